"""A shared tracking server with logins (``rnnflow tracking-server --auth``, MLflow's basic-auth
app) used by two users through the command lines, and a scoring server behind a bearer token."""

import contextlib
import os
import shutil
import subprocess
import sys

import httpx
import pytest
from mlflow import MlflowClient
from mlflow.server.auth.client import AuthServiceClient

from tests.prefect_server import ROOT
from tests.serving import free_port, rnnflow_served, until_ready

ADMIN_PASSWORD = "admin-pass-4-tests"
PASSWORDS = {"alice": "alice-pass-4-tests", "bob": "bob-pass-4-tests"}
MODEL = "auth-demo"
TINY = ["--length", "300", "--lookback", "12", "--horizon", "3", "--hidden-size", "4", "--epochs", "1",
        "--ensemble", "1", "--no-auto", "--device", "cpu", "--model-name", MODEL]
SCRIPT = str(ROOT / "flows" / "tracking-server.sh")
# The script's own PostgreSQL where it can run one (initdb as the postgres user needs root), else its SQLite store
POSTGRES = bool(shutil.which("initdb") and shutil.which("pg_ctl") and shutil.which("runuser") and os.geteuid() == 0)


def _as(base: str, user: str | None, password: str | None = None) -> dict:
    """The environment of a command typed by ``user`` (no login at all for None)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env["MLFLOW_TRACKING_URI"] = base
    if user:
        env |= {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password or PASSWORDS[user]}
    return env


def _run(env: dict, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], env=env, capture_output=True, text=True, timeout=timeout)


def _one_error_line(out: subprocess.CompletedProcess, *words: str) -> str:
    """The command failed with a last line ``error: ...`` holding ``words``, and no traceback."""
    assert out.returncode != 0, out.stdout[-2000:]
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(w in line for w in words), out.stderr[-2000:]
    return line


@contextlib.contextmanager
def _logged_in(user: str, password: str):
    """MLflow's Python clients in this process, logged in as ``user`` (they read the variables)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", user)
        mp.setenv("MLFLOW_TRACKING_PASSWORD", password)
        yield


@pytest.mark.parametrize("password, why", [
    (None, "is not set: export it with the admin's password"),
    ("password1234", "is MLflow's published default password: choose another"),
    ("short-one", "is shorter than the 12 characters MLflow requires"),
])
def test_the_script_refuses_an_admin_password_anyone_could_guess(password, why):
    env = {k: v for k, v in os.environ.items() if k != "RNNFLOW_ADMIN_PASSWORD"}
    env |= {"RNNFLOW_ADMIN_PASSWORD": password} if password is not None else {}
    out = subprocess.run([SCRIPT, "--auth", "--sqlite"], env=env, capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout, out.stderr) == (1, "", f"error: --auth: RNNFLOW_ADMIN_PASSWORD {why}\n")


@pytest.mark.parametrize("value", [None, "", "   "])
def test_serve_refuses_a_token_variable_that_is_unset_or_empty(value):
    env = {k: v for k, v in os.environ.items() if k != "RNNFLOW_TEST_TOKEN"}
    env |= {"RNNFLOW_TEST_TOKEN": value} if value is not None else {}
    out = _run(env, "flows.serve", MODEL, "--token-env", "RNNFLOW_TEST_TOKEN", timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == ("error: --token-env RNNFLOW_TEST_TOKEN: that environment variable is unset or "
                                  "empty; export it with the token clients must send")


# The tests on it are run by make journeys: a tracking server with logins, a training and a served model
# (about 2 minutes together).
@pytest.fixture(scope="module")
def server():
    """The script's server with logins, on free ports; the admin creates alice and bob."""
    port = free_port()
    env = {**os.environ, "MLFLOW_PORT": str(port), "PG_PORT": str(free_port()), "RNNFLOW_ADMIN_PASSWORD": ADMIN_PASSWORD}
    proc = subprocess.Popen([SCRIPT, "--auth", *([] if POSTGRES else ["--sqlite"])], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    with until_ready(proc, f"http://127.0.0.1:{port}", "/health", 180) as base:
        with _logged_in("admin", ADMIN_PASSWORD):
            for user, password in PASSWORDS.items():
                AuthServiceClient(base).create_user(user, password)
        yield base


@pytest.fixture(scope="module")
def trained(server):
    """alice trains and registers MODEL with the command line, and registers its files again as a second
    version (a challenger to promote, without a second training); the admin gives bob READ on the
    model. Returns the champion's version and the other's."""
    out = _run(_as(server, "alice"), "flows.timeseries", *TINY)
    assert out.returncode == 0 and f"registered models:/{MODEL}/1" in out.stdout, out.stderr[-3000:]
    with _logged_in("alice", PASSWORDS["alice"]):
        alice = MlflowClient(server, server)
        second = alice.create_model_version(MODEL, f"models:/{MODEL}/1", tags=alice.get_model_version(MODEL, "1").tags)
    with _logged_in("admin", ADMIN_PASSWORD):
        AuthServiceClient(server).grant_user_permission("bob", "registered_model", MODEL, "READ")
    assert _champion(server) == 1
    return 1, int(second.version)


def _champion(base: str) -> int:
    with _logged_in("admin", ADMIN_PASSWORD):
        return int(MlflowClient(base, base).get_model_version_by_alias(MODEL, "champion").version)


@pytest.mark.slow
@pytest.mark.journey
def test_a_reader_cannot_move_the_champion(server, trained):
    champion, other = trained
    bob = _as(server, "bob")
    listed = _run(bob, "flows.models", "list", timeout=120)  # READ is enough to see it
    assert listed.returncode == 0 and MODEL in listed.stdout, listed.stderr[-2000:]
    # --force: straight to moving the alias; without it the versions are scored first, on the
    # champion's run, which bob may not read either
    for command in (["promote", MODEL, str(other), "--force"], ["promote", MODEL, str(other)]):
        out = _run(bob, "flows.models", *command, timeout=120)
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
        _one_error_line(out, f"permission denied: user 'bob' may not promote model '{MODEL}'", "answered 403")
    assert _champion(server) == champion


@pytest.mark.slow
@pytest.mark.journey
def test_a_run_whose_registration_is_refused_is_one_line_and_keeps_the_model(server, trained):
    """bob trains into alice's model (his runs in an experiment of his own): the server refuses the new
    version, the run says so in one line and keeps the trained model for ``flows.models register``."""
    out = _run(_as(server, "bob"), "flows.timeseries", *TINY, "--experiment", "bob-runs")
    line = _one_error_line(out, f"permission denied: user 'bob' may not register model '{MODEL}'",
                           "model-versions/create", "flows.models register")
    assert os.path.isdir(line.split("the trained model is kept in ")[1].split(":")[0])
    with _logged_in("admin", ADMIN_PASSWORD):
        assert len(MlflowClient(server, server).search_model_versions(f"name='{MODEL}'")) == len(trained)


@pytest.mark.slow
@pytest.mark.journey
def test_a_wrong_password_or_no_login_is_one_line_before_any_work(server, trained):
    wrong = _as(server, "alice", "not-alices-password")
    for argv in (["flows.models", "list"], ["flows.timeseries", *TINY]):
        out = _run(wrong, *argv, timeout=120)
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
        _one_error_line(out, "the tracking server refused the login of user 'alice': wrong user name or password")
        assert "Flow run" not in out.stdout + out.stderr  # refused before the flow started
    out = _run(_as(server, None), "flows.models", "list", timeout=120)
    _one_error_line(out, "asks for a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")


@pytest.mark.slow
@pytest.mark.journey
def test_a_served_model_answers_only_the_bearer_of_the_token(server, trained):
    frame = {"dataframe_split": {"columns": ["value"], "data": [[i / 10] for i in range(30)]}}
    alice = _as(server, "alice")
    with rnnflow_served(MODEL, server, args=("--token-env", "RNNFLOW_TEST_TOKEN"),
                        env={**alice, "RNNFLOW_TEST_TOKEN": "s3cret-token"}) as base:
        for path in ("/ping", "/health"):  # open to load balancers
            assert httpx.get(base + path).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic s3cret-token"},
                        {"Authorization": "Bearer s3cret-token-and-more"}):
            r = httpx.post(base + "/invocations", json=frame, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (headers, r.text)
            assert "Authorization: Bearer" in r.json()["message"]
        assert httpx.get(base + "/version").status_code == 401
        for _ in range(4):  # whichever of the two workers answers
            r = httpx.post(base + "/invocations", json=frame, headers={"Authorization": "Bearer s3cret-token"})
            assert r.status_code == 200 and len(r.json()["predictions"]) == 3, r.text
    # READ on the model is not READ on the experiment that holds its files: bob cannot serve it
    out = _run({**_as(server, "bob"), "RNNFLOW_TEST_TOKEN": "x"}, "flows.serve", MODEL, "--token-env",
               "RNNFLOW_TEST_TOKEN", timeout=120)
    _one_error_line(out, f"permission denied: user 'bob' may not read model '{MODEL}'")

"""``rnnflow``, the console command, as a user types it (each a subprocess): help and version without
loading the heavy libraries, one-line mistakes with the closest match, a run from a folder outside
the clone that keeps its store and checkpoints there; and, in ``make journeys``, the wheel installed
in a fresh venv that trains, lists and serves."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.prefect_server import ROOT
from tests.serving import free_port, invoke, until_ready

RNNFLOW = Path(sys.executable).parent / "rnnflow"  # the console script `make install` puts beside python
TINY = ["--length", "300", "--lookback", "12", "--epochs", "1", "--batch-size", "16", "--hidden-size", "8",
        "--ensemble", "1", "--no-auto"]
HEAVY = ("torch", "prefect", "mlflow")


def rnnflow(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120,
            command: Path = RNNFLOW) -> subprocess.CompletedProcess:
    return subprocess.run([str(command), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def user_env(**extra: str) -> dict[str, str]:
    """The tests' environment without a tracking store or checkpoint folder chosen for the command:
    it picks its own, in the folder it runs from."""
    drop = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RNNFLOW_CHECKPOINTS", "RNNFLOW_DOWNLOADS")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PREFECT_LOGGING_LEVEL": "INFO", **extra}


@pytest.mark.parametrize("args", [["--version"], ["--help"]])
def test_version_and_help_load_none_of_torch_prefect_and_mlflow(args):
    out = subprocess.run([sys.executable, "-X", "importtime", str(RNNFLOW), *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = {line.rpartition("|")[2].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "flows.command" in imported
    assert not {m for m in imported if m.split(".")[0] in HEAVY}, sorted(m for m in imported if m.split(".")[0] in HEAVY)
    if args == ["--version"]:
        assert out.stdout == "rnnflow 0.1.0\n"
    else:
        for command in ("forecast", "charlm", "sweep", "models", "serve", "deploy", "server", "ui", "tracking-server"):
            assert f"\n  {command} " in out.stdout, command


def test_the_changelog_top_entry_is_the_version_the_command_reports():
    top = next(line for line in (ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("## "))
    assert top.startswith("## 0.1.0"), top
    assert rnnflow("--version").stdout.strip() == "rnnflow 0.1.0"


@pytest.mark.parametrize("argv, line", [
    ([str(RNNFLOW), "forecast", "--hiden-size", "3"],
     "rnnflow forecast: error: unrecognized option --hiden-size (did you mean --hidden-size?)"),
    ([sys.executable, "-m", "flows.timeseries", "--hiden-size", "3"],
     "python -m flows.timeseries: error: unrecognized option --hiden-size (did you mean --hidden-size?)"),
    ([str(RNNFLOW), "forcast"], "rnnflow: error: argument COMMAND: invalid choice: 'forcast' (did you mean forecast?)"),
    ([str(RNNFLOW), "--verison"], "rnnflow: error: unrecognized option --verison (did you mean --version?)"),
    ([str(RNNFLOW), "server", "strat"], "rnnflow server: error: argument command: invalid choice: 'strat' (did you mean start?)"),
    ([str(RNNFLOW), "worker"], "rnnflow worker: error: the following arguments are required: --pool"),
    ([str(RNNFLOW), "serve", "m", "--wokers", "2"],
     "rnnflow serve: error: unrecognized option --wokers (did you mean --workers?)"),
])
def test_a_mistyped_option_or_command_is_one_line_with_the_closest_match_and_exit_2(argv, line):
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120, env=user_env())
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.splitlines() == [line]
    assert out.stdout == ""


def parse(parser, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_the_parser_names_the_subcommand_and_the_closest_choice_or_all_of_them(capsys):
    from flows.parsing import COMMANDS, Parser

    p = Parser(prog="python -m flows.models")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    sub.add_parser("promote").add_argument("--force", action="store_true")
    p.add_argument("--cell", choices=("rnn", "lstm", "gru"))
    assert parse(p, ["promote", "--forse"], capsys) == \
        "python -m flows.models promote: error: unrecognized option --forse (did you mean --force?)\n"
    assert parse(p, ["lsit"], capsys).endswith("invalid choice: 'lsit' (did you mean list?)\n")
    assert parse(p, ["--cell", "tcn", "list"], capsys).endswith("invalid choice: 'tcn' (choose from rnn, lstm, gru)\n")
    assert parse(p, ["list", "--zzz", "--forse=1"], capsys) == \
        "python -m flows.models list: error: unrecognized options --zzz, --forse\n"  # list has no --force
    assert parse(p, ["list", "stray"], capsys) == "python -m flows.models list: error: unrecognized argument 'stray'\n"
    COMMANDS["flows.models"] = "rnnflow models"  # as flows.command sets it when rnnflow runs the module
    try:
        assert Parser(prog="python -m flows.models").prog == "rnnflow models"
    finally:
        COMMANDS.clear()


def test_the_ui_refuses_a_tracking_server_in_one_line(tmp_path):
    out = rnnflow("ui", cwd=tmp_path, env=user_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9"))
    assert out.returncode == 1
    assert out.stderr.splitlines() == ["error: MLFLOW_TRACKING_URI http://127.0.0.1:9 is a tracking server: open it in "
                                       "a browser, it is its own UI"]


@pytest.mark.slow
def test_forecast_from_another_folder_keeps_its_store_and_checkpoints_there_and_models_lists_it(tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = user_env()
    out = rnnflow("forecast", *TINY, "--model-name", "console-sine", cwd=work, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "registered models:/console-sine/1" in out.stdout
    assert (work / "mlruns" / "mlflow.db").is_file() and any((work / "mlruns" / "artifacts").rglob("MLmodel"))
    assert (work / "checkpoints").is_dir() and not any((work / "checkpoints").iterdir())  # kept until registered
    assert not (ROOT / "elsewhere").exists()
    listed = rnnflow("models", "list", cwd=work, env=env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    row = next(line.split() for line in listed.stdout.splitlines() if line.startswith("console-sine "))
    assert row[:4] == ["console-sine", "1", "champion", "forecaster"]


def get_json(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, json.loads(r.read() or b"{}")


@pytest.mark.journey
@pytest.mark.skipif(not (shutil.which("initdb") and shutil.which("runuser") and os.geteuid() == 0),
                    reason="needs PostgreSQL's initdb/pg_ctl and root (to run them as the postgres user)")
def test_tracking_server_runs_from_any_folder_and_stops_whole_on_sigterm(tmp_path):
    """`rnnflow tracking-server` runs the packaged script from a folder outside the clone; SIGTERM to
    rnnflow alone (as `kill` or a supervisor sends it) stops MLflow and PostgreSQL and removes its
    temporary folder."""
    port, pg_port = free_port(), free_port()
    shims = set(Path(tempfile.gettempdir()).glob("rnnflow-tracking-server-*"))
    proc = subprocess.Popen([str(RNNFLOW), "tracking-server"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=user_env(MLFLOW_PORT=str(port), PG_PORT=str(pg_port)))
    try:
        deadline = time.monotonic() + 180
        while not answers(f"http://127.0.0.1:{port}/health"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
            time.sleep(0.5)
        status, body = get_json(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5")
        assert status == 200 and body["experiments"][0]["name"] == "Default"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    for p in (port, pg_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", p)) != 0, f"port {p} still answers"
    assert set(Path(tempfile.gettempdir()).glob("rnnflow-tracking-server-*")) == shims


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.journey
@pytest.mark.timeout(2400)  # the install alone: about 2 minutes on a quiet machine, over 10 on a busy one
def test_the_wheel_installs_in_a_fresh_venv_and_its_command_trains_lists_and_serves(tmp_path):
    """What a new user does: build the wheel, install it in a venv of its own outside the clone (the
    dependencies from the package index pip is configured with), then from an empty folder train,
    list, serve and browse with `rnnflow` alone."""
    src, dist, venv, work = tmp_path / "src", tmp_path / "dist", tmp_path / "venv", tmp_path / "work"
    # the clone's files as on disk, without its build/ (setuptools would reuse what is left there)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(dist)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("rnnflow-0.1.0-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("flows/command.py", "flows/tracking-server.sh", "tasks/pyfunc/forecaster.py",
                   "tasks/pyfunc/charlm.py", "rnn_models/csrc/grouped_lstm.cpp", "rnn_models/csrc/grouped_forecast.cpp",
                   "tasks/corpora/timemachine.txt", "rnnflow-0.1.0.dist-info/licenses/LICENSE"):
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "data/", "scripts/", "benchmarks/")) for n in names)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        installed = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], capture_output=True,
                                   text=True, timeout=900)
        assert installed.returncode == 0, installed.stderr[-3000:]
        user_journey(venv / "bin" / "rnnflow", work)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # about 2 GB


def user_journey(command: Path, work: Path) -> None:
    work.mkdir()
    ours = str(Path(sys.executable).parent)  # nothing of the clone's venv on PATH: the new one alone
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != ours)
    env = user_env(PATH=path, PREFECT_HOME=str(work.parent / "prefect-home"),
                   PREFECT_SERVER_API_PORT=str(free_port()))
    env.pop("PYTHONPATH", None)
    try:
        out = rnnflow("forecast", *TINY, "--model-name", "wheel-sine", cwd=work, env=env, timeout=600, command=command)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "registered models:/wheel-sine/1" in out.stdout and (work / "mlruns" / "mlflow.db").is_file()
        listed = rnnflow("models", "list", cwd=work, env=env, command=command)
        assert listed.returncode == 0 and any(line.split()[:3] == ["wheel-sine", "1", "champion"]
                                              for line in listed.stdout.splitlines()), listed.stdout + listed.stderr
        port = free_port()
        proc = subprocess.Popen([str(command), "serve", "wheel-sine", "--port", str(port), "--workers", "1"], cwd=work,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        with until_ready(proc, f"http://127.0.0.1:{port}", "/ping", 180) as base:
            history = np.sin(2 * np.pi * np.arange(48) / 40).round(4).tolist()
            status, body = invoke(base, {"dataframe_split": {"columns": ["value"], "data": [[v] for v in history]}})
            assert status == 200, body
            (row,) = body["predictions"]
            assert row["step"] == 1 and np.isfinite(row["forecast"])
        # the MLflow UI opens on that folder's store
        port = free_port()
        proc = subprocess.Popen([str(command), "ui", "--port", str(port)], cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        with until_ready(proc, f"http://127.0.0.1:{port}", "/health", 180) as base:
            status, body = get_json(f"{base}/ajax-api/2.0/mlflow/registered-models/search")
            assert status == 200 and [m["name"] for m in body["registered_models"]] == ["wheel-sine"]
    finally:
        rnnflow("server", "stop", cwd=work, env=env, command=command)

"""SIGTERM and Ctrl-C stop the deployments' process (`python -m flows.deploy`, `make deploy`)
within seconds, whether or not its Prefect server still answers: systemd, Docker and Kubernetes
send SIGTERM and kill 10-30 s later, and a server stopped first (`docker compose stop`, a reboot)
must not keep the process retrying it. A flow run it was executing is stopped with it; what the
process cannot tell a dead server, the heartbeat automation does once the server is back."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
from pathlib import Path

import psutil
import pytest

from tests.prefect_server import BIN, _healthy, _start, _stop, _wait_for, api, flow_runs, served_deployments
from tests.serving import free_port

pytestmark = [pytest.mark.slow, pytest.mark.journey]  # make journeys: about 2 minutes

TINY = {"length": 600, "lookback": 12, "hidden_size": 16, "epochs": 3, "batch_size": 16, "patience": 0,
        "device": "cpu"}
DEADLINE = 10.0  # seconds from the signal to the exit: systemd/Docker/Kubernetes kill 10-30 s after SIGTERM


@pytest.fixture
def store(tmp_path, fresh_store):
    return fresh_store(tmp_path / "mlruns" / "mlflow.db")  # made before the runs that would race to make it


def server_env(tmp: Path, mlflow_uri: str) -> dict:
    """What tests.prefect_server.prefect_server sets, with the port chosen here, so that the
    server can be stopped and started again on the same port and PREFECT_HOME."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore", "MLFLOW_TRACKING_URI": mlflow_uri,
           "RNNFLOW_DOWNLOADS": str(tmp / "downloads"), "RNNFLOW_CHECKPOINTS": str(tmp / "checkpoints"),
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    env.pop("PREFECT_PROFILES_PATH", None)
    return env


def start_server(env: dict, tmp: Path, timeout: float = 120.0) -> subprocess.Popen:
    port = int(env["PREFECT_API_URL"].rsplit(":", 1)[1].split("/")[0])
    log = tmp / f"server-{time.monotonic_ns()}.log"
    proc = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    try:
        _wait_for(lambda: _healthy(port), proc, log, "prefect server did not start", timeout)
    except BaseException:
        _stop(proc)
        raise
    return proc


@contextlib.contextmanager
def server(env: dict, tmp: Path):
    """A `prefect server start` for ``env``; yields a callable that stops it (as `docker compose
    stop` or a crash would: SIGTERM to its process group, waited for), stopped at the end anyway."""
    proc = start_server(env, tmp)
    try:
        yield lambda: _stop(proc)
    finally:
        _stop(proc)


def serve_log(tmp: Path) -> Path:
    return max(tmp.glob("serve-*.log"), key=lambda p: p.stat().st_mtime)


def running_still(p: psutil.Process) -> bool:
    """Not ended (a zombie has: its parent or, orphaned, init has yet to reap it)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_with(proc: subprocess.Popen, sig: int, tmp: Path, group: bool = False) -> tuple[float, int, str]:
    """Send ``sig`` to the deployments' process (or its process group, as a terminal's Ctrl-C
    does); returns the seconds it took to exit (its processes all gone), its exit status and
    what it printed after the signal."""
    log = serve_log(tmp)
    before = len(log.read_bytes())
    family = psutil.Process(proc.pid).children(recursive=True)
    t0 = time.monotonic()
    (os.killpg if group else os.kill)(proc.pid, sig)
    try:
        status = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        status = None
    exited = time.monotonic() - t0
    while (alive := [p for p in family if running_still(p)]) and time.monotonic() < t0 + 60:
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    after = log.read_bytes()[before:].decode(errors="replace")
    assert status is not None, f"still running 60 s after the signal: {after[-3000:]}"
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    print(f"signal {sig}: exited {status} after {exited:.1f} s, its processes all gone after {elapsed:.1f} s; "
          f"printed: {after.strip()[-300:]!r}")
    return elapsed, status, after


def running(env: dict) -> list[dict]:
    return [r for r in flow_runs(env, "nightly-retrain") if r["state_type"] not in ("SCHEDULED", "PENDING")]


def start_a_run(env: dict, tmp: Path, proc: subprocess.Popen) -> dict:
    """Start a run of the deployment; returns it once it trains (a checkpoint written)."""
    (deployment,) = api(env, "POST", "/deployments/filter", {})
    deadline = time.monotonic() + 120
    while True:  # a server that has just started answers 503 while its SQLite database is busy: ask again
        try:
            api(env, "POST", f"/deployments/{deployment['id']}/create_flow_run", {})
            break
        except urllib.error.HTTPError as e:
            assert e.code == 503 and time.monotonic() < deadline, e
            time.sleep(1)
    while not list((tmp / "checkpoints").rglob("checkpoint.safetensors")):
        assert time.monotonic() < deadline and proc.poll() is None, serve_log(tmp).read_text()[-3000:]
        time.sleep(0.5)
    (run,) = running(env)
    assert run["state_type"] == "RUNNING", run["state"]
    return run


LONG = json.dumps({**TINY, "epochs": 5000, "length": 2000})  # trains until stopped


def test_sigterm_with_the_server_up_stops_within_seconds_its_run_crashed_and_the_deployments_paused(tmp_path, store):
    env = server_env(tmp_path, store)
    with server(env, tmp_path), \
            served_deployments(env, tmp_path, "--only", "timeseries", "--timeseries-params", LONG) as proc:
        start_a_run(env, tmp_path, proc)
        elapsed, status, out = stop_with(proc, signal.SIGTERM, tmp_path)
        assert elapsed < DEADLINE and status in (0, 143), out
        assert "Traceback" not in out
        assert "stopped: SIGTERM; 1 deployment paused; 1 flow run stopped (Crashed)" in out
        (run,) = running(env)
        assert run["state_type"] == "CRASHED", run["state"]  # at once, not after the heartbeat automation's wait
        (deployment,) = api(env, "POST", "/deployments/filter", {})
        assert deployment["paused"], deployment  # its schedule does not pile up runs while nothing serves it
    assert list((tmp_path / "checkpoints").rglob("checkpoint.safetensors"))  # the next run resumes from it


def test_sigterm_with_the_server_gone_stops_the_process_and_its_run_which_ends_crashed(tmp_path, store):
    """The server stopped first, then SIGTERM to the process alone (as Docker or Kubernetes send
    it) while it trains a deployment run: the process and the run's own process are gone within
    seconds, the checkpoint is kept, and once the server is back the heartbeat automation marks
    the run Crashed."""
    env = {**server_env(tmp_path, store), "RNNFLOW_ZOMBIE_SECONDS": "30"}
    with server(env, tmp_path) as stop_server, \
            served_deployments(env, tmp_path, "--only", "timeseries", "--timeseries-params", LONG) as proc:
        start_a_run(env, tmp_path, proc)
        stop_server()
        elapsed, status, out = stop_with(proc, signal.SIGTERM, tmp_path)
        assert elapsed < DEADLINE and status in (0, 143), out
        assert "Traceback" not in out
        assert "stopped: SIGTERM; the Prefect server did not answer (connection refused)" in out
    assert list((tmp_path / "checkpoints").rglob("checkpoint.safetensors"))  # the next run resumes from it

    with server(env, tmp_path):
        deadline = time.monotonic() + 150
        while (run := running(env)[0])["state_type"] == "RUNNING":
            assert time.monotonic() < deadline, run["state"]
            time.sleep(2)
        assert run["state_type"] == "CRASHED", run["state"]
        assert "no heartbeat" in run["state"]["message"]


@pytest.mark.parametrize(("sig", "group"), [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_with_the_server_gone_and_no_run_stops_within_seconds(tmp_path, store, sig, group):
    """Ctrl-C reaches the process group, as from a terminal. Before the fix SIGTERM here
    retried the dead server for over a minute after "Pausing all deployments..."."""
    env = server_env(tmp_path, store)
    with server(env, tmp_path) as stop_server, \
            served_deployments(env, tmp_path, "--only", "timeseries", "--timeseries-params", json.dumps(TINY)) as proc:
        stop_server()
        elapsed, status, out = stop_with(proc, sig, tmp_path, group=group)
        assert elapsed < DEADLINE and status in (0, 130, 143), out
        assert "Traceback" not in out
        assert out.strip().splitlines()[-1].startswith("stopped: "), out

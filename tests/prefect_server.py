"""A real ``prefect server start`` on a free 127.0.0.1 port with its own PREFECT_HOME, and the
rnnflow deployments served against it. Every process is stopped when the block ends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.serving import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # SIGTERM: serve pauses its deployments on the way out
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for(ready, proc: subprocess.Popen, log: Path, failure: str, timeout: float) -> None:
    """Poll ``ready()`` until it holds; fail with the log's tail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{failure}: {log.read_text()[-3000:]}")
        time.sleep(0.5)


def _healthy(port: int) -> bool:
    with contextlib.suppress(OSError):
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1).status == 200
    return False


@contextlib.contextmanager
def prefect_server(tmp: Path, mlflow_uri: str, timeout: float = 120.0):
    """Yields the environment (dict) that points Prefect clients at a fresh local server."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore", "MLFLOW_TRACKING_URI": mlflow_uri,
           "RNNFLOW_DOWNLOADS": str(tmp / "downloads"), "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    env.pop("PREFECT_PROFILES_PATH", None)
    server = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                    tmp / "server.log")
    try:
        _wait_for(lambda: _healthy(port), server, tmp / "server.log", "prefect server did not start", timeout)
        yield env
    finally:
        _stop(server)


@contextlib.contextmanager
def served_deployments(env: dict, tmp: Path, *deploy_args: str, timeout: float = 120.0):
    """Runs ``python -m flows.deploy ARGS`` until its deployments are registered; yields the process."""
    log = tmp / f"serve-{time.monotonic_ns()}.log"
    proc = _start([sys.executable, "-m", "flows.deploy", *deploy_args], env, log)
    try:
        _wait_for(lambda: bool(api(env, "POST", "/deployments/filter", {})), proc, log,
                  "flows.deploy did not register its deployments", timeout)
        yield proc
    finally:
        _stop(proc)


def api(env: dict, method: str, path: str, body: dict | None = None):
    req = urllib.request.Request(env["PREFECT_API_URL"] + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def flow_runs(env: dict, deployment: str) -> list[dict]:
    runs = api(env, "POST", "/flow_runs/filter", {"deployments": {"name": {"any_": [deployment]}}})
    return sorted(runs, key=lambda r: r["created"])


def prefect_cli(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)

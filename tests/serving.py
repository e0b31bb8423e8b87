"""Start ``mlflow models serve`` for a registered model on a free 127.0.0.1 port (used by the
serving tests and the latency benchmark)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(model_uri: str, tracking_uri: str, timeout: float = 120.0):
    """Yields the base URL of a scoring server for ``model_uri``; stops it however the body ends."""
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow execs uvicorn from the venv's bin
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": tracking_uri,
           "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    yield from _until_ready(proc, f"http://127.0.0.1:{port}", "/ping", timeout)


@contextlib.contextmanager
def rnnflow_served(name: str, tracking_uri: str, workers: int = 2, timeout: float = 120.0, args: tuple = (),
                   env: dict | None = None):
    """``python -m flows.serve NAME [args]`` (what ``make serve-model`` runs) on a free port, with ``env``
    added to the environment; yields its URL."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
           **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "flows.serve", name, "--port", str(port), "--workers", str(workers),
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    yield from _until_ready(proc, f"http://127.0.0.1:{port}", "/ping", timeout)


def post(base: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    """POST raw ``body`` to /invocations; returns (HTTP status, decoded JSON body or {"raw": text})."""
    req = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw or b"{}")
    except ValueError:
        return status, {"raw": raw.decode(errors="replace")}


def _until_ready(proc: subprocess.Popen, base: str, probe: str, timeout: float):
    """Wait for ``base + probe`` to answer 200, yield ``base``, then stop the process group."""
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[3:5]} exited {proc.returncode}: {proc.stdout.read().decode()[-3000:]}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(base + probe, timeout=1).status == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from {base}{probe} within {timeout} s")
            time.sleep(0.3)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def invoke(base: str, payload: dict) -> tuple[int, dict]:
    """POST ``payload`` to /invocations; returns (HTTP status, decoded JSON body)."""
    req = urllib.request.Request(f"{base}/invocations", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@contextlib.contextmanager
def tracking_ui(tracking_uri: str, artifacts_root: str, timeout: float = 120.0, port: int = 0):
    """A lean ``mlflow server`` (one worker, background jobs off) on ``port`` (default: a free
    one); yields its URL."""
    port = port or free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
         "--default-artifact-root", artifacts_root, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    yield from _until_ready(proc, f"http://127.0.0.1:{port}", "/health", timeout)


until_ready = contextlib.contextmanager(_until_ready)


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def chrome(profile: Path):
    """A headless Chromium driven by selenium, with a fresh profile and none of the background
    connections that this closed network refuses."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)

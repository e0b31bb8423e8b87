"""Shared fixtures: Prefect's test harness (a real temporary API) and a fresh MLflow SQLite
store per test."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

try:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness
except ImportError:  # a GPU box with PyTorch alone: its pure-PyTorch tests (tests/test_cuda.py) still run
    prefect_test_harness = None

# The models under test are tiny: one thread is faster for them than two, and it keeps the
# suite from fighting the Prefect test server for the CPU on a 2-core CI machine.
torch.set_num_threads(1)

SHARED_DATA = Path(os.environ.get("RNNFLOW_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def prefect_test_fixture(tmp_path_factory):
    if prefect_test_harness is None:
        yield
        return
    # a private result store, or cache records leak between test sessions
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("prefect-results")}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(autouse=True, scope="session")
def local_prefect_server(tmp_path_factory):
    """Command lines run in subprocesses share one local Prefect server (``flows.server``): for
    the tests, a private one (its own home and port, not the user's 4200), stopped at the end."""
    from tests.serving import free_port

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ["PREFECT_SERVER_API_PORT"] = str(free_port())
    os.environ.setdefault("RNNFLOW_CHECKPOINTS", str(tmp_path_factory.mktemp("checkpoints")))
    yield
    subprocess.run([sys.executable, "-m", "flows.server", "stop"], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with no runs, its tables made by MLflow once per session: a new store
    runs MLflow's schema migrations, about 6 s on 2 cores, and the tests' fresh stores are copies."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}", f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def fresh_store(empty_store):
    """fresh_store(path) -> the URI of a new, empty SQLite store at path (a copy of empty_store)."""
    def make(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(empty_store, path)
        return f"sqlite:///{path}"
    return make


@pytest.fixture
def store_uri(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI for a store that does not exist yet (for the tests that check a mistake
    creates none); the in-process MLflow URIs point there too. Returns the URI."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # tasks.registry.client() sets MLflow's process-wide URIs, which win over the variable:
    # point them here too, or an earlier test's store answers this test's in-process calls
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    monkeypatch.setenv("RNNFLOW_DOWNLOADS", str(tmp_path / "downloads"))
    monkeypatch.setenv("RNNFLOW_CHECKPOINTS", str(tmp_path / "checkpoints"))
    return uri


@pytest.fixture
def mlflow_store(store_uri, fresh_store):
    """A fresh SQLite tracking store and registry in a temp dir, MLFLOW_TRACKING_URI pointing at it;
    returns its URI."""
    return fresh_store(Path(store_uri.removeprefix("sqlite:///")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared corpora not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving ``tmp_path / 'www'``; yields (dir, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()

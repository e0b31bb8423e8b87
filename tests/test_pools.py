"""``make deploy POOL=NAME`` and ``make worker POOL=NAME``: deployments registered to a Prefect
process work pool, run by a worker in another process with its own working folder and temp folder
that shares nothing with the deploying process but the Prefect server and an MLflow tracking
server (artifacts uploaded through it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.prefect_server import BIN, ROOT, _stop, api, prefect_cli, prefect_server
from tests.serving import free_port, until_ready

pytestmark = [pytest.mark.slow, pytest.mark.journey]  # make journeys: two servers, a worker and two trainings

TINY = {"length": 600, "lookback": 12, "hidden_size": 16, "epochs": 3, "batch_size": 16, "patience": 0,
        "device": "cpu", "model_name": "pooled"}
DEPLOYMENT = "timeseries-forecasting/nightly-retrain"


def test_a_worker_elsewhere_runs_the_pool_deployment_and_the_champion_gate_holds(tmp_path, monkeypatch):
    port = free_port()
    mlflow_proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
                                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    with until_ready(mlflow_proc, f"http://127.0.0.1:{port}", "/health", 120) as tracking, \
            prefect_server(tmp_path, tracking) as env:
        deploy = subprocess.run([sys.executable, "-m", "flows.deploy", "--pool", "far-away", "--only", "timeseries",
                                 "--timeseries-params", json.dumps(TINY)], env=env, cwd=ROOT, capture_output=True,
                                text=True, timeout=180)
        assert deploy.returncode == 0, deploy.stderr[-3000:]
        assert f"registered {DEPLOYMENT} to work pool 'far-away'" in deploy.stdout
        stored = api(env, "GET", f"/deployments/name/{DEPLOYMENT}")
        assert stored["entrypoint"] == "flows.timeseries.timeseries_flow" and stored["path"] is None
        assert stored["job_variables"] == {"working_dir": "."} and stored["work_pool_name"] == "far-away"
        assert str(ROOT) not in json.dumps(stored) and str(tmp_path) not in json.dumps(stored)

        home, tmp = tmp_path / "worker-home", tmp_path / "worker-tmp"  # the other machine's folders
        home.mkdir(), tmp.mkdir()
        worker_env = {k: v for k, v in env.items() if not k.startswith("RNNFLOW_")}
        worker_env.update(TMPDIR=str(tmp), PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30")
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "far-away", "--type", "process"],
                                  env=worker_env, cwd=home, stdout=open(tmp_path / "worker.log", "wb"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out = prefect_cli(env, "deployment", "run", DEPLOYMENT, "--watch", timeout=420)
            assert out.returncode == 0, out.stdout[-2000:] + (tmp_path / "worker.log").read_text()[-3000:]
        finally:
            _stop(worker)
        c = MlflowClient(tracking, tracking)
        (version,) = c.search_model_versions("name='pooled'")
        assert c.get_run(version.run_id).info.artifact_uri.startswith("mlflow-artifacts:")  # through the server

        # a run on the serving machine, worse by construction, meets the champion the worker registered
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
        from flows.timeseries import timeseries_flow

        result = timeseries_flow(**{**TINY, "epochs": 1, "lr": 1e-6})
        assert not result["promoted"] and f"kept champion v{version.version}" in result["reason"]
        assert str(c.get_model_version_by_alias("pooled", "champion").version) == str(version.version)

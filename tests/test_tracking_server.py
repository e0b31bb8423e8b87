"""Everything unchanged against a shared MLflow tracking server on PostgreSQL."""

import os
import shutil
import subprocess

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from flows.timeseries import timeseries_flow
from tests.prefect_server import ROOT
from tests.serving import free_port, until_ready

pytestmark = pytest.mark.skipif(
    not (shutil.which("initdb") and shutil.which("pg_ctl") and shutil.which("runuser") and os.geteuid() == 0),
    reason="needs PostgreSQL's initdb/pg_ctl and root (to run them as the postgres user)")


def test_flow_registers_and_loads_through_a_postgres_tracking_server(monkeypatch, tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_PORT": str(port), "PG_PORT": str(free_port())}
    proc = subprocess.Popen([str(ROOT / "flows" / "tracking-server.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    with until_ready(proc, f"http://127.0.0.1:{port}", "/health", 120) as base:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
        result = timeseries_flow(length=600, lookback=12, hidden_size=16, epochs=3, device="cpu", model_name="shared")
        assert result["promoted"]
        c = MlflowClient(base, base)
        assert str(c.get_model_version_by_alias("shared", "champion").version) == "1"
        assert c.get_run(result["run_id"]).info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
        model = mlflow.pyfunc.load_model("models:/shared@champion")
        out = model.predict(pd.DataFrame({"value": np.sin(2 * np.pi * np.arange(30) / 40)}))
        assert len(out) == 1 and np.isfinite(out["forecast"]).all()

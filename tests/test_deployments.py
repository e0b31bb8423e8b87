"""Deployments on a real Prefect server: triggered runs, interval schedules, concurrent runs."""

import json
import time

import pytest
from mlflow import MlflowClient

from tests.prefect_server import flow_runs, prefect_cli, prefect_server, served_deployments

TINY = {"length": 600, "lookback": 12, "hidden_size": 16, "epochs": 3, "batch_size": 16, "patience": 0,
        "device": "cpu"}
DEPLOYMENT = "timeseries-forecasting/nightly-retrain"


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    MlflowClient(uri, uri).search_experiments()  # create the store once, before runs race to
    return uri


def test_deployment_run_with_one_param_registers_a_version(tmp_path, store):
    with prefect_server(tmp_path, store) as env, \
            served_deployments(env, tmp_path, "--only", "timeseries", "--timeseries-params", json.dumps(TINY)):
        out = prefect_cli(env, "deployment", "run", DEPLOYMENT, "--param", "epochs=2", "--watch")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "Completed" in out.stdout + out.stderr
        bad = prefect_cli(env, "deployment", "run", DEPLOYMENT, "--param", "horizon=0", "--watch")
        assert bad.returncode == 1  # a failed run shows as Failed ...
        runs = [r for r in flow_runs(env, "nightly-retrain") if r["state_type"] != "SCHEDULED"]  # cron's future runs
        assert [r["state_type"] for r in runs] == ["COMPLETED", "FAILED"]
        assert "--horizon must be at least 1" in runs[1]["state"]["message"]
    c = MlflowClient(store, store)
    (version,) = c.search_model_versions("name='sine-forecaster'")  # ... and registers nothing
    params = c.get_run(version.run_id).data.params
    assert params["epochs"] == "2" and params["hidden_size"] == "16"  # the param over the deployment's defaults
    assert str(c.get_model_version_by_alias("sine-forecaster", "champion").version) == "1"


def test_interval_schedule_runs_by_itself(tmp_path, store):
    with prefect_server(tmp_path, store) as env:
        with served_deployments(env, tmp_path, "--only", "timeseries", "--interval", "8", "--limit", "1",
                                "--timeseries-params", json.dumps({**TINY, "epochs": 1})):
            deadline = time.monotonic() + 240
            while sum(r["state_type"] == "COMPLETED" for r in flow_runs(env, "nightly-retrain")) < 2:
                assert time.monotonic() < deadline, flow_runs(env, "nightly-retrain")
                time.sleep(2)
        # nothing left scheduled behind us
        assert prefect_cli(env, "deployment", "delete", DEPLOYMENT).returncode == 0
    versions = MlflowClient(store, store).search_model_versions("name='sine-forecaster'")
    assert len(versions) >= 2


def test_two_runs_at_once_leave_the_better_champion(tmp_path, store):
    with prefect_server(tmp_path, store) as env, \
            served_deployments(env, tmp_path, "--only", "timeseries", "--timeseries-params", json.dumps(TINY)):
        import subprocess

        from tests.prefect_server import BIN, ROOT

        runs = [subprocess.Popen([str(BIN / "prefect"), "deployment", "run", DEPLOYMENT, *params, "--watch"],
                                 env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                for params in (["--param", "epochs=1", "--param", "lr=0.00001"], ["--param", "epochs=8"])]
        for p in runs:
            out = p.communicate(timeout=300)[0].decode()
            assert p.returncode == 0, out
    c = MlflowClient(store, store)
    versions = c.search_model_versions("name='sine-forecaster'")
    assert len(versions) == 2
    best = min(versions, key=lambda v: float(v.tags["test_mase"]))
    assert str(c.get_model_version_by_alias("sine-forecaster", "champion").version) == str(best.version)

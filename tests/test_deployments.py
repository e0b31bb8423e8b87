"""Deployments on a real Prefect server: triggered runs, interval schedules, concurrent runs."""

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.prefect_server import flow_runs, prefect_cli, prefect_server, served_deployments

TINY = {"length": 600, "lookback": 12, "hidden_size": 16, "epochs": 3, "batch_size": 16, "patience": 0,
        "device": "cpu"}
DEPLOYMENT = "timeseries-forecasting/nightly-retrain"
STORES = ["source=file", f"data={Path(__file__).resolve().parents[1] / 'data' / 'stores.csv'}", "id_column=store",
          "value_column=sales", "future_covariate_columns=promo,price", "static_columns=store_type,size",
          "holidays=US", "horizon=7", "auto=false", "window_norm=last", "ensemble=1", "model_name=stores"]


@pytest.fixture
def store(tmp_path, fresh_store):
    return fresh_store(tmp_path / "mlruns" / "mlflow.db")  # made before the runs that would race to make it


@pytest.mark.journey  # a Prefect server and served deployments of its own (about a minute)
def test_deployment_run_with_one_param_registers_a_version(tmp_path, store):
    with prefect_server(tmp_path, store) as env, \
            served_deployments(env, tmp_path, "--only", "timeseries", "--timeseries-params", json.dumps(TINY)):
        out = prefect_cli(env, "deployment", "run", DEPLOYMENT, "--param", "epochs=2", "--param", "intervals=0.8",
                          "--watch")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "Completed" in out.stdout + out.stderr
        bad = prefect_cli(env, "deployment", "run", DEPLOYMENT, "--param", "horizon=0", "--watch")
        assert bad.returncode == 1  # a failed run shows as Failed ...
        # a model name is checked before anything is trained or written: whoever may start a run cannot
        # make the serving process write outside its folders
        escape = prefect_cli(env, "deployment", "run", DEPLOYMENT, "--param", f"model_name=../../{tmp_path.name}-x",
                             "--watch")
        assert escape.returncode == 1
        # a global model with inputs known ahead, each option a --param of its own
        stores = prefect_cli(env, "deployment", "run", DEPLOYMENT, *[a for p in STORES for a in ("--param", p)],
                             "--watch")
        assert stores.returncode == 0, stores.stdout + stores.stderr
        runs = [r for r in flow_runs(env, "nightly-retrain") if r["state_type"] != "SCHEDULED"]  # cron's future runs
        assert [r["state_type"] for r in runs] == ["COMPLETED", "FAILED", "FAILED", "COMPLETED"]
        assert "--horizon must be at least 1" in runs[1]["state"]["message"]
        assert "--model-name: '../../" in runs[2]["state"]["message"]
        assert "cannot contain '/' or ':'" in runs[2]["state"]["message"]
        assert not list(tmp_path.parent.parent.glob(f"{tmp_path.name}-x*"))
    c = MlflowClient(store, store)
    (version,) = c.search_model_versions("name='sine-forecaster'")  # ... and registers nothing
    run = c.get_run(version.run_id)
    params = run.data.params
    assert params["epochs"] == "2" and params["hidden_size"] == "16"  # the param over the deployment's defaults
    assert params["intervals"] == "0.8" and 0 <= run.data.metrics["test_coverage_0.8"] <= 1
    assert str(c.get_model_version_by_alias("sine-forecaster", "champion").version) == "1"
    stores = c.get_run(c.get_model_version("stores", "1").run_id).data.params
    assert stores["static_columns"] == "store_type,size" and stores["future_covariate_columns"] == "promo,price"
    assert stores["holidays"] == "US" and stores["id_column"] == "store"


@pytest.mark.journey  # a Prefect server and served deployments of its own (about a minute)
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


@pytest.mark.journey  # a Prefect server and served deployments of its own (about a minute)
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


def ran(env: dict) -> dict:
    """The first flow run of the char-LM deployment that was not just scheduled (the cron's next
    run is there too)."""
    return [r for r in flow_runs(env, "weekly-retrain") if r["state_type"] != "SCHEDULED"][0]


@pytest.mark.journey  # a Prefect server and served deployments of its own (about a minute)
def test_a_run_whose_serving_process_dies_ends_crashed_and_the_next_run_resumes(tmp_path, store, shared_data):
    """`make deploy` stopped while a scheduled run trains: its flow run stops beating and the
    server's automation marks it Crashed (not Running for ever); once the deployments are served
    again, the next run of that deployment resumes from the checkpoint the dead one left."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((shared_data / "timemachine.txt").read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    params = {"data": str(corpus), "hidden_size": 32, "embedding_dim": 16, "num_steps": 20, "epochs": 30,
              "sample_every": 0, "sample_chars": 20, "patience": 0, "device": "cpu"}
    checkpoints = tmp_path / "checkpoints"
    with prefect_server(tmp_path, store) as env:
        env = {**env, "RNNFLOW_CHECKPOINTS": str(checkpoints), "RNNFLOW_ZOMBIE_SECONDS": "40",
               "PREFECT_LOGGING_LEVEL": "INFO"}  # the "resuming" line is an INFO log (make test sets WARNING)
        args = ("--only", "charlm", "--charlm-params", json.dumps(params))
        with served_deployments(env, tmp_path, *args) as proc:
            assert prefect_cli(env, "deployment", "run", "charlm-training/weekly-retrain").returncode == 0
            deadline = time.monotonic() + 120
            while not list(checkpoints.glob("*/checkpoint.safetensors")):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.5)
            # a death that reports nothing (kill -9, a power cut): SIGTERM now stops the run as Crashed at
            # once (tests/test_deploy_signals.py); here only the automation can tell
            os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 150
        while (run := ran(env))["state_type"] == "RUNNING":
            assert time.monotonic() < deadline, run["state"]
            time.sleep(3)
        assert run["state_type"] == "CRASHED", run["state"]
        assert "no heartbeat" in run["state"]["message"]

        with served_deployments(env, tmp_path, *args):
            out = prefect_cli(env, "deployment", "run", "charlm-training/weekly-retrain", "--watch")
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    logs = "".join(p.read_text() for p in tmp_path.glob("serve-*.log"))
    assert re.search(r"resuming from epoch \d+ of 30", logs), logs[-3000:]
    versions = MlflowClient(store, store).search_model_versions("name='corpus-charlm'")
    assert len(versions) == 1


def test_command_line_runs_beat_at_the_zombie_automations_cadence(monkeypatch):
    """The zombie automation crashes a flow run silent for three beats of ``HEARTBEAT_SECONDS``;
    at Prefect's default beat (180 s) it marked a command-line run Crashed ("its process died")
    while that run was still training, 34 s in with a 30 s silence (seen). Every run rnnflow
    starts beats at that cadence, unless $PREFECT_FLOWS_HEARTBEAT_FREQUENCY says otherwise."""
    from prefect import flow
    from prefect.settings import get_current_settings

    from flows.server import HEARTBEAT_ENV, HEARTBEAT_SECONDS, prefect_api

    @flow
    def beat() -> int:
        return get_current_settings().flows.heartbeat_frequency

    monkeypatch.delenv(HEARTBEAT_ENV, raising=False)
    with prefect_api():
        assert beat() == HEARTBEAT_SECONDS < 180
        assert os.environ[HEARTBEAT_ENV] == str(HEARTBEAT_SECONDS)  # what child processes inherit
    assert HEARTBEAT_ENV not in os.environ
    monkeypatch.setenv(HEARTBEAT_ENV, "120")
    with prefect_api():
        assert os.environ[HEARTBEAT_ENV] == "120"

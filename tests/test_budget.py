"""--minutes for the time-series flow: one budget spans --auto's candidates and the ensemble's
members; members that do not fit in it are left out, and the run says how many fitted."""

import os
import subprocess
import sys
import time

import mlflow


def test_a_budget_fits_what_it_can_and_says_how_many_members(tmp_path, mlflow_store):
    # GRU members train one after another (the grouped operation takes LSTMs), each until early
    # stopping or the budget; eight of them cannot all fit in 15 seconds
    args = ["--cell", "gru", "--hidden-size", "8", "--length", "600", "--ensemble", "8", "--minutes", "0.25",
            "--model-name", "budget"]
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "flows.timeseries", *args], capture_output=True, text=True,
                         timeout=600, env={**os.environ}, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = mlflow.MlflowClient(mlflow_store, mlflow_store)
    run = client.get_run(client.get_model_version("budget", "1").run_id)
    fitted = int(run.data.params["members_fitted"])
    assert 1 <= fitted < 8, fitted
    assert f"{fitted} of 8 ensemble members fitted in --minutes 0.25." in out.stdout
    assert run.data.params["minutes"] == "0.25" and run.data.metrics["members_diverged"] == 0
    assert run.data.metrics["train_seconds"] < 0.25 * 60 * 1.5, run.data.metrics  # the budget, and its floors
    assert time.monotonic() - t0 < 300


def test_a_negative_budget_is_one_line(tmp_path, mlflow_store):
    out = subprocess.run([sys.executable, "-m", "flows.timeseries", "--minutes", "-1"], capture_output=True,
                         text=True, timeout=120, env={**os.environ}, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == "error: --minutes must be 0 or more, got -1.0", out.stderr

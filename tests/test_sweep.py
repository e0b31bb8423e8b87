"""Sweeps: the grid, trials as nested runs on threads and on a local Dask cluster, bad input."""

import subprocess
import sys

import pytest
from mlflow import MlflowClient

from flows.sweep import main
from tasks.config import ConfigError
from tasks.sweep import build_grid

TINY = ["--length", "600", "--lookback", "12", "--epochs", "2", "--batch-size", "16", "--device", "cpu",
        "--patience", "0", "--auto", "false"]


def test_grid_is_the_product_and_samples_draw_from_it():
    grid = build_grid({"cell": "lstm,gru", "hidden_size": "16,32", "lookback": "24,48", "epochs": "3"})
    assert len(grid) == 8 and {p["cell"] for p in grid} == {"lstm", "gru"} and all(p["epochs"] == 3 for p in grid)
    sample = build_grid({"cell": "lstm,gru", "hidden_size": "16,32,64"}, samples=4, seed=1)
    assert len(sample) == 4 and len({tuple(sorted(p.items())) for p in sample}) == 4


def test_options_that_are_lists_themselves_are_not_grid_axes():
    grid = build_grid({"hidden_size": "16,32", "intervals": "0.8,0.95", "holidays": "US,DE", "source": "file",
                       "data": "x.csv", "future_covariate_columns": "promo,price"})
    assert len(grid) == 2 and all(p["intervals"] == "0.8,0.95" and p["holidays"] == "US,DE" for p in grid)


def test_trials_that_can_share_a_shape_are_grouped_one_group_per_worker():
    from flows.sweep import packs
    from tasks.sweep import split_grid

    def groups(options, workers):
        base, grid = split_grid(build_grid(options))
        return sorted(sorted(i for i, _, _ in pack) for pack in packs([(i, p, base) for i, p in enumerate(grid)],
                                                                        workers))

    one = {"auto": "false", "ensemble": "1"}
    # 8 LSTM trials of one shape: one group per worker, of at most 4 networks (one thread's)
    assert groups({**one, "lr": "0.001,0.003", "seed": "0,1,2,3"}, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups({**one, "lr": "0.001,0.003", "seed": "0,1,2,3"}, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert groups({**one, "lr": "0.001,0.003", "seed": "0,1,2,3", "ensemble": "2"}, 1) == [[0, 1], [2, 3], [4, 5],
                                                                                            [6, 7]]
    # other shapes (lookback), GRU and a hidden size the grouped operation does not cover: alone
    assert groups({**one, "lr": "0.001,0.003", "lookback": "24,36", "cell": "lstm,gru"}, 1) == [
        [0, 1], [2], [3], [4, 5], [6], [7]]
    assert groups({**one, "lr": "0.001,0.003", "hidden_size": "8"}, 1) == [[0], [1]]
    # trials that fill a group by themselves (--auto's candidates, 3 members): alone
    assert groups({"lr": "0.001,0.003"}, 1) == groups({**one, "ensemble": "3", "lr": "0.001,0.003"}, 1) == [[0], [1]]


@pytest.mark.parametrize("options, message", [
    ({"cell": "lstm,tcn"}, r"--cell: 'tcn' is not one of"),
    ({"hidden_size": "16,big"}, r"--hidden-size: 'big' is not a valid int"),
    ({"cell": ","}, r"--cell: the grid has no values"),
    ({"horizon": "1,0"}, r"--horizon must be at least 1, got 0"),
])
def test_bad_grids_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        build_grid(options)


def test_unknown_option_and_unreachable_dask_stop_before_any_trial(mlflow_store, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--cells", "lstm"])
    assert e.value.code == 2 and "unrecognized option --cells (did you mean --cell?)" in capsys.readouterr().err
    assert main([*TINY, "--task-runner", "dask", "--dask-address", "tcp://127.0.0.1:9"]) == 1
    assert "--dask-address tcp://127.0.0.1:9: cannot reach the Dask scheduler" in capsys.readouterr().err
    assert MlflowClient(mlflow_store, mlflow_store).search_registered_models() == []


def test_unreachable_tracking_server_stops_before_any_trial(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert main([*TINY, "--cell", "lstm,gru"]) == 1
    assert "MLFLOW_TRACKING_URI http://127.0.0.1:9: the tracking server does not answer" in capsys.readouterr().err


@pytest.mark.parametrize("runner", ["thread", pytest.param("dask", marks=pytest.mark.journey)])  # dask: a cluster
def test_sweep_logs_nested_trials_and_registers_the_best(runner, mlflow_store, capsys):
    args = [*TINY, "--cell", "lstm,gru", "--hidden-size", "8,16", "--task-runner", runner, "--workers", "2",
            "--model-name", f"swept-{runner}"]
    if runner == "thread":
        assert main(args) == 0
        out = capsys.readouterr().out
    else:  # the command line as users type it: its flow is pickled for the workers (it failed there, not in process)
        done = subprocess.run([sys.executable, "-m", "flows.sweep", *args], capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Traceback" not in done.stderr
        out = done.stdout
    c = MlflowClient(mlflow_store, mlflow_store)
    exp = c.get_experiment_by_name("timeseries-forecasting")
    parent = c.search_runs([exp.experiment_id], "tags.sweep = 'true'")[0]
    trials = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(trials) == 4
    best = min(trials, key=lambda r: r.data.metrics["best_val_loss"])
    assert parent.data.params["best_trial"] == best.data.params["trial"]
    assert c.list_artifacts(parent.info.run_id)[0].path == "sweep.md"
    # each trial's model travels through the tracking store, so workers need no shared disk
    for t in trials:
        assert {a.path for a in c.list_artifacts(t.info.run_id, "model")} == {"model/config.json",
                                                                             "model/weights.safetensors"}
    version = c.get_model_version_by_alias(f"swept-{runner}", "champion")
    registered = c.get_run(version.run_id).data.params
    assert (registered["cell"], registered["hidden_size"]) == (best.data.params["cell"], best.data.params["hidden_size"])
    assert "(best)" in out


def test_many_series_trains_and_registers_one_model_per_id(mlflow_store, tmp_path, capsys):
    import numpy as np
    import pandas as pd

    days = pd.date_range("2024-01-01", periods=400, freq="D")
    long = pd.concat([pd.DataFrame({"store": s, "date": days, "sales": 10 + k * 5 + np.sin(np.arange(400) / 3 + k)})
                      for k, s in enumerate(["north", "south"])])
    long.to_csv(tmp_path / "stores.csv", index=False)
    args = [*TINY, "--source", "file", "--data", str(tmp_path / "stores.csv"), "--time-column", "date",
            "--value-column", "sales", "--model-name", "shop", "--id-column", "store"]
    args[args.index("--length") + 1] = "1200"  # only generated series read --length
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| north | shop-north |" in out and "| south | shop-south |" in out
    c = MlflowClient(mlflow_store, mlflow_store)
    for sid in ("north", "south"):
        version = c.get_model_version_by_alias(f"shop-{sid}", "champion")
        assert c.get_run(version.run_id).data.params["data"].endswith(f"{sid}.csv")
    assert main([*args[:-1], "region"]) == 1
    assert "no id column 'region'; the columns are ['store', 'date', 'sales']" in capsys.readouterr().err


def test_trials_on_one_worker_train_together_and_score_as_alone(mlflow_store):
    """With one worker both trials are one group whose networks train as one batched network;
    with two, each trial trains alone. Each trial's validation loss and test MASE agree."""
    from rnn_models.grouped import available

    if not available():
        pytest.skip("the grouped C++ operation could not be built here")
    c = MlflowClient(mlflow_store, mlflow_store)
    scores = {}
    for workers in (1, 2):
        assert main([*TINY, "--hidden-size", "16", "--lr", "0.003,0.01", "--ensemble", "2", "--workers",
                     str(workers), "--model-name", f"packed-{workers}"]) == 0
        exp = c.get_experiment_by_name("timeseries-forecasting")
        parent = c.search_runs([exp.experiment_id], "tags.sweep = 'true' and params.grid_points = '2'",
                               order_by=["attributes.start_time DESC"])[0]
        trials = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert {t.data.tags["trained_with"] for t in trials} == ({"trial 0, trial 1"} if workers == 1
                                                                 else {"trial 0", "trial 1"})
        scores[workers] = {t.data.params["lr"]: (t.data.metrics["best_val_loss"], t.data.metrics["test_mase"])
                           for t in trials}
    assert scores[1].keys() == {"0.003", "0.01"}
    for lr, (val_loss, mase) in scores[2].items():
        assert scores[1][lr] == pytest.approx((val_loss, mase), rel=1e-4)


def test_bad_data_stops_before_prefect_with_one_line(mlflow_store, tmp_path, capsys):
    short = tmp_path / "short.csv"
    short.write_text("value\n" + "\n".join(str(i) for i in range(40)) + "\n")
    base = [*TINY, "--source", "file", "--lr", "0.001,0.003"]
    assert main([*base, "--data", str(tmp_path / "nosuch.csv")]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nosuch.csv'}: no such file"
    assert main([*base, "--data", str(short), "--lookback", "12,30"]) == 1  # the longer lookback does not fit
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {short}") and "\n" not in err
    assert main([*base, "--data", str(tmp_path / "nosuch.csv"), "--id-column", "store"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nosuch.csv'}: no such file"
    assert MlflowClient(mlflow_store, mlflow_store).search_experiments(filter_string="name = 'timeseries-forecasting'") \
        == []  # no flow ran: no parent run, not even the experiment

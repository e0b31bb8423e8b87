"""The time-series flow end to end: real Prefect (test harness), real MLflow on SQLite."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)

from flows.timeseries import timeseries_flow
from rnn_models.training import NonFiniteLossError
from tasks.config import ConfigError
from tasks.data import DataError

TINY = dict(length=600, lookback=12, hidden_size=16, epochs=4, batch_size=16, patience=0, device="cpu")


def run(**params):
    return timeseries_flow(**{**TINY, **params})


def task_names(state) -> list[str]:
    with get_client(sync_client=True) as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return [r.name.rsplit("-", 1)[0] for r in runs]


def test_default_flow_registers_a_champion_that_loads_without_pickle(mlflow_store, monkeypatch):
    result = run(epochs=6)
    assert result["promoted"] and result["version"] == "1" and result["reason"] == "no champion yet"
    c = MlflowClient(mlflow_store, mlflow_store)
    assert str(c.get_model_version_by_alias("sine-forecaster", "champion").version) == "1"

    # the run holds params, per-epoch losses, backtest metrics, plots, the dataset and the model
    r = c.get_run(result["run_id"])
    assert r.data.params["cell"] == "lstm" and r.data.params["lookback"] == "12"
    assert len(c.get_metric_history(r.info.run_id, "val_loss")) == 6
    for key in ("test_mase", "test_smape", "naive_mase", "seasonal_naive_mase", "train_seconds",
                "train_samples_per_second"):
        assert np.isfinite(r.data.metrics[key]), key
    assert r.data.metrics["test_mase"] < r.data.metrics["naive_mase"]  # it learned the sine
    assert {f.path for f in c.list_artifacts(r.info.run_id, "plots")} == {"plots/forecast.png", "plots/loss.png"}
    assert r.inputs.dataset_inputs[0].dataset.name == "sine-forecaster"

    # the logged model is plain files: safetensors + JSON, no pickle anywhere
    local = Path(mlflow.artifacts.download_artifacts("models:/sine-forecaster/1"))
    files = {p.name for p in local.rglob("*") if p.is_file()}
    assert {"weights.safetensors", "config.json", "MLmodel", "requirements.txt"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".pth", ".pickle"))]
    assert "torch==" in (local / "requirements.txt").read_text()

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model("models:/sine-forecaster@champion")
    history = pd.DataFrame({"value": np.sin(2 * np.pi * np.arange(100) / 40)})
    out = model.predict(history)
    assert list(out.columns) == ["step", "forecast"] and out["step"].tolist() == [1]
    assert abs(out["forecast"].iloc[0] - np.sin(2 * np.pi * 100 / 40)) < 0.3

    # the metrics table is a Prefect markdown artifact
    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sine-forecaster-backtest"])))
    assert arts and "| rnnflow-lstm |" in arts[0].data and "seasonal-naive" in arts[0].data


def test_served_model_reproduces_the_flow_backtest(mlflow_store):
    """What is evaluated is what is served: the pyfunc's forecasts give the flow's MASE."""
    from rnn_models.windows import Split, window_origins
    from tasks.config import TimeSeriesConfig
    from tasks.data import generate_series
    from tasks.evaluation import forecast_with, run_backtest
    from tasks.reevaluate import backtest_registered

    result = run(horizon=3)
    cfg = TimeSeriesConfig(**{**TINY, "horizon": 3})
    series = generate_series(cfg)
    split = Split.by_fraction(len(series.frame), cfg.val_size, cfg.test_size, 3)
    origins = window_origins(*split.part("test"), cfg.lookback, 3)
    model = mlflow.pyfunc.load_model(result["model_uri"])
    whole = forecast_with(model.predict, series, origins, 3)
    bt = run_backtest(series, split, origins, 3, {"served": whole})
    assert bt.scores["served"]["mase"] == pytest.approx(result["scores"]["rnnflow-lstm"]["mase"], rel=1e-5)
    # re-scoring it as a champion (every origin in one batch through its pipeline) gives the same score,
    # to float32 rounding: oneDNN's LSTM rounds a batch of 240 windows and one window apart in the last bit
    assert backtest_registered(result["model_uri"], series, split, origins, 3) == pytest.approx(
        bt.scores["served"]["mase"], rel=1e-6)


def test_champion_moves_only_to_a_better_model(mlflow_store):
    first = run(epochs=6, model_name="gate")
    worse = run(epochs=1, lr=1e-5, model_name="gate")
    assert first["promoted"] and not worse["promoted"]
    assert worse["reason"].startswith("kept champion v1: its test MASE")
    c = MlflowClient(mlflow_store, mlflow_store)
    assert str(c.get_model_version_by_alias("gate", "champion").version) == "1"
    assert c.get_run(worse["run_id"]).data.tags["promoted"] == "false"
    assert "champion_test_mase" in c.get_run(worse["run_id"]).data.metrics


def test_airline_csv_through_source_file(mlflow_store, shared_data):
    result = run(source="file", data=str(shared_data / "airline-passengers.csv"), lookback=12, horizon=6, epochs=3)
    assert result["model_name"] == "airline-passengers-forecaster" and result["promoted"]
    model = mlflow.pyfunc.load_model("models:/airline-passengers-forecaster@champion")
    hist = pd.read_csv(shared_data / "airline-passengers.csv")
    # the history with its dates: a model --auto gave calendar features makes them from the Month column
    out = model.predict(hist.assign(Passengers=hist["Passengers"].astype(float))[["Month", "Passengers"]])
    assert len(out) == 6 and out["forecast"].between(50, 1000).all()
    r = MlflowClient(mlflow_store, mlflow_store).get_run(result["run_id"])
    assert r.data.params["resolved_season_length"] == "12" and r.data.params["frequency"] == "MS"


def test_arithmetic_model_continues_70_80_90_with_about_100(mlflow_store):
    result = run(source="arithmetic", length=60, lookback=3, hidden_size=16, epochs=150, batch_size=8,
                 lr=1e-2, val_size=0.15, test_size=0.15)
    model = mlflow.pyfunc.load_model(result["champion_uri"].replace("sine", "arithmetic"))
    forecast = model.predict(pd.DataFrame({"value": [70, 80, 90]}))["forecast"].iloc[0]
    assert forecast == pytest.approx(100, abs=5)


def test_sin_cos_model_needs_its_covariate(mlflow_store):
    result = run(source="sin-cos", epochs=3)
    model = mlflow.pyfunc.load_model(result["champion_uri"])
    t = np.arange(50)
    frame = pd.DataFrame({"cos": np.cos(2 * np.pi * t / 40), "sin": np.sin(2 * np.pi * t / 40)})
    assert len(model.predict(frame)) == 1
    with pytest.raises(MlflowException, match=r"Model is missing inputs \['sin'\]\.") as refused:
        model.predict(frame[["cos"]])  # the signature, cos and sin both required, refuses it
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"


def test_quantile_ensemble_serves_ordered_quantiles_and_logs_members(mlflow_store):
    result = run(model_name="bands", horizon=3, quantiles="0.1,0.9", ensemble=2, ensemble_cells="lstm,gru", epochs=3)
    assert result["label"] == "rnnflow-lstm+gru"
    assert {"rnnflow-lstm+gru", "rnnflow-lstm+gru-member1", "rnnflow-lstm+gru-member2"} <= set(result["scores"])
    assert "quantile interval covers" in result["report"]
    r = MlflowClient(mlflow_store, mlflow_store).get_run(result["run_id"])
    for key in ("test_mase", "test_member1_mase", "test_member2_mase", "test_coverage", "test_spl"):
        assert np.isfinite(r.data.metrics[key]), key
    assert 0 <= r.data.metrics["test_coverage"] <= 1
    assert r.data.params["member_cells"] == "lstm,gru" and r.data.params["quantile_levels"] == "0.1,0.5,0.9"

    model = mlflow.pyfunc.load_model("models:/bands@champion")
    y = np.sin(2 * np.pi * np.arange(200) / 40)
    for end in range(12, 200, 7):  # every row of every answer is ordered
        out = model.predict(pd.DataFrame({"value": y[:end]}))
        assert list(out.columns) == ["step", "forecast", "q0.1", "q0.5", "q0.9"] and len(out) == 3
        assert (out["q0.1"] <= out["q0.5"]).all() and (out["q0.5"] <= out["q0.9"]).all()
        assert (out["forecast"] == out["q0.5"]).all()


def test_auto_logs_what_it_chose_and_why(mlflow_store):
    result = run(model_name="auto", auto=True, epochs=2, lookback=48)
    c = MlflowClient(mlflow_store, mlflow_store)
    r = c.get_run(result["run_id"])
    choice = r.data.params["auto_choice"]
    assert f"--auto chose **{choice}**" in result["report"]
    scores = {k: v for k, v in r.data.metrics.items() if k.startswith("auto_val_mase_")}
    # the sine is negative: the log candidate is skipped with its reason, the others scored
    assert len(scores) == 5 and "log" not in " ".join(scores)
    text = Path(mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="auto.md")).read_text()
    assert "skipped: --transform log needs a positive series" in text and "(chosen)" in text


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def guarded_store(tmp_path_factory, fresh_store):
    """One store with a champion 'guarded' v1, shared by every bad-input case."""
    tmp = tmp_path_factory.mktemp("guarded")
    uri = fresh_store(tmp / 'mlflow.db')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("RNNFLOW_DOWNLOADS", str(tmp / "downloads"))
        run(model_name="guarded", epochs=2)
        yield uri, tmp


def _bad_csv(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


BAD = {
    "missing file": (lambda t: dict(source="file", data=str(t / "nope.csv")), DataError, r"nope\.csv: no such file"),
    "checksum": (lambda t: dict(source="file", data=_bad_csv(t, "ok.csv", "t,v\n" + "".join(f"{i},{i}\n" for i in range(200))),
                                sha256="a" * 64), DataError, r"ok\.csv: sha256 is [0-9a-f]{64}, expected a{64}"),
    "unknown column": (lambda t: dict(source="file", data=_bad_csv(t, "c.csv", "t,v\n1,2\n2,3\n3,4\n"), value_column="w"),
                       DataError, r"no value column 'w'; the columns are \['t', 'v'\]"),
    "non-numeric": (lambda t: dict(source="file", data=_bad_csv(t, "n.csv", "t,v\n1,2\n2,x\n3,4\n")),
                    DataError, r"column 'v' has a non-numeric value 'x' at row 2"),
    "too short": (lambda t: dict(length=15), DataError, r"the series has 15 rows, too short for --lookback 12"),
    "too many gaps": (lambda t: dict(source="file", data=_bad_csv(t, "g.csv", "t,v\n" + "".join(
        f"{i},{i}\n" for i in list(range(50)) + list(range(60, 200))))), DataError, r"10 consecutive time steps are missing"),
    "horizon 0": (lambda t: dict(horizon=0), ConfigError, r"--horizon must be at least 1, got 0"),
    "negative lr": (lambda t: dict(lr=-0.1), ConfigError, r"--lr must be a positive number, got -0\.1"),
    "unknown cell": (lambda t: dict(cell="tcn"), ConfigError, r"--cell: 'tcn' is not one of rnn, lstm, gru, elman"),
    "transform under --auto": (lambda t: dict(baseline="naive"), ConfigError,
                               r"--baseline naive is chosen by --auto \(the default\); add --no-auto"),
    "nan loss": (lambda t: dict(lr=1e30, clip=0.0), NonFiniteLossError, r"loss became (nan|inf)"),
    "log of a negative series": (lambda t: dict(auto=False, transform="log"), DataError,
                                 r"--transform log needs a positive series, but column 'value' holds -?[0-9.]+ at row \d+"),
    "lookback under a season": (lambda t: dict(auto=False, difference="seasonal"), ConfigError,
                                r"--lookback 12 is too short for --difference seasonal with season 40: a lookback of at least 42 is needed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_stops_before_training_and_leaves_the_champion(case, guarded_store, monkeypatch, tmp_path):
    uri, tmp = guarded_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RNNFLOW_CHECKPOINTS", str(tmp_path / "checkpoints"))
    make, error, pattern = BAD[case]
    state = timeseries_flow(**{**TINY, "model_name": "guarded", **make(tmp)}, return_state=True)
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    with pytest.raises(error, match=pattern):
        raise exc
    names = task_names(state)
    if case != "nan loss":
        assert "train-forecaster" not in names, names
    assert "register-forecaster" not in names
    c = MlflowClient(uri, uri)
    assert [str(v.version) for v in c.search_model_versions("name='guarded'")] == ["1"]
    assert str(c.get_model_version_by_alias("guarded", "champion").version) == "1"
    exp = c.get_experiment_by_name("timeseries-forecasting")
    assert len(c.search_runs([exp.experiment_id])) == 1  # no half-written run
    assert not list(tmp_path.glob("checkpoints/*")), "a checkpoint folder outlived bad input"


def test_unchanged_data_and_config_reuse_cached_ingest_and_windows(mlflow_store, tmp_path):
    data = tmp_path / "cached.csv"
    data.write_text("t,v\n" + "".join(f"{i},{np.sin(i / 5):.6f}\n" for i in range(400)))
    params = {**TINY, "source": "file", "data": str(data), "epochs": 1, "seed": 11}

    def states(state) -> dict[str, str]:
        with get_client(sync_client=True) as c:
            runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}

    first = states(timeseries_flow(**params, return_state=True))
    again = states(timeseries_flow(**params, return_state=True))
    assert first["load-series"] == "Completed"
    for name in ("load-series", "split-series", "scale-and-window"):
        assert again[name] == "Cached", (name, sorted(again.items()))
    # a challenger is still trained: --auto's candidates, then the ensemble's other members
    assert again["choose-settings"] == "Completed" and again["train-forecaster"] == "Completed"

    data.write_text(data.read_text() + "400,0.5\n")  # the file changed: its hash changed
    changed = states(timeseries_flow(**params, return_state=True))
    assert changed["load-series"] == "Completed" and changed["scale-and-window"] == "Completed"


def test_a_cached_result_is_not_reused_under_other_pandas_or_numpy_versions(monkeypatch):
    """Persisted results are pickles of pandas/numpy objects: another version must not read them."""
    from flows import steps

    key = steps._libraries(None, {})
    assert steps._libraries(None, {}) == key
    monkeypatch.setattr(pd, "__version__", pd.__version__ + ".other")
    assert steps._libraries(None, {}) != key
    monkeypatch.undo()
    monkeypatch.setattr(np, "__version__", np.__version__ + ".other")
    assert steps._libraries(None, {}) != key

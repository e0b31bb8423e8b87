"""One global network over many series (``--id-column``): real Prefect flow runs (test harness),
a real MLflow store on SQLite, the registered model over real HTTP."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from flows.timeseries import timeseries_flow
from rnn_models import synthetic
from rnn_models.panel import Panel, PanelWindows, encode, last_windows
from rnn_models.recurrent import Forecaster, ForecasterConfig
from rnn_models.transforms import Baseline, Chain, Difference, Log, Scale, WindowNorm
from rnn_models.windows import Split, make_windows, window_origins
from tasks.config import ConfigError, TimeSeriesConfig
from tasks.config.series import PANEL_BATCHES, PANEL_SERIES
from tasks.data import DataError, generate_series
from tasks.features import batches, scale_and_window, split_series
from tasks.panel import load_panel
from tasks.selection import PANEL_CANDIDATES, AutoRound, apply, choose, settle_calendar
from tasks.training import Settings, train_forecaster
from tests.serving import invoke, served

# 24 series of scales 1 to 10^4, seasons 24 and 12; s3 and s17 cut too short to train on
TINY = dict(source="file", id_column="id", season_length=24, lookback=24, horizon=6, hidden_size=32, epochs=12,
            batch_size=64, patience=0, ensemble=1, device="cpu")


@pytest.fixture(scope="module")
def panel_file(tmp_path_factory):
    df = synthetic.panel(24, 300, seed=3, min_length=200)
    df = df[~df["id"].isin(["s3", "s17"]) | (df["t"] >= 280)]  # 20 rows: too short
    path = tmp_path_factory.mktemp("panel") / "meters.csv"
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def trained(panel_file, tmp_path_factory, fresh_store):
    """One global model registered in its own store: (store URI, flow result)."""
    tmp = tmp_path_factory.mktemp("global")
    uri = fresh_store(tmp / 'mlflow.db')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("RNNFLOW_CHECKPOINTS", str(tmp / "checkpoints"))
        result = timeseries_flow(**TINY, data=str(panel_file), auto=False, window_norm="mean")
    return uri, result


def test_the_global_model_beats_seasonal_naive_on_the_mean_mase(trained):
    uri, result = trained
    scores = result["scores"]
    assert scores["rnnflow-lstm"]["mase"] < 0.9 * scores["seasonal-naive"]["mase"], scores
    client = MlflowClient(uri, uri)
    run = client.get_run(result["run_id"])
    assert run.data.params["series"] == "22" and run.data.params["skipped_series"] == "2"
    per_series = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result["run_id"], artifact_path="per_series.csv",
                                                                 tracking_uri=uri))
    assert len(per_series) == 22 and {"s3", "s17"}.isdisjoint(per_series["id"])
    skipped = mlflow.artifacts.load_text(f"runs:/{result['run_id']}/skipped.csv")
    assert skipped.splitlines() == ["id,rows", "s3,20", "s17,20"]
    mean = per_series["rnnflow-lstm_mase"].mean()
    assert mean == pytest.approx(run.data.metrics["test_mase"], rel=1e-9)


def test_predict_answers_every_series_of_a_request_in_order_and_an_unseen_one(trained, panel_file):
    uri, _ = trained
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/meters-forecaster@champion")
    df = pd.read_csv(panel_file)
    # each series' rows backwards in time: the time column puts them in order
    request = pd.concat([df[df["id"] == i].iloc[::-1] for i in ("s5", "s0", "s9")])
    unseen = pd.DataFrame({"id": "new", "t": np.arange(48), "value": 500 + 100 * np.sin(np.arange(48) * np.pi / 12)})
    out = model.predict(pd.concat([request, unseen]))
    assert list(out.columns) == ["id", "step", "forecast"]
    assert out["id"].tolist() == [i for i in ("s5", "s0", "s9", "new") for _ in range(6)]  # as first seen
    assert out["step"].tolist() == list(range(1, 7)) * 4 and np.isfinite(out["forecast"]).all()
    # one series asked alone is forecast the same as among others: one batched pass, no mixing
    alone = model.predict(request[request["id"] == "s0"])
    np.testing.assert_allclose(alone["forecast"], out[out["id"] == "s0"]["forecast"], rtol=1e-5)
    new = out[out["id"] == "new"]["forecast"].to_numpy()
    assert 300 < new.min() and new.max() < 700  # forecast from its own history, at its own scale
    mixed = request.astype({"t": object})
    mixed.iloc[0, mixed.columns.get_loc("t")] = "yesterday"
    with pytest.raises(MlflowException, match="column 't' cannot be put in order"):
        model.predict(mixed)


def test_the_rest_server_answers_a_many_series_request(trained, panel_file):
    uri, _ = trained
    df = pd.read_csv(panel_file)
    request = df[df["id"].isin(["s1", "s2"])][["id", "value"]]
    with served("models:/meters-forecaster@champion", uri) as base:
        status, body = invoke(base, {"dataframe_split": {"columns": ["id", "value"], "data": request.values.tolist()}})
        assert status == 200, body
        assert [r["id"] for r in body["predictions"]] == ["s1"] * 6 + ["s2"] * 6
        status, body = invoke(base, {"dataframe_split": {"columns": ["id", "value"], "data": [["s1", 1.0]] * 5}})
        assert 400 <= status < 500 and "series 's1' has 5 rows; each series needs at least 24" in body["message"]


def test_quantiles_and_an_ensemble_work_for_many_series(panel_file, mlflow_store):
    result = timeseries_flow(**{**TINY, "epochs": 2, "ensemble": 2, "quantiles": "0.1,0.9"}, data=str(panel_file),
                             model_name="meters-q")
    run = MlflowClient().get_run(result["run_id"])
    assert "auto_choice" in run.data.params  # --auto ran on the panel, scoring by OWA, the log candidate too
    auto = mlflow.artifacts.load_text(f"runs:/{result['run_id']}/auto.md")
    assert "the lowest validation OWA of the candidates (M4's ranking" in auto, auto
    assert "| candidate | validation OWA | loss |" in auto and "| log + window-norm mean" in auto, auto
    rows = [row for row in auto.splitlines() if row.startswith(("| log", "| window-norm"))]
    # each says its loss
    assert len(rows) == len(PANEL_CANDIDATES) and all(row.endswith("| pinball |") for row in rows), auto
    assert 0 < run.data.metrics["auto_val_owa_log_window_norm_mean"] < 2
    # --ensemble-candidates 2 (the default here): member 2 took the runner-up's settings, its own transforms
    scores = {row.split(" | ")[0].lstrip("| ").removesuffix(" (chosen)"): float(row.split(" | ")[1]) for row in rows}
    best, second = sorted(scores, key=scores.get)[:2]
    assert scores[second] <= 1.05 * scores[best], scores  # within 5 %: kept (this panel, these seeds)
    assert f"members take in turn the settings of the 2 best (--ensemble-candidates): {best}, {second}." in auto
    assert run.data.params["auto_members"] == f"{best}, {second}" and " | " in run.data.params["transforms"]
    model = mlflow.pyfunc.load_model("models:/meters-q@champion")
    df = pd.read_csv(panel_file)
    out = model.predict(df[df["id"].isin(["s0", "s1"])])
    assert list(out.columns) == ["id", "step", "forecast", "q0.1", "q0.5", "q0.9"] and len(out) == 12
    assert (out["q0.1"] <= out["q0.5"]).all() and (out["q0.5"] <= out["q0.9"]).all()


def test_the_owa_loss_trains_a_global_model_and_one_series_on_weighted_windows(panel_file, mlflow_store):
    """--loss owa: the training loop reads each window's step weights after its targets, for many
    series and for one, and the model it trains beats seasonal naive."""
    result = timeseries_flow(**TINY, data=str(panel_file), auto=False, window_norm="mean", transform="log",
                             loss="owa", model_name="meters-owa")
    assert result["scores"]["rnnflow-lstm"]["mase"] < 0.9 * result["scores"]["seasonal-naive"]["mase"]
    assert MlflowClient().get_run(result["run_id"]).data.params["loss"] == "owa"
    one = TimeSeriesConfig(source="trend-season", length=400, loss="owa", auto=False, window_norm="mean", epochs=8)
    series = generate_series(one)
    windows = scale_and_window(series, split_series(series, one), one)
    x, y, w = next(batches(series, windows, one, "cpu").train(torch.Generator().manual_seed(0)))
    assert w.shape == y.shape and bool((w > 0).all()) and w.std() > 0
    assert train_forecaster(series, windows, Settings(one)).val_loss > 0


# ---------------------------------------------------------------- the pieces


def test_lazy_encoded_windows_equal_the_materialised_numpy_chain():
    rng = np.random.default_rng(0)
    series = [np.exp(rng.normal(size=n).cumsum() * 0.1) * scale for n, scale in ((80, 1.0), (50, 300.0))]
    L, H = 30, 5
    windows = PanelWindows(Panel.from_series(series, dtype=torch.float64), L, H, np.zeros(2, int), np.array([80, 50]))
    x, y, _ = windows.gather(torch.arange(len(windows)))
    expected_x = np.concatenate([make_windows(s[:, None], s, window_origins(0, len(s), L, H), L, H, np.float64)[0]
                                 for s in series])
    np.testing.assert_array_equal(x.numpy(), expected_x)
    for steps in ([WindowNorm("last")], [WindowNorm("mean"), Baseline(12)], [Log(), Difference(12), WindowNorm()],
                  [Scale(np.array([2.0]), np.array([3.0])), Baseline(1)]):
        chain = Chain(steps)
        want_x, want_y, _ = chain.encode(x.numpy(), y.numpy())
        got_x, got_y = encode(chain, x, y)
        np.testing.assert_allclose(got_x.numpy(), want_x, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got_y.numpy(), want_y, rtol=1e-9, atol=1e-12)


def test_last_windows_takes_each_series_own_tail():
    values = np.array([1, 10, 2, 20, 3, 30, 4], dtype=float)
    codes = np.array([0, 1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(last_windows(values, codes, 2), [[3, 4], [20, 30]])


# ---------------------------------------------------------------- bad input

def _csv(tmp, text: str):
    path = tmp / "bad.csv"
    path.write_text(text)
    return str(path)


def _rows(ids, n=300):
    return "".join(f"{i},{t},{(t % 24) + 10}\n" for i in ids for t in range(n))


BAD = {
    "missing id column": ("t,value\n" + "".join(f"{t},{t}\n" for t in range(300)), DataError,
                          r"bad\.csv: no id column 'id'; the columns are \['t', 'value'\]"),
    "non-numeric value": ("id,t,value\n" + _rows("ab") + "c,0,1\nc,1,x\n", DataError,
                          r"series 'c' \(column 'id'\) has a non-numeric value 'x' in column 'value' at row 602"),
    "duplicate time": ("id,t,value\n" + _rows("ab") + "a,5,1\n", DataError,
                       r"series 'a' \(column 'id'\) has two rows at t 5"),
    "one-row series": ("id,t,value\n" + _rows("ab") + "z,0,1\n", DataError,
                       r"series 'z' \(column 'id'\) has a single row"),
    "one series": ("id,t,value\n" + _rows("a"), DataError, r"column 'id' holds one id \('a'\), one series: drop --id-column"),
    "none long enough": ("id,t,value\n" + _rows("ab", 20), DataError, r"no series is long enough for --lookback 24"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_panel_input_is_one_line_naming_the_id_and_column(case, tmp_path):
    text, error, pattern = BAD[case]
    cfg = TimeSeriesConfig(**{**TINY, "data": _csv(tmp_path, text)})
    with pytest.raises(error, match=pattern):
        load_panel(cfg.data, "", cfg)


def test_integer_time_steps_need_a_season_and_options_that_fit_many_series(tmp_path):
    cfg = TimeSeriesConfig(**{**TINY, "season_length": 0, "data": _csv(tmp_path, "id,t,value\n" + _rows("ab"))})
    with pytest.raises(ConfigError, match=r"column 't' holds plain time steps, not dates, .*give --season-length"):
        load_panel(cfg.data, "", cfg)
    with pytest.raises(ConfigError, match="--covariate-columns cannot be used with --id-column"):
        TimeSeriesConfig(**TINY, data="x.csv", covariate_columns="temp")
    with pytest.raises(ConfigError, match="--id-column needs --source file"):
        TimeSeriesConfig(id_column="id")


@pytest.mark.parametrize("rows, options, message, code", [  # 1: the data is wrong, 2: the options
    (_rows("ab") + "a,5,1\n", [], "series 'a' (column 'id') has two rows at t 5", 1),
    (_rows("ab") + "".join(f"c,{t},{t % 2}\n" for t in range(300)), ["--no-auto", "--transform", "log",
                                                                      "--window-norm", "level"],
     "--transform log needs a positive series, but series 'c' (column 'id') holds 0 in column 'value' at row 0 "
     "(150 such rows)", 1),
    (_rows("ab"), ["--loss", "owa", "--quantiles", "0.1,0.9"],
     "--loss owa weighs a point forecast's errors; --quantiles trains the pinball loss: drop one", 2),
])
def test_the_command_line_names_a_bad_panel_before_prefect_starts(tmp_path, rows, options, message, code):
    data = _csv(tmp_path, "id,t,value\n" + rows)
    out = subprocess.run([sys.executable, "-m", "flows.timeseries", "--source", "file", "--data", data,
                          "--id-column", "id", "--season-length", "24", *options], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert out.returncode == code, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"error: {data}: {message}" if code == 1 else f"error: {message}")
    assert "Traceback" not in out.stderr and not (tmp_path / "m.db").exists()


def test_a_patched_forecaster_reads_its_window_in_segments():
    torch.manual_seed(0)
    patched = Forecaster(ForecasterConfig(hidden_size=8, horizon=3, patch=4))
    plain = Forecaster(ForecasterConfig(hidden_size=8, horizon=3, input_size=4))
    plain.load_state_dict(patched.state_dict())
    x = torch.randn(5, 18, 1)  # 18 = 4 segments of 4, the oldest 2 steps left out
    torch.testing.assert_close(patched(x), plain(x[:, 2:].reshape(5, 4, 4)))


def test_many_series_default_to_ten_seasons_or_a_week_where_ten_would_leave_series_out_read_a_day_per_step():
    cfg = TimeSeriesConfig(source="file", data="x.csv", id_column="id", horizon=48)
    assert (cfg.lookback, cfg.patch) == (0, 0)
    m4 = cfg.settled(24, 414, [700] * 400 + [960] * 14)  # M4 Hourly's lengths: ten days of context
    assert (m4.lookback, m4.patch) == (240, 24)
    # 12 series of 300 steps (a few: one series' fractions): ten days leave no training window, a week does
    short = replace(cfg, horizon=12).settled(24, 12, [300] * 12)
    assert (short.lookback, short.patch) == (168, 24) and short.train_windows(300, 240) == 0 < short.train_windows(300)
    # a series too short for either is left out either way: it does not hold the others to a week
    assert cfg.settled(24, 414, [700] * 413 + [100]).lookback == 240
    assert cfg.settled(24, 414, [700] * 413 + [350]).lookback == 168  # 350 steps hold a week and a horizon, not ten days
    assert cfg.settled(24, 414, [100] * 414).lookback == 168  # none holds either: the error names the shorter
    assert (cfg.settled(1, 12, [700] * 12).lookback, cfg.settled(1, 12, [700] * 12).patch) == (24, 1)
    assert replace(cfg, lookback=96).settled(24, 414, [700] * 414).lookback == 96  # given: kept
    one = TimeSeriesConfig()
    assert (one.lookback, one.patch, one.loss, one.batch_size, one.lr) == (24, 1, "mse", 32, 3e-3)  # as before
    assert (cfg.lr, TimeSeriesConfig(source="file", data="x.csv", id_column="id", lr=1e-3).lr) == (6e-3, 1e-3)
    assert cfg.settled(24, 12, [700] * 12).batch_size == 256


def test_the_members_take_the_settings_of_the_best_candidates_within_five_percent():
    """--ensemble-candidates N (2 by default with --id-column, 1 for one series): the settings of
    the N best candidates within 5 % of the best, each with the network --auto trained, in order."""
    cfg = TimeSeriesConfig(source="file", data="x.csv", id_column="id").settled(24, 12, [700] * 12)
    assert (cfg.kept_candidates, TimeSeriesConfig().kept_candidates) == (2, 1)
    trials = {c: apply(cfg, c) for c in PANEL_CANDIDATES}
    nets = {c: f"network of {c}" for c in trials}  # stand-ins for the trained networks
    scores = dict(zip(trials, [0.62, 0.60, 0.64, float("nan")], strict=True))
    late = "its loss became NaN or infinite at epoch 9 (lr 0.006): kept epoch 8's weights"
    rnd = AutoRound(trials, {}, {}, {"window-norm level": "it could not run", "window-norm mean": late}, "")
    two = choose(rnd, nets, scores, "x.csv", keep=2)
    # a candidate that could not run says why; one that diverged late is scored at its best epoch, and says so
    assert "| window-norm level | skipped: it could not run |" in two.selection.markdown()
    assert f"| window-norm mean | 0.64 ({late}) | mae |" in two.selection.markdown()
    assert two.cfg == trials["log + window-norm level"] and two.selection.trained == nets["log + window-norm level"]
    assert two.runners_up == [(trials["log + window-norm mean"], nets["log + window-norm mean"])]
    assert two.selection.members == ["log + window-norm level", "log + window-norm mean"]
    assert "members take in turn the settings of the 2 best" in two.selection.markdown()
    assert len(choose(rnd, nets, scores, "x.csv", keep=4).runners_up) == 1  # 0.64 is over 5 % above 0.60
    alone = choose(rnd, nets, {**scores, "log + window-norm mean": 0.65}, "x.csv", keep=2)
    assert alone.runners_up == [] and "No other candidate scored within 5% of it" in alone.selection.markdown()
    one = choose(rnd, nets, scores, "x.csv")
    assert one.runners_up == [] and one.selection.members == [] and "members take" not in one.selection.markdown()
    widened = choose(replace(rnd, widened="scored on a longer window"), nets, scores, "x.csv", keep=2)
    assert widened.runners_up == [(trials["log + window-norm mean"], None)]  # trained on another split: anew
    calendar = settle_calendar(two, True)  # its data gains features: a runner-up's network is trained anew
    assert calendar.runners_up == [(replace(trials["log + window-norm mean"], calendar=True), None)]
    assert settle_calendar(two, False).runners_up[0][1] == nets["log + window-norm mean"]
    with pytest.raises(ConfigError, match="--ensemble-candidates 2 keeps --auto's best candidates"):
        TimeSeriesConfig(source="file", data="x.csv", id_column="id", auto=False, window_norm="mean",
                         ensemble_candidates=2)


def test_a_global_models_loss_is_owa_in_log_space_and_mae_elsewhere():
    """--loss auto with --id-column: each --auto candidate resolves its own, as --no-auto does."""
    cfg = TimeSeriesConfig(source="file", data="x.csv", id_column="id").settled(24, 12, [700] * 12)
    assert cfg.loss == "auto"  # left to each candidate
    assert apply(cfg, "log + window-norm mean").loss == "owa"
    assert apply(cfg, "log + window-norm level").loss == "owa"
    assert apply(cfg, "window-norm level").loss == apply(cfg, "window-norm mean").loss == "mae"
    assert apply(replace(cfg, loss="mse"), "log + window-norm mean").loss == "mse"  # given: kept
    assert apply(replace(cfg, quantiles="0.1,0.9"), "log + window-norm mean").loss == "mae"  # pinball, as before
    fixed = dict(source="file", data="x.csv", id_column="id", auto=False, window_norm="mean")
    assert TimeSeriesConfig(**fixed, transform="log").settled(24, 12, [700] * 12).loss == "owa"
    assert TimeSeriesConfig(**fixed).settled(24, 12, [700] * 12).loss == "mae"


def test_an_epoch_of_many_series_is_at_most_batches_per_epoch_drawn_afresh_each_time(panel_file):
    """On 400 series a whole pass is 800 batches: early stopping and the learning-rate plateau would
    look at validation once per 800 steps. A global model's epoch is at most PANEL_BATCHES batches,
    the start of a pass in a new random order each epoch; one series keeps its whole pass."""
    from tasks.features import scale_and_window, split_series
    from tasks.ingest import fetch_data

    cfg = TimeSeriesConfig(**TINY, data=str(panel_file), auto=False, window_norm="mean")
    assert (cfg.settled(24, 22, [200] * 22).batches_per_epoch, TimeSeriesConfig().batches_per_epoch) == (PANEL_BATCHES, 0)
    cfg = replace(cfg.settled(24, 22, [200] * 22), batches_per_epoch=3)
    data = load_panel(*fetch_data(str(panel_file)), cfg)
    windows = scale_and_window(data, split_series(data, cfg), cfg)
    epochs = batches(data, windows, cfg, "cpu")
    gen = torch.Generator().manual_seed(0)
    first, second = list(epochs.train(gen)), list(epochs.train(gen))
    assert len(first) == len(second) == 3 and all(len(batch[0]) == cfg.batch_size for batch in first)
    assert not torch.equal(first[0][0], second[0][0])  # a fresh draw, not the same three batches again
    whole = list(batches(data, windows, replace(cfg, batches_per_epoch=0), "cpu").train(gen))
    assert len(whole) == -(-epochs.sizes[0] // cfg.batch_size) > 3


def test_many_series_validate_and_test_on_their_last_horizons_and_a_few_on_fractions():
    """With PANEL_SERIES series or more each part is one horizon of every series (as M4 scores a
    model: from the end of its data); fewer series keep one series' fractions, for enough origins;
    given sizes are kept."""
    cfg = TimeSeriesConfig(source="file", data="x.csv", id_column="id", horizon=48)
    many, few = cfg.settled(24, PANEL_SERIES, [960]), cfg.settled(24, PANEL_SERIES - 1, [960])
    assert (many.val_size, many.test_size, few.val_size, few.test_size) == (0.0, 0.0, 0.1, 0.2)
    assert Split.by_fraction(960, many.val_size, many.test_size, 48) == Split(960, 864, 912)
    given = replace(cfg, val_size=0.05, test_size=0.1).settled(24, PANEL_SERIES, [960])
    assert (given.val_size, given.test_size) == (0.05, 0.1)
    assert (TimeSeriesConfig().val_size, TimeSeriesConfig().test_size) == (0.1, 0.2)  # one series: as before


def test_a_registered_global_model_scores_again_as_it_scored_in_its_run(trained, monkeypatch):
    from tasks.reevaluate import evaluation_data, score

    uri, result = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what promote and compare read, whatever ran before
    version = MlflowClient(uri, uri).get_model_version("meters-forecaster", result["version"])
    data = evaluation_data(version)  # the series rebuilt from the run's params, as promote and compare do
    assert len(data.forecast_data) == 22
    assert score(version, data) == pytest.approx(result["scores"]["rnnflow-lstm"]["mase"], rel=1e-5)

"""A global model (--id-column) with covariates known ahead, calendar features and per-series
attributes (--future-covariate-columns, --holidays, --static-columns): through the command line a
user types, the registered model, REST, and their bad input as one line before any training."""

import json
import logging
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from rnn_models.panel import Panel, PanelWindows, encode, encoded_batches
from rnn_models.statics import StaticEncoding
from rnn_models.transforms import Baseline, Chain, Log, Scale, WindowNorm
from tests.serving import invoke, rnnflow_served
from tests.test_future_covariates import champion, forecast

ROOT = Path(__file__).resolve().parents[1]
STORES = ROOT / "data" / "stores.csv"  # benchmarks/panel_data.py: promotions lift sales 1.6x, US holidays halve them
PANEL = ["--source", "file", "--data", str(STORES), "--id-column", "store", "--value-column", "sales", "--horizon",
         "7", "--ensemble", "1", "--no-auto", "--window-norm", "last", "--epochs", "15"]
KNOWN = ["--future-covariate-columns", "promo,price", "--static-columns", "store_type,size", "--holidays", "US"]
L, H = 70, 7  # ten weeks of days: the default lookback of daily data with --id-column, where every store holds it


@pytest.fixture(scope="module")
def stores(tmp_path_factory, fresh_store):
    """(store URI, the run's params, its metrics): ``stores`` trained by the command line with every kind of
    input known ahead, and ``plain`` without them, on the same data and splits."""
    work = tmp_path_factory.mktemp("stores")
    uri = fresh_store(work / "mlflow.db")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RNNFLOW_CHECKPOINTS": str(work / "checkpoints")}
    for name, extra in (("stores", [*KNOWN, "--intervals", "0.8"]), ("plain", [])):
        out = forecast(*PANEL, *extra, "--model-name", name, env=env, cwd=work)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return uri


def run_of(uri: str, name: str):
    client = mlflow.MlflowClient(uri, uri)
    return client.get_run(client.get_model_version(name, "1").run_id).data


def request(stores=("store00", "store03"), promo_on: int | None = None) -> pd.DataFrame:
    """Each store's last L days, then the H days after them (sales empty; promo only on day ``promo_on``)."""
    frame = pd.read_csv(STORES)
    parts = []
    for sid in stores:
        own = frame[frame["store"] == sid].iloc[-(L + H):].copy()
        own.loc[own.index[-H:], "sales"] = np.nan
        own.loc[own.index[-H:], "promo"] = [int(d == promo_on) for d in range(1, H + 1)]
        parts.append(own)
    return pd.concat(parts, ignore_index=True)


def test_known_inputs_and_attributes_cut_the_error_and_are_logged(stores):
    known, plain = run_of(stores, "stores"), run_of(stores, "plain")
    assert known.metrics["test_mase"] < 0.7 * plain.metrics["test_mase"], (known.metrics, plain.metrics)
    assert known.params["static_columns"] == "store_type,size" and known.params["holidays"] == "US"
    assert 0.6 <= known.metrics["test_coverage_0.8"] <= 1.0


def test_the_registered_model_reads_each_stores_days_ahead_and_a_promotion_lifts_its_day(stores):
    model = champion(stores, "stores")
    schema = [c.name for c in model.metadata.get_input_schema().inputs]
    assert schema == ["store", "date", "sales", "promo", "price", "store_type", "size"]
    plain, promo = model.predict(request()), model.predict(request(promo_on=3))
    assert list(plain.columns) == ["store", "step", "forecast", "lo0.8", "hi0.8"] and len(plain) == 2 * H
    assert plain["store"].tolist() == ["store00"] * H + ["store03"] * H
    lift = (promo["forecast"] / plain["forecast"]).to_numpy().reshape(2, H)
    # the day of the promotion (the true lift is 1.6x; a lone promotion day is rarer than the runs trained on)
    assert (lift[:, 2] > 1.1).all(), lift
    assert (np.abs(np.delete(lift, 2, axis=1) - 1) < 0.05).all(), lift  # and that day only


def test_an_unseen_category_is_read_as_none_and_said(stores, caplog):
    model = champion(stores, "stores")
    new = request(("store01",)).assign(store="new", store_type="z")
    with caplog.at_level(logging.WARNING):
        out = model.predict(new)
    assert len(out) == H and np.isfinite(out["forecast"]).all()
    assert "'z' was not seen in training: read as no category (column 'store_type')" in caplog.text


@pytest.mark.parametrize("case, expected", [
    ("no days ahead", "series 'store00': this model reads ['promo', 'price'] for the 7 steps ahead: give them in 7 "
                      "rows after the history, with 'sales' empty (got 0 such rows)"),
    ("a hole", "series 'store03': column 'price' is missing for step 4 ahead"),
    ("varying", "static column 'store_type' varies within series 'store00' ('b' and 'a')"),
    ("no attribute", "missing inputs ['size']"),  # MLflow's own check of the signature
])
def test_a_bad_request_is_refused_naming_the_series_column_and_step(stores, case, expected):
    body = request()
    if case == "no days ahead":
        body = body[body["sales"].notna()]
    elif case == "a hole":
        body.loc[body.index[-H + 3], "price"] = np.nan
    elif case == "varying":
        body.loc[body.index[0], "store_type"] = "b"
    else:
        body = body.drop(columns="size")
    with pytest.raises(mlflow.exceptions.MlflowException) as e:
        champion(stores, "stores").predict(body)
    assert expected in str(e.value), str(e.value)


def test_over_rest_each_series_sends_its_days_ahead(stores):
    body = request()
    payload = {"dataframe_split": {"columns": list(body.columns), "data": json.loads(body.to_json(orient="values"))}}
    with rnnflow_served("stores", stores, workers=1) as base:
        status, answer = invoke(base, payload)
        assert status == 200, answer
        assert [r["store"] for r in answer["predictions"]] == ["store00"] * H + ["store03"] * H
        history = [row for row in payload["dataframe_split"]["data"] if row[2] is not None]
        status, answer = invoke(base, {"dataframe_split": {"columns": list(body.columns), "data": history}})
        assert 400 <= status < 500 and "for the 7 steps ahead" in answer["message"], (status, answer)


def test_the_champion_gate_scores_a_champion_that_reads_other_columns(stores, tmp_path):
    """A second run without covariates meets ``stores`` v1 (which reads them) at the gate: the champion is
    scored on the challenger's data only if that holds its columns; here it does not, and it is said."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": stores, "RNNFLOW_CHECKPOINTS": str(tmp_path / "checkpoints")}
    out = forecast(*PANEL, "--epochs", "1", "--model-name", "stores", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "reads ['promo', 'price'" in out.stdout + out.stderr
    client = mlflow.MlflowClient(stores, stores)
    assert str(client.get_model_version_by_alias("stores", "champion").version) == "1"


@pytest.mark.parametrize("args, expected", [
    (["--static-columns", "store_type"], "--static-columns needs --id-column"),
    (["--id-column", "store", "--static-columns", "region"], "no static column 'region'"),
    (["--id-column", "store", "--static-columns", "VARYING"], "static column 'promo' varies within series 'store00'"),
    (["--id-column", "store", "--covariate-columns", "promo"], "--covariate-columns cannot be used with --id-column"),
    (["--id-column", "store", "--future-covariate-columns", "region"], "no future covariate column 'region'"),
    (["--id-column", "store", "--calendar", "--data", "STEPS", "--season-length", "7"],
     "--calendar: calendar features need dates, and column 'day' holds step numbers"),
])
def test_bad_panel_covariates_are_one_line_before_training(tmp_path, mlflow_store, args, expected):
    steps = tmp_path / "steps.csv"
    pd.read_csv(STORES).assign(day=lambda d: d.groupby("store").cumcount()).drop(columns="date").to_csv(steps,
                                                                                                       index=False)
    args = [str(steps) if a == "STEPS" else "promo" if a == "VARYING" else a for a in args]
    out = forecast("--source", "file", "--data", str(STORES), "--value-column", "sales", *args, env={**os.environ},
                   cwd=tmp_path, timeout=120)
    assert out.returncode != 0
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line, out.stderr
    assert not (tmp_path / "mlruns").exists() or not list((tmp_path / "mlruns").rglob("*.safetensors"))


# ---------------------------------------------------------------- the pieces


def test_lazy_windows_with_covariates_equal_the_numpy_chain_and_scale():
    rng = np.random.default_rng(0)
    series = [np.column_stack([rng.normal(size=n).cumsum() + 50, rng.integers(0, 2, n), rng.normal(size=n)])
              for n in (60, 45)]
    windows = PanelWindows(Panel.from_series(series, dtype=torch.float64), 12, 4, np.zeros(2, int), np.array([60, 45]))
    x, y, future = windows.gather(torch.arange(len(windows)))
    assert x.shape[1:] == (12, 3) and future.shape[1:] == (4, 2)
    ahead = Scale(np.array([0.5, 1.0]), np.array([0.5, 2.0]))
    for steps in ([WindowNorm("last")], [WindowNorm("mean"), Baseline(3)], [WindowNorm("level")],
                  [Log(), WindowNorm("log-level")], [Scale(np.ones(3), np.full(3, 2.0))]):
        chain = Chain(steps)
        want_x, want_y, _ = chain.encode(x.numpy(), y.numpy())
        got = next(encoded_batches(windows, chain, len(windows), ahead=ahead))
        np.testing.assert_allclose(got[0].numpy(), want_x, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got[1].numpy(), ahead.forward(future.numpy(), None)[0], rtol=1e-12)
        np.testing.assert_allclose(got[2].numpy(), want_y, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(encode(chain, x, y)[1].numpy(), want_y, rtol=1e-9, atol=1e-12)


def test_attributes_encode_one_hot_and_numeric_and_round_trip():
    attrs = pd.DataFrame({"kind": ["b", "a", "b"], "size": [1.0, 2.0, 3.0]}, index=["x", "y", "z"])
    enc = StaticEncoding.fit(attrs)
    assert enc.columns == ["kind=a", "kind=b", "size"]
    values, unseen = enc.encode(attrs)
    np.testing.assert_array_equal(values, [[0, 1, 1], [1, 0, 2], [0, 1, 3]])
    again = StaticEncoding.from_dict(json.loads(json.dumps(enc.to_dict())))
    values, unseen = again.encode(pd.DataFrame({"kind": ["c"], "size": [4.0]}))
    np.testing.assert_array_equal(values, [[0, 0, 4]])
    assert unseen == {"kind": ["c"]}

"""--future-covariate-columns: covariates known for the horizon too (a promotion, a price), through
the command line a user types, the registered model, REST and a deployment's schema; their bad
input is one line before any training."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from rnn_models.recurrent import Forecaster, ForecasterConfig
from tests.serving import invoke, rnnflow_served

ROOT = Path(__file__).resolve().parents[1]
PROMOS = ROOT / "data" / "promotions.csv"  # rnn_models.synthetic.promotions(): a promotion lifts sales by 40
QUICK = ["--source", "file", "--data", str(PROMOS), "--horizon", "7", "--lookback", "28", "--epochs", "8",
         "--ensemble", "1", "--no-auto", "--window-norm", "mean", "--hidden-size", "32"]


def forecast(*args: str, env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.timeseries", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def registered(tmp_path_factory, fresh_store):
    """``promos``, trained and registered by the command line with promo and price known ahead."""
    work = tmp_path_factory.mktemp("future")
    uri = fresh_store(work / 'mlflow.db')
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RNNFLOW_CHECKPOINTS": str(work / "checkpoints")}
    out = forecast(*QUICK, "--future-covariate-columns", "promo,price", "--intervals", "0.8", "--model-name",
                   "promos", env=env, cwd=work)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # a second run meets v1 at the champion gate, which scores it on the same test origins
    out = forecast(*QUICK, "--future-covariate-columns", "promo,price", "--intervals", "0.8", "--model-name", "promos",
                   "--seed", "1", env=env, cwd=work)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return uri


def champion(store: str, name: str = "promos"):
    """``name@champion`` loaded from ``store``, MLflow's process-wide URIs put back after."""
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(store), mlflow.set_registry_uri(store)
    try:
        return mlflow.pyfunc.load_model(f"models:/{name}@champion")
    finally:
        mlflow.set_tracking_uri(before[0]), mlflow.set_registry_uri(before[1])


def request(rows: int, ahead: pd.DataFrame | None = None) -> pd.DataFrame:
    """The first ``rows`` days of history, then ``ahead`` (promo, price of the days to come; sales empty)."""
    frame = pd.read_csv(PROMOS)
    history = frame[["sales", "promo", "price"]].iloc[:rows]
    return history if ahead is None else pd.concat([history, ahead.assign(sales=np.nan)], ignore_index=True)


def days_ahead(promo_on: tuple[int, ...] = ()) -> pd.DataFrame:
    return pd.DataFrame({"promo": [int(d in promo_on) for d in range(1, 8)],
                         "price": [7.99 if d in promo_on else 9.99 for d in range(1, 8)]})


def test_the_champion_gate_scores_a_champion_that_reads_the_days_ahead(registered):
    client = mlflow.MlflowClient(registered, registered)
    second = client.get_run(client.get_model_version("promos", "2").run_id).data
    assert second.metrics["champion_test_mase"] < 1.0, second.metrics  # scored with its covariates, beating naive
    assert second.params["future_covariate_columns"] == "promo,price"


def test_the_registered_model_reads_the_days_ahead_and_a_promotion_lifts_its_day(registered):
    model = champion(registered)
    plain = model.predict(request(100, days_ahead()))
    promo = model.predict(request(100, days_ahead(promo_on=(3,))))
    assert list(plain.columns) == ["step", "forecast", "lo0.8", "hi0.8"] and len(plain) == 7
    lift = (promo["forecast"] - plain["forecast"]).to_numpy()
    assert lift[2] > 20, lift  # the day of the promotion: the true lift is 40
    assert np.abs(np.delete(lift, 2)).max() < lift[2] / 2, lift  # and mostly that day


@pytest.mark.parametrize("case, ahead, expected", [
    ("no steps ahead", None, "reads ['promo', 'price'] for the 7 steps ahead: give them in 7 rows after the "
                             "history, with 'sales' empty (got 0 such rows)"),
    ("too few", days_ahead().iloc[:3], "(got 3 such rows)"),
    ("a hole", days_ahead().assign(price=[9.99, 9.99, np.nan, 9.99, 9.99, 9.99, 9.99]),
     "column 'price' is missing for step 3 ahead"),
])
def test_a_request_without_the_steps_ahead_is_refused_naming_the_column_and_step(registered, case, ahead, expected):
    model = champion(registered)
    with pytest.raises(mlflow.exceptions.MlflowException, match=expected.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        model.predict(request(100, ahead))


def test_over_rest_the_days_ahead_are_rows_with_an_empty_value(registered):
    body = request(60, days_ahead(promo_on=(1,)))
    payload = {"dataframe_split": {"columns": list(body.columns),
                                   "data": json.loads(body.to_json(orient="values"))}}  # NaN -> null
    with rnnflow_served("promos", registered, workers=1) as base:
        status, answer = invoke(base, payload)
        assert status == 200, answer
        assert [r["step"] for r in answer["predictions"]] == list(range(1, 8))
        status, answer = invoke(base, {"dataframe_split": {"columns": ["sales", "promo", "price"],
                                                           "data": payload["dataframe_split"]["data"][:60]}})
        assert 400 <= status < 500 and "for the 7 steps ahead" in answer["message"], (status, answer)


@pytest.mark.parametrize("args, expected", [
    (["--future-covariate-columns", "discount"], "no future covariate column 'discount'; the columns are"),
    (["--future-covariate-columns", "promo", "--covariate-columns", "promo"], "column 'promo' is named twice"),
    (["--covariate-columns", "promo", "--id-column", "id"],
     "--covariate-columns cannot be used with --id-column: a global model reads covariates known ahead"),
])
def test_bad_future_covariates_are_one_line_before_training(tmp_path, mlflow_store, args, expected):
    out = forecast(*QUICK, *args, env={**os.environ}, cwd=tmp_path, timeout=120)
    assert out.returncode != 0
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line, out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_a_generated_series_has_no_columns_to_name(tmp_path, mlflow_store):
    out = forecast("--future-covariate-columns", "promo", env={**os.environ}, cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "--future-covariate-columns is only read with --source file" in out.stderr


def test_the_decoder_reads_each_step_ahead_and_is_absent_without_covariates():
    torch.manual_seed(0)
    net = Forecaster(ForecasterConfig(input_size=3, hidden_size=8, horizon=4, future_size=2))
    x, future = torch.randn(5, 10, 3), torch.zeros(5, 4, 2)
    base = net(x, future)
    future[:, 2, 0] = 1.0
    moved = (net(x, future) - base).abs()
    assert base.shape == (5, 4) and moved[:, 2].min() > 0 and moved[:, [0, 1, 3]].max() == 0
    with pytest.raises(ValueError, match="reads 2 covariates known for the horizon"):
        net(x)
    assert Forecaster(ForecasterConfig(input_size=1, hidden_size=8, horizon=4)).decoder is None

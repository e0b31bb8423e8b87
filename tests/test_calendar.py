"""--calendar / --no-calendar / --holidays: calendar features made from the time column for history
and horizon, through the command line a user types and the registered model (which needs nothing
but the time column); --auto's choice of them; their bad input is one line before any training."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from rnn_models.calendar import calendar_columns, calendar_frame, frequency_kind, holiday_flags, times_ahead
from tests.serving import invoke, rnnflow_served

ROOT = Path(__file__).resolve().parents[1]
SALES = ROOT / "data" / "holiday_sales.csv"  # rnn_models.synthetic.holiday_sales(): US holidays cut sales by 60
QUICK = ["--source", "file", "--data", str(SALES), "--horizon", "7", "--lookback", "28", "--epochs", "12",
         "--ensemble", "1", "--hidden-size", "16"]
JULY_4 = 185  # the row of 2024-07-04 in SALES


def forecast(*args: str, env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.timeseries", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def store(tmp_path_factory, fresh_store):
    """Two models trained by the command line on SALES: ``holidays`` with --holidays US (and --no-auto),
    ``chosen`` with the calendar left to --auto."""
    work = tmp_path_factory.mktemp("calendar")
    uri = fresh_store(work / 'mlflow.db')
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RNNFLOW_CHECKPOINTS": str(work / "checkpoints")}
    for args in (["--holidays", "US", "--no-auto", "--window-norm", "mean", "--model-name", "holidays"],
                 ["--model-name", "chosen"]):
        out = forecast(*QUICK, *args, env=env, cwd=work)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return uri


def load(uri: str, name: str):
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri), mlflow.set_registry_uri(uri)
    try:
        return mlflow.pyfunc.load_model(f"models:/{name}@champion")
    finally:
        mlflow.set_tracking_uri(before[0]), mlflow.set_registry_uri(before[1])


def test_the_features_fit_the_frequency_and_wrap_around():
    assert [frequency_kind(f) for f in ("h", "15min", "D", "B", "W-SUN", "7D", "MS", "QS-JAN", "YS")] == [
        "sub-daily", "sub-daily", "daily", "daily", "weekly", "weekly", "monthly", "quarterly", "yearly"]
    assert calendar_columns("h", ["US"]) == ["cal_hour_sin", "cal_hour_cos", "cal_weekday_sin", "cal_weekday_cos",
                                             "cal_holiday"]
    assert calendar_columns("MS") == ["cal_month_sin", "cal_month_cos"]
    hours = calendar_frame(pd.date_range("2024-01-01", periods=48, freq="h"), "h")
    hour, weekday = hours[["cal_hour_sin", "cal_hour_cos"]], hours[["cal_weekday_sin", "cal_weekday_cos"]]
    assert np.allclose(hour.iloc[0], hour.iloc[24]) and not np.allclose(weekday.iloc[0], weekday.iloc[24])
    assert np.allclose(weekday.iloc[0], weekday.iloc[23]) and not np.allclose(hour.iloc[0], hour.iloc[12])
    assert hour["cal_hour_cos"].iloc[23] > 0.96  # hour 23 lies next to hour 0
    days = pd.date_range("2024-07-01", periods=7, freq="D")
    assert holiday_flags(days, ["US"]).tolist() == [0, 0, 0, 1, 0, 0, 0]  # Independence Day
    assert holiday_flags(days, ["DE"]).sum() == 0
    assert list(times_ahead(pd.Timestamp("2024-01-31"), "MS", 2)) == [pd.Timestamp("2024-02-01"),
                                                                      pd.Timestamp("2024-03-01")]
    for freq, expected in ((None, "need dates"), ("YS", "no calendar position"), ("MS", "daily or finer")):
        with pytest.raises(ValueError, match=expected):
            calendar_columns(freq, ["US"] if freq == "MS" else [])


def test_a_model_trained_with_holidays_needs_only_the_time_column_and_foresees_the_holiday(store):
    model = load(store, "holidays")
    history = pd.read_csv(SALES)
    meta = model.unwrap_python_model().pipeline.meta
    assert meta["calendar"] == {"columns": ["cal_weekday_sin", "cal_weekday_cos", "cal_monthday_sin",
                                            "cal_monthday_cos", "cal_yearday_sin", "cal_yearday_cos",
                                            "cal_holiday"], "countries": ["US"]}
    out = model.predict(history.iloc[: JULY_4 - 3])  # history to 1 July: 4 July is step 4 ahead
    assert list(out["step"]) == list(range(1, 8)) and np.isfinite(out["forecast"]).all()
    # the shop is half closed on the holiday (sales 60 lower than on a day like it): the forecast foresees most of it
    assert out["forecast"].iloc[3] < history["sales"].iloc[JULY_4] + 30, out
    with pytest.raises(mlflow.exceptions.MlflowException, match="missing inputs \\['date'\\]"):
        model.predict(history[["sales"]].iloc[:100])


def test_over_rest_a_request_is_the_history_with_its_dates(store):
    body = pd.read_csv(SALES).iloc[:120]
    with rnnflow_served("holidays", store, workers=1) as base:
        status, answer = invoke(base, {"dataframe_split": {"columns": list(body.columns),
                                                           "data": json.loads(body.to_json(orient="values"))}})
        assert status == 200 and [r["step"] for r in answer["predictions"]] == list(range(1, 8)), answer
        bad = body.assign(date=body["date"].where(body.index != 110, "someday"))
        status, answer = invoke(base, {"dataframe_split": {"columns": list(bad.columns),
                                                           "data": json.loads(bad.to_json(orient="values"))}})
        assert 400 <= status < 500 and "column 'date' has a value that is not a time, 'someday' at row 111" in \
            answer["message"], answer


def test_auto_tries_the_calendar_on_validation_and_logs_the_choice(store):
    client = mlflow.MlflowClient(store, store)
    run = client.get_run(client.get_model_version("chosen", "1").run_id)
    auto = Path(client.download_artifacts(run.info.run_id, "auto.md")).read_text()
    rows = [line for line in auto.splitlines() if line.startswith("| ") and "candidate" not in line]
    assert len(rows) == 7 and "+ calendar" in rows[-1], auto  # six transform candidates, then the best + calendar
    kept = run.data.params["calendar"] == "True"
    assert kept == ("(chosen)" in rows[-1]), (run.data.params["calendar"], auto)
    assert run.data.params["auto_choice"].endswith("+ calendar") == kept


def test_a_generated_series_has_no_dates(tmp_path, mlflow_store):
    out = forecast("--calendar", env={**os.environ}, cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "--calendar needs dates: read them with --source file" in out.stderr


def test_a_series_without_dates_or_without_auto_gets_no_calendar(tmp_path, mlflow_store):
    steps = tmp_path / "steps.csv"
    pd.read_csv(SALES).assign(date=range(730)).to_csv(steps, index=False)
    env = {**os.environ}
    out = forecast(*QUICK, "--epochs", "1", "--data", str(steps), "--model-name", "steps", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "+ calendar" not in out.stdout
    client = mlflow.MlflowClient(mlflow_store, mlflow_store)
    assert client.get_run(client.get_model_version("steps", "1").run_id).data.params["calendar"] == "False"
    out = forecast(*QUICK, "--epochs", "1", "--no-auto", "--window-norm", "mean", "--model-name", "plain",
                   env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert client.get_run(client.get_model_version("plain", "1").run_id).data.params["calendar"] == "False"


@pytest.mark.parametrize("args, expected", [
    (["--holidays", "XX"], "--holidays: 'XX' is not a country code the holidays library knows"),
    (["--holidays", "US", "--no-calendar"], "--holidays is a calendar feature: drop --no-calendar"),
    (["--calendar", "--data", "STEPS"], "--calendar: calendar features need dates, and column 'date' holds step "
                                        "numbers"),
])
def test_bad_calendar_options_are_one_line_before_training(tmp_path, mlflow_store, args, expected):
    steps = tmp_path / "steps.csv"
    pd.DataFrame({"date": range(100), "sales": np.arange(100.0)}).to_csv(steps, index=False)
    args = [str(steps) if a == "STEPS" else a for a in args]
    out = forecast(*QUICK, *args, env={**os.environ}, cwd=tmp_path, timeout=120)
    assert out.returncode != 0
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line, out.stderr
    assert "Traceback" not in out.stdout + out.stderr

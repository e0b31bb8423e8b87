"""Conformal intervals (``--intervals``): the calibration, its promise on fresh data, the registered
model's lo/hi columns for one series and many, and the option's bad values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from flows.timeseries import timeseries_flow
from rnn_models.conformal import calibrate, interval_scores, needed, rank, window_scale
from tasks.config import ConfigError, TimeSeriesConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(length=600, lookback=12, hidden_size=16, epochs=3, batch_size=16, patience=0, device="cpu")


def noisy_windows(rng, n: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n windows of a random walk with steps of ``scale``, a forecast that is the last value, and the
    actual that followed: its error scales with the walk's own step."""
    steps = rng.normal(scale=scale, size=(n, 9))
    windows = steps[:, :8].cumsum(axis=1)[..., None] + 100.0
    point = np.repeat(windows[:, -1, :], 2, axis=1)  # (n, 2)
    actual = point + steps[:, 8:9] * np.array([1.0, 2.0])  # step 2 errs twice as much
    return windows, actual, point


def test_calibrated_intervals_cover_their_level_of_fresh_errors_at_any_scale():
    rng = np.random.default_rng(0)
    windows, actual, point = noisy_windows(rng, 400, 1.0)
    cal = calibrate(windows, actual, point, (0.8, 0.95))
    assert cal.calibrated_on == 400 and cal.short == () and cal.radius.shape == (2, 2)
    assert (cal.radius[1] > cal.radius[0]).all() and (cal.radius[:, 1] > cal.radius[:, 0]).all()
    for scale in (1.0, 1000.0):  # scaled by each window's own moves: one table serves series of any level
        fresh, fresh_actual, fresh_point = noisy_windows(rng, 4000, scale)
        for level, (lo, hi) in cal.bounds(fresh, fresh_point).items():
            covered = np.mean((fresh_actual >= lo) & (fresh_actual <= hi))
            assert covered == pytest.approx(level, abs=0.03), (scale, level)


def test_the_radius_is_the_conformal_rank_and_too_few_errors_say_so():
    windows = np.stack([np.arange(5.0)] * 9)[..., None]  # every window moves 1 a step: scale 1
    np.testing.assert_allclose(window_scale(windows), 1.0)
    point = np.zeros((9, 1))
    actual = np.arange(1.0, 10.0)[:, None]  # errors 1..9
    cal = calibrate(windows, actual, point, (0.8, 0.95))
    assert rank(0.8, 9) == 8 and cal.radius[0, 0] == 8.0  # ceil(10 x 0.8) = 8th smallest
    assert cal.short == (0.95,) and cal.radius[1, 0] == 9.0  # 9 < 0.95 / 0.05: the largest error
    assert "9 held-out errors are too few to promise level(s) 0.95 (they need at least 19)" in cal.markdown()
    for level, n in ((0.5, 1), (0.8, 4), (0.9, 9), (0.95, 19), (0.99, 99)):  # the least n with rank <= n
        assert needed(level) == n and rank(level, n) <= n and rank(level, n - 1) > n - 1


def test_msis_is_m4s_interval_score_averaged_within_then_over_series():
    actual = np.array([[1.0], [5.0], [0.0]])
    lo, hi = np.zeros((3, 1)), np.full((3, 1), 2.0)
    # widths 2; misses: 0, 3 (above), 0; level 0.8: 2 / 0.2 = 10 per unit missed
    scores = interval_scores(actual, lo, hi, 0.8, np.array([1.0, 1.0, 2.0]), np.array([0, 0, 1]))
    assert scores["coverage"] == pytest.approx(2 / 3)
    assert scores["msis"] == pytest.approx(((2 + 32) / 2 + 2 / 2) / 2)


@pytest.mark.parametrize("value, message", [
    ("1.2", "--intervals must lie strictly between 0 and 1, got [1.2]"),
    ("0", "--intervals must lie strictly between 0 and 1, got [0.0]"),
    ("0.8;0.9", "--intervals must be comma-separated numbers, got '0.8;0.9'"),
])
def test_a_bad_level_is_refused(value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TimeSeriesConfig(intervals=value)


def test_a_bad_level_is_one_line_from_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flows.timeseries", "--intervals", "0.8,95"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: --intervals must lie strictly between 0 and 1, got [95.0]"]
    assert not (tmp_path / "mlruns").exists()


def test_one_series_registers_intervals_that_are_logged_and_served(mlflow_store):
    result = timeseries_flow(**TINY, model_name="iv", horizon=3, ensemble=2, quantiles="0.1,0.9",
                             intervals="0.95,0.8")
    assert "conformal 0.8 interval (calibrated on" in result["report"]
    run = MlflowClient(mlflow_store, mlflow_store).get_run(result["run_id"])
    for level in ("0.8", "0.95"):
        assert 0 <= run.data.metrics[f"test_coverage_{level}"] <= 1 and run.data.metrics[f"test_msis_{level}"] > 0
    n = int(run.data.params["intervals_calibrated_on"])
    table = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="intervals.md")).read_text()
    assert f"calibrated on {n} held-out validation errors per horizon step" in table and "| 0.95 |" in table

    model = mlflow.pyfunc.load_model("models:/iv@champion")
    out = model.predict(pd.DataFrame({"value": np.sin(2 * np.pi * np.arange(60) / 40)}))
    assert list(out.columns) == ["step", "forecast", "q0.1", "q0.5", "q0.9", "lo0.8", "hi0.8", "lo0.95", "hi0.95"]
    assert (out["lo0.95"] <= out["lo0.8"]).all() and (out["lo0.8"] <= out["forecast"]).all()
    assert (out["forecast"] <= out["hi0.8"]).all() and (out["hi0.8"] <= out["hi0.95"]).all()


def test_many_series_get_intervals_each_at_its_own_scale(tmp_path, mlflow_store):
    rng = np.random.default_rng(1)
    rows = [pd.DataFrame({"id": f"s{i}", "t": np.arange(160),
                          "value": scale * (10 + np.sin(np.arange(160) / 4) + rng.normal(scale=0.1, size=160))})
            for i, scale in enumerate((1.0, 100.0, 1.0, 100.0))]
    path = tmp_path / "panel.csv"
    pd.concat(rows).to_csv(path, index=False)
    timeseries_flow(**{**TINY, "epochs": 2}, source="file", data=str(path), id_column="id", time_column="t",
                    horizon=4, season_length=25, model_name="panel-iv", intervals="0.9", ensemble=1, auto=False,
                    window_norm="last")
    model = mlflow.pyfunc.load_model("models:/panel-iv@champion")
    out = model.predict(pd.read_csv(path)[["id", "value"]])
    assert list(out.columns) == ["id", "step", "forecast", "lo0.9", "hi0.9"] and len(out) == 16
    width = (out["hi0.9"] - out["lo0.9"]).groupby(out["id"]).mean()
    assert (width > 0).all() and width["s1"] > 20 * width["s0"]  # a series 100 times larger, a wider interval

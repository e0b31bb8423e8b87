"""Rolling-origin backtest over the test part, against naive and seasonal-naive forecasts,
and the plots that go with it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rnn_models import metrics
from rnn_models.conformal import coverage_lines, interval_scores, short_note
from rnn_models.forecasting import ForecastPipeline
from rnn_models.training import FitResult
from rnn_models.windows import Split
from tasks import run_logger
from tasks.data import Series
from tasks.features import Data, Origins, Windows
from tasks.panel import PanelBacktest, PanelData, PanelSplit, panel_windows, score_panel, score_table
from tasks.training import Trained


@dataclass
class Backtest:
    origins: np.ndarray  # (N,) index of each origin's first forecast step
    actual: np.ndarray  # (N, H) original units
    forecasts: dict[str, np.ndarray]  # model name -> (N, H)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    season_length: int = 1
    quantiles: dict[str, np.ndarray] = field(default_factory=dict)  # model name -> (N, H, Q)
    levels: tuple[float, ...] = ()
    intervals: dict[str, dict[str, float]] = field(default_factory=dict)  # model name -> coverage, spl
    conformal: dict[float, dict[str, float]] = field(default_factory=dict)  # --intervals level -> coverage, msis
    calibrated_on: int = 0
    bounds: dict[float, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # level -> (N, H) each

    def markdown(self, title: str = "Backtest") -> str:
        n, h = self.actual.shape
        lines = score_table(title, f"Rolling origin over the test part: {n} origins x {h} steps; MASE scaled by the "
                            f"in-sample seasonal-naive error (season {self.season_length}).", self.scores)
        for name, s in self.intervals.items():
            lines += ["", f"{name}: the {self.levels[0]:g}-{self.levels[-1]:g} quantile interval covers "
                      f"{100 * s['coverage']:.1f} % of actual values (nominal {100 * s['nominal']:.0f} %); "
                      f"mean scaled pinball loss {s['spl']:.4g} over quantiles {', '.join(map(str, self.levels))}."]
        lines += ["", *coverage_lines(self.conformal, self.calibrated_on)] if self.conformal else []
        return "\n".join(lines)


def run_backtest(series: Series, split: Split, origins: np.ndarray, horizon: int,
                 forecasts: dict[str, np.ndarray], levels: tuple[float, ...] = ()) -> Backtest:
    """Score ``forecasts`` (name -> (N, H), or (N, H, Q) quantiles at ``levels`` whose median is
    scored as the point forecast) and the naive baselines on the same origins."""
    y = series.features[:, 0]  # target in original units
    actual = y[origins[:, None] + np.arange(horizon)[None, :]]  # (N, H)
    m = series.season_length
    scale = metrics.seasonal_naive_scale(y[: split.train_end], m)
    quantiles = {name: f for name, f in forecasts.items() if f.ndim == 3}
    points = {name: f[..., levels.index(0.5)] if f.ndim == 3 else f for name, f in forecasts.items()}
    all_f = {**points,
             "naive": metrics.naive_forecast(y, origins, horizon),
             "seasonal-naive": metrics.seasonal_naive_forecast(y, origins, horizon, m)}
    scores = {name: metrics.score(actual, f, scale) for name, f in all_f.items()}
    intervals = {name: metrics.interval_scores(actual, f, levels, scale) for name, f in quantiles.items()}
    return Backtest(origins, actual, all_f, scores, m, quantiles, tuple(levels), intervals)


def history_windows(data: Data, origins: Origins, lookback: int, ahead: int = 0) -> np.ndarray:
    """Raw input windows (N, L, F) in original units ending just before each origin (of each
    series in turn); with ``ahead`` (a model reading covariates known ahead), the ``ahead`` steps
    from the origin on too, (N, L + ahead, F), their target not read."""
    if isinstance(data, PanelData):
        return panel_windows(data, origins, lookback, ahead)
    steps = origins[:, None] + np.arange(-lookback, ahead)[None, :]
    return data.features[steps]


def score(data: Data, split: Split | PanelSplit, origins: Origins, horizon: int, forecasts: dict[str, np.ndarray],
          levels: tuple[float, ...] = ()) -> Backtest | PanelBacktest:
    """``forecasts`` (name -> (N, H), or (N, H, Q) quantiles at ``levels``) scored beside the
    naive baselines: of one series, or of each of many and their means."""
    if isinstance(data, PanelData):
        points = {name: f[..., levels.index(0.5)] if f.ndim == 3 else f for name, f in forecasts.items()}
        return score_panel(data, split, origins, horizon, points)
    return run_backtest(data, split, origins, horizon, forecasts, levels)


def backtest(data: Data, windows: Windows, pipeline: ForecastPipeline, label: str) -> Backtest | PanelBacktest:
    """The pipeline's forecasts of every test origin, in one batched call, and each ensemble
    member's beside them, against the baselines; with --intervals, their coverage and MSIS."""
    origins = windows.test_origins
    x = history_windows(data, origins, pipeline.lookback, pipeline.ahead)
    forecast, each = pipeline.predict(x, members=True)
    members = {f"{label}-member{i + 1}": f for i, f in enumerate(each)} if len(each) > 1 else {}
    bt = score(data, windows.split, origins, pipeline.horizon, {label: forecast, **members}, pipeline.quantiles)
    if pipeline.calibration:
        actual, scales = actuals(data, origins, pipeline.horizon), in_sample_scales(data, windows.split, origins)
        bounds = pipeline.bounds(x, forecast)
        bt.conformal = {a: interval_scores(actual, lo, hi, a, *scales) for a, (lo, hi) in bounds.items()}
        bt.calibrated_on = pipeline.calibration.calibrated_on
        if isinstance(bt, Backtest):  # for its plot
            bt.bounds = bounds
    return bt


def calibrate_intervals(data: Data, windows: Windows, trained: Trained, levels: tuple[float, ...]) -> Trained:
    """--intervals: the trained model's conformal intervals, calibrated per horizon step on the
    validation part's origins, errors it did not train on (``rnn_models.conformal``)."""
    if levels:
        pipeline, origins = trained.pipeline(), windows.val_origins
        cal = pipeline.calibrate(history_windows(data, origins, pipeline.lookback, pipeline.ahead),
                                 actuals(data, origins, pipeline.horizon), levels)
        run_logger().info("intervals %s calibrated on %d validation errors per horizon step",
                          ", ".join(f"{a:g}" for a in levels), cal.calibrated_on)
        if cal.short:
            run_logger().warning(short_note(cal))
    return trained


def actuals(data: Data, origins: Origins, horizon: int) -> np.ndarray:
    """The target's values (N, H) from each origin on (of each series in turn)."""
    steps = np.arange(horizon)[None, :]
    if isinstance(data, PanelData):
        return np.concatenate([v[o[:, None] + steps] for v, o in zip(data.values, origins, strict=True)])
    return data.features[:, 0][origins[:, None] + steps]


def in_sample_scales(data: Data, split: Split | PanelSplit, origins: Origins) -> tuple[np.ndarray, np.ndarray]:
    """Each origin's MASE denominator (its series' in-sample seasonal-naive error) and series number."""
    if isinstance(data, PanelData):
        counts = [len(o) for o in origins]
        scales = [metrics.seasonal_naive_scale(v[:end], data.season_length)
                  for v, end in zip(data.values, split.train_end, strict=True)]
        return np.repeat(scales, counts), np.repeat(np.arange(len(counts)), counts)
    scale = metrics.seasonal_naive_scale(data.features[: split.train_end, 0], data.season_length)
    return np.full(len(origins), scale), np.zeros(len(origins), dtype=np.int64)


def forecast_with(predict: Callable[[pd.DataFrame], pd.DataFrame], series: Series, origins: np.ndarray,
                  horizon: int) -> np.ndarray:
    """Forecasts (N, H) from a served-model style ``predict(history frame) -> frame`` (e.g. a
    champion loaded from the registry), one origin at a time as a user would call it."""
    frame = series.frame[[series.value_column, *series.covariate_columns]]
    rows = [predict(frame.iloc[:o])["forecast"].to_numpy()[:horizon] for o in origins]
    return np.stack(rows)


# ---------------------------------------------------------------- plots


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display on servers and CI), imported when the first
    plot is drawn: the steps that draw none (a benchmark, a GPU machine without matplotlib) need
    no matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_forecast(series: Series, bt: Backtest, model_label: str, path: Path) -> Path:
    """Actual test values against each model's one-step-ahead forecasts, plus the last origin's
    full horizon."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    t = series.frame[series.time_column].to_numpy()
    y = series.features[:, 0]
    lo = max(int(bt.origins[0]) - 3 * len(bt.actual[0]) - 20, 0)
    ax.plot(t[lo:], y[lo:], color="black", lw=1.2, label="actual")
    for name, style in ((model_label, "-"), ("seasonal-naive", ":")):
        ax.plot(t[bt.origins], bt.forecasts[name][:, 0], style, lw=1, label=f"{name} (1 step ahead)")
    if model_label in bt.quantiles:
        q = bt.quantiles[model_label][:, 0]  # (N, Q) one step ahead
        ax.fill_between(t[bt.origins], q[:, 0], q[:, -1], alpha=0.25, lw=0,
                        label=f"{bt.levels[0]:g}-{bt.levels[-1]:g} quantiles")
    for a, (lo, hi) in sorted(bt.bounds.items(), reverse=True):  # the widest first, beneath
        ax.fill_between(t[bt.origins], lo[:, 0], hi[:, 0], alpha=0.2, lw=0, label=f"{a:g} conformal interval")
    last = bt.origins[-1] + np.arange(bt.actual.shape[1])
    if len(last) > 1:
        ax.plot(t[last], bt.forecasts[model_label][-1], "o-", ms=3, label=f"{model_label}, last origin")
    ax.axvline(t[bt.origins[0]], color="grey", ls="--", lw=0.8)
    ax.set_title(f"{series.value_column}: test-part forecasts (MASE {bt.scores[model_label]['mase']:.3f})")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_losses(fit: FitResult, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [s.epoch for s in fit.history]
    ax.plot(epochs, [s.train_loss for s in fit.history], label="train")
    ax.plot(epochs, [s.val_loss for s in fit.history], label="validation")
    ax.axvline(fit.best_epoch, color="grey", ls="--", lw=0.8, label=f"best epoch {fit.best_epoch}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_backtest(data: Data, bt: Backtest | PanelBacktest, fit: FitResult, label: str, directory: str) -> list[str]:
    """The training curves and, for one series, its test-part forecasts."""
    d = Path(directory)
    forecast = [str(plot_forecast(data, bt, label, d / "forecast.png"))] if isinstance(data, Series) else []
    return [*forecast, str(plot_losses(fit, d / "loss.png"))]

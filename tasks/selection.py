"""``--auto``: try a few transform settings on the validation part and keep the best.

Each candidate trains one network (the config's first member) on the training part, early-
stopped on validation as usual, and is scored by its validation MASE in original units, so
candidates in different network spaces compare fairly. The test part is never looked at.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import run_logger
from tasks.config import TRANSFORM_FIELDS, ConfigError, TimeSeriesConfig
from tasks.data import DataError, Series
from tasks.evaluation import history_windows, run_backtest
from tasks.features import scale_and_window, split_series
from tasks.training import Trained, train_forecaster

CANDIDATES = {  # (transform, difference, window_norm, baseline); chosen by benchmarks/bench_accuracy.py
    "plain": ("none", "none", "none", "none"),
    "window-norm last": ("none", "none", "last", "none"),
    "window-norm mean": ("none", "none", "mean", "none"),
    "seasonal baseline": ("none", "none", "none", "seasonal-naive"),
    "seasonal difference": ("none", "seasonal", "none", "none"),
    "log + seasonal difference": ("log", "seasonal", "none", "none"),
}


@dataclass
class Selection:
    choice: str
    scores: dict[str, float]  # candidate -> validation MASE (nan: the candidate could not run)
    reasons: dict[str, str]  # candidate -> why it was skipped
    trained: Trained | None = None  # the chosen candidate's network: the model's first member

    def markdown(self) -> str:
        rows = [f"| {name}{' (chosen)' if name == self.choice else ''} | "
                + (f"{s:.4g}" if np.isfinite(s) else f"skipped: {self.reasons[name]}") + " |"
                for name, s in self.scores.items()]
        return "\n".join([f"--auto chose **{self.choice}**: the lowest validation MASE of the candidates.", "",
                          "| candidate | validation MASE |", "|---|---:|", *rows])


def apply(cfg: TimeSeriesConfig, candidate: str) -> TimeSeriesConfig:
    """The config with the candidate's settings, as if given with --no-auto: what the run logs,
    so that rebuilding the config from the run's params gives this model's settings back."""
    return replace(cfg, auto=False, **dict(zip(TRANSFORM_FIELDS, CANDIDATES[candidate], strict=True)))


@task(name="choose-settings", cache_policy=NO_CACHE)
def choose_settings(series: Series, cfg: TimeSeriesConfig) -> tuple[TimeSeriesConfig, Selection]:
    """The config with the transform settings of the candidate with the best validation MASE."""
    logger = run_logger()
    scores, reasons, trained = {}, {}, {}
    for name in CANDIDATES:
        trial = replace(apply(cfg, name), ensemble=1, ensemble_cells=cfg.member_cells[0])
        try:
            split = split_series.fn(series, trial)
        except (DataError, ConfigError) as e:  # e.g. log on a series with zeros, lookback too short
            scores[name], reasons[name] = float("nan"), str(e).removeprefix(f"{series.source}: ")
            continue
        windows = scale_and_window.fn(series, split, trial)
        trained[name] = train_forecaster.fn(series, windows, trial)
        pipeline = trained[name].pipeline()
        forecast = pipeline.point(pipeline.predict(history_windows(series, windows.val_origins, cfg.lookback)))
        bt = run_backtest(series, split, windows.val_origins, cfg.horizon, {name: forecast})
        scores[name] = bt.scores[name]["mase"]
        logger.info("--auto: %s scores validation MASE %.4f", name, scores[name])
    finite = {k: v for k, v in scores.items() if np.isfinite(v)}
    if not finite:
        raise DataError(f"{series.source}: no --auto candidate could run on this series: {reasons}")
    choice = min(finite, key=finite.get)
    logger.info("--auto chose %s (validation MASE %.4f)", choice, finite[choice])
    return apply(cfg, choice), Selection(choice, scores, reasons, trained[choice])


def train_directly(series: Series, cfg: TimeSeriesConfig):
    """The time-series flow's transform and training steps as plain calls, not task runs (for
    sweep trials and benchmarks): returns (settled config, selection or None, split, windows,
    trained)."""
    selection = None
    if cfg.auto:
        cfg, selection = choose_settings.fn(series, cfg)
    split = split_series.fn(series, cfg)
    windows = scale_and_window.fn(series, split, cfg)
    trained = train_forecaster.fn(series, windows, cfg, selection.trained if selection else None)
    return cfg, selection, split, windows, trained

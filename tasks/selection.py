"""``--auto``: try a few transform settings on the validation part and keep the best.

Each candidate trains one network (the config's first member) on the training part, early-
stopped on validation as usual, and is scored by its validation MASE in original units, so
candidates in different network spaces compare fairly. The test part is never looked at.
A validation part of fewer than ``MIN_ORIGINS`` forecast origins (a short monthly series: 3)
makes the choice a coin toss, so there the candidates are scored on a longer window carved
from the end of the training part, and the chosen settings are then trained on the flow's split.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from rnn_models.windows import Split, window_origins
from tasks import run_logger
from tasks.config import TRANSFORM_FIELDS, ConfigError, TimeSeriesConfig
from tasks.data import DataError, Series
from tasks.evaluation import history_windows, run_backtest
from tasks.features import Windows, build_chain, check_lookback, scale_and_window, split_series
from tasks.panel import PanelData, panel_windows, score_panel, split_panel
from tasks.training import (
    Ensemble,
    Trained,
    forecaster_ensemble,
    label,
    panel_ensemble,
    train_ensembles,
    train_forecaster,
    train_panel,
)

CANDIDATES = {  # (transform, difference, window_norm, baseline); chosen by benchmarks/bench_accuracy.py
    "plain": ("none", "none", "none", "none"),
    "window-norm last": ("none", "none", "last", "none"),
    "window-norm mean": ("none", "none", "mean", "none"),
    "seasonal baseline": ("none", "none", "none", "seasonal-naive"),
    "seasonal difference": ("none", "seasonal", "none", "none"),
    "log + seasonal difference": ("log", "seasonal", "none", "none"),
}


# a global model over many series (--id-column) has no global scaler: every candidate normalises
# its windows one by one, and may learn the correction to seasonal naive
PANEL_CANDIDATES = {
    "window-norm last": ("none", "none", "last", "none"),
    "window-norm mean": ("none", "none", "mean", "none"),
    "window-norm last + seasonal baseline": ("none", "none", "last", "seasonal-naive"),
}

MIN_ORIGINS = 12  # forecast origins the candidates are scored on, at least, where the series allows


@dataclass
class Selection:
    choice: str
    scores: dict[str, float]  # candidate -> validation MASE (nan: the candidate could not run)
    reasons: dict[str, str]  # candidate -> why it was skipped
    trained: Trained | None = None  # the chosen network, the model's first member (None: trained on another split)
    widened: str = ""  # how the validation part was widened, if it was

    def markdown(self) -> str:
        rows = [f"| {name}{' (chosen)' if name == self.choice else ''} | "
                + (f"{s:.4g}" if np.isfinite(s) else f"skipped: {self.reasons[name]}") + " |"
                for name, s in self.scores.items()]
        lines = [f"--auto chose **{self.choice}**: the lowest validation MASE of the candidates."]
        if self.widened:
            lines.append(self.widened)
        return "\n".join([*lines, "", "| candidate | validation MASE |", "|---|---:|", *rows])


def selection_split(split: Split, cfg: TimeSeriesConfig) -> Split:
    """The split the candidates are scored on: the flow's own, or, when its validation part holds
    fewer than MIN_ORIGINS origins, one whose validation part is the last MIN_ORIGINS + H - 1 rows
    before the test part, provided the shorter training part still holds MIN_ORIGINS windows."""
    H = cfg.horizon
    if len(window_origins(*split.part("val"), cfg.lookback, H)) >= MIN_ORIGINS:
        return split
    train_end = split.val_end - (MIN_ORIGINS + H - 1)
    if len(window_origins(0, train_end, cfg.lookback, H, cfg.stride)) < MIN_ORIGINS:
        return split  # too short for both: the flow's split, as good as it gets
    return Split(split.n, train_end, split.val_end)


def apply(cfg: TimeSeriesConfig, candidate: str) -> TimeSeriesConfig:
    """The config with the candidate's settings, as if given with --no-auto: what the run logs,
    so that rebuilding the config from the run's params gives this model's settings back."""
    settings = (PANEL_CANDIDATES if cfg.panel else CANDIDATES)[candidate]
    return replace(cfg, auto=False, **dict(zip(TRANSFORM_FIELDS, settings, strict=True)))


@dataclass
class AutoRound:
    """--auto's candidates for one series, ready to be trained (``candidates``: give them to
    ``train_ensembles``, alone or with other models) and then chosen from (``choose``)."""

    series: Series
    cfg: TimeSeriesConfig
    candidates: dict[str, Ensemble]
    prepared: dict[str, tuple[Split, Windows]]  # each candidate's split (see selection_split) and windows
    reasons: dict[str, str]  # candidate -> why it could not run
    widened: str  # how the validation part was widened, if it was

    def choose(self, trained: dict[str, Trained]) -> tuple[TimeSeriesConfig, Selection]:
        """The config with the settings of the trained candidate with the best validation MASE."""
        series, cfg, logger = self.series, self.cfg, run_logger()
        scores = dict.fromkeys(self.reasons, float("nan"))
        for name, (split, windows) in self.prepared.items():
            pipeline = trained[name].pipeline()
            forecast = pipeline.point(pipeline.predict(history_windows(series, windows.val_origins, cfg.lookback)))
            bt = run_backtest(series, split, windows.val_origins, cfg.horizon, {name: forecast})
            scores[name] = bt.scores[name]["mase"]
            logger.info("--auto: %s scores validation MASE %.4f", name, scores[name])
        scores = {name: scores[name] for name in CANDIDATES}  # in the candidates' order, skipped ones too
        choice = best(scores, self.reasons, f"{series.source}: no --auto candidate could run on this series")
        return apply(cfg, choice), Selection(choice, scores, self.reasons,
                                             None if self.widened else trained[choice], self.widened)


def auto_candidates(series: Series, cfg: TimeSeriesConfig, checkpoints: Path | None = None,
                    name: str = "") -> AutoRound:
    """--auto's candidates on one series: each one network (the config's first member) on the
    windows its settings make. ``checkpoints``: a folder for each candidate's training checkpoints;
    ``name``: what the log calls the model they are chosen for (a sweep's trial), if anything."""
    logger = run_logger()
    reasons, prepared, candidates, widened = {}, {}, {}, ""
    for candidate in CANDIDATES:
        trial = replace(apply(cfg, candidate), ensemble=1, ensemble_cells=cfg.member_cells[0])
        try:
            own = split_series(series, trial)
        except (DataError, ConfigError) as e:  # e.g. log on a series with zeros, lookback too short
            reasons[candidate] = str(e).removeprefix(f"{series.source}: ")
            continue
        split = selection_split(own, trial)
        if split != own and not widened:
            widened = (f"The validation part holds {len(window_origins(*own.part('val'), cfg.lookback, cfg.horizon))} "
                       f"forecast origins, too few to choose on: candidates were trained on rows "
                       f"0..{split.train_end - 1} and scored on {MIN_ORIGINS} origins in rows "
                       f"{split.train_end}..{split.val_end - 1}; the chosen settings were then trained on the "
                       f"flow's split.")
            logger.info("--auto: %s", widened)
        windows = scale_and_window(series, split, trial)
        prepared[candidate] = split, windows
        # candidates whose networks and windows have one shape train together (tasks.training)
        candidates[candidate] = forecaster_ensemble(series, windows, trial, None, folder(checkpoints, candidate),
                                                    label(name, candidate))
    return AutoRound(series, cfg, candidates, prepared, reasons, widened)


def choose_settings(series: Series, cfg: TimeSeriesConfig,
                    checkpoints: Path | None = None) -> tuple[TimeSeriesConfig, Selection]:
    """The config with the transform settings of the candidate with the best validation MASE.
    ``checkpoints``: a folder for each candidate's training checkpoints."""
    auto = auto_candidates(series, cfg, checkpoints)
    return auto.choose(train_ensembles(auto.candidates))


def folder(checkpoints: Path | None, candidate: str) -> Path | None:
    return checkpoints and checkpoints / candidate.replace(" ", "-")


def best(scores: dict[str, float], reasons: dict[str, str], none_ran: str) -> str:
    """The candidate with the lowest validation MASE; ``none_ran`` (with the reasons) if none ran."""
    finite = {k: v for k, v in scores.items() if np.isfinite(v)}
    if not finite:
        raise DataError(f"{none_ran}: {reasons}")
    choice = min(finite, key=finite.get)
    run_logger().info("--auto chose %s (validation MASE %.4f)", choice, finite[choice])
    return choice


def train_directly(series: Series, cfg: TimeSeriesConfig, steps=None, checkpoints: Path | None = None):
    """The time-series pipeline's transform and training steps, written once: returns (settled
    config, selection or None, split, windows, trained). ``steps`` holds the four step
    functions: by default this package's plain ones (sweep trials, the Dask warm-up, tests,
    benchmarks); the flow passes ``flows.steps``, the same functions as Prefect tasks.
    ``checkpoints``: the run's checkpoint folder (``training.checkpoint_dir``), or None."""
    s = steps or PLAIN_STEPS
    selection = None
    if cfg.auto:
        cfg, selection = s.choose_settings(series, cfg, checkpoints and checkpoints / "auto")
    split = s.split_series(series, cfg)
    windows = s.scale_and_window(series, split, cfg)
    trained = s.train_forecaster(series, windows, cfg, selection.trained if selection else None,
                                 checkpoints and checkpoints / "model")
    return cfg, selection, split, windows, trained


def train_many_directly(models: dict[str, tuple[Series, TimeSeriesConfig]]) -> dict[str, tuple]:
    """``train_directly`` for several models at once, each {name: (series, config)}: a sweep's
    trials on one worker. Each phase hands the networks of every model to ``train_ensembles``
    together (--auto's candidates, then the members), so those of one shape train as one batched
    network across models too. Returns what ``train_directly`` returns, for each name."""
    rounds = {name: auto_candidates(series, cfg, name=name) for name, (series, cfg) in models.items() if cfg.auto}
    tried = train_ensembles({(name, c): e for name, auto in rounds.items() for c, e in auto.candidates.items()})
    settled = {name: rounds[name].choose({c: tried[name, c] for c in rounds[name].candidates}) if name in rounds
               else (cfg, None) for name, (_, cfg) in models.items()}
    planned = {}
    for name, (series, _) in models.items():
        cfg, selection = settled[name]
        split = split_series(series, cfg)
        windows = scale_and_window(series, split, cfg)
        planned[name] = split, windows, forecaster_ensemble(series, windows, cfg, selection and selection.trained,
                                                            name=name)
    trained = train_ensembles({name: e for name, (_, _, e) in planned.items()})
    return {name: (*settled[name], split, windows, trained[name]) for name, (split, windows, _) in planned.items()}


# ---------------------------------------------------------------- many series, one network


def choose_panel_settings(panel: PanelData, cfg: TimeSeriesConfig,
                          checkpoints: Path | None = None) -> tuple[TimeSeriesConfig, Selection]:
    """--auto for a global model: each candidate trains one network on every series' training
    part and is scored by the mean over series of its validation MASE."""
    logger, split = run_logger(), split_panel(panel, cfg)
    scores, reasons, candidates = {}, {}, {}
    for name in PANEL_CANDIDATES:
        trial = replace(apply(cfg, name), ensemble=1, ensemble_cells=cfg.member_cells[0])
        try:
            check_lookback(trial, panel.season_length)
        except ConfigError as e:
            scores[name], reasons[name] = float("nan"), str(e)
            continue
        candidates[name] = panel_ensemble(panel, split, build_chain(trial, panel.season_length), trial, None,
                                          folder(checkpoints, name), name)
    trained = train_ensembles(candidates)  # those of one shape together (tasks.training)
    for name in trained:
        pipeline = trained[name].pipeline()
        origins = split.origins("val", cfg.lookback, cfg.horizon)
        forecast = pipeline.point(pipeline.predict(panel_windows(panel, origins, cfg.lookback)))
        scores[name] = score_panel(panel, split, origins, cfg.horizon, {name: forecast}).scores[name]["mase"]
        logger.info("--auto: %s scores mean validation MASE %.4f", name, scores[name])
    scores = {name: scores[name] for name in PANEL_CANDIDATES}  # in the candidates' order, skipped ones too
    choice = best(scores, reasons, f"{panel.source}: no --auto candidate could run on these series")
    return apply(cfg, choice), Selection(choice, scores, reasons, trained[choice])


def train_panel_directly(panel: PanelData, cfg: TimeSeriesConfig, steps=None, checkpoints: Path | None = None):
    """``train_directly`` for a global model over many series: returns (settled config,
    selection or None, split, trained)."""
    s, cfg = steps or PLAIN_STEPS, cfg.settled(panel.season_length)
    selection = None
    if cfg.auto:
        cfg, selection = s.choose_panel_settings(panel, cfg, checkpoints and checkpoints / "auto")
    check_lookback(cfg, panel.season_length)
    split = s.split_panel(panel, cfg)
    trained = s.train_panel(panel, split, build_chain(cfg, panel.season_length), cfg,
                            selection.trained if selection else None, checkpoints and checkpoints / "model")
    return cfg, selection, split, trained


PLAIN_STEPS = SimpleNamespace(choose_settings=choose_settings, split_series=split_series,
                              scale_and_window=scale_and_window, train_forecaster=train_forecaster,
                              choose_panel_settings=choose_panel_settings, split_panel=split_panel,
                              train_panel=train_panel)

"""``--auto``: try a few transform settings on the validation part and keep the best.

Each candidate trains one network (the config's first member) on the training part, early-
stopped on validation as usual, and is scored by its validation MASE in original units, so
candidates in different network spaces compare fairly. The test part is never looked at.
A validation part of fewer than ``MIN_ORIGINS`` forecast origins (a short monthly series: 3)
makes the choice a coin toss, so there the candidates are scored on a longer window carved
from the end of the training part, and the chosen settings are then trained on the flow's split.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from rnn_models.windows import Split, window_origins
from tasks import run_logger
from tasks.config import TRANSFORM_FIELDS, ConfigError, TimeSeriesConfig
from tasks.data import DataError
from tasks.evaluation import history_windows, score
from tasks.features import Data, Windows, scale_and_window, split_series
from tasks.panel import PanelSplit
from tasks.training import Ensemble, Settings, Trained, forecaster_ensemble, label, train_ensembles

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


def candidates_for(cfg: TimeSeriesConfig) -> dict[str, tuple[str, str, str, str]]:
    return PANEL_CANDIDATES if cfg.panel else CANDIDATES


def selection_split(split: Split | PanelSplit, cfg: TimeSeriesConfig) -> Split | PanelSplit:
    """The split the candidates are scored on: the flow's own, or, when its validation part holds
    fewer than MIN_ORIGINS origins, one whose validation part is the last MIN_ORIGINS + H - 1 rows
    before the test part, provided the shorter training part still holds MIN_ORIGINS windows.
    (Many series: the flow's own; their validation parts hold many origins together.)"""
    H = cfg.horizon
    if isinstance(split, PanelSplit) or len(window_origins(*split.part("val"), cfg.lookback, H)) >= MIN_ORIGINS:
        return split
    train_end = split.val_end - (MIN_ORIGINS + H - 1)
    if len(window_origins(0, train_end, cfg.lookback, H, cfg.stride)) < MIN_ORIGINS:
        return split  # too short for both: the flow's split, as good as it gets
    return Split(split.n, train_end, split.val_end)


def apply(cfg: TimeSeriesConfig, candidate: str) -> TimeSeriesConfig:
    """The config with the candidate's settings, as if given with --no-auto: what the run logs,
    so that rebuilding the config from the run's params gives this model's settings back."""
    return replace(cfg, auto=False, **dict(zip(TRANSFORM_FIELDS, candidates_for(cfg)[candidate], strict=True)))


@dataclass
class AutoRound:
    """--auto's candidates for one model, ready to be trained (``candidates``: give them to
    ``train_ensembles``, alone or with other models) and then chosen from (``choose``)."""

    data: Data
    cfg: TimeSeriesConfig
    candidates: dict[str, Ensemble]
    prepared: dict[str, Windows]  # each candidate's windows, on its split (see selection_split)
    reasons: dict[str, str]  # candidate -> why it could not run
    widened: str  # how the validation part was widened, if it was

    def choose(self, trained: dict[str, Trained]) -> Settings:
        """The config with the settings of the trained candidate with the best validation MASE."""
        data, cfg, logger = self.data, self.cfg, run_logger()
        scores = dict.fromkeys(self.reasons, float("nan"))
        for name, windows in self.prepared.items():
            pipeline = trained[name].pipeline()
            forecast = pipeline.point(pipeline.predict(history_windows(data, windows.val_origins, cfg.lookback,
                                                                                    pipeline.ahead)))
            bt = score(data, windows.split, windows.val_origins, cfg.horizon, {name: forecast})
            scores[name] = bt.scores[name]["mase"]
            logger.info("--auto: %s scores validation MASE %.4f", name, scores[name])
        scores = {name: scores[name] for name in candidates_for(cfg)}  # in the candidates' order, skipped ones too
        choice = best(scores, self.reasons, f"{data.source}: no --auto candidate could run on this data")
        return Settings(apply(cfg, choice), Selection(choice, scores, self.reasons,
                                                      None if self.widened else trained[choice], self.widened))


def auto_candidates(data: Data, cfg: TimeSeriesConfig, checkpoints: Path | None = None, name: str = "") -> AutoRound:
    """--auto's candidates: each one network (the config's first member) on the windows its
    settings make. ``checkpoints``: a folder for each candidate's training checkpoints; ``name``:
    what the log calls the model they are chosen for (a sweep's trial), if anything."""
    reasons, prepared, candidates, widened = {}, {}, {}, ""
    for candidate in candidates_for(cfg):
        trial = replace(apply(cfg, candidate), ensemble=1, ensemble_cells=cfg.member_cells[0])
        try:
            own = split_series(data, trial)
        except (DataError, ConfigError) as e:  # e.g. log on a series with zeros, lookback too short
            reasons[candidate] = str(e).removeprefix(f"{data.source}: ")
            continue
        split = selection_split(own, trial)
        if split is not own and not widened:
            widened = (f"The validation part holds {len(window_origins(*own.part('val'), cfg.lookback, cfg.horizon))} "
                       f"forecast origins, too few to choose on: candidates were trained on rows "
                       f"0..{split.train_end - 1} and scored on {MIN_ORIGINS} origins in rows "
                       f"{split.train_end}..{split.val_end - 1}; the chosen settings were then trained on the "
                       f"flow's split.")
            run_logger().info("--auto: %s", widened)
        prepared[candidate] = windows = scale_and_window(data, split, trial)
        # candidates whose networks and windows have one shape train together (tasks.training)
        candidates[candidate] = forecaster_ensemble(data, windows, Settings(trial), folder(checkpoints, candidate),
                                                    label(name, candidate))
    return AutoRound(data, cfg, candidates, prepared, reasons, widened)


def choose_settings(data: Data, cfg: TimeSeriesConfig, checkpoints: Path | None = None) -> Settings:
    """The config settled for the data (the automatic settings of a global model, once the
    season is known) and, with --auto, given the transform settings of the candidate with the
    best validation MASE. ``checkpoints``: a folder for each candidate's training checkpoints."""
    return choose_all({"": (data, cfg, checkpoints)})[""]


def choose_all(models: dict[Hashable, tuple[Data, TimeSeriesConfig, Path | None]]) -> dict[Hashable, Settings]:
    """``choose_settings`` for several models at once ({name: (data, config, checkpoint folder)}):
    the --auto candidates of all of them train together, so those of one shape train as one
    batched network across models too."""
    settled = {k: (data, cfg.settled(data.season_length), ckpt) for k, (data, cfg, ckpt) in models.items()}
    rounds = {k: auto_candidates(data, cfg, ckpt, str(k)) for k, (data, cfg, ckpt) in settled.items() if cfg.auto}
    tried = train_ensembles({(k, c): e for k, auto in rounds.items() for c, e in auto.candidates.items()})
    return {k: rounds[k].choose({c: tried[k, c] for c in rounds[k].candidates}) if k in rounds else Settings(cfg)
            for k, (_, cfg, _) in settled.items()}


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


@dataclass
class Outcome:
    """What the forecasting pipeline made of one model's data and config."""

    settings: Settings  # the settled config and --auto's choice
    windows: Windows  # and its split
    trained: Trained


def train_models(models: dict[Hashable, tuple[Data, TimeSeriesConfig]]) -> dict[Hashable, Outcome]:
    """The pipeline's transform and training steps for several models at once, each {name:
    (data, config)}: a sweep's trials on one worker, a benchmark's model. Each phase hands the
    networks of every model to ``train_ensembles`` together (--auto's candidates, then the
    members), so those of one shape train as one batched network across models too."""
    settings = choose_all({k: (data, cfg, None) for k, (data, cfg) in models.items()})
    windows = {k: scale_and_window(data, split_series(data, settings[k].cfg), settings[k].cfg)
               for k, (data, _) in models.items()}
    trained = train_ensembles({k: forecaster_ensemble(data, windows[k], settings[k], name=str(k))
                               for k, (data, _) in models.items()})
    return {k: Outcome(settings[k], windows[k], trained[k]) for k in models}

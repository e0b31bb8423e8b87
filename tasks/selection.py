"""``--auto``: try a few transform settings on the validation part and keep the best.

Each candidate trains one network (the config's first member) on the training part, early-
stopped on validation as usual, and is scored on validation in original units, so candidates in
different network spaces compare fairly: by MASE for one series; for a global model over many
series by OWA, M4's ranking measure (sMAPE and MASE each as a share of seasonal naive's, averaged),
as one measure alone would trade the other away. The test part is never looked at.
A validation part of fewer than ``MIN_ORIGINS`` forecast origins (a short monthly series: 3)
makes the choice a coin toss, so there the candidates are scored on a longer window carved
from the end of the training part, and the chosen settings are then trained on the flow's split.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from rnn_models import NonFiniteLossError
from rnn_models.windows import Split, window_origins
from tasks import run_logger
from tasks.config import TRANSFORM_FIELDS, ConfigError, TimeSeriesConfig
from tasks.config.series import NEAR_BEST
from tasks.data import DataError, has_dates, with_calendar
from tasks.evaluation import history_windows, score
from tasks.features import Data, Windows, scale_and_window, settle, split_series
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
# its windows one by one; "level" weighs each
# series' errors as a share of its level, not of its swings; in log space an error is a share of the
# level and no forecast falls below zero; the two log candidates differ in what a unit is (a share of the
# window's swing, of its level), and a model whose members take both beats either (docs/BENCHMARKS.md, M4 Hourly).
# "window-norm last + seasonal baseline" (--no-auto --window-norm last --baseline seasonal-naive) was one too: never
# chosen on M4 Hourly nor the generated panels, it took a sixth of the round's time that a longer lookback now uses
PANEL_CANDIDATES = {
    "log + window-norm mean": ("log", "none", "mean", "none"),
    "log + window-norm level": ("log", "none", "level", "none"),
    "window-norm mean": ("none", "none", "mean", "none"),
    "window-norm level": ("none", "none", "level", "none"),
}

MIN_ORIGINS = 12  # forecast origins the candidates are scored on, at least, where the series allows


@dataclass
class Selection:
    choice: str
    scores: dict[str, float]  # candidate -> its validation ``measure`` (nan: the candidate could not run)
    reasons: dict[str, str]  # candidate -> why it was skipped, or (scored) how its training ended early
    trained: Trained | None = None  # the chosen network, the model's first member (None: trained on another split)
    widened: str = ""  # how the validation part was widened, if it was
    measure: str = "MASE"  # what the candidates were scored by: MASE, or OWA for a global model (MEASURES)
    losses: dict[str, str] = field(default_factory=dict)  # candidate -> the loss it trained with (--loss auto: its own)
    # --ensemble-candidates over 1: the candidates whose settings the members take in turn (the choice alone: none near)
    members: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        rows = [f"| {name}{' (chosen)' if name == self.choice else ''} | "
                + (f"{s:.4g}{f' ({self.reasons[name]})' if name in self.reasons else ''}" if np.isfinite(s)
                   else f"skipped: {self.reasons[name]}")
                + f" | {self.losses.get(name, '')} |" for name, s in self.scores.items()]
        lines = [f"--auto chose **{self.choice}**: the lowest validation {self.measure} of the candidates"
                 f"{MEASURES[self.measure][0]}."]
        if len(self.members) > 1:
            lines.append(f"The ensemble's members take in turn the settings of the {len(self.members)} best "
                         f"(--ensemble-candidates): {', '.join(self.members)}.")
        elif self.members:
            lines.append(f"No other candidate scored within {NEAR_BEST - 1:.0%} of it, so every ensemble member "
                         "takes its settings (--ensemble-candidates).")
        if self.widened:
            lines.append(self.widened)
        return "\n".join([*lines, "", f"| candidate | validation {self.measure} | loss |", "|---|---:|---|", *rows])


def candidates_for(cfg: TimeSeriesConfig) -> dict[str, tuple[str, str, str, str]]:
    return PANEL_CANDIDATES if cfg.panel else CANDIDATES


def owa(scores: dict[str, dict[str, float]], name: str) -> float:
    """M4's overall weighted average: ``name``'s sMAPE and MASE each over seasonal naive's, averaged
    (a measure seasonal naive scores 0 on, so that no share exists, is left out)."""
    ours, ref = scores[name], scores["seasonal-naive"]
    shares = [ours[k] / ref[k] for k in ("smape", "mase") if ref[k] > 0]
    return float(np.mean(shares)) if shares else ours["mase"]


MEASURES = {  # how --auto scores a candidate's validation backtest: (what the report says of it, the score)
    "MASE": ("", lambda scores, name: scores[name]["mase"]),
    "OWA": (" (M4's ranking: sMAPE and MASE each as a share of seasonal naive's, averaged, so that neither "
            "is traded away)", owa),
}


def measure_for(cfg: TimeSeriesConfig) -> str:
    return "OWA" if cfg.panel else "MASE"


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
    so that rebuilding the config from the run's params gives this model's settings back (--loss auto
    resolved for the candidate's transform: ``TimeSeriesConfig.resolved_loss``)."""
    trial = replace(cfg, auto=False, ensemble_candidates=0,
                    **dict(zip(TRANSFORM_FIELDS, candidates_for(cfg)[candidate], strict=True)))
    return replace(trial, loss=trial.resolved_loss())


@dataclass
class AutoRound:
    """One round of --auto's candidates for one model, ready to be trained (``candidates``: give
    them to ``train_ensembles``, alone or with other models) and then scored (``score``)."""

    trials: dict[str, TimeSeriesConfig]  # candidate -> its settings
    candidates: dict[str, Ensemble]
    prepared: dict[str, tuple[Data, Windows]]  # each candidate's data and windows, on its split (selection_split)
    reasons: dict[str, str]  # candidate -> why it could not run
    widened: str  # how the validation part was widened, if it was
    # candidate -> how its training diverged in its first epoch (later, it keeps its best epoch, and the log says so)
    diverged: dict[str, NonFiniteLossError] = field(default_factory=dict)

    @property
    def losses(self) -> dict[str, str]:
        return {name: trial.trained_loss for name, trial in self.trials.items()}

    @property
    def measure(self) -> str:
        """What the candidates are scored by (MEASURES): the trials' own, one model's settings alike."""
        return measure_for(next(iter(self.trials.values()))) if self.trials else "MASE"

    def score(self, trained: dict[str, Trained]) -> dict[str, float]:
        """Each candidate's validation ``measure`` in the trials' order (nan: it could not run)."""
        scores = dict.fromkeys(self.trials, float("nan"))
        for name, (data, windows) in self.prepared.items():
            pipeline, cfg = trained[name].pipeline(), self.trials[name]
            forecast = pipeline.point(pipeline.predict(history_windows(data, windows.val_origins, cfg.lookback,
                                                                       pipeline.ahead)))
            bt = score(data, windows.split, windows.val_origins, cfg.horizon, {name: forecast})
            scores[name] = MEASURES[self.measure][1](bt.scores, name)
            run_logger().info("--auto: %s scores validation %s %.4f", name, self.measure, scores[name])
        return scores


def auto_round(data: Data, trials: dict[str, TimeSeriesConfig], checkpoints: Path | None = None,
               name: str = "", deadline: float | None = None) -> AutoRound:
    """Candidates ({name: settings}) of one model: each one network (the config's first member) on
    the windows its settings make of ``data`` (with calendar features if they ask for them).
    ``checkpoints``: a folder for each candidate's training checkpoints; ``name``: what the log
    calls the model they are chosen for (a sweep's trial), if anything; ``deadline``: when their
    share of a --minutes budget ends."""
    reasons, prepared, candidates, widened = {}, {}, {}, ""
    for candidate, cfg in trials.items():
        trial = replace(cfg, ensemble=1, ensemble_cells=cfg.member_cells[0])
        try:
            own_data = with_calendar(data, trial)
            own = split_series(own_data, trial)
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
        windows = scale_and_window(own_data, split, trial)
        prepared[candidate] = own_data, windows
        # candidates whose networks and windows have one shape train together (tasks.training)
        candidates[candidate] = forecaster_ensemble(own_data, windows, Settings(trial, deadline=deadline),
                                                    folder(checkpoints, candidate), label(name, candidate))
    return AutoRound(trials, candidates, prepared, reasons, widened)


def choose_settings(data: Data, cfg: TimeSeriesConfig, checkpoints: Path | None = None) -> Settings:
    """The config settled for the data (the automatic settings of a global model, once the
    season is known) and, with --auto, given the transform settings of the candidate with the
    best validation score (MASE, or OWA for a global model), then calendar features if they score
    better still (where --calendar and --no-calendar leave it to --auto). ``checkpoints``: a folder
    for each candidate's training checkpoints. The data the model then trains on is
    ``with_calendar(data, cfg)``."""
    return choose_all({"": (data, cfg, checkpoints)})[""]


def choose_all(models: dict[Hashable, tuple[Data, TimeSeriesConfig, Path | None]]) -> dict[Hashable, Settings]:
    """``choose_settings`` for several models at once ({name: (data, config, checkpoint folder)}):
    the --auto candidates of all of them train together, so those of one shape train as one
    batched network across models too."""
    start = time.time()  # --minutes: the candidates train in the budget's first third, the members in the rest
    settled = {k: (data, settle(data, cfg), ckpt) for k, (data, cfg, ckpt) in models.items()}
    ends = {k: (start + cfg.minutes * 20, start + cfg.minutes * 60) if cfg.minutes else (None, None)
            for k, (_, cfg, _) in settled.items()}
    auto = {k: (data, {c: apply(cfg, c) for c in candidates_for(cfg)}, ckpt, ends[k][0])
            for k, (data, cfg, ckpt) in settled.items() if cfg.auto}
    first = {k: choose(*tried, settled[k][0].source, settled[k][1].kept_candidates)
             for k, tried in train_rounds(auto).items()}
    # a second round where --auto decides the calendar features: the first round's choice with them
    undecided = {k: (settled[k][0], {f"{s.selection.choice} + calendar": replace(s.cfg, calendar=True)}, settled[k][2],
                     ends[k][0]) for k, s in first.items() if s.cfg.calendar is None and has_dates(settled[k][0])}
    second = train_rounds(undecided)
    chosen = {k: first.get(k, Settings(cfg)) for k, (_, cfg, _) in settled.items()}
    chosen = {k: with_calendar_round(s, *second[k]) if k in second else settle_calendar(s, bool(s.cfg.calendar))
              for k, s in chosen.items()}
    return {k: replace(s, deadline=ends[k][1]) for k, s in chosen.items()}


def train_rounds(rounds: dict[Hashable, tuple[Data, dict[str, TimeSeriesConfig], Path | None, float | None]]
                 ) -> dict[Hashable, tuple[AutoRound, dict[str, Trained], dict[str, float]]]:
    """Each model's round of candidates ({name: (data, candidates, checkpoints, deadline)}) trained,
    all models' together, and scored."""
    made = {k: auto_round(data, trials, ckpt, str(k), end) for k, (data, trials, ckpt, end) in rounds.items()}
    tried, diverged = train_candidates({(k, c): e for k, rnd in made.items() for c, e in rnd.candidates.items()})
    out = {}
    for k, rnd in made.items():
        for c in [c for c in rnd.candidates if (k, c) in diverged]:  # dropped with its reason, as one that cannot run
            rnd.diverged[c] = diverged[k, c]
            rnd.reasons[c] = f"training diverged ({diverged[k, c]})"
            del rnd.candidates[c], rnd.prepared[c]
        trained = {c: tried[k, c] for c in rnd.candidates}
        for c, t in trained.items():  # a network that diverged after its first epoch: kept at its best, and said
            if diverged_at := "; ".join(f.divergence for f in t.fits if f.diverged):
                rnd.reasons[c] = diverged_at
        out[k] = rnd, trained, rnd.score(trained)
    return out


def train_candidates(candidates: dict[Hashable, Ensemble]
                     ) -> tuple[dict[Hashable, Trained], dict[Hashable, NonFiniteLossError]]:
    """Every candidate trained (together, ``train_ensembles``), and those whose training diverged in its first
    epoch, with how: when one does, each is trained again alone, so that the others are kept."""
    try:
        return train_ensembles(candidates), {}
    except NonFiniteLossError as e:
        if len(candidates) == 1:
            return {}, dict.fromkeys(candidates, e)
        run_logger().warning("--auto: a candidate's training diverged (%s); training each alone", e)
    trained, diverged = {}, {}
    for key, candidate in candidates.items():
        try:
            trained.update(train_ensembles({key: candidate}))
        except NonFiniteLossError as e:
            diverged[key] = e
    return trained, diverged


def choose(rnd: AutoRound, trained: dict[str, Trained], scores: dict[str, float], source: str,
           keep: int = 1) -> Settings:
    """The settings of the round's candidate with the best validation score, and those of the next
    ``keep`` - 1 within NEAR_BEST of it as runners-up the ensemble's members take in turn, each with
    the network the round trained (every candidate's training diverged: how the first did, with what to change)."""
    if rnd.diverged and not any(np.isfinite(v) for v in scores.values()):
        raise next(iter(rnd.diverged.values()))
    choice = best(scores, rnd.reasons, f"{source}: no --auto candidate could run on this data", rnd.measure)
    near = [c for c, v in scores.items() if np.isfinite(v) and v <= scores[choice] * NEAR_BEST]
    ranked = sorted(near, key=scores.get)[:keep]  # stable: the choice first
    network = {c: None if rnd.widened else trained[c] for c in ranked}
    selection = Selection(choice, scores, rnd.reasons, network[choice], rnd.widened, rnd.measure, rnd.losses,
                          ranked if keep > 1 else [])
    return Settings(rnd.trials[choice], selection, runners_up=[(rnd.trials[c], network[c]) for c in ranked[1:]])


def with_calendar_round(first: Settings, rnd: AutoRound, trained: dict[str, Trained],
                        scores: dict[str, float]) -> Settings:
    """``first``'s choice, or its calendar candidate if that scored lower still."""
    (name, score_), sel = next(iter(scores.items())), first.selection
    better = bool(np.isfinite(score_) and score_ < sel.scores[sel.choice])
    run_logger().info("--auto: calendar features %s", "kept" if better else "left out")
    selection = replace(sel, scores={**sel.scores, **scores}, reasons={**sel.reasons, **rnd.reasons},
                        losses={**sel.losses, **rnd.losses})
    if not better:
        return replace(settle_calendar(first, False), selection=selection)
    members = [name, *(f"{m} + calendar" for m in sel.members[1:])]
    return replace(settle_calendar(first, True), cfg=rnd.trials[name], selection=replace(
        selection, choice=name, trained=None if rnd.widened else trained[name], members=members))


def settle_calendar(settings: Settings, on: bool) -> Settings:
    """``settings`` with the calendar features on or off, for the runners-up too: a runner-up's
    network is kept where its data stays as it trained on it, dropped (trained anew) where not."""
    return replace(settings, cfg=replace(settings.cfg, calendar=on), runners_up=[
        (replace(cfg, calendar=on), network if bool(cfg.calendar) == on else None)
        for cfg, network in settings.runners_up])


def folder(checkpoints: Path | None, candidate: str) -> Path | None:
    return checkpoints and checkpoints / candidate.replace(" ", "-")


def best(scores: dict[str, float], reasons: dict[str, str], none_ran: str, measure: str = "MASE") -> str:
    """The candidate with the lowest validation score; ``none_ran`` (with the reasons) if none ran."""
    finite = {k: v for k, v in scores.items() if np.isfinite(v)}
    if not finite:
        raise DataError(f"{none_ran}: {reasons}")
    choice = min(finite, key=finite.get)
    run_logger().info("--auto chose %s (validation %s %.4f)", choice, measure, finite[choice])
    return choice


@dataclass
class Outcome:
    """What the forecasting pipeline made of one model's data and config."""

    settings: Settings  # the settled config and --auto's choice
    data: Data  # what it trained on: the data given, with calendar features if chosen
    windows: Windows  # and its split
    trained: Trained


def train_models(models: dict[Hashable, tuple[Data, TimeSeriesConfig]]) -> dict[Hashable, Outcome]:
    """The pipeline's transform and training steps for several models at once, each {name:
    (data, config)}: a sweep's trials on one worker, a benchmark's model. Each phase hands the
    networks of every model to ``train_ensembles`` together (--auto's candidates, then the
    members), so those of one shape train as one batched network across models too."""
    settings = choose_all({k: (data, cfg, None) for k, (data, cfg) in models.items()})
    data = {k: with_calendar(data, settings[k].cfg) for k, (data, _) in models.items()}
    windows = {k: scale_and_window(data[k], split_series(data[k], settings[k].cfg), settings[k].cfg) for k in models}
    trained = train_ensembles({k: forecaster_ensemble(data[k], windows[k], settings[k], name=str(k)) for k in models})
    return {k: Outcome(settings[k], data[k], windows[k], trained[k]) for k in models}

"""The champion's live error: its data source read again, the actuals that arrived after its
training data ended scored by the champion gate's own re-scoring (``tasks.reevaluate``), a drift
test on each series' level and spread, the verdict, and each check logged to MLflow as one point
of a curve (a run per champion version in the ``monitoring`` experiment, one step per check)."""

from __future__ import annotations

import base64
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.entities import Metric, RunTag
from scipy import stats

from rnn_models.windows import Split, window_origins
from tasks.config import ConfigError, check_model_name, option, safe_name
from tasks.data import Series
from tasks.features import Data
from tasks.panel import PanelBacktest, PanelData, PanelSplit
from tasks.reevaluate import RESCORED, evaluation_data, rescore_registered
from tasks.registry import champion_version, client, ensure_experiment

DATA_END = "data_end.json"  # in a forecaster's run: where each series' training data ended


@dataclass
class MonitorConfig:
    """The monitor's options: its flow's parameters and its command line."""

    title = "monitor"  # the group in --help (no annotation: not a field)
    model_name: str = option("", "the registered model to check; default: every forecaster that has a champion")
    degrade_ratio: float = option(1.3, "degraded when the live MASE exceeds the MASE the champion was registered "
                                  "with (its backtest) by this factor")
    min_new_points: int = option(0, "new points needed before the MASE ratio is judged; 0 = twice the model's "
                                 "horizon")
    drift_p: float = option(0.001, "a series' level or spread has shifted when its test's p-value is below this "
                            "(divided by the number of tests)")
    experiment: str = option("monitoring", "MLflow experiment of the live-error runs")

    def __post_init__(self):
        if not self.degrade_ratio > 0 or math.isinf(self.degrade_ratio):
            raise ConfigError(f"--degrade-ratio must be a positive number, got {self.degrade_ratio}")
        if self.min_new_points < 0:
            raise ConfigError(f"--min-new-points must be 0 or more, got {self.min_new_points}")
        if not 0 < self.drift_p < 1:
            raise ConfigError(f"--drift-p must lie strictly between 0 and 1, got {self.drift_p}")
        if self.model_name:
            check_model_name(self.model_name, given=True)

    def to_params(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- where the training data ended


def data_ends(data: Data) -> dict[str, dict]:
    """Each series' last time step and row count (one series: under ''), recorded at registration."""
    if isinstance(data, PanelData):
        return {sid: {"last": str(t[-1]), "rows": len(t)} for sid, t in zip(data.ids, data.times, strict=True)}
    return {"": {"last": str(data.frame[data.time_column].iloc[-1]), "rows": len(data.frame)}}


def _rows_through(times, last: str, rows: int) -> int:
    """How many of ``times`` (sorted) fall at or before ``last``: where the new data starts. Without
    a recorded time (a version registered before they were), or one that no longer parses, the
    recorded row count."""
    times = np.asarray(times)
    try:
        key = np.datetime64(pd.Timestamp(last)) if np.issubdtype(times.dtype, np.datetime64) else float(last)
        return int(np.searchsorted(times, key, side="right"))
    except (TypeError, ValueError):
        return min(rows, len(times))


def recorded_ends(version) -> dict[str, dict] | None:
    """``data_ends`` as the champion's run recorded it; for one series registered before that was
    recorded, its row count (the ``rows`` param); None when unknown."""
    c = client()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(c.download_artifacts(version.run_id, DATA_END, tmp)).read_text())
    except Exception:  # noqa: BLE001 - not recorded (an older version): MLflow raises several types
        params = c.get_run(version.run_id).data.params
        if params.get("id_column") or "rows" not in params:
            return None
        return {"": {"last": "", "rows": int(params["rows"])}}


# ---------------------------------------------------------------- the check


@dataclass
class Check:
    """One model's check: its figures, its verdict and why."""

    name: str
    version: str | None
    status: str  # ok | degraded | nothing | failed
    reason: str = ""
    live_mase: float = math.nan
    live_smape: float = math.nan
    registered_mase: float = math.nan
    new_points: int = 0
    worst_series: str = ""  # many series: the one with the highest live MASE, and it
    drift: list[str] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)  # the champion's run params: what a retrain runs with

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}" if self.version else self.name

    def line(self) -> str:
        """The command line's line for this model."""
        if self.status == "nothing":
            return f"{self.label}: nothing to check ({self.reason})"
        if self.status == "failed":
            return f"{self.label}: error: {self.reason}"
        verdict = "ok" if self.status == "ok" else f"degraded ({self.reason})"
        return (f"{self.label}: live MASE {self.live_mase:.4g} over {self.new_points} new points "
                f"(registered {self.registered_mase:.4g}): {verdict}")

    def payload(self) -> dict:
        """The degradation event's payload: the figures, the reason and the run params to retrain with."""
        return {"model_name": self.name, "version": self.version, "reason": self.reason,
                **{k: _finite(getattr(self, k)) for k in ("live_mase", "live_smape", "registered_mase")},
                "new_points": self.new_points, "worst_series": self.worst_series, "drift": self.drift,
                "parameters": self.parameters}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def champions(model_name: str = "") -> list:
    """The registered forecasters to check: ``model_name``, or every one with a champion (by name)."""
    if model_name:
        return [model_name]
    names = [m.name for m in client().search_registered_models()]
    return sorted(n for n, v in zip(names, map(champion_version, names), strict=True)
                  if v is not None and v.tags.get("kind") == "forecaster")


def check_model(name: str, cfg: MonitorConfig) -> Check:
    """Score ``name``'s champion on the data that arrived after its training data ended and judge it.
    A source that cannot be read any more is a ``failed`` check, not an exception."""
    from tasks.data import DataError

    version = champion_version(name)
    if version is None:
        known = [m.name for m in client().search_registered_models()]
        why = "no champion" if name in known else f"no registered model {name!r}; there are {sorted(known) or 'none'}"
        return Check(name, None, "nothing", why)
    if version.tags.get("kind") != "forecaster":
        kind = version.tags.get("kind") or "model rnnflow did not register"
        return Check(name, str(version.version), "nothing", f"a {kind}, not a forecaster: the monitor checks those")
    try:
        data = evaluation_data(version, latest=True)
    except DataError as e:
        return Check(name, str(version.version), "failed", f"its data source cannot be read: {e}")
    return judge(version, data.cfg, data.forecast_data, cfg)


def judge(version, tcfg, data: Data, cfg: MonitorConfig) -> Check:
    """The live scores of ``version`` on ``data``'s new part, the drift test and the verdict."""
    name, v = version.name, str(version.version)
    params = {**tcfg.to_params(), "sha256": "", "model_name": name}  # a retrain reads the grown data
    check = Check(name, v, "nothing", parameters=params, registered_mase=float(version.tags.get("test_mase", "nan")))
    ends = recorded_ends(version)
    if ends is None:
        check.reason = "its run did not record where its training data ended (registered before the monitor)"
        return check
    live = live_part(data, tcfg, ends)
    if live is None:
        check.reason = f"no new data since {_since(ends)}; a check needs at least its horizon, {tcfg.horizon} steps"
        return check
    data, split, origins, check.new_points = live
    bt = rescore_registered(f"models:/{name}/{v}", data, split, origins, tcfg.horizon)
    check.live_mase, check.live_smape = bt.scores[RESCORED]["mase"], bt.scores[RESCORED]["smape"]
    check.worst_series = _worst(bt)
    check.drift = drift(data, split, cfg.drift_p)
    return verdict(check, cfg.min_new_points or 2 * tcfg.horizon, cfg.degrade_ratio)


def _since(ends: dict[str, dict]) -> str:
    lasts = sorted({e["last"] or f"row {e['rows']}" for e in ends.values()})
    return lasts[-1] if lasts else "registration"


def verdict(check: Check, min_points: int, ratio: float) -> Check:
    """Degraded when the live MASE exceeds ``ratio`` x the registered one over at least ``min_points``
    new points, or when a series drifted; ok otherwise."""
    reasons = []
    if check.new_points >= min_points and check.live_mase > ratio * check.registered_mase:
        worst = f"; worst series {check.worst_series}" if check.worst_series else ""
        reasons.append(f"live MASE {check.live_mase / check.registered_mase:.2f}x the registered one, "
                       f"above --degrade-ratio {ratio:g}{worst}")
    reasons += check.drift
    check.status, check.reason = ("degraded", "; ".join(reasons)) if reasons else ("ok", "")
    return check


def _worst(bt) -> str:
    if not isinstance(bt, PanelBacktest):
        return ""
    rows = bt.table[bt.table["model"] == RESCORED].sort_values("mase", ascending=False)
    return f"{rows['id'].iloc[0]} (MASE {rows['mase'].iloc[0]:.4g})"


def live_part(data: Data, tcfg, ends: dict[str, dict]):
    """(data, split, origins, new points) over what arrived after the recorded ends: the split's test
    part is the new data, its training part the champion's (the MASE scale it was registered with).
    Many series: those the champion knew with at least a horizon of new data. None when none has."""
    H, L = tcfg.horizon, tcfg.lookback
    if isinstance(data, Series):
        rows, was = len(data.frame), ends[""]["rows"]
        start = _rows_through(data.frame[data.time_column], ends[""]["last"], was)
        origins = window_origins(start, rows, L, H)
        if not len(origins):
            return None
        train_end = Split.by_fraction(was, tcfg.val_size, tcfg.test_size, H).train_end
        return data, Split(rows, train_end, start), origins, rows - start
    keep = [(i, _rows_through(data.times[i], ends[sid]["last"], ends[sid]["rows"]), ends[sid]["rows"])
            for i, sid in enumerate(data.ids) if sid in ends]
    keep = [(i, start, was) for i, start, was in keep if len(window_origins(start, len(data.values[i]), L, H))]
    if not keep:
        return None
    idx = [i for i, _, _ in keep]
    data = data.subset(idx)
    starts = np.array([s for _, s, _ in keep], dtype=np.int64)
    train_end = [Split.by_fraction(was, tcfg.val_size, tcfg.test_size, H).train_end for _, _, was in keep]
    split = PanelSplit(data.lengths, np.array(train_end, dtype=np.int64), starts)
    return data, split, split.origins("test", L, H), int((data.lengths - starts).sum())


# ---------------------------------------------------------------- drift


def drift(data: Data, split: Split | PanelSplit, p: float) -> list[str]:
    """Series whose new part's level or spread differs from the champion's data: their seasonal
    differences (y[t] - y[t - m]) compared, Welch's t-test on the mean (a level shift), Levene's
    (median-centred) on the spread; each test at ``p`` divided by the number of tests."""
    if isinstance(data, PanelData):
        series = list(zip(data.ids, data.values, split.val_end, strict=True))
    else:
        series = [("", data.features[:, 0], split.val_end)]
    alpha, m, found = p / (2 * len(series)), max(data.season_length, 1), []
    for sid, y, start in series:
        d = y[m:] - y[:-m]  # (T - m,) seasonal differences; d[t - m] belongs to y[t]
        old, new = d[: max(start - m, 0)], d[max(start - m, 0):]
        if len(new) < 3 or len(old) < 3 or np.std(old) == 0:
            continue
        who = f"series {sid}: " if sid else ""
        level, spread = stats.ttest_ind(new, old, equal_var=False).pvalue, stats.levene(new, old).pvalue
        if level < alpha:
            found.append(f"{who}level shifted by {(new.mean() - old.mean()) / old.std():+.1f} sd (p={level:.1g})")
        if spread < alpha:
            found.append(f"{who}spread x{new.std() / old.std():.2f} (p={spread:.1g})")
    return found


# ---------------------------------------------------------------- the record in MLflow


def log_check(check: Check, experiment: str) -> list[dict]:
    """The check as the next point of the champion version's live-error curve (one run per version
    in ``experiment``, one step per check); returns every check of that run so far."""
    c = client()
    exp = ensure_experiment(experiment)
    key = f"{safe_name(check.name)}-v{check.version}"
    found = c.search_runs([exp], f"tags.monitor_of = '{key}'", max_results=1)
    run_id = found[0].info.run_id if found else c.create_run(
        exp, run_name=f"{check.label} live error",
        tags={"monitor_of": key, "model_name": check.name, "model_version": check.version}).info.run_id
    step, now = len(c.get_metric_history(run_id, "live_mase")), int(time.time() * 1000)
    figures = {"live_mase": check.live_mase, "live_smape": check.live_smape, "new_points": check.new_points,
               "registered_mase": check.registered_mase, "degraded": float(check.status == "degraded")}
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in figures.items() if math.isfinite(v)],
                tags=[RunTag("last_status", check.status), RunTag("last_reason", check.reason[:500])])
    c.set_terminated(run_id)
    history = {k: c.get_metric_history(run_id, k) for k in ("live_mase", "registered_mase", "new_points")}
    return [{"at": m.timestamp, "step": m.step, "live_mase": m.value,
             **{k: next((x.value for x in history[k] if x.step == m.step), math.nan)
                for k in ("registered_mase", "new_points")}}
            for m in sorted(history["live_mase"], key=lambda m: m.step)]


def report(check: Check, history: list[dict], ratio: float) -> str:
    """A markdown report of the check: the live-error plot (a PNG inline) and the table of checks."""
    png = base64.b64encode(plot_live_error(check.label, history, ratio)).decode()
    lines = [f"### {check.label}: live error", "", check.line(), "",
             f"![live MASE of {check.label}](data:image/png;base64,{png})", "",
             "| check | at (UTC) | new points | live MASE | registered MASE |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {h['step']} | {pd.Timestamp(h['at'], unit='ms'):%Y-%m-%d %H:%M} | {h['new_points']:.0f} | "
              f"{h['live_mase']:.4g} | {h['registered_mase']:.4g} |" for h in history]
    return "\n".join(lines)


def plot_live_error(label: str, history: list[dict], ratio: float) -> bytes:
    """Live MASE per check against the registered backtest MASE and the degradation threshold (PNG)."""
    from tasks.evaluation import pyplot

    plt = pyplot()

    at = [pd.Timestamp(h["at"], unit="ms") for h in history]
    registered = history[-1]["registered_mase"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(at, [h["live_mase"] for h in history], "o-", label="live MASE (new data)")
    ax.axhline(registered, color="grey", ls="--", lw=1, label=f"registered backtest MASE {registered:.3g}")
    ax.axhline(ratio * registered, color="red", ls=":", lw=1, label=f"degraded above x{ratio:g}")
    ax.set_title(f"{label}: live error")
    ax.set_ylabel("MASE")
    ax.legend(loc="best", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        fig.savefig(Path(tmp) / "live.png", dpi=80)
        plt.close(fig)
        return (Path(tmp) / "live.png").read_bytes()

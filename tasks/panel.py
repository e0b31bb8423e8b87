"""Many series, one global network: the steps of ``python -m flows.timeseries --id-column ID``.

A long-format file (id, time, value rows; CSV or Parquet) is read into a :class:`PanelData`,
every series regular and in time order. Each series is split at the same relative point; the
windows of every series train one network (``rnn_models.panel``: gathered lazily, each window
normalised by itself, so series of any scale train together); the backtest scores every
series' test part and averages MASE and sMAPE over series, beside naive and seasonal naive.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from rnn_models import metrics
from rnn_models.calendar import calendar_frame
from rnn_models.conformal import coverage_lines
from rnn_models.statics import StaticEncoding, per_series
from rnn_models.windows import Split, window_origins
from tasks import run_logger
from tasks.config import ConfigError, TimeSeriesConfig
from tasks.data import DataError, _fill_gaps, _numeric, _pick_columns, _read_table, _regularise, _season_for, _times


@dataclass
class PanelData:
    """Every usable series of a long-format file, regular and in time order."""

    ids: list[str]
    values: list[np.ndarray]  # one (T_i,) float64 array per series
    id_column: str
    value_column: str
    time_column: str  # '' when the rows' order is the time order
    source: str
    sha256: str
    freq: str | None
    season_length: int
    skipped: dict[str, int] = field(default_factory=dict)  # too-short series: id -> rows
    times: list[np.ndarray] = field(default_factory=list)  # each series' times (its row numbers without a time column)
    # the covariates known ahead, (T_i, C) per series: --future-covariate-columns, the calendar's, then the
    # encoded --static-columns (one value per series, repeated on its rows)
    covariates: list[np.ndarray] = field(default_factory=list)
    future_columns: list[str] = field(default_factory=list)
    calendar_columns: list[str] = field(default_factory=list)
    countries: list[str] = field(default_factory=list)
    statics: StaticEncoding | None = None  # how --static-columns were encoded (columns ``statics.columns``)
    attributes: pd.DataFrame | None = None  # --static-columns as read: one row per series id

    def __post_init__(self):
        if not self.covariates:
            self.covariates = [np.zeros((len(v), 0)) for v in self.values]

    def __len__(self) -> int:
        return len(self.ids)

    def features(self) -> list[np.ndarray]:
        """Each series' (T_i, F) rows as a window reads them: the target, then the covariates known ahead."""
        return [np.column_stack([v, c]) for v, c in zip(self.values, self.covariates, strict=True)]

    def with_calendar(self, columns: list[str], countries: list[str]) -> PanelData:
        """The panel with these calendar features (``calendar_columns``) of each series' times, known ahead."""
        made = calendar_frame(np.concatenate(self.times), self.freq, countries).to_numpy()
        parts = np.split(made, np.cumsum(self.lengths)[:-1])
        return replace(self, covariates=[np.column_stack([c, p]) for c, p in zip(self.covariates, parts, strict=True)],
                       future_columns=[*self.future_columns, *columns], calendar_columns=columns, countries=countries)

    def subset(self, keep: list[int]) -> PanelData:
        """The series at these positions."""
        return replace(self, ids=[self.ids[i] for i in keep], values=[self.values[i] for i in keep],
                       times=[self.times[i] for i in keep], covariates=[self.covariates[i] for i in keep])

    @property
    def series_read(self) -> int:
        """The series of the file, the too-short ones included: what the automatic settings count."""
        return len(self.ids) + len(self.skipped)

    @property
    def covariate_columns(self) -> list[str]:
        return self.future_columns  # a global model reads no past covariates: every one is known ahead

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(v) for v in self.values], dtype=np.int64)


# ---------------------------------------------------------------- reading


def load_panel(path: str, sha256: str, cfg: TimeSeriesConfig) -> PanelData:
    """Read and check a long-format file; series too short for the split are skipped and named,
    a file where none is long enough is refused."""
    label = cfg.data or path
    df = _read_table(path, label)
    id_col, time_col, value_col, ahead = _panel_columns(df, cfg, label)
    ids = df[id_col]
    if ids.isna().any():
        raise DataError(f"{label}: column {id_col!r} is empty at row {int(np.flatnonzero(ids.isna())[0]) + 1}")
    ids = ids.astype(str)
    table = pd.DataFrame({"id": ids, **{c: _numeric(df[c], c, label, ids) for c in [value_col, *ahead]}})
    if time_col:
        if pd.api.types.is_numeric_dtype(df[time_col]) and not cfg.season_length:
            raise ConfigError(f"{label}: column {time_col!r} holds plain time steps, not dates, so the season is "
                              "unknown: give --season-length (e.g. 24 for hourly data)")
        table["time"] = _times(df[time_col], time_col, label)
    if table["id"].nunique() == 1:
        raise DataError(f"{label}: column {id_col!r} holds one id ({ids.iloc[0]!r}), one series: "
                        f"drop --id-column to train on it")
    panel = _series_of(table, (id_col, time_col, value_col, ahead), label, sha256, cfg)
    return with_statics(panel, df.assign(**{id_col: ids}), cfg.statics) if cfg.statics else panel


def _panel_columns(df: pd.DataFrame, cfg: TimeSeriesConfig, label: str) -> tuple[str, str, str, list[str]]:
    """(id, time or '', value column, covariates known ahead): found as for one series, beside the id
    and the per-series attributes."""
    missing = [c for c in [cfg.id_column, *cfg.statics] if c not in df.columns]
    if missing:
        what = "id" if missing[0] == cfg.id_column else "static"
        raise DataError(f"{label}: no {what} column {missing[0]!r}; the columns are {list(df.columns)}")
    time_col, value_col, ahead = _pick_columns(df.drop(columns=[cfg.id_column, *cfg.statics]), cfg, label)
    return cfg.id_column, time_col, value_col, ahead


def _series_of(table: pd.DataFrame, columns: tuple[str, str, str, list[str]], label: str, sha256: str,
               cfg: TimeSeriesConfig) -> PanelData:
    """Each id's rows as one regular series (sorted, gaps up to --max-gap interpolated)."""
    id_col, time_col, value_col, ahead = columns
    read = ["value", *ahead]  # the columns each series' rows keep
    table = table.rename(columns={value_col: "value"})
    logger, ids, values, times, covariates, freq = run_logger(), [], [], [], [], None
    table["order"] = pd.factorize(table["id"])[0]  # series in the order they first appear
    if time_col:
        table = table.sort_values(["order", "time"], kind="stable")
        dup = table.duplicated(["id", "time"])
        if dup.any():
            row = table[dup].iloc[0]
            raise DataError(f"{label}: series {row['id']!r} (column {id_col!r}) has two rows at {time_col} "
                            f"{row['time']}")
    for sid, part in table.groupby("id", sort=False):
        where = f"{label}: series {sid!r} (column {id_col!r})"
        if len(part) < 2:
            raise DataError(f"{where} has a single row; a series needs a history to forecast from")
        if part["value"].isna().all():
            raise DataError(f"{where} holds no values in column {value_col!r}")
        if time_col:
            part, f = _regularise(part[["time", *read]], "time", where)
            freq = freq or f
        else:
            part = part.assign(time=np.arange(len(part)))  # the rows' order is the time order
        part = _fill_gaps(part.reset_index(drop=True), read, "time", cfg.max_gap, where, logger)
        ids.append(str(sid))
        values.append(part["value"].to_numpy(dtype=np.float64))
        covariates.append(part[ahead].to_numpy(dtype=np.float64).reshape(len(part), len(ahead)))
        times.append(part["time"].to_numpy())
    season = cfg.season_length or _season_for(freq)
    panel = PanelData(ids, values, id_col, value_col, time_col, label, sha256, freq, season, times=times,
                      covariates=covariates, future_columns=list(ahead))
    return keep_long_enough(panel, cfg.settled(season, panel.series_read, panel.lengths))


def with_statics(panel: PanelData, df: pd.DataFrame, columns: list[str]) -> PanelData:
    """``panel`` with the per-series attributes of ``df``'s ``columns`` encoded (``rnn_models.statics``) as
    covariates known ahead, each series' values repeated on its rows."""
    try:
        attributes = per_series(df, panel.id_column, columns)
    except ValueError as e:
        raise DataError(f"{panel.source}: {e}") from None
    trained_on = attributes.loc[panel.ids]  # the series long enough to train on, and their categories
    encoding = StaticEncoding.fit(trained_on)
    encoded, _ = encoding.encode(trained_on)
    covariates = [np.column_stack([c, np.repeat(e[None], len(c), axis=0)])
                  for c, e in zip(panel.covariates, encoded, strict=True)]
    return replace(panel, covariates=covariates, future_columns=[*panel.future_columns, *encoding.columns],
                   statics=encoding, attributes=attributes)


def keep_long_enough(panel: PanelData, cfg: TimeSeriesConfig) -> PanelData:
    """The series long enough for the split and a training window; the others named in a warning."""
    L, H = cfg.lookback, cfg.horizon
    long_enough = [cfg.train_windows(len(v)) >= 1 for v in panel.values]
    keep = [i for i, ok in enumerate(long_enough) if ok]
    skipped = {sid: len(v) for sid, v, ok in zip(panel.ids, panel.values, long_enough, strict=True) if not ok}
    if not keep:
        shortest, longest = int(panel.lengths.min()), int(panel.lengths.max())
        raise DataError(f"{panel.source}: no series is long enough for --lookback {L} + --horizon {H} + the "
                        f"validation and test parts (the series have {shortest} to {longest} rows)")
    if skipped:
        named = ", ".join(f"{k} ({n} rows)" for k, n in list(skipped.items())[:20])
        more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        run_logger().warning("%s: skipped %d of %d series, too short for --lookback %d + --horizon %d + the "
                             "validation and test parts: %s%s", panel.source, len(skipped), len(panel), L, H,
                             named, more)
    return replace(panel.subset(keep), skipped=skipped)


# ---------------------------------------------------------------- splitting


@dataclass(frozen=True)
class PanelSplit:
    """Every series split at the same relative point: rows [0, train_end[i]) train,
    [train_end[i], val_end[i]) validate, [val_end[i], n[i]) test."""

    n: np.ndarray
    train_end: np.ndarray
    val_end: np.ndarray

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return {"train": (np.zeros_like(self.n), self.train_end), "val": (self.train_end, self.val_end),
                "test": (self.val_end, self.n)}[name]

    def origins(self, name: str, lookback: int, horizon: int) -> list[np.ndarray]:
        """Each series' forecast origins in the part, every step (the backtest's origins)."""
        return [window_origins(int(a), int(b), lookback, horizon) for a, b in zip(*self.part(name), strict=True)]


def split_panel(panel: PanelData, cfg: TimeSeriesConfig) -> PanelSplit:
    splits = [Split.by_fraction(len(v), cfg.val_size, cfg.test_size, cfg.horizon) for v in panel.values]
    return PanelSplit(panel.lengths, np.array([s.train_end for s in splits], dtype=np.int64),
                      np.array([s.val_end for s in splits], dtype=np.int64))


# ---------------------------------------------------------------- backtest


@dataclass
class PanelBacktest:
    """Per-series scores of the test part (one row per series and model) and their means."""

    table: pd.DataFrame  # id, model, origins, mae, rmse, smape, mase
    season_length: int
    horizon: int
    origins: list[np.ndarray]  # each series' forecast origins, in series order
    conformal: dict[float, dict[str, float]] = field(default_factory=dict)  # --intervals level -> coverage, msis
    calibrated_on: int = 0

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        """Model -> metric -> mean over series (a series whose in-sample seasonal-naive error is 0
        has no MASE and is left out of that mean)."""
        means = self.table.groupby("model", sort=False)[list(METRICS)].mean()
        return {m: {k: float(v) for k, v in row.items()} for m, row in means.iterrows()}

    def markdown(self, title: str = "Backtest") -> str:
        n = self.table["id"].nunique()
        origins = int(self.table.groupby("id")["origins"].first().sum())
        lines = score_table(title, f"Rolling origin over the test part of each of {n} series ({origins} origins in "
                            f"all, {self.horizon} steps each); each measure is the mean over series; MASE scaled by "
                            f"each series' in-sample seasonal-naive error (season {self.season_length}).", self.scores)
        lines += ["", *coverage_lines(self.conformal, self.calibrated_on)] if self.conformal else []
        return "\n".join(lines)


METRICS = ("mae", "rmse", "smape", "mase")


def score_table(title: str, intro: str, scores: dict[str, dict[str, float]]) -> list[str]:
    """A backtest's markdown: its title, what was measured, and a row of METRICS per model."""
    header = " | ".join("sMAPE %" if m == "smape" else m.upper() for m in METRICS)
    return [f"### {title}", "", intro, "", f"| model | {header} |", "|---|" + "---:|" * len(METRICS),
            *(f"| {name} | " + " | ".join(f"{s[m]:.4g}" for m in METRICS) + " |" for name, s in scores.items())]


def panel_windows(panel: PanelData, origins: list[np.ndarray], lookback: int, ahead: int = 0) -> np.ndarray:
    """Raw input windows (N, L + ahead, F) ending before each origin of each series (with the ``ahead``
    steps from it on, for the covariates known ahead), series after series."""
    steps = np.arange(-lookback, ahead)[None, :]
    return np.concatenate([f[o[:, None] + steps] for f, o in zip(panel.features(), origins, strict=True)])


def score_panel(panel: PanelData, split: PanelSplit, origins: list[np.ndarray], horizon: int,
                forecasts: dict[str, np.ndarray]) -> PanelBacktest:
    """``forecasts``: model -> (N, H) for the origins of every series in turn."""
    rows, at, m = [], 0, panel.season_length
    for i, (sid, y, o) in enumerate(zip(panel.ids, panel.values, origins, strict=True)):
        actual = y[o[:, None] + np.arange(horizon)[None, :]]
        scale = metrics.seasonal_naive_scale(y[: split.train_end[i]], m)
        each = {name: f[at : at + len(o)] for name, f in forecasts.items()}
        each["naive"] = metrics.naive_forecast(y, o, horizon)
        each["seasonal-naive"] = metrics.seasonal_naive_forecast(y, o, horizon, m)
        rows += [{"id": sid, "model": name, "origins": len(o), **metrics.score(actual, f, scale)}
                 for name, f in each.items()]
        at += len(o)
    return PanelBacktest(pd.DataFrame(rows), m, horizon, origins)


def per_series_csv(bt: PanelBacktest, directory: str | Path) -> Path:
    """The per-series table as a CSV file: one row per series, one column per model and measure."""
    wide = bt.table.pivot(index="id", columns="model", values=list(METRICS))
    wide.columns = [f"{model}_{measure}" for measure, model in wide.columns]
    path = Path(directory) / "per_series.csv"
    wide.reset_index().to_csv(path, index=False)
    return path

"""Loading a series: the synthetic generators, or a CSV/Parquet file (made local by ``tasks.ingest``),
validated and made regular (sorted, frequency detected, short gaps interpolated)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from rnn_models import synthetic
from rnn_models.calendar import calendar_columns, calendar_frame, to_datetime
from tasks import run_logger
from tasks.config import TimeSeriesConfig


class DataError(ValueError):
    """The input data cannot be used; the message names the file, column or row."""


@dataclass
class Series:
    """A regular series ready for windowing: ``frame`` holds the value column first, then the
    covariates (those known for the horizon too, ``future_columns``, last), one row per time
    step, no missing values."""

    frame: pd.DataFrame
    value_column: str
    covariate_columns: list[str]
    time_column: str
    source: str  # path, URL or generator description
    sha256: str  # of the file's bytes, or of the generated values
    freq: str | None = None
    season_length: int = 1
    future_columns: list[str] = field(default_factory=list)  # the last of ``covariate_columns``
    calendar_columns: list[str] = field(default_factory=list)  # the last of ``future_columns``: made, not read
    countries: list[str] = field(default_factory=list)  # whose public holidays ``cal_holiday`` flags

    @property
    def features(self) -> np.ndarray:
        return self.frame[[self.value_column, *self.covariate_columns]].to_numpy(dtype=np.float64)  # (T, F)

    def with_calendar(self, columns: list[str], countries: list[str]) -> Series:
        """The series with these calendar features (``calendar_columns``) of its times, known ahead."""
        frame = pd.concat([self.frame, calendar_frame(self.frame[self.time_column], self.freq, countries)], axis=1)
        return replace(self, frame=frame, covariate_columns=[*self.covariate_columns, *columns],
                       future_columns=[*self.future_columns, *columns], calendar_columns=columns, countries=countries)


# ---------------------------------------------------------------- synthetic


PERIOD = 40  # of the generated sine waves
# source -> (frame for the config, value column, covariate columns, season)
GENERATORS = {"sine": (lambda cfg: synthetic.sine(cfg.length, PERIOD, seed=cfg.seed), "value", [], PERIOD),
              "sin-cos": (lambda cfg: synthetic.sin_cos(cfg.length, PERIOD, seed=cfg.seed), "cos", ["sin"], PERIOD),
              "arithmetic": (lambda cfg: synthetic.arithmetic(cfg.length), "value", [], 1),
              "trend-season": (lambda cfg: synthetic.trend_season(cfg.length, seed=cfg.seed), "value", [], 24)}


def generate_series(cfg: TimeSeriesConfig) -> Series:
    if cfg.source not in GENERATORS:
        raise ValueError(f"generate_series cannot make source {cfg.source!r}")
    make, value, covs, season = GENERATORS[cfg.source]
    df, cols = make(cfg), [value, *covs]
    digest = hashlib.sha256(df[cols].to_numpy().tobytes()).hexdigest()
    return Series(df[["t", *cols]], value, covs, "t", f"generated:{cfg.source}(length={cfg.length}, seed={cfg.seed})",
                  digest, None, cfg.season_length or season)


# ---------------------------------------------------------------- files


SERIES_SUFFIXES = (".csv", ".parquet", ".pq")


def load_series(path: str, sha256: str, cfg: TimeSeriesConfig) -> Series:
    """Read, check and regularise a series file (see module docstring)."""
    label = cfg.data or path
    df = _read_table(path, label)
    time_col, value_col, covs = _pick_columns(df, cfg, label)
    out = pd.DataFrame({c: _numeric(df[c], c, label) for c in [value_col, *covs]})
    freq, season = None, 1
    if time_col:
        times = _times(df[time_col], time_col, label)
        out.insert(0, time_col, times)
        out = out.sort_values(time_col, kind="stable")
        dup = out[time_col].duplicated()
        if dup.any():
            raise DataError(f"{label}: column {time_col!r} repeats the time {out[time_col][dup].iloc[0]}")
        out, freq = _regularise(out, time_col, label)
        season = _season_for(freq)
    else:
        time_col = "step"
        out.insert(0, time_col, np.arange(len(out)))
    out = _fill_gaps(out, [value_col, *covs], time_col, cfg.max_gap, label, run_logger())
    return Series(out.reset_index(drop=True), value_col, covs, time_col, label, sha256, freq,
                  cfg.season_length or season, cfg.future_covariates)


def with_calendar(data, cfg: TimeSeriesConfig):
    """``data`` (one series or a panel) with calendar features made from its time column
    (``rnn_models.calendar``) as covariates known ahead, when ``cfg.calendar`` asks for them; as it is
    otherwise."""
    if not cfg.calendar or data.calendar_columns:
        return data
    try:
        if not has_dates(data):
            raise ValueError(f"calendar features need dates, and column {data.time_column!r} holds step numbers")
        columns = calendar_columns(data.freq, cfg.countries)
    except ValueError as e:
        raise DataError(f"{data.source}: --calendar: {e}") from None
    return data.with_calendar(columns, cfg.countries)


def has_dates(data) -> bool:
    """Whether the time column of ``data`` (one series or a panel) holds dates (calendar features can be made)."""
    if isinstance(data, Series):
        return pd.api.types.is_datetime64_any_dtype(data.frame[data.time_column])
    return bool(data.time_column) and pd.api.types.is_datetime64_any_dtype(data.times[0])


def _read_table(path: str, label: str) -> pd.DataFrame:
    try:
        df = pd.read_parquet(path) if Path(path).suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    except Exception as e:  # pandas raises many types for malformed files
        raise DataError(f"{label}: cannot be read as a table ({type(e).__name__}: {e})") from e
    if df.empty:
        raise DataError(f"{label}: has no rows")
    df.columns = [str(c) for c in df.columns]
    return df


def _pick_columns(df: pd.DataFrame, cfg: TimeSeriesConfig, label: str) -> tuple[str, str, list[str]]:
    """(time column or '', value column, covariate columns): as the config names them, else guessed."""
    columns = list(df.columns)

    def need(col: str, what: str) -> str:
        if col not in columns:
            raise DataError(f"{label}: no {what} column {col!r}; the columns are {columns}")
        return col

    time_col = need(cfg.time_column, "time") if cfg.time_column else _guess_time_column(df)
    covs = [need(c, "covariate") for c in cfg.covariates] + [need(c, "future covariate") for c in cfg.future_covariates]
    twice = next((c for c in covs if covs.count(c) > 1), None)
    if twice:
        raise DataError(f"{label}: column {twice!r} is named twice in --covariate-columns and "
                        "--future-covariate-columns")
    if cfg.value_column:
        value_col = need(cfg.value_column, "value")
    else:
        candidates = [c for c in columns if c != time_col and c not in covs]
        if len(candidates) > 1:
            candidates = [c for c in candidates if _mostly_numeric(df[c])]
        if len(candidates) != 1:
            raise DataError(f"{label}: cannot tell which column to forecast among {candidates or columns}; "
                            "name it with --value-column")
        value_col = candidates[0]
    if value_col in covs:
        raise DataError(f"{label}: column {value_col!r} is both the value and a covariate")
    return time_col, value_col, covs


def _mostly_numeric(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s) or pd.to_numeric(s, errors="coerce").notna().mean() > 0.9


TIME_NAMES = {"t", "time", "date", "datetime", "timestamp", "ds", "step", "period", "day", "month", "year"}


def _guess_time_column(df: pd.DataFrame) -> str:
    """The first column named like a time, or holding text that parses as dates; '' if none."""
    for col in df.columns:
        if col.lower() in TIME_NAMES:
            return col
        if not pd.api.types.is_numeric_dtype(df[col]):
            parsed = to_datetime(df[col])
            if parsed.notna().mean() > 0.9:
                return col
    return ""


def _numeric(s: pd.Series, col: str, label: str, ids: pd.Series | None = None) -> pd.Series:
    """Column ``col`` as floats; ``ids``: each row's series, named in the error for a non-numeric value."""
    values = pd.to_numeric(s, errors="coerce")
    bad = values.isna() & s.notna() & (s.astype(str).str.strip() != "")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        whose, where = ((f"column {col!r}", "") if ids is None else
                        (f"series {ids.iloc[row]!r} (column {ids.name!r})", f" in column {col!r}"))
        raise DataError(f"{label}: {whose} has a non-numeric value {s.iloc[row]!r}{where} at row {row + 1}")
    if np.isinf(values.to_numpy(dtype=float)).any():
        raise DataError(f"{label}: column {col!r} holds an infinite value")
    if values.isna().all():
        raise DataError(f"{label}: column {col!r} holds no values (every cell is empty)")
    return values.astype(float)


def _times(s: pd.Series, col: str, label: str) -> pd.Series:
    if pd.api.types.is_numeric_dtype(s):
        return s
    t = to_datetime(s)
    if t.isna().any():
        row = int(np.flatnonzero(t.isna().to_numpy())[0])
        raise DataError(f"{label}: column {col!r} has a value that is not a time, {s.iloc[row]!r} at row {row + 1}")
    return t


_CALENDAR_FREQS = ("D", "B", "MS", "ME", "QS", "QE", "YS", "YE")


def _regularise(df: pd.DataFrame, time_col: str, label: str) -> tuple[pd.DataFrame, str | None]:
    """Reindex onto the coarsest regular grid that contains every timestamp; the rows it adds
    are the gaps. Returns the frame and the frequency."""
    times = df[time_col]
    if len(times) < 3:
        return df, None
    step = times.diff().dropna().mode().iloc[0]
    if pd.api.types.is_numeric_dtype(times):
        grid = (np.arange(times.iloc[0], times.iloc[-1] + 1, step) if pd.api.types.is_integer_dtype(times)
                else np.arange(times.iloc[0], times.iloc[-1] + step / 2, step))
        freq = str(step)
    else:
        freq, grid = None, None
        inferred = pd.infer_freq(times)
        candidates = ([inferred] if inferred else []) + [*_CALENDAR_FREQS, pd.Timedelta(step)]  # names first
        present = set(times)
        for cand in candidates:
            g = pd.date_range(times.iloc[0], times.iloc[-1], freq=cand)
            if present.issubset(g) and (grid is None or len(g) < len(grid)):
                grid, freq = g, cand if isinstance(cand, str) else pd.tseries.frequencies.to_offset(cand).freqstr
        if grid is None:
            raise DataError(f"{label}: column {time_col!r} is not on a regular time grid (most common step {step})")
    return df.set_index(time_col).reindex(grid).rename_axis(time_col).reset_index(), freq


def _season_for(freq: str | None) -> int:
    if not freq:
        return 1
    base = freq.lstrip("0123456789").split("-")[0]
    return {"D": 7, "B": 5, "W": 52, "7D": 52, "MS": 12, "ME": 12, "M": 12, "QS": 4, "QE": 4, "h": 24, "H": 24}.get(
        base if freq[0].isalpha() else freq, 1)


def _fill_gaps(df: pd.DataFrame, cols: list[str], time_col: str, max_gap: int, label: str, logger) -> pd.DataFrame:
    missing = df[cols].isna().any(axis=1).to_numpy()
    if not missing.any():
        return df
    edges = np.diff(np.concatenate(([0], missing, [0])).astype(np.int8))  # +1 where a gap starts, -1 past its end
    starts = np.flatnonzero(edges == 1)
    lengths = np.flatnonzero(edges == -1) - starts
    worst = int(np.argmax(lengths))
    if lengths[worst] > max_gap:
        raise DataError(f"{label}: {lengths[worst]} consecutive time steps are missing from "
                        f"{df[time_col].iloc[starts[worst]]} (at most --max-gap {max_gap} are interpolated)")
    if missing[0] or missing[-1]:
        edge = df[time_col].iloc[0 if missing[0] else -1]
        raise DataError(f"{label}: the series starts or ends with a missing value (at {edge}); trim it")
    df[cols] = df[cols].interpolate(method="linear")
    logger.warning("%s: interpolated %d missing time steps in %d gaps (longest %d)",
                   label, int(missing.sum()), len(starts), lengths[worst])
    return df

"""Calendar features made from a time column: where each step sits in the day, week and year, as
the frequency allows, and a public-holiday flag (the ``holidays`` library). Known for any future
time, so a forecaster reads them for its horizon as well as its history, and a request needs
nothing beyond the time column.

Each position is a sine and cosine pair, so that the end of a cycle lies next to its start
(hour 23 beside hour 0, 31 December beside 1 January).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

DAY = pd.Timedelta(days=1)


QUARTER = r"^\s*(\d{4})\s*[-_ ]?\s*[Qq]([1-4])\s*$"  # 1970 Q1, 1970-Q1, 1970Q1, as fpp3 and spreadsheets write them


def to_datetime(s: pd.Series) -> pd.Series:
    """Text as times (NaT where it is not one): what pandas reads, and quarters (as their first day)."""
    quarters = s.astype(str).str.extract(QUARTER)
    if quarters[0].notna().all():
        months = (quarters[1].astype(int) * 3 - 2).astype(str).str.zfill(2)
        return pd.to_datetime(quarters[0] + "-" + months + "-01")
    return pd.to_datetime(s, errors="coerce", format="mixed")


def _hour(t: pd.DatetimeIndex) -> tuple[np.ndarray, int]:
    return (t.hour + t.minute / 60).to_numpy(float), 24


def _weekday(t: pd.DatetimeIndex) -> tuple[np.ndarray, int]:
    return t.day_of_week.to_numpy(float), 7


def _monthday(t: pd.DatetimeIndex) -> tuple[np.ndarray, int]:
    return (t.day - 1).to_numpy(float), 31


def _yearday(t: pd.DatetimeIndex) -> tuple[np.ndarray, int]:
    return (t.day_of_year - 1).to_numpy(float), 366


def _month(t: pd.DatetimeIndex) -> tuple[np.ndarray, int]:
    return (t.month - 1).to_numpy(float), 12


def _quarter(t: pd.DatetimeIndex) -> tuple[np.ndarray, int]:
    return (t.quarter - 1).to_numpy(float), 4


CYCLES = {"hour": _hour, "weekday": _weekday, "monthday": _monthday, "yearday": _yearday, "month": _month,
          "quarter": _quarter}
# the cycles each kind of frequency can tell apart; holidays need days
BY_KIND = {"sub-daily": ("hour", "weekday"), "daily": ("weekday", "monthday", "yearday"),
           "weekly": ("yearday",), "monthly": ("month",), "quarterly": ("quarter",), "yearly": ()}


def frequency_kind(freq: str | None) -> str:
    """'sub-daily', 'daily', 'weekly', 'monthly', 'quarterly' or 'yearly' for a pandas frequency;
    ValueError if it is not a calendar frequency (integer steps, none detected)."""
    try:
        offset = pd.tseries.frequencies.to_offset(freq) if freq else None
    except ValueError:
        offset = None
    if offset is None:
        raise ValueError(f"calendar features need dates at a regular frequency, and the time column has "
                         f"{'none' if not freq else repr(freq)}")
    name = type(offset).__name__
    for kind, marks in (("quarterly", ("Quarter",)), ("yearly", ("Year",)), ("monthly", ("Month",)),
                        ("weekly", ("Week",)), ("daily", ("BusinessDay",))):
        if any(m in name for m in marks):
            return kind
    step = pd.Timedelta(offset.nanos)  # a fixed step: 1h, 15min, 1D, 7D
    return "sub-daily" if step < DAY else "weekly" if step >= 7 * DAY else "daily"


def calendar_columns(freq: str | None, countries: Sequence[str] = ()) -> list[str]:
    """The columns ``calendar_frame`` makes for this frequency and these holiday countries."""
    kind = frequency_kind(freq)
    if countries and kind not in ("sub-daily", "daily"):
        raise ValueError(f"public holidays are flagged for daily or finer data; this data is {kind} ({freq})")
    names = [f"cal_{c}_{f}" for c in BY_KIND[kind] for f in ("sin", "cos")]
    if not names and not countries:
        raise ValueError(f"{kind} data ({freq}) has no calendar position to learn")
    return names + (["cal_holiday"] if countries else [])


def calendar_frame(times, freq: str | None, countries: Sequence[str] = ()) -> pd.DataFrame:
    """The calendar features of ``times`` (datetimes), one row each, columns ``calendar_columns``."""
    t = pd.DatetimeIndex(times)
    out = {}
    for column in calendar_columns(freq, countries):
        cycle, _, part = column.removeprefix("cal_").rpartition("_")
        if column == "cal_holiday":
            out[column] = holiday_flags(t, countries)
            continue
        position, period = CYCLES[cycle](t)
        out[column] = (np.sin if part == "sin" else np.cos)(2 * np.pi * position / period)
    return pd.DataFrame(out, index=range(len(t)))


def holiday_flags(t: pd.DatetimeIndex, countries: Sequence[str]) -> np.ndarray:
    """1.0 where the day is a public holiday in any of ``countries`` (ISO codes), else 0.0."""
    import holidays  # only for models that ask for holidays

    years = range(t.year.min(), t.year.max() + 1) if len(t) else range(0)
    days = set()
    for code in countries:
        days.update(holidays.country_holidays(code, years=years))
    return np.isin(t.normalize().date, list(days)).astype(float) if days else np.zeros(len(t))


def check_countries(countries: Sequence[str]) -> None:
    """ValueError naming a code the holidays library does not know."""
    import holidays

    known = holidays.list_supported_countries()
    unknown = [c for c in countries if c not in known]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a country code the holidays library knows (ISO 3166-1 alpha-2, "
                         f"e.g. US, GB, DE)")


def times_ahead(last, freq: str, steps: int) -> pd.DatetimeIndex:
    """The ``steps`` times after ``last`` at frequency ``freq``."""
    step = pd.tseries.frequencies.to_offset(freq)
    return pd.date_range(pd.Timestamp(last) + step, periods=steps, freq=step)

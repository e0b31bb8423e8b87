"""The synthetic series of the tutorials rnnflow grew from."""

from __future__ import annotations

import numpy as np
import pandas as pd


def sine(n: int = 1200, period: int = 40, noise: float = 0.1, seed: int = 0) -> pd.DataFrame:
    """A noisy sine wave for next-step prediction."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return pd.DataFrame({"t": t, "value": np.sin(2 * np.pi * t / period) + noise * rng.standard_normal(n)})


def sin_cos(n: int = 1200, period: int = 40, noise: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Sine as the input, cosine as the target: the model carries phase in its hidden state."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    phase = 2 * np.pi * t / period
    return pd.DataFrame({"t": t, "sin": np.sin(phase) + noise * rng.standard_normal(n), "cos": np.cos(phase)})


def arithmetic(n: int = 200, start: float = 10.0, step: float = 10.0) -> pd.DataFrame:
    """An arithmetic sequence: 10, 20, 30 -> 40."""
    return pd.DataFrame({"t": np.arange(n), "value": start + step * np.arange(n, dtype=float)})


def trend_season(n: int = 600, period: int = 24, slope: float = 0.05, amplitude: float = 2.0, noise: float = 0.3,
                 seed: int = 0) -> pd.DataFrame:
    """A linear trend plus a season plus noise: its test part lies above every training level,
    which a network trained on globally scaled levels cannot reach."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    value = 10 + slope * t + amplitude * np.sin(2 * np.pi * t / period) + noise * rng.standard_normal(n)
    return pd.DataFrame({"t": t, "value": value})


def panel(series: int = 40, length: int = 400, seed: int = 0, min_length: int | None = None) -> pd.DataFrame:
    """A long table (id, t, value) of ``series`` seasonal series of very different scales
    (1 to 10^4), daily (period 24) or half-daily (period 12) seasons with a random phase, a mild
    trend and noise, as many meters or shops would give. Lengths vary from ``min_length``
    (default: ``length``) to ``length``; each series ends at step length - 1."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(series):
        n = int(rng.integers(min_length, length + 1)) if min_length else length
        t = np.arange(length - n, length)
        scale = 10 ** rng.uniform(0, 4)
        period = (24, 12)[i % 2]
        shape = np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
        value = scale * (5 + 2 * shape + rng.uniform(-2, 2) * t / length + 0.4 * rng.standard_normal(n))
        frames.append(pd.DataFrame({"id": f"s{i}", "t": t, "value": value}))
    return pd.concat(frames, ignore_index=True)


def promotions(n: int = 730, promo_rate: float = 0.15, lift: float = 40.0, noise: float = 4.0,
               seed: int = 0) -> pd.DataFrame:
    """A shop's daily sales (date, sales, promo, price): a weekly season, a slow trend and
    promotion days, planned ahead and known for the days to come, that lift sales by ``lift``
    and cut the price. Without the promo column the lift is noise no history can foresee."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    promo = (rng.random(n) < promo_rate).astype(np.int64)
    price = np.round(9.99 - 2.0 * promo + 0.25 * rng.standard_normal(n).clip(-2, 2), 2)
    sales = 120 + 0.02 * t + 15 * np.sin(2 * np.pi * t / 7) + lift * promo + noise * rng.standard_normal(n)
    dates = pd.date_range("2024-01-01", periods=n, freq="D")
    return pd.DataFrame({"date": dates.strftime("%Y-%m-%d"), "sales": sales.round(1), "promo": promo, "price": price})


def holiday_sales(n: int = 730, dip: float = 60.0, noise: float = 3.0, countries: tuple[str, ...] = ("US",),
                  seed: int = 0) -> pd.DataFrame:
    """A shop's daily sales (date, sales): a weekly season, a yearly one and a slow trend, and the
    shop half closed on the public holidays of ``countries`` (sales fall by ``dip``): a drop that
    history alone cannot place, and the calendar features can (``--calendar --holidays US``)."""
    from rnn_models.calendar import holiday_flags

    rng = np.random.default_rng(seed)
    t, dates = np.arange(n), pd.date_range("2024-01-01", periods=n, freq="D")
    closed = holiday_flags(dates, countries)
    sales = (150 + 0.02 * t + 20 * np.sin(2 * np.pi * t / 7) + 10 * np.sin(2 * np.pi * t / 365.25)
             - dip * closed + noise * rng.standard_normal(n))
    return pd.DataFrame({"date": dates.strftime("%Y-%m-%d"), "sales": sales.round(1)})

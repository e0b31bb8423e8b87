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

"""Sliding windows over a series and the chronological train/validation/test split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    """Boundaries (row indices) of a chronological split: train [0, train_end),
    validation [train_end, val_end), test [val_end, n)."""

    n: int
    train_end: int
    val_end: int

    @classmethod
    def by_fraction(cls, n: int, val_fraction: float, test_fraction: float, horizon: int) -> Split:
        # each evaluation part holds at least one full horizon, or it could not score a forecast
        n_test = max(int(round(n * test_fraction)), horizon)
        n_val = max(int(round(n * val_fraction)), horizon)
        return cls(n, n - n_test - n_val, n - n_test)

    def part(self, name: str) -> tuple[int, int]:
        bounds = {"train": (0, self.train_end), "val": (self.train_end, self.val_end), "test": (self.val_end, self.n)}
        return bounds[name]


def window_origins(start: int, end: int, lookback: int, horizon: int, stride: int = 1) -> np.ndarray:
    """Forecast origins o (index of the first target) whose targets o..o+H-1 all lie in
    [start, end) and whose inputs o-L..o-1 exist. Inputs may reach back before ``start``
    (that is history, not leakage); targets never cross ``end``."""
    first = max(start, lookback)
    return np.arange(first, end - horizon + 1, stride, dtype=np.int64)


def make_windows(features: np.ndarray, target: np.ndarray, origins: np.ndarray, lookback: int, horizon: int,
                 dtype=np.float32):
    """Inputs X (N, L, F) from ``features`` (T, F) and targets Y (N, H) from ``target`` (T,)."""
    steps_in = origins[:, None] + np.arange(-lookback, 0)[None, :]  # (N, L)
    steps_out = origins[:, None] + np.arange(horizon)[None, :]  # (N, H)
    return features[steps_in].astype(dtype), target[steps_out].astype(dtype)

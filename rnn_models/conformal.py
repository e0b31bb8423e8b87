"""Split-conformal prediction intervals around any forecaster's point forecasts.

A forecaster's errors on windows it did not train on (the validation part's rolling origins)
calibrate, per horizon step, how far the actual value may lie from the forecast. Each error is
scaled by its input window's own scale (the mean absolute step-to-step change of its target
values), so an interval is wider where the series moves more and one table serves series of
any level (normalised split conformal: Lei et al., "Distribution-free predictive inference for
regression", JASA 2018). For level a and n held-out errors the radius is the ceil((n + 1) a)-th
smallest: where new errors are exchangeable with the held-out ones, the interval covers at least
a of them. With fewer than a / (1 - a) errors no radius can promise that; the largest error seen
is taken and ``Calibration.short`` names the level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd


def window_scale(windows: np.ndarray) -> np.ndarray:
    """(N, L, F) windows in original units -> (N,) their target's mean absolute step-to-step change,
    floored at 1e-6 of its mean level (a flat window still gets an interval)."""
    y = windows[..., 0].astype(np.float64)
    level = np.abs(y).mean(axis=1)
    moves = np.abs(np.diff(y, axis=1)).mean(axis=1) if y.shape[1] > 1 else np.zeros(len(y))
    return np.maximum(moves, 1e-6 * np.maximum(level, 1.0))


def rank(level: float, n: int) -> int:
    """The 1-based rank of the radius among n sorted held-out errors: ceil((n + 1) level)."""
    return math.ceil((n + 1) * level - 1e-9)


@dataclass
class Calibration:
    levels: tuple[float, ...]
    radius: np.ndarray  # (levels, H): in units of the window's scale
    calibrated_on: int  # held-out errors per horizon step

    @property
    def short(self) -> tuple[float, ...]:
        """Levels with too few held-out errors to promise their coverage."""
        return tuple(a for a in self.levels if rank(a, self.calibrated_on) > self.calibrated_on)

    def bounds(self, windows: np.ndarray, point: np.ndarray) -> dict[float, tuple[np.ndarray, np.ndarray]]:
        """Level -> (lower, upper), each like ``point`` (N, H), for the windows it forecast."""
        s = window_scale(windows)[:, None]
        return {a: (point - r * s, point + r * s) for a, r in zip(self.levels, self.radius, strict=True)}

    def to_dict(self) -> dict:
        return {"levels": list(self.levels), "radius": self.radius.tolist(), "calibrated_on": self.calibrated_on}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(tuple(d["levels"]), np.asarray(d["radius"], dtype=np.float64), int(d["calibrated_on"]))

    def markdown(self) -> str:
        """The table the run logs: each level's radius per horizon step."""
        h = self.radius.shape[1]
        lines = [f"Conformal intervals calibrated on {self.calibrated_on} held-out validation errors per horizon "
                 f"step; radius in units of each input window's mean absolute step-to-step change.", "",
                 "| level | " + " | ".join(f"step {i + 1}" for i in range(h)) + " |", "|---|" + "---:|" * h]
        lines += [f"| {a:g} | " + " | ".join(f"{r:.4g}" for r in row) + " |"
                  for a, row in zip(self.levels, self.radius, strict=True)]
        if self.short:
            lines += ["", short_note(self)]
        return "\n".join(lines)


def short_note(cal: Calibration) -> str:
    return (f"{cal.calibrated_on} held-out errors are too few to promise level(s) "
            f"{', '.join(f'{a:g}' for a in cal.short)} (they need at least "
            f"{min(needed(a) for a in cal.short)}): those take the largest error seen")


def needed(level: float) -> int:
    """The fewest held-out errors that can promise ``level``: the least n with rank(level, n) <= n."""
    return math.ceil(level / (1 - level) - 1e-9)


def calibrate(windows: np.ndarray, actual: np.ndarray, point: np.ndarray, levels: tuple[float, ...]) -> Calibration:
    """The radius of each level per horizon step from held-out ``actual`` (N, H) and ``point`` (N, H)
    forecasts of ``windows`` (N, L, F)."""
    scores = np.sort(np.abs(actual - point) / window_scale(windows)[:, None], axis=0)  # (N, H)
    n = len(scores)
    if n == 0:
        raise ValueError("no held-out forecast origin to calibrate the intervals on")
    radius = np.stack([scores[min(rank(a, n), n) - 1] for a in levels])
    return Calibration(tuple(levels), radius, n)


def interval_scores(actual: np.ndarray, lower: np.ndarray, upper: np.ndarray, level: float,
                    scale: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Coverage of ``actual`` (N, H) by [lower, upper], and the mean scaled interval score (M4's
    MSIS: width plus 2 / (1 - level) times each miss, over the origin's series' in-sample
    seasonal-naive error ``scale`` (N,)), averaged within each series (``groups`` (N,)), then over
    series."""
    alpha = 1.0 - level
    miss = np.maximum(lower - actual, 0) + np.maximum(actual - upper, 0)
    per_origin = pd.Series(((upper - lower) + 2.0 / alpha * miss).mean(axis=1) / scale)
    msis = per_origin.replace([np.inf, -np.inf], np.nan).groupby(groups).mean().mean()  # NaN scale: left out
    return {"coverage": float(np.mean((actual >= lower) & (actual <= upper))), "msis": float(msis)}


def coverage_lines(scores: dict[float, dict[str, float]], calibrated_on: int) -> list[str]:
    """A backtest report's lines for the conformal intervals' test scores (level -> coverage, msis)."""
    return [f"conformal {a:g} interval (calibrated on {calibrated_on} validation errors a step): covers "
            f"{100 * s['coverage']:.1f} % of test values, MSIS {s['msis']:.4g}" for a, s in scores.items()]

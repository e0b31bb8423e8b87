"""Forecast accuracy metrics and the naive baselines they are compared with.

Arrays are (N, H): N forecast origins, H steps ahead each.
"""

from __future__ import annotations

import numpy as np


def mae(y: np.ndarray, f: np.ndarray) -> float:
    return float(np.mean(np.abs(y - f)))


def rmse(y: np.ndarray, f: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y - f) ** 2)))


def smape(y: np.ndarray, f: np.ndarray) -> float:
    """Symmetric MAPE in percent (0..200); a term where both are zero counts as 0."""
    denom = np.abs(y) + np.abs(f)
    terms = np.divide(2.0 * np.abs(y - f), denom, out=np.zeros_like(denom, dtype=float), where=denom > 0)
    return float(100.0 * np.mean(terms))


def seasonal_naive_scale(insample: np.ndarray, season_length: int) -> float:
    """Mean absolute error of the in-sample seasonal-naive forecast: MASE's denominator."""
    m = season_length if len(insample) > season_length else 1
    scale = float(np.mean(np.abs(insample[m:] - insample[:-m])))
    return scale if scale > 0 else float("nan")


def mase(y: np.ndarray, f: np.ndarray, scale: float) -> float:
    return mae(y, f) / scale


def naive_forecast(series: np.ndarray, origins: np.ndarray, horizon: int) -> np.ndarray:
    """Last observed value repeated H times, for each origin: (N, H)."""
    return np.repeat(series[origins - 1][:, None], horizon, axis=1)


def seasonal_naive_forecast(series: np.ndarray, origins: np.ndarray, horizon: int, season_length: int) -> np.ndarray:
    """Value one season before each target step, using only data before the origin: (N, H)."""
    m = max(season_length, 1)
    h = np.arange(horizon)
    back = m * (h // m + 1)  # how far each step looks back to land before the origin
    return series[origins[:, None] + h[None, :] - back[None, :]]


def score(y: np.ndarray, f: np.ndarray, scale: float) -> dict[str, float]:
    return {"mae": mae(y, f), "rmse": rmse(y, f), "smape": smape(y, f), "mase": mase(y, f, scale)}


def pinball(y: np.ndarray, fq: np.ndarray, quantiles) -> float:
    """Mean pinball (quantile) loss of quantile forecasts ``fq`` (N, H, Q) for ``y`` (N, H)."""
    q = np.asarray(quantiles, dtype=np.float64)
    err = y[..., None] - fq
    return float(np.mean(np.maximum(q * err, (q - 1) * err)))


def coverage(y: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
    """Share of actual values inside [lower, upper]."""
    return float(np.mean((y >= lower) & (y <= upper)))


def interval_scores(y: np.ndarray, fq: np.ndarray, quantiles, scale: float) -> dict[str, float]:
    """Coverage of the outermost quantiles' interval (beside its nominal level) and the mean
    scaled pinball loss (pinball over the same in-sample scale as MASE)."""
    return {"coverage": coverage(y, fq[..., 0], fq[..., -1]), "nominal": float(quantiles[-1] - quantiles[0]),
            "spl": pinball(y, fq, quantiles) / scale}

"""Windowing and scaling: the chronological split, the scaler fitted on the training part
only, and the (X, Y) arrays the network trains on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from prefect import task
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from rnn_models.forecasting import Affine
from rnn_models.windows import Split, make_windows, window_origins
from tasks.config import TimeSeriesConfig
from tasks.data import DataError, Series


@dataclass
class Windows:
    """Scaled training/validation arrays, plus what the backtest needs in original units."""

    split: Split
    scaler: Affine
    x_train: np.ndarray  # (N, L, F) scaled
    y_train: np.ndarray  # (N, H) scaled
    x_val: np.ndarray
    y_val: np.ndarray
    test_origins: np.ndarray  # (N_test,) indices of the first forecast step


def _by_series_content(ctx, params: dict) -> str:
    # a Series is keyed by its data's sha256 (it is what the config made of that data);
    # hashing the DataFrame itself proved unstable from one flow run to the next
    return hash_objects(params["series"].sha256, params["cfg"], params.get("split"), raise_on_failure=True)


SERIES_CONTENT = CachePolicy.from_cache_key_fn(_by_series_content) + TASK_SOURCE


@task(name="split-series", cache_policy=SERIES_CONTENT, persist_result=True)
def split_series(series: Series, cfg: TimeSeriesConfig) -> Split:
    """Chronological train/validation/test boundaries, refusing a series too short for them."""
    n, L, H = len(series.frame), cfg.lookback, cfg.horizon
    split = Split.by_fraction(n, cfg.val_size, cfg.test_size, H)
    train_windows = len(window_origins(0, split.train_end, L, H, cfg.stride))
    if train_windows < 1:
        need = L + H + (split.val_end - split.train_end) + (n - split.val_end)
        raise DataError(
            f"{series.source}: the series has {n} rows, too short for --lookback {L} + --horizon {H} "
            f"+ validation {split.val_end - split.train_end} + test {n - split.val_end} rows (needs more than {need})"
        )
    return split


def fit_scaler(train: np.ndarray, kind: str) -> Affine:
    """Fit a scikit-learn scaler on the training rows (T, F) and keep its numbers."""
    if kind == "none":
        return Affine.identity(train.shape[1])
    if kind == "standard":
        s = StandardScaler().fit(train)
        return Affine(s.mean_.copy(), s.scale_.copy())
    if kind == "minmax":
        s = MinMaxScaler().fit(train)  # x' = x * scale_ + min_  ==  (x - (-min_/scale_)) / (1/scale_)
        return Affine(-s.min_ / s.scale_, 1.0 / s.scale_)
    raise ValueError(f"unknown scaler {kind!r}")


@task(name="scale-and-window", cache_policy=SERIES_CONTENT, persist_result=True)
def scale_and_window(series: Series, split: Split, cfg: TimeSeriesConfig) -> Windows:
    features = series.features  # (T, F), target first
    scaler = fit_scaler(features[: split.train_end], cfg.scaler)
    scaled = scaler.transform(features)
    L, H = cfg.lookback, cfg.horizon
    train_o = window_origins(*split.part("train"), L, H, cfg.stride)
    val_o = window_origins(*split.part("val"), L, H, 1)
    x_train, y_train = make_windows(scaled, scaled[:, 0], train_o, L, H)
    x_val, y_val = make_windows(scaled, scaled[:, 0], val_o, L, H)
    test_o = window_origins(*split.part("test"), L, H, 1)
    return Windows(split, scaler, x_train, y_train, x_val, y_val, test_o)

"""Splitting and windowing, for one series or many: the chronological split, the transform
chain (fitted on the training part only), and the windows the network trains on."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from rnn_models.metrics import smape
from rnn_models.panel import OwaWeights, Panel, PanelWindows, encoded_batches
from rnn_models.training import tensor_batches
from rnn_models.transforms import Baseline, Chain, Difference, Log, Scale, Transform, WindowNorm
from rnn_models.windows import Split, make_windows, window_origins
from tasks.config import ConfigError, TimeSeriesConfig
from tasks.data import DataError, Series
from tasks.panel import PanelData, PanelSplit, split_panel

Data = Series | PanelData  # what the forecasting pipeline trains on: one series, or many (--id-column)
Origins = np.ndarray | list[np.ndarray]  # forecast origins (rows of the first forecast step): of each series


@dataclass
class Windows:
    """Where the network trains, validates and is tested. For one series, its training and
    validation windows in network space, built here; many series' windows are gathered batch by
    batch from the data where it lives (``rnn_models.panel``), never all at once."""

    split: Split | PanelSplit
    chain: Chain  # fitted on the training part; the registered model carries it
    val_origins: Origins
    test_origins: Origins
    x_train: np.ndarray | None = None  # (N, L', F) network space
    y_train: np.ndarray | None = None  # (N, H) network space
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    f_train: np.ndarray | None = None  # (N, H, C) the covariates known ahead, scaled (``future_scale``)
    f_val: np.ndarray | None = None
    future_scale: Chain | None = None  # fitted on the training rows of --future-covariate-columns
    w_train: np.ndarray | None = None  # (N, H) each step's loss weight, with --loss owa (``owa_weights``)
    w_val: np.ndarray | None = None


def build_chain(cfg: TimeSeriesConfig, season_length: int) -> Chain:
    """The (unfitted) transforms the config asks for, in their fixed order. A global model over
    many series (``--id-column``) has no global scaler: its windows are normalised one by one."""
    m = max(season_length, 1)
    steps: list[Transform] = []
    if cfg.transform == "log":
        steps.append(Log())
    if cfg.difference != "none":
        steps.append(Difference(1 if cfg.difference == "first" else m))
    if not cfg.panel:
        steps.append(Scale(method=cfg.scaler))
    if cfg.window_norm != "none":  # the level of a log target: its mean log (a difference of logs is a share)
        steps.append(WindowNorm("log-level" if cfg.window_norm == "level" and cfg.transform == "log"
                                else cfg.window_norm))
    if cfg.baseline != "none":
        steps.append(Baseline(1 if cfg.baseline == "naive" else m))
    return Chain(steps)


def settle(data: Data, cfg: TimeSeriesConfig) -> TimeSeriesConfig:
    """``cfg`` settled for ``data``: a global model's by the series in its file; one series' by its season."""
    if cfg.panel:
        return cfg.settled(data.season_length, data.series_read, data.lengths)
    return cfg.settled(data.season_length, 1, [len(data.frame)])


def check_transforms(data: Data, cfg: TimeSeriesConfig) -> None:
    """Refuse, before training, what the transforms cannot do with this series (or these series)."""
    if cfg.transform == "log":
        named = (zip(data.ids, data.values, strict=True) if isinstance(data, PanelData)
                 else [("", data.features[:, 0])])
        for sid, y in named:
            bad = np.flatnonzero(y <= 0)
            if len(bad):
                value, column = f"{y[bad[0]]:g}", repr(data.value_column)
                which = (f"series {sid!r} (column {data.id_column!r}) holds {value} in column {column}" if sid
                         else f"column {column} holds {value}")
                raise DataError(f"{data.source}: --transform log needs a positive series, but {which} at row "
                                f"{bad[0]} ({len(bad)} such rows)")
    check_lookback(cfg, data.season_length)


def check_lookback(cfg: TimeSeriesConfig, season_length: int) -> None:
    """Refuse a lookback too short for the differencing or baseline the config asks for."""
    chain, m = build_chain(cfg, season_length), season_length
    left = cfg.lookback - chain.consumes  # input steps the network still sees
    lag = next((t.lag for t in chain.steps if type(t) is Baseline), 1)  # a Difference is a Baseline too
    if left < max(lag, 2):
        asked = " and ".join(f"--{k} {v}" for k, v in (("difference", cfg.difference), ("baseline", cfg.baseline))
                             if v != "none")
        raise ConfigError(f"--lookback {cfg.lookback} is too short for {asked} with season {m}: "
                          f"a lookback of at least {chain.consumes + max(lag, 2)} is needed")


def split_series(data: Data, cfg: TimeSeriesConfig) -> Split | PanelSplit:
    """Chronological train/validation/test boundaries, refusing a series too short for them
    or one the transforms cannot take. Many series are each split at the same relative point
    (those too short were left out when they were read)."""
    check_transforms(data, cfg)
    if isinstance(data, PanelData):
        return split_panel(data, cfg)
    series = data
    n, L, H = len(series.frame), cfg.lookback, cfg.horizon
    split = Split.by_fraction(n, cfg.val_size, cfg.test_size, H)
    if cfg.train_windows(n) < 1:
        need = L + H + (split.val_end - split.train_end) + (n - split.val_end)
        raise DataError(
            f"{series.source}: the series has {n} rows, too short for --lookback {L} + --horizon {H} "
            f"+ validation {split.val_end - split.train_end} + test {n - split.val_end} rows (needs more than {need})"
        )
    return split


def scale_and_window(data: Data, split: Split | PanelSplit, cfg: TimeSeriesConfig) -> Windows:
    """Raw windows of the training and validation parts, through the transform chain fitted
    on the training rows only (many series: no fitted transform, each window normalised by itself)."""
    if isinstance(data, PanelData):  # the covariates known ahead scaled on every series' training rows
        rows = np.concatenate([c[:end] for c, end in zip(data.covariates, split.train_end, strict=True)])
        return Windows(split, build_chain(cfg, data.season_length), origins(split, "val", cfg),
                       origins(split, "test", cfg), future_scale=Chain([Scale()]).fit(rows) if rows.shape[1] else None)
    L, H, C = cfg.lookback, cfg.horizon, len(data.future_columns)
    features = data.features  # (T, F), target first, the covariates known ahead last
    chain = build_chain(cfg, data.season_length).fit(features[: split.train_end])
    ahead = Chain([Scale()]).fit(features[: split.train_end, -C:]) if C else None
    weigh, arrays = owa_weights(data, split, cfg), []
    for part in (window_origins(*split.part("train"), L, H, cfg.stride), origins(split, "val", cfg)):
        x, y = make_windows(features, features[:, 0], part, L, H, dtype=np.float64)
        w = weigh(chain, torch.from_numpy(x), torch.from_numpy(y))[2].numpy().astype(np.float32) if weigh else None
        x, y, _ = chain.encode(x, y)
        f = ahead.encode(features[part[:, None] + np.arange(H), -C:])[0].astype(np.float32) if C else None
        arrays += [x.astype(np.float32), y.astype(np.float32), f, part, w]
    x_tr, y_tr, f_tr, _, w_tr, x_va, y_va, f_va, val_o, w_va = arrays
    return Windows(split, chain, val_o, origins(split, "test", cfg), x_tr, y_tr, x_va, y_va, f_tr, f_va, ahead,
                   w_tr, w_va)


def owa_weights(data: Data, split: Split | PanelSplit, cfg: TimeSeriesConfig) -> OwaWeights | None:
    """--loss owa's weights (``rnn_models.panel.OwaWeights``), their sMAPE reference the seasonal naive's
    in-sample sMAPE over the training part (of each series, averaged); None for another loss."""
    if cfg.loss != "owa":
        return None
    m = max(data.season_length, 1)
    train = ([v[:end] for v, end in zip(data.values, split.train_end, strict=True)] if isinstance(data, PanelData)
             else [data.features[: split.train_end, 0]])
    refs = [smape(v[m:], v[:-m]) / 100 for v in train if len(v) > m]
    return OwaWeights(m, max(float(np.mean(refs)) if refs else 1.0, 1e-3))


def origins(split: Split | PanelSplit, part: str, cfg: TimeSeriesConfig) -> Origins:
    """The forecast origins of a part of the split, every step (of each series, for many)."""
    if isinstance(split, PanelSplit):
        return split.origins(part, cfg.lookback, cfg.horizon)
    return window_origins(*split.part(part), cfg.lookback, cfg.horizon)


@dataclass
class Batches:
    """A forecaster's training data as the loop reads it: shuffled training batches (by a
    generator), validation batches, and how many windows each part holds."""

    train: Callable[[torch.Generator], Iterable]
    val: Callable[[], Iterable]
    input_size: int
    sizes: tuple[int, int]  # (training windows, validation windows)
    length: int  # time steps of a window as the network reads it (a difference shortens it)
    future_size: int = 0  # covariates known ahead each window holds for every horizon step


def batches(data: Data, windows: Windows, cfg: TimeSeriesConfig, device: str) -> Batches:
    """The windows as the training loop reads them, living on the device: one series' arrays,
    sliced by index; many series end to end, each batch of windows gathered there by index and
    normalised window by window (``rnn_models.panel``), never materialised all at once. An epoch is the
    first ``--batches-per-epoch`` batches of a pass in a fresh random order, if that is fewer."""
    per_epoch = cfg.batches_per_epoch or None
    if isinstance(data, Series):  # (x[, covariates known ahead], y[, loss weights]) of each window
        train, val = ([torch.from_numpy(a).to(device) for a in arrays if a is not None]
                      for arrays in ((windows.x_train, windows.f_train, windows.y_train, windows.w_train),
                                     (windows.x_val, windows.f_val, windows.y_val, windows.w_val)))
        return Batches(lambda gen: islice(tensor_batches(*train, batch_size=cfg.batch_size, generator=gen), per_epoch),
                       lambda: tensor_batches(*val, batch_size=4096), train[0].shape[2], (len(train[0]), len(val[0])),
                       train[0].shape[1], 0 if windows.f_train is None else windows.f_train.shape[2])
    panel, split, chain, L, H = Panel.from_series(data.features(), data.ids, device=device), windows.split, \
        windows.chain, cfg.lookback, cfg.horizon
    train = PanelWindows(panel, L, H, *split.part("train"), stride=cfg.stride)
    val = PanelWindows(panel, L, H, *split.part("val"))
    ahead = windows.future_scale and windows.future_scale.steps[0]  # covariates known ahead, scaled
    weigh = owa_weights(data, split, cfg)
    first = next(encoded_batches(train, chain, 1, ahead=ahead), None)  # a window as the network reads it
    return Batches(lambda gen: islice(encoded_batches(train, chain, cfg.batch_size, gen, ahead, weigh), per_epoch),
                   lambda: encoded_batches(val, chain, 4096, ahead=ahead, weigh=weigh), panel.values.shape[1],
                   (len(train), len(val)), L if first is None else first[0].shape[1], len(data.future_columns))

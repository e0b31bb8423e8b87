"""Many series in one tensor, and their windows gathered lazily by index arithmetic: the data
of a global model, one network trained on windows from every series.

A :class:`Panel` holds every series end to end in one flat tensor with each series' offset
and length. :class:`PanelWindows` numbers every (series, origin) window whose targets lie in
a chosen part of each series and gathers a batch of them where the panel lives: memory grows
with the data, not with data x lookback, and on a GPU no batch crosses from the host.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rnn_models.transforms import EPS, Baseline, Chain, Difference, Log, Scale, WindowNorm


@dataclass
class Panel:
    values: torch.Tensor  # (N, F) every series end to end: the target, then any covariates
    offsets: torch.Tensor  # (S,) int64: where each series starts in ``values``
    lengths: torch.Tensor  # (S,) int64
    ids: list[str]

    @classmethod
    def from_series(cls, series: Sequence[np.ndarray], ids: Sequence[str] | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Panel:
        """``series``: one (T_i,) array of values, or (T_i, F) of features (the target first), per series."""
        lengths = np.array([len(s) for s in series], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        values = (np.concatenate([np.asarray(s, dtype=np.float64).reshape(len(s), -1) for s in series])
                  if len(series) else np.zeros((0, 1)))
        ids = list(ids) if ids is not None else [str(i) for i in range(len(series))]
        if len(ids) != len(series):
            raise ValueError(f"{len(ids)} ids for {len(series)} series")
        return cls(torch.from_numpy(values).to(device, dtype), torch.from_numpy(offsets).to(device),
                   torch.from_numpy(lengths).to(device), ids)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def device(self) -> torch.device:
        return self.values.device


class PanelWindows:
    """Every window of ``lookback`` inputs and ``horizon`` targets, of every series, whose
    targets lie in rows [start[i], end[i]) of series i (inputs may reach back before start:
    that is history, not leakage), every ``stride``-th origin. Window k is found by a binary
    search over the per-series counts, never stored."""

    def __init__(self, panel: Panel, lookback: int, horizon: int, start: np.ndarray, end: np.ndarray,
                 stride: int = 1):
        self.panel, self.lookback, self.horizon, self.stride = panel, lookback, horizon, stride
        start, end = np.asarray(start, dtype=np.int64), np.asarray(end, dtype=np.int64)
        first = np.maximum(start, lookback)  # the first origin with a full input window
        counts = np.maximum((end - horizon - first) // stride + 1, 0)  # (S,) windows per series
        dev = panel.device
        self.counts = torch.from_numpy(counts).to(dev)
        self.ends = torch.from_numpy(np.cumsum(counts)).to(dev)  # (S,) one past each series' last window id
        self.first = torch.from_numpy(first).to(dev)
        self.total = int(counts.sum())
        self.steps = torch.arange(-lookback, horizon, device=dev)  # (L+H,) offsets around an origin

    def __len__(self) -> int:
        return self.total

    def locate(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Window ids (B,) -> (series (B,), origin row within that series (B,))."""
        series = torch.searchsorted(self.ends, index, right=True)  # (B,)
        within = index - (self.ends[series] - self.counts[series])  # k-th window of its series
        return series, self.first[series] + within * self.stride

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Window ids (B,) on the panel's device -> inputs (B, L, F), targets (B, H) and the covariates
        of the horizon's steps (B, H, F - 1)."""
        series, origin = self.locate(index)
        rows = (self.panel.offsets[series] + origin)[:, None] + self.steps[None, :]  # (B, L+H)
        w = self.panel.values[rows]  # (B, L+H, F)
        return w[:, : self.lookback], w[:, self.lookback :, 0], w[:, self.lookback :, 1:]

    def batches(self, batch_size: int, generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(inputs, targets, covariates ahead) batches, shuffled when a generator is given (drawn on the CPU, so
        the order is the same on any device, and moved once per pass, not per batch)."""
        dev = self.panel.device
        order = (torch.randperm(self.total, generator=generator).to(dev) if generator is not None
                 else torch.arange(self.total, device=dev))
        for i in range(0, self.total, batch_size):
            yield self.gather(order[i : i + batch_size])


def window_norm(x: torch.Tensor, y: torch.Tensor | None = None, center: str = "last"):
    """The torch twin of :class:`rnn_models.transforms.WindowNorm`: windows x (B, L, F) each feature
    centred on its last value (or mean) and divided by its own spread (the target by its level with
    ``level``), targets y (B, H) as feature 0. Returns (x', y' or None, (c, s)), c and s (B, 1) of
    the target, so that y = y' * s + c."""
    c = x[:, -1:] if center == "last" else x.mean(dim=1, keepdim=True)  # (B, 1, F)
    s = torch.sqrt(x.var(dim=1, correction=0, keepdim=True) + EPS)  # (B, 1, F)
    if center in ("level", "log-level"):
        level = x[..., :1].abs().mean(dim=1, keepdim=True) + EPS if center == "level" else torch.ones_like(s[..., :1])
        s = torch.cat([level, s[..., 1:]], dim=-1)
    c0, s0 = c[..., 0], s[..., 0]  # (B, 1)
    return (x - c) / s, (None if y is None else (y - c0) / s0), (c0, s0)


def encode(chain: Chain, x: torch.Tensor, y: torch.Tensor, slope: bool = False):
    """The torch twin of ``chain.encode``, where the windows live (a GPU batch never crosses to the
    host): raw x (B, L, F) (the target first), y (B, H) -> network input (B, L', F) and targets (B, H).
    The served model encodes with the numpy chain; a test holds the two equal. With ``slope``, also
    what one network unit of each target step is worth in original units (B, H): the slope of the
    chain's decoding there, a product of the steps' own (a log's: the value; a division's: its divisor)."""
    unit = torch.ones_like(y)
    for t in chain.steps:
        if isinstance(t, Log):
            x, y, unit = torch.cat([x[..., :1].log(), x[..., 1:]], dim=-1), y.log(), unit * y
        elif isinstance(t, Baseline):  # and Difference, a Baseline that also differences its inputs
            L, h = x.shape[1], torch.arange(y.shape[1], device=x.device)
            y = y - x[:, L + h - t.lag * (h // t.lag + 1), 0]
            if isinstance(t, Difference):
                x = torch.cat([x[:, t.lag :, :1] - x[:, : -t.lag, :1], x[:, t.lag :, 1:]], dim=-1)
        elif isinstance(t, WindowNorm):
            x, y, (_, s) = window_norm(x, y, t.center)
            unit = unit * s
        elif isinstance(t, Scale):
            offset, scale = (torch.as_tensor(a, dtype=x.dtype, device=x.device) for a in (t.offset, t.scale))
            x, y, unit = (x - offset) / scale, (y - offset[0]) / scale[0], unit * scale[0]
        else:
            raise ValueError(f"no torch twin for the {t.kind} transform")
    return (x, y, unit) if slope else (x, y)


@dataclass
class OwaWeights:
    """Per-step weights (B, H) that make the absolute error in network units count as M4's OWA counts
    it: half as a share of the actual value (sMAPE's |y - f| / |y|) over ``smape_ref``, seasonal
    naive's in-sample sMAPE as a fraction, half over the window's own seasonal-naive error (MASE's
    scale, from its lookback), seasonal naive's in-sample MASE being 1 by definition."""

    season: int
    smape_ref: float

    def __call__(self, chain: Chain, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Raw windows x (B, L, F), y (B, H) -> (network input, targets, weights)."""
        target, m = x[..., 0], self.season if x.shape[1] > self.season else 1
        scale = (target[:, m:] - target[:, :-m]).abs().mean(dim=1, keepdim=True) + EPS  # (B, 1)
        x_net, y_net, unit = encode(chain, x, y, slope=True)
        return x_net, y_net, 0.5 * unit.abs() * (1 / (self.smape_ref * (y.abs() + EPS)) + 1 / scale)


def encoded_batches(windows: PanelWindows, chain: Chain, batch_size: int, generator: torch.Generator | None = None,
                    ahead: Scale | None = None, weigh: OwaWeights | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """``windows.batches`` through ``encode``: what the training loop's objectives read, (x, y), or
    (x, covariates ahead scaled by ``ahead``, y) for a model that reads the covariates of its horizon;
    with ``weigh``, each step's loss weight after y."""
    if ahead is not None:
        offset, scale = (torch.as_tensor(a, dtype=windows.panel.values.dtype, device=windows.panel.device)
                         for a in (ahead.offset, ahead.scale))
    for x, y, future in windows.batches(batch_size, generator):
        x, y, *w = weigh(chain, x, y) if weigh else encode(chain, x, y)
        yield (x, y, *w) if ahead is None else (x, (future - offset) / scale, y, *w)


def last_windows(values: np.ndarray, codes: np.ndarray, lookback: int) -> np.ndarray:
    """The last ``lookback`` values of each series of a long table, in one gather: ``values``
    (N,) in time order within each series, ``codes`` (N,) the series number 0..S-1 of each row.
    Returns (S, lookback); each series must hold at least ``lookback`` rows."""
    order = np.argsort(codes, kind="stable")  # rows grouped by series, time order kept
    ends = np.cumsum(np.bincount(codes))  # one past each series' last row in ``order``
    return values[order[ends[:, None] - lookback + np.arange(lookback)[None, :]]]

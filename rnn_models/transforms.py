"""Invertible, window-local transforms between a forecaster's raw windows and its network.

A forecaster reads raw windows ``x`` (N, L, F) in original units (feature 0 is the target)
and must answer ``y`` (N, H) in original units. A :class:`Chain` of transforms maps both
into the space the network learns in and maps the network's output back:

    log          target -> log(target)                        (positive series)
    difference   target inputs -> x[t] - x[t-lag]; each target step -> its change from the last
                 known value of the same phase (lag 1: the last value; lag m: one season back)
    scale        global affine scaling fitted on the training rows (scikit-learn's numbers)
    window-norm  RevIN-style: each window centred on its own last value (or mean) and divided
                 by its own spread; the forecast is de-normalised with the same two numbers
    baseline     the network learns the residual over the naive (lag 1) or seasonal-naive
                 (lag m) forecast of the transformed target

Every step is computed from the window alone (plus numbers fitted once on the training part),
so the served model applies exactly what was trained, and every inverse adds or multiplies
known per-window numbers: exact (to float rounding), and monotone, so quantile forecasts stay
ordered. ``inverse`` accepts ``y`` of shape (N, H) or (N, H, Q).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-5  # variance floor of window-norm, in the (globally scaled) units it sees


def lagged_reference(target: np.ndarray, lag: int, horizon: int) -> np.ndarray:
    """For windows ``target`` (N, L): the last known value one ``lag`` cycle before each of the
    ``horizon`` steps after the window, (N, H). lag 1 is the naive forecast, lag m seasonal naive."""
    L, h = target.shape[1], np.arange(horizon)
    if lag > L:
        raise ValueError(f"a lag of {lag} needs at least {lag} input steps, the window has {L}")
    return target[:, L + h - lag * (h // lag + 1)]


def _expand(ref: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, H) per-window numbers broadcast against y (N, H) or (N, H, Q)."""
    return ref.reshape(ref.shape + (1,) * (y.ndim - ref.ndim))


class Transform:
    kind = ""
    consumes = 0  # input steps the transform uses up (differencing drops the first ``lag``)

    def fit(self, rows: np.ndarray) -> None:
        """Fit on the training rows (T, F) as this transform sees them; most need nothing."""

    def forward(self, x: np.ndarray, y: np.ndarray | None):
        """(x, y or None) -> (x', y' or None, context for ``inverse``)."""
        raise NotImplementedError

    def inverse(self, y: np.ndarray, ctx) -> np.ndarray:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"kind": self.kind}


class Log(Transform):
    kind = "log"

    def forward(self, x, y):
        if np.any(x[..., 0] <= 0) or (y is not None and np.any(y <= 0)):
            raise ValueError("the log transform needs a positive target; the input holds a value <= 0")
        x = x.copy()
        x[..., 0] = np.log(x[..., 0])
        return x, (None if y is None else np.log(y)), None

    def inverse(self, y, ctx):
        return np.exp(y)


@dataclass
class Baseline(Transform):
    """The network learns y minus the naive (lag 1) or seasonal-naive (lag m) forecast."""

    lag: int = 1
    kind = "baseline"

    def forward(self, x, y):
        ref = lagged_reference(x[..., 0], self.lag, 1 if y is None else y.shape[1])
        return x, (None if y is None else y - ref), x[..., 0]

    def inverse(self, y, ctx):
        return y + _expand(lagged_reference(ctx, self.lag, y.shape[1]), y)

    def to_dict(self):
        return {"kind": self.kind, "lag": self.lag}


@dataclass
class Difference(Baseline):
    """Baseline's targets (each step's change from the value ``lag`` back), with the target
    inputs differenced too, which uses up the first ``lag`` input steps."""

    kind = "difference"

    @property
    def consumes(self) -> int:
        return self.lag

    def forward(self, x, y):
        _, y, ctx = super().forward(x, y)
        out = x[:, self.lag :].copy()
        out[..., 0] = x[:, self.lag :, 0] - x[:, : -self.lag, 0]
        return out, y, ctx


@dataclass
class Scale(Transform):
    """x' = (x - offset) / scale per feature; the target's numbers scale the forecast."""

    offset: np.ndarray | None = None  # (F,)
    scale: np.ndarray | None = None  # (F,)
    method: str = "standard"  # standard | minmax | none
    kind = "scale"

    def fit(self, rows):
        from sklearn.preprocessing import MinMaxScaler, StandardScaler  # only needed to fit, not to serve

        if self.method == "none":
            self.offset, self.scale = np.zeros(rows.shape[1]), np.ones(rows.shape[1])
        elif self.method == "standard":
            s = StandardScaler().fit(rows)
            self.offset, self.scale = s.mean_.copy(), s.scale_.copy()
        elif self.method == "minmax":
            s = MinMaxScaler().fit(rows)  # x' = x * scale_ + min_  ==  (x - (-min_/scale_)) / (1/scale_)
            self.offset, self.scale = -s.min_ / s.scale_, 1.0 / s.scale_
        else:
            raise ValueError(f"unknown scaler {self.method!r}")

    def forward(self, x, y):
        out = (x - self.offset) / self.scale
        return out, (None if y is None else (y - self.offset[0]) / self.scale[0]), None

    def inverse(self, y, ctx):
        return y * self.scale[0] + self.offset[0]

    def to_dict(self):
        return {"kind": self.kind, "method": self.method, "offset": self.offset.tolist(),
                "scale": self.scale.tolist()}


@dataclass
class WindowNorm(Transform):
    """Each window centred on its last value or mean and divided by its spread; ``level``: centred on
    its mean, the target divided by its mean absolute value, so that an error counts as a share of
    the series' level (as sMAPE and MAPE count it), not of its swings; ``log-level``, the same for a
    log target: centred on its mean log and not divided, a difference of logs being a share already."""

    center: str = "last"  # last | mean | level | log-level
    kind = "window-norm"

    def forward(self, x, y):
        c = x[:, -1:, :] if self.center == "last" else x.mean(axis=1, keepdims=True)  # (N, 1, F)
        s = np.sqrt(x.var(axis=1, keepdims=True) + EPS)  # (N, 1, F)
        if self.center == "level":
            s[..., :1] = np.abs(x[..., :1]).mean(axis=1, keepdims=True) + EPS
        elif self.center == "log-level":
            s[..., :1] = 1.0
        out = (x - c) / s
        ctx = (c[:, :, 0], s[:, :, 0])  # (N, 1) each
        return out, (None if y is None else (y - ctx[0]) / ctx[1]), ctx

    def inverse(self, y, ctx):
        c, s = ctx
        return y * _expand(s, y) + _expand(c, y)

    def to_dict(self):
        return {"kind": self.kind, "center": self.center}


def _from_dict(d: dict) -> Transform:
    d = dict(d)
    kind = d.pop("kind")
    if kind == "log":
        return Log()
    if kind == "difference":
        return Difference(int(d["lag"]))
    if kind == "scale":
        return Scale(np.asarray(d["offset"], dtype=np.float64), np.asarray(d["scale"], dtype=np.float64),
                     d.get("method", "standard"))
    if kind == "window-norm":
        return WindowNorm(d["center"])
    if kind == "baseline":
        return Baseline(int(d["lag"]))
    raise ValueError(f"unknown transform {kind!r}")


class Chain:
    """Transforms applied in order on the way in, undone in reverse order on the way out."""

    def __init__(self, steps: list[Transform]):
        self.steps = steps

    @property
    def consumes(self) -> int:
        return sum(t.consumes for t in self.steps)

    def fit(self, rows: np.ndarray) -> Chain:
        """Fit each step on the training rows (T, F) as transformed by the steps before it."""
        x = np.asarray(rows, dtype=np.float64)[None]
        for t in self.steps:
            t.fit(x[0])
            x, _, _ = t.forward(x, None)
        return self

    def encode(self, x: np.ndarray, y: np.ndarray | None = None):
        """Raw windows (and targets) -> network space; returns (x', y', contexts)."""
        x = np.asarray(x, dtype=np.float64)
        y = None if y is None else np.asarray(y, dtype=np.float64)
        contexts = []
        for t in self.steps:
            x, y, ctx = t.forward(x, y)
            contexts.append(ctx)
        return x, y, contexts

    def decode(self, y: np.ndarray, contexts: list) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        for t, ctx in zip(reversed(self.steps), reversed(contexts), strict=True):
            y = t.inverse(y, ctx)
        return y

    def to_list(self) -> list[dict]:
        return [t.to_dict() for t in self.steps]

    @classmethod
    def from_list(cls, items: list[dict]) -> Chain:
        return cls([_from_dict(d) for d in items])

    def describe(self) -> str:
        def one(t: Transform) -> str:  # "baseline(24)", "window-norm(mean)", "log"
            detail = getattr(t, "lag", None) or getattr(t, "center", None)
            return f"{t.kind}({detail})" if detail else t.kind

        return " -> ".join(map(one, self.steps)) or "identity"

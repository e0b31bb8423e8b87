"""A trained forecaster with its transforms: raw windows in original units in, forecasts out.

The flow's backtest and the registered MLflow model both predict through this one class, so
what is evaluated is what is served. One or more member networks (an ensemble), each with its
:class:`~rnn_models.transforms.Chain` (one shared by all, or each member's own: members trained on
differently transformed windows); their forecasts are averaged in original units. It saves
to plain files: weights as safetensors, configuration and transform numbers as JSON; nothing
is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from rnn_models import checkpoint
from rnn_models.conformal import Calibration, calibrate
from rnn_models.members import Members
from rnn_models.recurrent import Forecaster, ForecasterConfig
from rnn_models.transforms import Chain, Scale


class ForecastPipeline:
    """Transforms + member networks. Feature 0 is the target; the rest are covariates, the last C
    of them (``meta["future_covariate_columns"]``) known for the horizon too: a window then holds
    the H steps ahead after its L steps of history, (N, L + H, F), the target of those H unread."""

    def __init__(self, members: list[Forecaster], chain: Chain | list[Chain], meta: dict | None = None):
        """``chain``: the members' transforms, or each member's own (a list as long as ``members``)."""
        if not members:
            raise ValueError("a forecast pipeline needs at least one member network")
        chains = chain if isinstance(chain, list) else [chain] * len(members)
        if len(chains) != len(members):
            raise ValueError(f"{len(chains)} transform chains for {len(members)} member networks")
        self.members = nn.ModuleList(members).eval()
        self.chains, self.meta = chains, dict(meta or {})
        self.calibration = Calibration.from_dict(self.meta["intervals"]) if "intervals" in self.meta else None
        # the covariates known ahead are scaled on their own (fitted on the training rows), not per window
        self.future_scale = Chain.from_list([self.meta["future_scale"]]) if "future_scale" in self.meta else None

    @property
    def lookback(self) -> int:
        return int(self.meta["lookback"])

    @property
    def horizon(self) -> int:
        return self.members[0].cfg.horizon

    @property
    def future_columns(self) -> list[str]:
        return list(self.meta.get("future_covariate_columns", []))

    @property
    def ahead(self) -> int:
        """Steps a window holds after its history: H with covariates known ahead, else 0."""
        return self.horizon if self.future_columns else 0

    def split(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Windows (N, L + ahead, F) -> history (N, L, F) and the covariates known ahead (N, H, C) or None."""
        L, C = self.lookback, len(self.future_columns)
        if not C:
            return windows, None
        if windows.shape[1] != L + self.horizon:
            raise ValueError(f"a window holds {self.lookback} steps of history and the {self.horizon} steps ahead "
                             f"(for {self.future_columns}); got {windows.shape[1]} steps")
        return windows[:, :L], windows[:, L:, -C:]

    @property
    def quantiles(self) -> tuple[float, ...]:
        return self.members[0].cfg.quantiles

    @property
    def median_index(self) -> int:
        return self.quantiles.index(0.5)

    @torch.no_grad()
    def predict(self, windows: np.ndarray, batch_size: int = 4096, members: bool = False):
        """windows (N, L + ahead, F) in original units -> forecasts (N, H), or (N, H, Q) with quantiles
        (sorted along Q), in original units: the members' average. With ``members=True``
        returns (average, [each member's forecast])."""
        past, future = self.split(windows)
        ahead = [] if future is None else [self.future_scale.encode(future)[0].astype(np.float32)]
        encoded = {}  # chain -> (network inputs, decoding context): each distinct chain encodes once
        each = []
        for chain, m in zip(self.chains, self.members, strict=True):
            if chain not in encoded:
                x, _, ctx = chain.encode(past)
                encoded[chain] = [x.astype(np.float32), *ahead], ctx
            inputs, ctx = encoded[chain]
            each.append(chain.decode(self._run(m, inputs, batch_size), ctx))
        mean = np.mean(each, axis=0)
        if self.quantiles:  # rearrangement: sorted quantiles never cross, and score no worse
            mean, each = np.sort(mean, axis=-1), [np.sort(f, axis=-1) for f in each]
        return (mean, each) if members else mean

    def point(self, forecast: np.ndarray) -> np.ndarray:
        """The point forecast (N, H) of ``predict``'s output: the median with quantiles."""
        return forecast[..., self.median_index] if self.quantiles else forecast

    def calibrate(self, windows: np.ndarray, actual: np.ndarray, levels: tuple[float, ...]) -> Calibration:
        """Conformal intervals at ``levels``, calibrated on held-out ``windows`` (N, L, F) and what
        followed them, ``actual`` (N, H); saved with the pipeline (``rnn_models.conformal``)."""
        self.calibration = calibrate(self.split(windows)[0], actual, self.point(self.predict(windows)), levels)
        self.meta["intervals"] = self.calibration.to_dict()
        return self.calibration

    def bounds(self, windows: np.ndarray, forecast: np.ndarray) -> dict[float, tuple[np.ndarray, np.ndarray]]:
        """Level -> (lower, upper) (N, H) of the calibrated intervals around ``predict``'s ``forecast``
        of ``windows``; {} without intervals."""
        return self.calibration.bounds(self.split(windows)[0], self.point(forecast)) if self.calibration else {}

    def answer(self, windows: np.ndarray, ids: pd.Index | None = None) -> pd.DataFrame:
        """The served table for one series' window (1, L + ahead, F), or for S series' with ``ids``."""
        forecast = self.predict(windows)
        bounds = self.bounds(windows, forecast)
        if ids is None:
            forecast, bounds = forecast[0], {a: (lo[0], hi[0]) for a, (lo, hi) in bounds.items()}
        return self.to_frame(forecast, ids, bounds)

    def to_frame(self, forecast: np.ndarray, ids: pd.Index | None = None,
                 bounds: dict[float, tuple[np.ndarray, np.ndarray]] | None = None) -> pd.DataFrame:
        """One window's forecast (H,) or (H, Q) as the served table: ``step`` (1..H),
        ``forecast`` and, with quantiles, one ``q<level>`` column per quantile; with ``bounds``
        (level -> (lower, upper)), ``lo<level>`` and ``hi<level>`` columns. With ``ids`` (a named
        index of S series), S windows' forecasts (S, H[, Q]), H rows per series, the id column first."""
        steps = np.arange(1, self.horizon + 1, dtype=np.int64)
        flat = forecast.reshape(-1, *forecast.shape[2:]) if ids is not None else forecast  # (S*H[, Q])
        frame = pd.DataFrame({"step": np.tile(steps, len(ids)) if ids is not None else steps,
                              "forecast": self.point(flat)})
        for j, q in enumerate(self.quantiles):
            frame[f"q{q:g}"] = flat[:, j]
        for a, (lo, hi) in (bounds or {}).items():
            frame[f"lo{a:g}"], frame[f"hi{a:g}"] = lo.reshape(-1), hi.reshape(-1)
        if ids is not None:
            frame.insert(0, ids.name, np.repeat(ids.to_numpy(), self.horizon))
        return frame

    def _run(self, model: Forecaster, inputs: list[np.ndarray], batch_size: int) -> np.ndarray:
        device = next(model.parameters()).device
        out = [model(*(torch.from_numpy(a[i : i + batch_size]).to(device) for a in inputs)).float().cpu().numpy()
               for i in range(0, len(inputs[0]), batch_size)]
        shape = (0, self.horizon) + ((len(self.quantiles),) if self.quantiles else ())
        return np.concatenate(out) if out else np.zeros(shape, dtype=np.float32)

    def describe(self) -> str:
        """The transforms, as the run's params show them: each distinct chain's, in members' order."""
        return " | ".join(dict.fromkeys(c.describe() for c in self.chains))

    def save(self, directory: str | Path) -> dict[str, str]:
        """Write weights and config into ``directory``; returns {artifact name: path}. One shared chain is
        saved as ``transforms``; members with chains of their own add ``member_transforms``."""
        config = {"members": [m.config_dict() for m in self.members], "transforms": self.chains[0].to_list(),
                  **self.meta}
        if any(c is not self.chains[0] for c in self.chains):
            config["member_transforms"] = [c.to_list() for c in self.chains]
        return checkpoint.save(self.members, directory, config)

    @classmethod
    def load(cls, weights: str | Path, config: str | Path, device: str = "cpu") -> ForecastPipeline:
        cfg = checkpoint.load_config(config)
        if "model" in cfg:  # saved before ensembles and transforms: one network, one scaler
            members = nn.ModuleList([Forecaster(ForecasterConfig(**cfg.pop("model")))])
            checkpoint.load_weights(members, weights, prefix="0.")
            chain = Chain([Scale(**{k: np.asarray(v) for k, v in cfg.pop("scaler").items()})])
        else:
            members = nn.ModuleList([Forecaster(ForecasterConfig(**c)) for c in cfg.pop("members")])
            checkpoint.load_weights(members, weights)
            chain = Chain.from_list(cfg.pop("transforms"))
            if "member_transforms" in cfg:  # members alike share one chain again
                made: dict[str, Chain] = {}
                chain = [made.setdefault(json.dumps(c), Chain.from_list(c)) for c in cfg.pop("member_transforms")]
        return cls(list(members.to(device)), chain, cfg)


class ForecastObjective:
    """The training loop's objective for forecasters: an elementwise loss in network units,
    averaged; for a model made of members (``rnn_models.members``), averaged member by member:
    one loss per member (K,), each over its own batch."""

    def __init__(self, elementwise, weighted: bool = False):
        self.elementwise, self.weighted = elementwise, weighted

    def __call__(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        # (x (B, L, F)[, future (B, H, C)], y (B, H)[, weights (B, H) if weighted]); for K members each
        # with a K dimension first
        *inputs, y, w = batch if self.weighted else (*batch, None)
        loss = self.elementwise(model(*inputs).float(), y)
        loss = loss if w is None else loss * w
        if isinstance(model, Members):
            return loss.mean(dim=tuple(range(1, loss.dim()))), y.shape[1]
        return loss.mean(), len(y)


def _squared(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (pred - y) ** 2


def _absolute(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (pred - y).abs()


mse_objective = ForecastObjective(_squared)
mae_objective = ForecastObjective(_absolute)  # learns the median, as sMAPE and MASE reward
owa_objective = ForecastObjective(_absolute, weighted=True)  # each step weighted as OWA counts it (panel.OwaWeights)


class PinballObjective(ForecastObjective):
    """Quantile (pinball) loss averaged over steps and quantiles, for (B, H, Q) outputs."""

    def __init__(self, quantiles: tuple[float, ...]):
        super().__init__(self.pinball)
        self.q = torch.tensor(quantiles, dtype=torch.float32)

    def pinball(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        err = y[..., None] - pred  # (..., H, Q)
        q = self.q.to(err.device)
        return torch.maximum(q * err, (q - 1) * err)

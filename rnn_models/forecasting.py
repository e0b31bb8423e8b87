"""A trained forecaster with its scaling: raw windows in original units in, forecasts out.

The flow's backtest and the registered MLflow model both predict through this one class, so
what is evaluated is what is served. It saves to plain files: weights as safetensors and the
configuration and scaler numbers as JSON; nothing is pickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rnn_models import checkpoint
from rnn_models.recurrent import Forecaster, ForecasterConfig


@dataclass
class Affine:
    """Per-feature scaling x' = (x - offset) / scale, the form every scikit-learn scaler we use
    reduces to; kept as numbers so a model loads without unpickling a scaler."""

    offset: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.offset) / self.scale

    def inverse(self, x: np.ndarray, feature: int | None = None) -> np.ndarray:
        if feature is None:
            return x * self.scale + self.offset
        return x * self.scale[feature] + self.offset[feature]

    def to_dict(self) -> dict:
        return {"offset": self.offset.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Affine:
        return cls(np.asarray(d["offset"], dtype=np.float64), np.asarray(d["scale"], dtype=np.float64))

    @classmethod
    def identity(cls, n_features: int) -> Affine:
        return cls(np.zeros(n_features), np.ones(n_features))


class ForecastPipeline:
    """Scaler + network. Feature 0 is the target; the rest are past covariates."""

    def __init__(self, model: Forecaster, scaler: Affine, meta: dict | None = None):
        self.model, self.scaler, self.meta = model.eval(), scaler, dict(meta or {})

    @property
    def lookback(self) -> int:
        return int(self.meta["lookback"])

    @property
    def horizon(self) -> int:
        return self.model.cfg.horizon

    @torch.no_grad()
    def predict(self, windows: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """windows (N, L, F) in original units -> forecasts (N, H) in original units."""
        device = next(self.model.parameters()).device
        x = self.scaler.transform(np.asarray(windows, dtype=np.float64)).astype(np.float32)
        out = []
        for i in range(0, len(x), batch_size):
            out.append(self.model(torch.from_numpy(x[i : i + batch_size]).to(device)).float().cpu().numpy())
        y = np.concatenate(out) if out else np.zeros((0, self.horizon), dtype=np.float32)
        return self.scaler.inverse(y.astype(np.float64), feature=0)

    def save(self, directory: str | Path) -> dict[str, str]:
        """Write weights and config into ``directory``; returns {artifact name: path}."""
        config = {"model": self.model.config_dict(), "scaler": self.scaler.to_dict(), **self.meta}
        return checkpoint.save(self.model, directory, config)

    @classmethod
    def load(cls, weights: str | Path, config: str | Path, device: str = "cpu") -> ForecastPipeline:
        cfg = checkpoint.load_config(config)
        model = checkpoint.load_weights(Forecaster(ForecasterConfig(**cfg.pop("model"))), weights)
        scaler = Affine.from_dict(cfg.pop("scaler"))
        return cls(model.to(device), scaler, cfg)


def mse_objective(model: Forecaster, batch) -> tuple[torch.Tensor, int]:
    """The training loop's objective for forecasters: mean squared error in scaled units."""
    x, y = batch  # (B, L, F), (B, H)
    return torch.nn.functional.mse_loss(model(x).float(), y), len(x)

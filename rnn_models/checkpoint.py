"""Plain-file checkpoints: weights as safetensors (no pickle) and everything else as JSON; and
a training run's resumable state (``Checkpoint``)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS, CONFIG = "weights.safetensors", "config.json"


def save(model: nn.Module, directory: str | Path, config: dict) -> dict[str, str]:
    """Write ``weights.safetensors`` and ``config.json``; returns {artifact name: path}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, directory / WEIGHTS)
    (directory / CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return {"weights": str(directory / WEIGHTS), "config": str(directory / CONFIG)}


def load_weights(model: nn.Module, weights: str | Path, prefix: str = "") -> nn.Module:
    """Load ``weights`` into ``model``, each name prefixed with ``prefix`` (to load one network's
    file into a container of several)."""
    # to the CPU first: a CUDA-trained model must load on a machine without one
    model.load_state_dict({prefix + k: v for k, v in load_file(str(weights), device="cpu").items()})
    return model


def load_config(config: str | Path) -> dict:
    return json.loads(Path(config).read_text())


class Checkpoint:
    """A training run's resumable state in one file, ``checkpoint.safetensors``: the tensors as
    safetensors, everything else as JSON in its header (nothing pickled). Written atomically
    (a temp file, fsync, rename), so a crash or power cut mid-write leaves the previous one.
    ``every_seconds``: how often the training loop also writes one inside an epoch."""

    FILE = "checkpoint.safetensors"

    def __init__(self, directory: str | Path, every_seconds: float = 300.0):
        self.directory, self.every_seconds = Path(directory), every_seconds
        self.path = self.directory / self.FILE
        self.last_write = time.monotonic()

    def exists(self) -> bool:
        return self.path.is_file()

    def due(self) -> bool:
        """True once ``every_seconds`` have passed since the last write (0: never inside an epoch)."""
        return self.every_seconds > 0 and time.monotonic() - self.last_write >= self.every_seconds

    def write(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{self.FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
        # copies: safetensors refuses tensors that share memory, and a CUDA tensor must come to the host
        save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"state": json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.last_write = time.monotonic()

    def read(self) -> tuple[dict[str, torch.Tensor], dict]:
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["state"])  # noqa: SIM118

    def meta(self) -> dict:
        """The JSON part alone (which epoch, of how many), without reading the tensors."""
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            return json.loads(f.metadata()["state"])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

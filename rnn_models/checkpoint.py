"""Plain-file checkpoints: weights as safetensors (no pickle) and everything else as JSON."""

from __future__ import annotations

import json
from pathlib import Path

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

"""What every flow config is made of: ``option`` fields with their help, the pieces both flows share
(model, training, registry), the checks they share, and how a value is read from text."""

from __future__ import annotations

import hashlib
import math
import posixpath
import re
from dataclasses import asdict, dataclass, field, fields

from rnn_models import CELL_NAMES


class ConfigError(ValueError):
    """A parameter has an impossible value; raised before any data is read or model trained."""


def option(default, help: str, choices: tuple[str, ...] | None = None):
    """A config field with its command-line help (and allowed values) attached."""
    return field(default=default, metadata={"help": help, "choices": choices})


def override(piece, name: str, default, help: str = ""):
    """``piece``'s option ``name`` with another default, keeping its help unless given a new one."""
    metadata = piece.__dataclass_fields__[name].metadata
    return option(default, help or metadata["help"], metadata["choices"])

MAX_NAME = 200  # characters in a registered model's name
BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


@dataclass
class ModelOptions:
    title = "model"  # the group in --help (no annotation: not a field); projected onto ForecasterConfig, CharLMConfig
    cell: str = option("lstm", "recurrent cell", CELL_NAMES)
    hidden_size: int = option(64, "hidden units per layer (and direction)")
    num_layers: int = option(1, "stacked recurrent layers")
    dropout: float = option(0.0, "dropout between stacked layers")


@dataclass
class TrainingOptions:
    title = "training"  # projected onto rnn_models.training.TrainConfig
    epochs: int = option(40, "maximum epochs")
    batch_size: int = option(32, "windows per gradient step")
    lr: float = option(3e-3, "AdamW learning rate")
    weight_decay: float = option(0.01, "AdamW decoupled weight decay")
    clip: float = option(1.0, "max gradient norm; recurrent nets explode without it (0 = off)")
    patience: int = option(6, "epochs without a better validation loss before stopping (0 = never)")
    device: str = option("auto", "auto takes CUDA (with bf16 autocast) when present", ("auto", "cpu", "cuda"))
    seed: int = option(0, "seed for weights, shuffling, generated data and samples: same seed, same result on CPU")
    resume: bool = option(True, "go on from the checkpoint an interrupted run of the same config and data left "
                          "(checkpoints/ or $RNNFLOW_CHECKPOINTS); --no-resume starts afresh")
    checkpoint_minutes: float = option(5.0, "write a checkpoint every this many minutes inside an epoch too, not only "
                                       "at its end (0 = at epoch ends only)")


@dataclass
class RegistryOptions:
    title = "registry"  # where the trained model is registered
    model_name: str = option("", "registered model name; default: after the data, <source or file name>-forecaster "
                             "or <corpus file name>-charlm")
    experiment: str = option("timeseries-forecasting", "MLflow experiment")
    registry_retry_minutes: float = option(2.0, "how long to keep retrying, with back-off, a tracking server that "
                                           "stops answering after training; then the trained model is kept on disk "
                                           "for `python -m flows.models register`")

    def to_params(self) -> dict:
        """Every field of the flow config (both end in this piece): its MLflow run's params."""
        return asdict(self)


def check_common(cfg, positive=(), non_negative=(), fractions=(), probabilities=(), part_sizes=()) -> None:
    """The checks every flow config shares, with its own fields of each kind; NaN fails every range.
    ``part_sizes``: fractions where 0 leaves the size to the config's automatic settings."""
    for f in fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"{flag(f.name)}: {getattr(cfg, f.name)!r} is not one of {', '.join(choices)}")
    ranges = [(("epochs", "hidden_size", "num_layers", *positive), "must be at least 1", lambda v: v >= 1),
              (("patience", "weight_decay", "clip", "checkpoint_minutes", "registry_retry_minutes", *non_negative),
               "must be 0 or more", lambda v: 0 <= v < math.inf),
              (("lr",), "must be a positive number", lambda v: 0 < v < math.inf),
              (("dropout", *probabilities), "must be in [0, 1)", lambda v: 0 <= v < 1),
              (fractions, "must be a fraction in (0, 0.5)", lambda v: 0 < v < 0.5),
              (part_sizes, "must be 0 (automatic) or a fraction below 0.5", lambda v: 0 <= v < 0.5)]
    for names, must, within in ranges:
        for name in names:
            if not within(getattr(cfg, name)):
                raise ConfigError(f"{flag(name)} {must}, got {getattr(cfg, name)}")
    check_model_name(cfg.registered_name, given=bool(cfg.model_name))
    if cfg.device.startswith("cuda"):  # said in one line where PyTorch sees no CUDA GPU
        from rnn_models.training import resolve_device  # imports torch: only when a GPU is asked for
        try:
            resolve_device(cfg.device)
        except ValueError as e:
            raise ConfigError(f"--device {cfg.device}: {e}") from None
    if cfg.sha256 and (len(cfg.sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in cfg.sha256)):
        raise ConfigError(f"--sha256 must be 64 hex digits, got {cfg.sha256!r}")


def check_model_name(name: str, given: bool) -> None:
    """Refuse, before anything is trained, a name MLflow's registry would refuse or that is not
    printable. It reaches files and Prefect keys only through ``safe_name``."""
    where = "--model-name" if given else f"the model name {name!r} made from --data (give --model-name)"
    problem = ("is blank" if not name.strip() else
               "cannot contain '/' or ':' (MLflow's rule)" if "/" in name or ":" in name else
               "cannot be a path such as '.' or '..' (MLflow's rule)" if posixpath.normpath(name) != name
               or name.startswith("..") else
               "cannot contain control characters" if any(not c.isprintable() for c in name) else
               f"is longer than {MAX_NAME} characters" if len(name) > MAX_NAME else "")
    if problem:
        raise ConfigError(f"{where}: {name!r} {problem}")


def safe_name(name: str) -> str:
    """``name`` in lower-case ASCII letters, digits and dashes, for file names and Prefect keys; with
    8 hex digits of its hash if it held anything else, so distinct names stay distinct."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:80]
    return slug if slug == name.lower() else f"{slug or 'model'}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_value(kind: type, raw, name: str):
    """A field's value from its text, for the command line, sweep grids and logged MLflow params alike.
    Booleans read true/false, yes/no or 1/0 in any case, and nothing else; an optional boolean reads
    none or nothing as None too."""
    if kind == bool | None:  # on, off, or left to --auto
        return None if raw is None or str(raw).strip().lower() in ("", "none") else parse_value(bool, raw, name)
    if kind is bool and not isinstance(raw, bool):
        key = str(raw).strip().lower()
        if key not in BOOLEANS:
            raise ConfigError(f"{flag(name)}: {raw!r} is not a boolean; use true or false")
        return BOOLEANS[key]
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{flag(name)}: {raw!r} is not a valid {kind.__name__}") from None


def project(cls, cfg, **overrides):
    """A lower layer's config ``cls`` from the fields it shares by name with the flow config ``cfg``."""
    shared = {f.name for f in fields(cls)} & {f.name for f in fields(cfg)}
    return cls(**{**{k: getattr(cfg, k) for k in shared}, **overrides})

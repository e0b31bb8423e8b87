"""What a training run is told and what it changes as it goes: its config, its results, and the
state that goes to and from a checkpoint (weights, optimizer, schedules, moving average, best
weights, random-number generators, position in the epoch). The loop that drives it is
``rnn_models.training``; this module knows nothing of batches or objectives."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from rnn_models import NonFiniteLossError  # defined without torch for the CLI
from rnn_models.checkpoint import Checkpoint
from rnn_models.schedules import Budget, cosine


@dataclass
class TrainConfig:
    epochs: int = 30
    lr: float = 3e-3
    weight_decay: float = 0.01  # AdamW's default; decoupled, so it does not fight Adam's scaling
    clip: float = 1.0  # max gradient norm; recurrent nets on raw series explode without it
    patience: int = 5  # epochs without a better validation loss before stopping; 0 disables
    lr_patience: int = 0  # epochs without a better validation loss before the lr is halved; 0: constant lr
    ema: float = 0.0  # per-step decay of a moving average of the weights, which is validated and kept; 0: off
    minutes: float = 0.0  # wall-clock budget: train until it is spent, the lr on a cosine over it; 0: by epochs
    cosine: bool = False  # without a budget: the lr on a cosine over the epochs, set at each epoch's start
    warmup: int = 0  # optimizer steps over which the lr rises linearly to the schedule's; 0: none
    precision: str = "auto"  # the training step's, see training.autocast(); validation on CPU is always float32
    device: str = "cpu"
    seed: int = 0
    progress: bool = True


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    seconds: float
    lr: float = math.nan  # the learning rate the epoch began with


@dataclass
class FitResult:
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    train_seconds: float = 0.0
    samples: int = 0  # training examples (windows, tokens) seen over all epochs
    diverged: int = 0  # the epoch whose loss became NaN or infinite, ending training at the best before it; 0: none

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def divergence(self) -> str:
        """How training ended where its loss became NaN or infinite; '' where it did not."""
        if not self.diverged:
            return ""
        lr = self.history[-1].lr if self.history else math.nan
        return (f"its loss became NaN or infinite at epoch {self.diverged} (lr {lr:.3g}): "
                f"kept epoch {self.best_epoch}'s weights")

    @property
    def stopped_early(self) -> bool:
        return bool(self.history) and self.history[-1].epoch > self.best_epoch


class TrainingRun:
    """Everything one network's training changes as it goes, and how it goes to and from a
    checkpoint. A model made of members (``rnn_models.members``) has one run per member: its own
    optimizer, schedules, moving average, early stopping and checkpoint, as if it trained alone."""

    def __init__(self, model: nn.Module, objective, cfg: TrainConfig):
        self.model, self.objective, self.cfg = model, objective, cfg
        self.params = list(model.parameters())
        # fused: one kernel for the whole update, where a small model's step is bound by launches (CUDA)
        # or by per-tensor dispatch (CPU; docs/BENCHMARKS.md, "Ensemble members trained together")
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # shuffling order, independent of the global RNG
        self.budget = Budget(self.opt, cfg.minutes * 60.0) if cfg.minutes > 0 else None
        self.plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, factor=0.5, patience=cfg.lr_patience - 1)
                        if cfg.lr_patience and self.budget is None else None)
        self.averaged = MovingAverage(model, cfg.ema) if cfg.ema else None
        self.scored = self.averaged.module if self.averaged is not None else model  # validated, kept, returned
        self.result, self.best_state, self.stale = FitResult(), None, 0
        # epochs done; stopped (early, by budget or at the last epoch; at once when there are none to do)
        self.epoch, self.finished = 0, cfg.epochs <= 0
        self.step, self.partial = 0, (0.0, 0)  # batches done in the epoch under way, their summed loss and count
        self.updates = 0  # optimizer steps over the whole run (the warm-up counts them)
        self.epoch_gen = self.gen.get_state()  # the shuffling generator as the epoch under way began

    def start_epoch(self) -> torch.Generator:
        """The generator the epoch's batches are drawn with: as the epoch began, even when it
        resumes half-way (its first ``step`` batches are then drawn again and skipped)."""
        if self.step == 0:
            self.epoch_gen = self.gen.get_state()
        else:
            self.gen.set_state(self.epoch_gen)
        return self.gen

    def resume_from(self, checkpoint: Checkpoint | None) -> None:
        """Go on from ``checkpoint`` where it exists."""
        if checkpoint is not None and checkpoint.exists():
            self.restore(*checkpoint.read())

    def begin_epoch(self, epoch: int) -> float:
        """The learning rate epoch ``epoch`` begins with, set first where it follows a cosine over
        the epochs (``cfg.cosine`` without a budget)."""
        if self.cfg.cosine and self.budget is None:
            for group in self.opt.param_groups:
                group["lr"] = self.cfg.lr * cosine((epoch - 1) / self.cfg.epochs)
        return self.opt.param_groups[0]["lr"]

    def keep_best(self) -> None:
        """Put the best weights validated back into the model."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def end_epoch(self, stats: EpochStats, checkpoint: Checkpoint | None = None) -> None:
        """Record the epoch: best weights, plateau, whether training is finished; then write the
        whole state to ``checkpoint``, if any. A loss that becomes NaN or infinite after an epoch
        was validated ends training there, at the best weights so far (``result.diverged`` says
        when); before one was, there are none to keep: ``NonFiniteLossError`` with its cause."""
        if not (math.isfinite(stats.train_loss) and math.isfinite(stats.val_loss)):
            if self.best_state is None:
                raise divergence(stats, self.cfg)
            self.result.diverged = stats.epoch
        self.result.history.append(stats)
        self.result.train_seconds += stats.seconds
        if not self.result.diverged and stats.val_loss < self.result.best_val_loss:
            self.result.best_val_loss, self.result.best_epoch, self.stale = stats.val_loss, stats.epoch, 0
            self.best_state = copy.deepcopy(self.scored.state_dict())
        else:
            self.stale += 1
        if self.plateau is not None:
            self.plateau.step(stats.val_loss)
        self.epoch, self.step, self.partial = stats.epoch, 0, (0.0, 0)
        self.finished = (stats.epoch >= self.cfg.epochs or bool(self.cfg.patience and self.stale >= self.cfg.patience)
                         or (self.budget is not None and self.budget.spent) or bool(self.result.diverged))
        if checkpoint is not None:
            checkpoint.write(*self.snapshot())

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able rest) of the whole state, for ``Checkpoint.write``."""
        opt = self.opt.state_dict()
        tensors = {**_prefixed("model.", self.model.state_dict()), **_prefixed("best.", self.best_state or {}),
                   **{f"opt.{i}.{k}": v for i, st in opt["state"].items() for k, v in st.items()},
                   "rng.gen": self.gen.get_state(), "rng.epoch_gen": self.epoch_gen, "rng.torch": torch.get_rng_state()}
        if self.averaged is not None:
            tensors.update(_prefixed("ema.", self.averaged.module.state_dict()))
        if torch.cuda.is_available() and self.cfg.device.startswith("cuda"):
            tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        tensors.update(_prefixed("objective.", getattr(self.objective, "state_dict", dict)()))
        result = self.result
        meta = {"epoch": self.epoch, "epochs": self.cfg.epochs, "step": self.step, "partial": self.partial,
                "updates": self.updates,
                "finished": self.finished, "stale": self.stale, "opt_groups": opt["param_groups"],
                "ema_started": self.averaged.started if self.averaged is not None else False,
                "plateau": self.plateau.state_dict() if self.plateau is not None else None,
                "budget_elapsed": self.budget.elapsed() if self.budget is not None else 0.0,
                "history": [vars(s) for s in result.history], "best_epoch": result.best_epoch,
                "best_val_loss": result.best_val_loss, "train_seconds": result.train_seconds,
                "samples": result.samples, "diverged": result.diverged}
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Put the state of ``snapshot()`` back, the tensors onto the model's device."""
        dev = self.cfg.device
        self.model.load_state_dict(_unprefixed("model.", tensors))
        self.best_state = {k: v.to(dev) for k, v in _unprefixed("best.", tensors).items()} or None
        if self.averaged is not None:
            self.averaged.module.load_state_dict(_unprefixed("ema.", tensors))
            self.averaged.started = meta["ema_started"]
        state: dict[int, dict] = {}
        for key, value in _unprefixed("opt.", tensors).items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = value
        self.opt.load_state_dict({"state": state, "param_groups": meta["opt_groups"]})
        self._restore_generators(tensors)
        if hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict({k: v.to(dev) for k, v in _unprefixed("objective.", tensors).items()})
        if self.plateau is not None and meta["plateau"] is not None:
            self.plateau.load_state_dict(meta["plateau"])
        if self.budget is not None:
            self.budget.resume(meta["budget_elapsed"])
        self.epoch, self.step, self.partial = meta["epoch"], meta["step"], tuple(meta["partial"])
        self.updates = meta.get("updates", 0)  # a checkpoint from before warm-ups were counted had none
        self.finished, self.stale = meta["finished"], meta["stale"]
        self.result = FitResult([EpochStats(**s) for s in meta["history"]], meta["best_epoch"], meta["best_val_loss"],
                                meta["train_seconds"], meta["samples"], meta.get("diverged", 0))

    def _restore_generators(self, tensors: dict[str, torch.Tensor]) -> None:
        self.gen.set_state(tensors["rng.gen"])
        self.epoch_gen = tensors["rng.epoch_gen"]
        torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)


def divergence(stats: EpochStats, cfg: TrainConfig) -> NonFiniteLossError:
    """The error of an epoch whose loss became NaN or infinite: its likely cause and the options to change."""
    part, bad = ("training", stats.train_loss) if not math.isfinite(stats.train_loss) else \
        ("validation", stats.val_loss)
    cause = ("an overflow: values beyond float32's range (scale the data, e.g. --scaler standard) or "
             if math.isinf(bad) else "")
    cause += f"weights that diverged (lr={cfg.lr}, clip={cfg.clip}): try a lower --lr or a smaller --clip"
    return NonFiniteLossError(f"epoch {stats.epoch}: loss became {bad} in the {part} pass: {cause}")


def _prefixed(prefix: str, tensors: dict) -> dict:
    return {prefix + k: v for k, v in tensors.items()}


def _unprefixed(prefix: str, tensors: dict) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


class MovingAverage:
    """An exponential moving average of a model's weights (Polyak averaging), kept in a copy
    of the model: the first step copies the weights, every later one moves the average
    ``1 - decay`` of the way towards them, in place, one fused operation for all tensors and
    no host round trip (``swa_utils.AveragedModel`` reads a device counter every step)."""

    def __init__(self, model: nn.Module, decay: float):
        self.module, self.decay, self.started = copy.deepcopy(model), decay, False
        for m in self.module.modules():
            if isinstance(m, nn.RNNBase):  # a deep copy's cuDNN weights are no longer one chunk:
                m.flatten_parameters()  # compact them once here, not at every call (seen on an H200)
        self.averaged = list(self.module.parameters())

    def update(self, model: nn.Module) -> None:
        update_averages([self], [list(model.parameters())])


@torch.no_grad()
def update_averages(averages: list[MovingAverage], weights: list[list[torch.Tensor]]) -> None:
    """Move each average towards its model's current ``weights``: one fused operation for all
    the averages that share a decay and a start (a model's members), not one per member."""
    alike: dict[tuple[float, bool], tuple[list, list]] = {}
    for average, current in zip(averages, weights, strict=True):
        targets, sources = alike.setdefault((average.decay, average.started), ([], []))
        targets += average.averaged
        sources += current
        average.started = True
    for (decay, started), (targets, sources) in alike.items():
        if started:
            torch._foreach_lerp_(targets, sources, 1.0 - decay)
        else:
            torch._foreach_copy_(targets, sources)

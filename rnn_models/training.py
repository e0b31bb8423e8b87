"""A lean, model-agnostic training loop.

It knows batches, a loss and an optimizer, nothing of forecasting or text: the caller passes
``train_batches(generator)`` and ``val_batches()`` (iterables of whatever a batch is) and an
objective ``loss(model, batch) -> (mean loss, count)``. An objective that carries state across
batches (truncated BPTT) may define ``reset()``, called before every pass over the data.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from rnn_models import NonFiniteLossError  # noqa: F401  (raised here; defined without torch for the CLI)


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
    device: str = "cpu"
    seed: int = 0
    progress: bool = True


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    seconds: float


@dataclass
class FitResult:
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    train_seconds: float = 0.0
    samples: int = 0  # training examples (windows, tokens) seen over all epochs

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def stopped_early(self) -> bool:
        return bool(self.history) and self.history[-1].epoch > self.best_epoch


Batch = Any
Objective = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]


def resolve_device(device: str) -> str:
    """``auto`` picks CUDA when present; asking for CUDA where there is none is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; expected auto, cpu or cuda")
    return device


def autocast(device: str):
    """bf16 autocast on CUDA (fast, no loss scaling needed); full precision on CPU."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fit(
    model: nn.Module,
    train_batches: Callable[[torch.Generator], Iterable[Batch]],
    val_batches: Callable[[], Iterable[Batch]],
    objective: Objective,
    cfg: TrainConfig,
    on_epoch: Callable[[EpochStats, nn.Module], None] | None = None,
) -> FitResult:
    """Train with AdamW and gradient clipping; stop early on validation loss and restore the
    best weights. With ``cfg.ema`` the weights validated and restored are an exponential moving
    average of the optimizer's (Polyak averaging: the noise of the last steps averages out).
    With ``cfg.minutes`` training stops once that much wall-clock time has passed (at most
    ``cfg.epochs`` epochs), the learning rate falling on a cosine over the budget; the epoch
    under way when it runs out is cut short and validated. The model must already be on
    ``cfg.device``."""
    # fused: one kernel for the whole update on CUDA, where a small model's step is launch-bound
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=cfg.device.startswith("cuda"))
    gen = torch.Generator().manual_seed(cfg.seed)  # shuffling order, independent of the global RNG
    budget = Budget(opt, cfg.minutes * 60.0) if cfg.minutes > 0 else None
    plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=cfg.lr_patience - 1)
               if cfg.lr_patience and budget is None else None)
    result, best_state, stale = FitResult(), None, 0
    averaged = MovingAverage(model, cfg.ema) if cfg.ema else None
    after_step = averaged.update if averaged is not None else None
    scored = averaged.module if averaged is not None else model  # the weights validated, kept and returned
    # disable=None: a bar only on a terminal, not in logs
    bar = tqdm(range(1, cfg.epochs + 1), desc="train", unit="epoch", leave=False,
               disable=None if cfg.progress else True)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        train_loss, n = _run_pass(model, train_batches(gen), objective, cfg, opt, after_step, budget)
        result.samples += n
        model.eval()
        scored.eval()
        with torch.no_grad():
            val_loss, _ = _run_pass(scored, val_batches(), objective, cfg, None)
        seconds = time.perf_counter() - t0
        result.train_seconds += seconds
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise NonFiniteLossError(
                f"epoch {epoch}: loss became {train_loss if not math.isfinite(train_loss) else val_loss}"
                f" (lr={cfg.lr}, clip={cfg.clip}); try a lower --lr or a smaller --clip"
            )
        stats = EpochStats(epoch, train_loss, val_loss, seconds)
        result.history.append(stats)
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        if val_loss < result.best_val_loss:
            result.best_val_loss, result.best_epoch, stale = val_loss, epoch, 0
            best_state = copy.deepcopy(scored.state_dict())
        else:
            stale += 1
        if plateau is not None:
            plateau.step(val_loss)
        if on_epoch is not None:
            on_epoch(stats, model)
        if (cfg.patience and stale >= cfg.patience) or (budget is not None and budget.spent):
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return result


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

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = list(model.parameters())
        if self.started:
            torch._foreach_lerp_(self.averaged, current, 1.0 - self.decay)
        else:
            torch._foreach_copy_(self.averaged, current)
            self.started = True


class Budget:
    """A wall-clock training budget: sets the learning rate on a cosine from its start value
    down to ``floor`` times it as the budget is spent, and says when it is."""

    def __init__(self, opt: torch.optim.Optimizer, seconds: float, floor: float = 0.1):
        self.opt, self.seconds, self.floor = opt, seconds, floor
        self.base = [g["lr"] for g in opt.param_groups]
        self.start = time.perf_counter()
        self.spent = False

    def step(self) -> bool:
        """After an optimizer step: update the learning rate; True once the budget is spent."""
        frac = min((time.perf_counter() - self.start) / self.seconds, 1.0)
        scale = self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * frac))
        for group, base in zip(self.opt.param_groups, self.base, strict=True):
            group["lr"] = base * scale
        self.spent = frac >= 1.0
        return self.spent


def _run_pass(model, batches, objective, cfg: TrainConfig, opt, after_step=None,
              budget: Budget | None = None) -> tuple[float, int]:
    """One pass over ``batches``; trains when an optimizer is given, until the budget (if any)
    is spent. Returns (mean loss, count)."""
    reset = getattr(objective, "reset", None)
    if reset is not None:
        reset()
    total = torch.zeros((), device=cfg.device)  # summed on the device: no host sync per step
    count = 0
    for batch in batches:
        with autocast(cfg.device):
            loss, n = objective(model, batch)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            if after_step is not None:
                after_step(model)
        total += loss.detach().float() * n
        count += n
        if budget is not None and budget.step():
            break
    return (total.item() / count if count else math.nan), count


def tensor_batches(
    *tensors: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Slices of device-resident tensors, shuffled when a generator is given; no DataLoader."""
    n = tensors[0].shape[0]
    if generator is None:
        for i in range(0, n, batch_size):
            yield tuple(t[i : i + batch_size] for t in tensors)
        return
    order = torch.randperm(n, generator=generator).to(tensors[0].device)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        yield tuple(t[idx] for t in tensors)

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
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from rnn_models import PRECISIONS, NonFiniteLossError  # defined without torch for the CLI
from rnn_models.checkpoint import Checkpoint
from rnn_models.cores import SHARE, cpu_flags


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
    precision: str = "auto"  # the training step's, see autocast(); validation on CPU is always float32
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
    if device.startswith("cuda") and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"PyTorch sees no CUDA GPU on this machine (torch {torch.__version__}, {build}); "
                         f"use --device auto or cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; expected auto, cpu or cuda")
    return device


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast
    roughly doubles an LSTM's training speed; elsewhere it is emulated and slower than float32."""
    return bool({"avx512_bf16", "amx_bf16", "amx_tile"} & set(cpu_flags().split()))


def autocast(device: str, precision: str = "auto"):
    """The training step's precision. ``auto``: bf16 autocast on CUDA (no loss scaling needed),
    float32 on CPU; ``bf16``: bf16 autocast on either (float32 master weights, bf16 matmuls);
    ``fp32``: float32 throughout."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if precision == "bf16" or (precision == "auto" and kind == "cuda"):
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fit(
    model: nn.Module,
    train_batches: Callable[[torch.Generator], Iterable[Batch]],
    val_batches: Callable[[], Iterable[Batch]],
    objective: Objective,
    cfg: TrainConfig,
    on_epoch: Callable[[EpochStats, nn.Module], None] | None = None,
    checkpoint: Checkpoint | None = None,
) -> FitResult:
    """Train with AdamW and gradient clipping; stop early on validation loss and restore the
    best weights. With ``cfg.ema`` the weights validated and restored are an exponential moving
    average of the optimizer's (Polyak averaging: the noise of the last steps averages out).
    With ``cfg.minutes`` training stops once that much wall-clock time has passed (at most
    ``cfg.epochs`` epochs), the learning rate falling on a cosine over the budget; the epoch
    under way when it runs out is cut short and validated. The model must already be on
    ``cfg.device``.

    With ``checkpoint``, the whole state (weights, optimizer, moving average, best weights so
    far, random-number generators, position in the epoch) is written after every epoch and
    every ``checkpoint.every_seconds`` inside one; if the checkpoint exists, training resumes
    from it and ends exactly where an uninterrupted run would (on the CPU)."""
    with SHARE.claim():
        return _fit(model, train_batches, val_batches, objective, cfg, on_epoch, checkpoint)


def _fit(model, train_batches, val_batches, objective, cfg, on_epoch, checkpoint) -> FitResult:
    run = TrainingRun(model, objective, cfg)
    run.resume_from(checkpoint)
    # disable=None: a bar only on a terminal, not in logs
    bar = tqdm(range(run.epoch + 1, cfg.epochs + 1), desc="train", unit="epoch", leave=False,
               disable=None if cfg.progress and not run.finished else True)
    for epoch in bar:
        if run.finished:
            break
        t0 = time.perf_counter()
        model.train()
        lr = run.begin_epoch(epoch)
        train_loss, n = _train_pass(run, train_batches(run.start_epoch()), checkpoint)
        val_loss = run.validate(val_batches(), n)
        stats = EpochStats(epoch, train_loss, val_loss, time.perf_counter() - t0, lr)
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        run.end_epoch(stats, checkpoint)  # first: an epoch announced by on_epoch (a log line) survives a kill
        if on_epoch is not None:
            on_epoch(stats, model)
    bar.close()
    run.keep_best()
    return run.result


class TrainingRun:
    """Everything a training run changes as it goes, and how it goes to and from a checkpoint."""

    def __init__(self, model: nn.Module, objective: Objective, cfg: TrainConfig):
        self.model, self.objective, self.cfg = model, objective, cfg
        # fused: one kernel for the whole update, where a small model's step is bound by launches (CUDA)
        # or by per-tensor dispatch (CPU: a forecaster's step 10 % faster than foreach's)
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # shuffling order, independent of the global RNG
        self.budget = Budget(self.opt, cfg.minutes * 60.0) if cfg.minutes > 0 else None
        self.plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, factor=0.5, patience=cfg.lr_patience - 1)
                        if cfg.lr_patience and self.budget is None else None)
        self.averaged = MovingAverage(model, cfg.ema) if cfg.ema else None
        self.scored = self.averaged.module if self.averaged is not None else model  # validated, kept, returned
        self.result, self.best_state, self.stale = FitResult(), None, 0
        self.epoch, self.finished = 0, False  # epochs done; stopped (early, by budget or at the last epoch)
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

    def validate(self, batches: Iterable[Batch], samples: int) -> float:
        """After a training pass over ``samples`` examples: the validation loss of the weights
        that are scored (the moving average, if any)."""
        self.result.samples += samples
        self.model.eval()
        self.scored.eval()
        with torch.no_grad():
            return eval_pass(self.scored, batches, self.objective, self.cfg)

    def keep_best(self) -> None:
        """Put the best weights validated back into the model."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def end_epoch(self, stats: EpochStats, checkpoint: Checkpoint | None = None) -> None:
        """Record the epoch: best weights, plateau, whether training is finished; then write the
        whole state to ``checkpoint``, if any."""
        if not (math.isfinite(stats.train_loss) and math.isfinite(stats.val_loss)):
            part, bad = ("training", stats.train_loss) if not math.isfinite(stats.train_loss) else \
                ("validation", stats.val_loss)
            cause = ("an overflow: values beyond float32's range (scale the data, e.g. --scaler standard) or "
                     if math.isinf(bad) else "")
            cause += (f"weights that diverged (lr={self.cfg.lr}, clip={self.cfg.clip}): try a lower --lr or a "
                      f"smaller --clip")
            raise NonFiniteLossError(f"epoch {stats.epoch}: loss became {bad} in the {part} pass: {cause}")
        self.result.history.append(stats)
        self.result.train_seconds += stats.seconds
        if stats.val_loss < self.result.best_val_loss:
            self.result.best_val_loss, self.result.best_epoch, self.stale = stats.val_loss, stats.epoch, 0
            self.best_state = copy.deepcopy(self.scored.state_dict())
        else:
            self.stale += 1
        if self.plateau is not None:
            self.plateau.step(stats.val_loss)
        self.epoch, self.step, self.partial = stats.epoch, 0, (0.0, 0)
        self.finished = (stats.epoch >= self.cfg.epochs or bool(self.cfg.patience and self.stale >= self.cfg.patience)
                         or (self.budget is not None and self.budget.spent))
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
                "samples": result.samples}
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
        self.gen.set_state(tensors["rng.gen"])
        self.epoch_gen = tensors["rng.epoch_gen"]
        torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
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
                                meta["train_seconds"], meta["samples"])


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

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = list(model.parameters())
        if self.started:
            torch._foreach_lerp_(self.averaged, current, 1.0 - self.decay)
        else:
            torch._foreach_copy_(self.averaged, current)
            self.started = True


def cosine(frac: float, floor: float = 0.1) -> float:
    """The learning rate's factor ``frac`` of the way through a cosine schedule: 1 down to ``floor``."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


@contextlib.contextmanager
def warmed_up(opt: torch.optim.Optimizer, update: int, warmup: int):
    """For one optimizer step, the ``update``-th (from 0): the learning rate the schedule set,
    times ``(update + 1) / warmup`` while ``update < warmup`` (a linear warm-up); put back after.
    It composes with any schedule (per epoch, per step, on a plateau) without touching it."""
    if update >= warmup:
        yield
        return
    scheduled = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] *= (update + 1) / warmup
    try:
        yield
    finally:
        for group, lr in zip(opt.param_groups, scheduled, strict=True):
            group["lr"] = lr


class Budget:
    """A wall-clock training budget: sets the learning rate on a cosine from its start value
    down to ``floor`` times it as the budget is spent, and says when it is."""

    def __init__(self, opt: torch.optim.Optimizer, seconds: float, floor: float = 0.1):
        self.opt, self.seconds, self.floor = opt, seconds, floor
        self.base = [g["lr"] for g in opt.param_groups]
        self.start = time.perf_counter()
        self.spent = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def resume(self, elapsed: float) -> None:
        """Go on from a checkpoint: ``elapsed`` seconds of the budget were spent before it."""
        self.start = time.perf_counter() - elapsed

    def step(self) -> bool:
        """After an optimizer step: update the learning rate; True once the budget is spent."""
        frac = min(self.elapsed() / self.seconds, 1.0)
        for group, base in zip(self.opt.param_groups, self.base, strict=True):
            group["lr"] = base * cosine(frac, self.floor)
        self.spent = frac >= 1.0
        return self.spent


STOP = threading.Event()
"""Set by a program that was interrupted (Ctrl-C) while trainings run in other threads of its
process (a sweep's trials): each stops at its next optimizer step, raising ``Stopped``."""


class Stopped(KeyboardInterrupt):
    """A training stopped because ``STOP`` was set."""


def between_steps() -> None:
    """Before each optimizer step: stop if the program was interrupted, and use this process's
    share of the cores (``rnn_models.cores``)."""
    if STOP.is_set():
        raise Stopped("training stopped: the program was interrupted")
    SHARE.rebalance()


def _train_pass(run: TrainingRun, batches: Iterable[Batch], checkpoint: Checkpoint | None) -> tuple[float, int]:
    """One training pass (until the budget, if any, is spent); a resumed epoch skips the
    batches it had done. Returns (mean loss, count)."""
    model, objective, cfg, opt = run.model, run.objective, run.cfg, run.opt
    reset = getattr(objective, "reset", None)
    if reset is not None and run.step == 0:
        reset()  # (resumed half-way, the objective's carried state came with the checkpoint)
    # summed on the device: no host sync per step; a fill and a scalar add, not a tensor built from a
    # Python float, which is a host-to-device copy every epoch (tests/test_cuda.py counts them)
    total = torch.zeros((), device=cfg.device) + run.partial[0]
    count = run.partial[1]
    for k, batch in enumerate(batches):
        if k < run.step:
            continue
        between_steps()
        with autocast(cfg.device, cfg.precision):
            loss, n = objective(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        with warmed_up(opt, run.updates, cfg.warmup):
            opt.step()
        run.updates += 1
        if run.averaged is not None:
            run.averaged.update(model)
        total += loss.detach().float() * n
        count += n
        spent = run.budget is not None and run.budget.step()
        if checkpoint is not None and checkpoint.due() and not spent:
            run.step, run.partial = k + 1, (total.item(), count)
            checkpoint.write(*run.snapshot())
        if spent:
            break
    return mean_over(total, count, "training"), count


def mean_over(total: torch.Tensor, count: int, part: str) -> float:
    """A pass's summed loss over its ``count`` examples; a pass with none is the data's fault,
    not the learning rate's, and says so (its mean would be NaN)."""
    if not count:
        raise NonFiniteLossError(f"no {part} batch: the {part} part is shorter than one batch "
                                 f"(lower --batch-size, or the window: --lookback/--horizon or --num-steps)")
    return total.item() / count


def eval_pass(model: nn.Module, batches: Iterable[Batch], objective: Objective, cfg: TrainConfig) -> float:
    """The mean loss over ``batches``, without gradients."""
    reset = getattr(objective, "reset", None)
    if reset is not None:
        reset()
    total = torch.zeros((), device=cfg.device)
    count = 0
    # on CPU in float32 whatever the training step ran in: the loss of the model as it is served
    precision = cfg.precision if cfg.device.startswith("cuda") else "fp32"
    for batch in batches:
        with autocast(cfg.device, precision):
            loss, n = objective(model, batch)
        total += loss.detach().float() * n
        count += n
    return mean_over(total, count, "validation")


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

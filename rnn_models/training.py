"""A lean, model-agnostic training loop.

It knows batches, a loss and an optimizer, nothing of forecasting or text: the caller passes
``train_batches(generator)`` and ``val_batches()`` (iterables of whatever a batch is) and an
objective ``loss(model, batch) -> (mean loss, count)``. An objective that carries state across
batches (truncated BPTT) may define ``reset()``, called before every pass over the data.

A model made of members (``rnn_models.members.Members``: ensemble members, a sweep's trials)
trains through the same loop (``fit_members``): one step for all members per batch, its loss one
per member, and everything else (optimizer, clipping, warm-up, schedule, moving average, early
stopping, best weights, checkpoint) each member's own, as ``fit`` keeps it for a network alone.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from rnn_models import PRECISIONS, NonFiniteLossError  # defined without torch for the CLI
from rnn_models.checkpoint import Checkpoint
from rnn_models.cores import SHARE, cpu_flags
from rnn_models.gradients import MemberGradients, NetworkGradients
from rnn_models.members import Members
from rnn_models.schedules import Budget, cosine, warmed_up
from rnn_models.training_state import (
    EpochStats,
    FitResult,
    MovingAverage,
    TrainConfig,
    TrainingRun,
    update_averages,
)

__all__ = ["STOP", "Budget", "EpochStats", "FitResult", "MembersApart", "MovingAverage", "NonFiniteLossError",
           "Stopped", "TrainConfig", "TrainStep", "TrainingRun", "autocast", "between_steps", "cosine", "eval_pass",
           "fit", "fit_members", "mean_over", "native_bf16_cpu", "resolve_device", "tensor_batches", "warmed_up"]

Batch = Any
Objective = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]
TrainBatches = Callable[[torch.Generator], Iterable[Batch]]
ValBatches = Callable[[], Iterable[Batch]]
OnEpoch = Callable[[EpochStats, nn.Module], None]


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
    train_batches: TrainBatches,
    val_batches: ValBatches,
    objective: Objective,
    cfg: TrainConfig,
    on_epoch: OnEpoch | None = None,
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
    (result,) = _fit(model, [TrainingRun(model, objective, cfg)], [train_batches], [val_batches], on_epoch,
                     [checkpoint])
    return result


def fit_members(
    model: Members,
    train_batches: Sequence[TrainBatches],
    val_batches: Sequence[ValBatches],
    objective: Objective,
    cfgs: Sequence[TrainConfig],
    checkpoints: Sequence[Checkpoint | None] | None = None,
    on_epoch: OnEpoch | None = None,
) -> list[FitResult]:
    """Train each member of ``model`` as ``fit`` trains a network alone, all of them in one step
    per batch: member k on its own data (``train_batches[k]``, shuffled by ``cfgs[k].seed``,
    validated on ``val_batches[k]``), with its own settings and ``checkpoints[k]``; so each ends
    as it would alone, to float rounding. A member that stops leaves the model's ``active`` and
    costs nothing after. The objective gives one loss per active member (K,); every member's
    pass over its data must hold as many batches, of one size at each step.

    Raises ``MembersApart`` where the members' checkpoints stopped at different places (a run
    killed between two members' writes): they cannot go on together, only one by one."""
    if len({(cfg.device, cfg.precision) for cfg in cfgs}) > 1:
        raise ValueError("a model's members train on one device in one precision")
    runs = [TrainingRun(member, objective, cfg) for member, cfg in zip(model.members, cfgs, strict=True)]
    return _fit(model, runs, train_batches, val_batches, on_epoch, checkpoints or [None] * len(runs))


class MembersApart(ValueError):
    """The members of a model cannot train together from where their checkpoints left them."""


def _fit(model, runs, train_batches, val_batches, on_epoch, checkpoints) -> list[FitResult]:
    with SHARE.claim():
        for run, checkpoint in zip(runs, checkpoints, strict=True):
            run.resume_from(checkpoint)
        if len({(run.epoch, run.step) for run in runs if not run.finished}) > 1:
            raise MembersApart("the members' checkpoints stopped at different places")
        # disable=None: a bar only on a terminal, not in logs
        bar = tqdm(total=max(run.cfg.epochs for run in runs), initial=min(run.epoch for run in runs),
                   desc="train" if len(runs) == 1 else f"train {len(runs)}", unit="epoch", leave=False,
                   disable=None if runs[0].cfg.progress and not all(run.finished for run in runs) else True)
        while running := [k for k, run in enumerate(runs) if not run.finished and run.epoch < run.cfg.epochs]:
            stats = _epoch(model, [runs[k] for k in running], [train_batches[k] for k in running],
                           [val_batches[k] for k in running], [checkpoints[k] for k in running], running)
            bar.update(1)
            bar.set_postfix(train=f"{stats[0].train_loss:.4f}", val=f"{stats[0].val_loss:.4f}")
            for k, epoch_stats in zip(running, stats, strict=True):
                if on_epoch is not None:
                    on_epoch(epoch_stats, runs[k].model)
        bar.close()
        for run in runs:
            run.keep_best()
        return [run.result for run in runs]


def _epoch(model, runs, train_batches, val_batches, checkpoints, running) -> list[EpochStats]:
    """One epoch of every run in ``runs`` (those of ``model``'s members in ``running``): the
    training pass, then each one's validation, record and checkpoint."""
    t0 = time.perf_counter()
    if isinstance(model, Members):
        model.active = running
    model.train()
    epoch = runs[0].epoch + 1
    lrs = [run.begin_epoch(epoch) for run in runs]
    train_losses, n = _train_pass(model, runs, train_batches, checkpoints)
    val_losses = [validate(run, batches(), n) for run, batches in zip(runs, val_batches, strict=True)]
    seconds = (time.perf_counter() - t0) / len(runs)  # each member's share of the epoch's time
    stats = [EpochStats(epoch, train, val, seconds, lr)
             for train, val, lr in zip(train_losses, val_losses, lrs, strict=True)]
    for run, epoch_stats, checkpoint in zip(runs, stats, checkpoints, strict=True):
        run.end_epoch(epoch_stats, checkpoint)  # before on_epoch: an epoch announced (a log line) survives a kill
    return stats


def validate(run: TrainingRun, batches: Iterable[Batch], samples: int) -> float:
    """After a training pass over ``samples`` examples: the validation loss of the weights that
    are scored (the moving average, if any)."""
    run.result.samples += samples
    run.model.eval()
    run.scored.eval()
    with torch.no_grad():
        return eval_pass(run.scored, batches, run.objective, run.cfg)


def _train_pass(model, runs, train_batches, checkpoints) -> tuple[list[float], int]:
    """One training pass of every run (until a budget, if any, is spent): one optimizer step of
    all of them per batch; a resumed epoch skips the batches it had done. Returns each run's mean
    loss and their count of examples."""
    reset = getattr(runs[0].objective, "reset", None)
    if reset is not None and runs[0].step == 0:
        reset()  # (resumed half-way, the objective's carried state came with the checkpoint)
    streams = [batches(run.start_epoch()) for run, batches in zip(runs, train_batches, strict=True)]
    # summed on the device: no host sync per step; a fill and a scalar add, not a tensor built from a
    # Python float, which is a host-to-device copy every epoch (tests/test_cuda.py counts them)
    total = torch.stack([torch.zeros((), device=run.cfg.device) + run.partial[0] for run in runs])
    start, count = runs[0].step, runs[0].partial[1]
    step = TrainStep(model, runs)
    try:
        for k, batches in enumerate(zip(*streams, strict=True)):
            if k < start:
                continue
            between_steps()
            loss, n = step(model.stack(batches) if isinstance(model, Members) else batches[0])
            total += loss.detach().float() * n
            count += n
            spent = any([run.budget.step() for run in runs if run.budget is not None])  # every budget's lr set
            if not spent and any(c is not None and c.due() for c in checkpoints):
                for run, checkpoint, partial in zip(runs, checkpoints, total.tolist(), strict=True):
                    run.step, run.partial = k + 1, (partial, count)
                    if checkpoint is not None:
                        checkpoint.write(*run.snapshot())
            if spent:
                break
    finally:
        step.gradients.release()
    return [mean_over(member_total, count, "training") for member_total in total], count


class TrainStep:
    """One optimizer step of every run per batch: the loss (one per member), its gradients (each
    member's its own loss's), each run's clipping, warm-up, AdamW update and moving average."""

    def __init__(self, model: nn.Module, runs: list[TrainingRun]):
        self.model, self.runs = model, runs
        self.gradients = MemberGradients(runs) if isinstance(model, Members) else NetworkGradients(runs[0])
        self.averaged = [run for run in runs if run.averaged is not None]

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, int]:
        runs, cfg = self.runs, self.runs[0].cfg
        with autocast(cfg.device, cfg.precision):
            loss, n = runs[0].objective(self.model, batch)
        self.gradients.clear()
        (loss.sum() if loss.dim() else loss).backward()  # members are independent: each its own loss's gradient
        self.gradients.clip()
        for run in runs:
            with warmed_up(run.opt, run.updates, run.cfg.warmup):
                run.opt.step()
            run.updates += 1
        if self.averaged:
            update_averages([run.averaged for run in self.averaged], [run.params for run in self.averaged])
        return loss, n


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

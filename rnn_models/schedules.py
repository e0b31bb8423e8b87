"""The learning rate over a training run: a cosine over the epochs or a wall-clock budget, and
a linear warm-up on top of either. They set ``param_groups[...]["lr"]`` of a public optimizer and
nothing else, so they compose with ``ReduceLROnPlateau`` and with each other."""

from __future__ import annotations

import contextlib
import math
import time

import torch


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

"""How a training step holds and clips its gradients: a network's own ``.grad``, cleared and
clipped as ``nn.utils.clip_grad_norm_`` clips it; or, for a model made of members, every member's
gradients in one row of one buffer, so that clearing them is one operation and clipping each
member to its own norm a few, whatever the number of members (a step's small operations cost as
much as its recurrences: docs/BENCHMARKS.md, "One training loop")."""

from __future__ import annotations

import torch
from torch import nn

from rnn_models.training_state import TrainingRun


class NetworkGradients:
    """One network's gradients, as a plain training loop keeps them."""

    def __init__(self, run: TrainingRun):
        self.run = run

    def clear(self) -> None:
        for p in self.run.params:  # opt.zero_grad(set_to_none=True), without its per-call profiling hooks
            p.grad = None

    def clip(self) -> None:
        if self.run.cfg.clip > 0:
            nn.utils.clip_grad_norm_(self.run.params, self.run.cfg.clip)

    def release(self) -> None:
        """(A network keeps its last gradients, as ``fit`` always left them.)"""


class MemberGradients:
    """The gradients of the members in ``runs``, in one (K, P) buffer when the members have as
    many parameters (of one dtype, on one device), member k's row its parameters' ``.grad`` in
    turn; autograd accumulates into them in place. Every parameter of a running member must take
    part in its forward pass (a gradient left at zero would still be decayed by AdamW)."""

    def __init__(self, runs: list[TrainingRun]):
        params = [[p for p in run.params if p.requires_grad] for run in runs]
        first = params[0][0]
        if any(p.dtype != first.dtype or p.device != first.device for member in params for p in member):
            raise ValueError("a model's members keep their parameters in one dtype on one device")
        sizes = [sum(p.numel() for p in member) for member in params]
        self.flat = torch.zeros(sum(sizes), dtype=first.dtype, device=first.device)
        self.parts = list(self.flat.split(sizes))  # member k's gradients, flat
        self.rows = self.flat.view(len(runs), -1) if len(set(sizes)) == 1 else None  # (K, P)
        self.params = [p for member in params for p in member]
        for part, member in zip(self.parts, params, strict=True):
            for p, grad in zip(member, part.split([p.numel() for p in member]), strict=True):
                p.grad = grad.view_as(p)
        clips = [run.cfg.clip if run.cfg.clip > 0 else torch.inf for run in runs]
        self.bound = (None if all(c == torch.inf for c in clips) else clips[0] if len(set(clips)) == 1
                      else torch.tensor(clips, device=first.device))

    def clear(self) -> None:
        self.flat.zero_()

    def clip(self) -> None:
        """Each member's gradients scaled by min(1, clip / (its norm + 1e-6)), as
        ``nn.utils.clip_grad_norm_`` scales one network's."""
        if self.bound is None:
            return
        if self.rows is not None:
            norms = torch.linalg.vector_norm(self.rows, dim=1)  # (K,)
        else:
            norms = torch.stack([torch.linalg.vector_norm(part) for part in self.parts])
        coefs = (norms + 1e-6).reciprocal_().mul_(self.bound).clamp_(max=1.0)
        if self.rows is not None:
            self.rows.mul_(coefs[:, None])
        else:
            torch._foreach_mul_(self.parts, list(coefs.unbind()))

    def release(self) -> None:
        """Let go of the buffer (the parameters' ``.grad``)."""
        for p in self.params:
            p.grad = None

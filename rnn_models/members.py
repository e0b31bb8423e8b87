"""A model made of members: K networks trained as one model, each as it would train alone.

The members are ordinary modules (their parameters are the ones trained, saved and served); the
model runs the ones still training at once, on a batch stacked member by member along a new first
dimension, and its output and loss have that dimension first too: member k's in ``[k]``.
``rnn_models.training.fit_members`` trains it with one run per member (its own optimizer, clipping,
schedule, moving average, early stopping and checkpoint); a member that stops leaves ``active``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Members(nn.Module):
    """Base of a model made of members: ``members`` (all of them), ``active`` (the indices of
    those its forward runs, in order) and ``stack`` (their batches as the one it takes)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.active: list[int] = list(range(len(self.members)))

    def stack(self, batches: Sequence[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """One batch of each active member, (B, ...) tensors alike in shape -> (K, B, ...) tensors."""
        return tuple(torch.stack(parts) for parts in zip(*batches, strict=True))

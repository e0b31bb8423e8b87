"""A from-scratch Elman RNN, h_t = tanh(W·[x_t, h_{t-1}] + b), kept for teaching.

It has the same call signature as ``nn.RNN(batch_first=True)`` so it can be dropped into
:class:`rnn_models.recurrent.Recurrent` as the ``elman`` cell, and ``elman_bptt`` spells out
backpropagation through time by hand so a test can check it against autograd.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class ElmanCell(nn.Module):
    """One step of an Elman network with a single weight over the concatenated [x, h]."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight = nn.Parameter(torch.empty(hidden_size, input_size + hidden_size))
        self.bias = nn.Parameter(torch.empty(hidden_size))
        bound = 1.0 / math.sqrt(hidden_size)  # nn.RNN's initialisation, so the two train alike
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        # x (B, I), h (B, H) -> (B, H)
        return torch.tanh(torch.cat([x, h], dim=-1) @ self.weight.T + self.bias)

    @torch.no_grad()
    def copy_from(self, rnn: nn.RNN, layer: int = 0, suffix: str = "") -> None:
        """Take the weights of one layer/direction of an ``nn.RNN`` (tanh): W = [W_ih, W_hh]."""
        w_ih = getattr(rnn, f"weight_ih_l{layer}{suffix}")
        w_hh = getattr(rnn, f"weight_hh_l{layer}{suffix}")
        self.weight.copy_(torch.cat([w_ih, w_hh], dim=1))
        self.bias.copy_(getattr(rnn, f"bias_ih_l{layer}{suffix}") + getattr(rnn, f"bias_hh_l{layer}{suffix}"))


class ElmanRNN(nn.Module):
    """Stacked (optionally bidirectional) Elman cells unrolled in a Python loop over time."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        bidirectional: bool = False,
        batch_first: bool = True,
    ):
        super().__init__()
        if not batch_first:
            raise ValueError("ElmanRNN supports batch_first=True only")
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.directions = 2 if bidirectional else 1
        self.cells = nn.ModuleList(
            ElmanCell(input_size if layer == 0 else hidden_size * self.directions, hidden_size)
            for layer in range(num_layers)
            for _ in range(self.directions)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None):
        # x (B, T, I), h0 (layers*dirs, B, H) -> out (B, T, dirs*H), h_n (layers*dirs, B, H)
        B, T, _ = x.shape
        if h0 is None:
            h0 = x.new_zeros(self.num_layers * self.directions, B, self.hidden_size)
        finals, layer_in = [], x
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.directions):
                k = layer * self.directions + d
                cell, h = self.cells[k], h0[k]
                steps = range(T) if d == 0 else range(T - 1, -1, -1)
                seq = [None] * T
                for t in steps:
                    h = cell(layer_in[:, t], h)  # (B, H)
                    seq[t] = h
                outs.append(torch.stack(seq, dim=1))  # (B, T, H)
                finals.append(h)
            layer_in = torch.cat(outs, dim=-1)  # (B, T, dirs*H)
            if layer < self.num_layers - 1:
                layer_in = self.dropout(layer_in)  # like nn.RNN: between layers, not after the last
        return layer_in, torch.stack(finals, dim=0)


def elman_bptt(weight: np.ndarray, bias: np.ndarray, xs: np.ndarray, h0: np.ndarray, grad_hs: np.ndarray):
    """Backpropagation through time for one Elman cell, by hand.

    ``xs`` (T, I) are the inputs, ``h0`` (H,) the initial state and ``grad_hs`` (T, H) the
    gradient of the loss with respect to each hidden state from outside the recurrence
    (e.g. from an output layer). Returns (dL/dW, dL/db, dL/dh0).
    """
    T, n_in = xs.shape
    hs = [h0]
    for t in range(T):
        hs.append(np.tanh(weight @ np.concatenate([xs[t], hs[-1]]) + bias))
    d_weight, d_bias = np.zeros_like(weight), np.zeros_like(bias)
    carry = np.zeros_like(h0)  # dL/dh_t arriving from step t+1
    for t in reversed(range(T)):
        dh = grad_hs[t] + carry
        dz = dh * (1.0 - hs[t + 1] ** 2)  # through tanh
        d_weight += np.outer(dz, np.concatenate([xs[t], hs[t]]))
        d_bias += dz
        carry = weight[:, n_in:].T @ dz  # to h_{t-1} through the recurrent half of W
    return d_weight, d_bias, carry

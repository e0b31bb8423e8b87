"""What training K ensemble members together would cost on this CPU, per optimizer step, against
one network: the designs issue #15 names for "members trained as one batched network".

    .venv/bin/python benchmarks/bench_members.py [--members 3] [--threads 2]

The flow's default member (LSTM, hidden 64, lookback 24, one feature, horizon 1, batch 32;
AdamW, clipping) trained by a plain loop, and K of them trained at once three ways:

- one-by-one   -- K x the single network's step (what the flow does today);
- block-diag   -- one nn.LSTM of hidden K*64 whose weights are block-diagonal (each member's
                  block, zeros elsewhere, the zeros' gradients masked): one fused cuDNN/oneDNN
                  call, but K^2 the recurrent multiply-adds of one member, K of them on zeros;
- grouped bmm  -- the K members' weights stacked (K, ., .), the recurrence written out step by
                  step with batched matrix products (torch.baddbmm), autograd through the loop:
                  K x the work of one member, but ~10 small ops per time step.

(torch.func.vmap over nn.LSTM is not an option: PyTorch has no batching rule for aten::lstm.)
Printed: milliseconds per optimizer step (mean of 300 after 20 warm-up; the fastest of
``--repeats`` such runs), and each as a multiple of one network's step. The issue's target is 1.5x for K=3.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

B, L, F, H = 32, 24, 1, 64


def one_network():
    lstm, head = nn.LSTM(F, H, batch_first=True), nn.Linear(H, 1)
    params = [*lstm.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    x, y = torch.randn(B, L, F), torch.randn(B, 1)

    def step():
        _, (h, _) = lstm(x)
        loss = nn.functional.mse_loss(head(h[-1]), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return step


def block_diagonal(k: int):
    lstm, head = nn.LSTM(k * F, k * H, batch_first=True), nn.Linear(k * H, k)
    params = [*lstm.parameters(), *head.parameters()]
    masks = [torch.ones_like(p) for p in params]  # the cost of masking; the pattern does not matter here
    opt = torch.optim.AdamW(params, lr=1e-3)
    x, y = torch.randn(B, L, k * F), torch.randn(B, k)

    def step():
        _, (h, _) = lstm(x)
        loss = nn.functional.mse_loss(head(h[-1]), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch._foreach_mul_([p.grad for p in params], masks)
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return step


def grouped_bmm(k: int):
    w_ih = nn.Parameter(torch.randn(k, F, 4 * H) * 0.1)
    w_hh = nn.Parameter(torch.randn(k, H, 4 * H) * 0.1)
    bias = nn.Parameter(torch.zeros(k, 1, 4 * H))
    w_out, b_out = nn.Parameter(torch.randn(k, H, 1) * 0.1), nn.Parameter(torch.zeros(k, 1, 1))
    params = [w_ih, w_hh, bias, w_out, b_out]
    opt = torch.optim.AdamW(params, lr=1e-3)
    x, y = torch.randn(k, B, L, F), torch.randn(k, B, 1)

    def step():
        xp = torch.matmul(x, w_ih.unsqueeze(1)) + bias.unsqueeze(1)  # (K, B, L, 4H)
        h, c = x.new_zeros(k, B, H), x.new_zeros(k, B, H)
        for t in range(L):
            i, f, g, o = torch.baddbmm(xp[:, :, t], h, w_hh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        loss = ((torch.baddbmm(b_out, h, w_out) - y) ** 2).mean(dim=(1, 2)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def ms_per_step(step, n: int = 300, warm: int = 20) -> float:
    for _ in range(warm):
        step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each; the fastest is shown")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    k = args.members
    steps = {"one network": one_network(), f"{k} block-diagonal": block_diagonal(k), f"{k} grouped bmm": grouped_bmm(k)}
    best = {name: min(ms_per_step(step) for _ in range(args.repeats)) for name, step in steps.items()}
    one = best.pop("one network")
    rows = [("one network", one), (f"{k} one-by-one", k * one), *best.items()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); LSTM hidden {H}, lookback {L}, batch {B}")
    for name, ms in rows:
        print(f"{name:<20} {ms:8.3f} ms/step   {ms / one:5.2f}x one network")


if __name__ == "__main__":
    main()

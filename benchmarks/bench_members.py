"""What training K ensemble members together costs on this CPU against one network: the designs
issue #15 names for "members trained as one batched network", and the one rnnflow uses.

    .venv/bin/python benchmarks/bench_members.py [--members 3] [--threads 2]          # per step
    .venv/bin/python benchmarks/bench_members.py --fit [--members 3] [--epochs 6]     # whole trainings

Per step (the default):

The flow's default member (LSTM, hidden 64, lookback 24, one feature, horizon 1, batch 32;
AdamW, clipping) trained by a plain loop, and K of them trained at once three ways:

- one-by-one   -- K x the single network's step (what the flow does today);
- block-diag   -- one nn.LSTM of hidden K*64 whose weights are block-diagonal (each member's
                  block, zeros elsewhere, the zeros' gradients masked): one fused cuDNN/oneDNN
                  call, but K^2 the recurrent multiply-adds of one member, K of them on zeros;
- grouped bmm  -- the K members' weights stacked (K, ., .), the recurrence written out step by
                  step with batched matrix products (torch.baddbmm), autograd through the loop:
                  K x the work of one member, but ~10 small ops per time step.

- grouped C++   -- rnnflow's ``rnn_models.grouped``: the members' forecasters as one C++ operator
                  with its autograd (every member and slice of the batch its own recurrence, spread
                  over the threads), stepped by the training loop's own step
                  (``rnn_models.training.TrainStep``): one fused AdamW per member, each member
                  clipped to its own norm over one gradient buffer.

(torch.func.vmap over nn.LSTM is not an option: PyTorch has no batching rule for aten::lstm.)
Printed: milliseconds per optimizer step (mean of 300 after 20 warm-up; the fastest of
``--repeats`` such runs), and each as a multiple of one network's step. The issue's target is 1.5x for K=3.

With ``--fit``: the flow's own training code end to end on a noisy sine (2,400 training windows,
validation every epoch, moving average, plateau, fixed ``--epochs`` with no early stopping):
one network (``rnn_models.training.fit``: ``nn.LSTM`` and autograd), one network through the
grouped operation (``fit_grouped`` with one member, as the flow now trains a lone LSTM on the
CPU), K members one by one (``fit`` K times, as the flow trained them before), and K members
grouped (``rnn_models.grouped.fit_grouped``), alternated ``--repeats`` times; the fastest of
each and its multiple of one network.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from rnn_models.forecasting import mse_objective
from rnn_models.grouped import GroupedForecasters, available, fit_grouped
from rnn_models.recurrent import Forecaster, ForecasterConfig
from rnn_models.training import TrainConfig, TrainingRun, TrainStep, fit, tensor_batches

B, L, F, H = 32, 24, 1, 64


def one_network():
    lstm, head = nn.LSTM(F, H, batch_first=True), nn.Linear(H, 1)
    params = [*lstm.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)  # as the flow's TrainingRun
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


def grouped_cpp(k: int):
    members = [Forecaster(ForecasterConfig(cell="lstm", input_size=F, hidden_size=H)) for _ in range(k)]
    runs = [TrainingRun(m, mse_objective, TrainConfig(lr=1e-3, clip=1.0, ema=0.0)) for m in members]
    step = TrainStep(GroupedForecasters(members), runs)
    x, y = torch.randn(k, B, L, F), torch.randn(k, B, 1)
    return lambda: step((x, y))


def whole_trainings(k: int, epochs: int, repeats: int) -> None:
    gen = torch.Generator().manual_seed(1)
    s = torch.sin(torch.arange(3000, dtype=torch.float32) * 0.1) + 0.1 * torch.randn(3000, generator=gen)
    x = torch.stack([s[i:i + L] for i in range(len(s) - L)])[..., None]
    y = s[L:][:, None]
    xt, yt, xv, yv = x[:2400], y[:2400], x[2400:], y[2400:]
    train = lambda g: tensor_batches(xt, yt, batch_size=B, generator=g)  # noqa: E731
    val = lambda: tensor_batches(xv, yv, batch_size=4096)  # noqa: E731
    cfgs = [TrainConfig(epochs=epochs, lr=3e-3, patience=0, lr_patience=3, ema=0.98, seed=i, progress=False)
            for i in range(k)]

    def members():
        out = []
        for i in range(k):
            torch.manual_seed(i)
            out.append(Forecaster(ForecasterConfig(cell="lstm", hidden_size=H)))
        return out

    def one():
        fit(members()[0], train, val, mse_objective, cfgs[0])

    def one_by_one():
        for m, cfg in zip(members(), cfgs, strict=True):
            fit(m, train, val, mse_objective, cfg)

    def grouped():
        fit_grouped(members(), [train] * k, [val] * k, mse_objective, cfgs)

    def one_grouped():
        fit_grouped(members()[:1], [train], [val], mse_objective, cfgs[:1])

    runs = {"one network": one, "1 grouped": one_grouped, f"{k} one-by-one": one_by_one, f"{k} grouped": grouped}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # alternated, so that a slow spell of the machine hits every row
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); LSTM hidden {H}, lookback {L}, "
          f"batch {B}; {epochs} epochs of 2,400 windows; {repeats} alternated trainings of each")
    report(times, "s", "{:7.2f}")


def ms_per_step(step, n: int = 100) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n * 1e3


def report(times: dict[str, list[float]], unit: str, fmt: str) -> None:
    """Each row's fastest time and its multiple of one network's: the median over the repeats of
    the ratio within a repeat (the rows of a repeat run back to back, so a slow spell of this VM
    hits them alike; the fastest times alone may come from different spells)."""
    base = times["one network"]
    for name, ts in times.items():
        ratios = sorted(t / b for t, b in zip(ts, base, strict=True))
        print(f"{name:<20} {fmt.format(min(ts))} {unit}   {ratios[len(ratios) // 2]:5.2f}x one network "
              f"(ratios {ratios[0]:.2f}-{ratios[-1]:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=0, help="alternated timed runs of each (default: 15 steps "
                    "of 100, 5 --fit trainings)")
    ap.add_argument("--fit", action="store_true", help="whole trainings through the flow's code, not single steps")
    ap.add_argument("--epochs", type=int, default=6, help="with --fit: epochs per training")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    k = args.members
    if not available():
        raise SystemExit("the grouped operation could not be built (see the warning above)")
    if args.fit:
        whole_trainings(k, args.epochs, args.repeats or 5)
        return
    steps = {"one network": one_network(), f"{k} block-diagonal": block_diagonal(k), f"{k} grouped bmm": grouped_bmm(k),
             f"{k} grouped C++": grouped_cpp(k)}
    for step in steps.values():  # warm-up
        ms_per_step(step, 20)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats or 15):
        for name, step in steps.items():
            times[name].append(ms_per_step(step))
    times = {"one network": times["one network"], f"{k} one-by-one": [k * t for t in times["one network"]],
             **{name: ts for name, ts in times.items() if name != "one network"}}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); LSTM hidden {H}, lookback {L}, "
          f"batch {B}; {len(times['one network'])} alternated runs of 100 steps")
    report(times, "ms/step", "{:8.3f}")


if __name__ == "__main__":
    main()

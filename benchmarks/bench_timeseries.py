"""Time-series training speed: rnnflow's training path against a plain PyTorch loop and the
seed tutorials' per-time-step loop, on the same data, in one run.

What is measured (wall-clock seconds for ``--epochs`` epochs of training plus a validation pass
each epoch, CPU, default torch thread count):

1. rnnflow   -- ``rnn_models.training.fit`` with ``tensor_batches`` and ``rnn_models.forecasting.mse_objective``
                on a ``Forecaster`` (LSTM), exactly as ``tasks.training.train_forecaster`` builds it
                (patience=0 so every epoch runs, progress bar off); ``rnnflow+ema`` adds the flow's
                default ``--ema 0.98`` (the weights' moving average, updated every step).
2. plain     -- the ceiling: ``nn.LSTM`` + ``nn.Linear`` written out here; tensors in memory,
                randperm + index slicing, AdamW, clip_grad_norm_, one validation pass per epoch.
3. tutorial  -- the seed tutorials' loop: batch size 1, an ``nn.LSTMCell`` stepped over the L
                time steps in Python (same AdamW + clipping, one step per window). Far too slow
                to run in full, so it is timed on a subset of windows and EXTRAPOLATED to the
                same windows x epochs as 1 and 2.

Data: ``rnn_models.synthetic.sine(--points)``, standard-scaled on the training part, windows of
L=24 inputs -> H=1 target, 80/20 chronological train/validation split; LSTM hidden 32, batch 32.
1 and 2 are repeated ``--repeats`` times, interleaved, after one untimed warm-up each.

Run:  cd /work/main && .venv/bin/python benchmarks/bench_timeseries.py [--repeats 5 --epochs 5 --points 4000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from rnn_models.forecasting import mse_objective
from rnn_models.recurrent import Forecaster, ForecasterConfig
from rnn_models.synthetic import sine
from rnn_models.training import TrainConfig, fit, tensor_batches
from rnn_models.transforms import Scale
from rnn_models.windows import Split, make_windows, window_origins
from tasks.training import seed_everything

L, H, HIDDEN, BATCH, VAL_BATCH, LR, WD, CLIP, SEED = 24, 1, 32, 32, 4096, 3e-3, 0.01, 1.0, 0
EMA = 0.98  # the flow's default --ema: a moving average of the weights, validated and kept


def build_data(points: int):
    """(x_train, y_train, x_val, y_val) float32 tensors, built the way tasks.features does."""
    features = sine(points)[["value"]].to_numpy()  # (T, 1)
    split = Split(points, int(points * 0.8), points)  # train 80 %, validation 20 %, no test part
    scaler = Scale(method="standard")
    scaler.fit(features[: split.train_end])
    scaled = scaler.forward(features[None], None)[0][0]
    out = []
    for part in ("train", "val"):
        origins = window_origins(*split.part(part), L, H)
        x, y = make_windows(scaled, scaled[:, 0], origins, L, H)
        out += [torch.from_numpy(x), torch.from_numpy(y)]
    return out


def run_rnnflow(data, epochs: int, ema: float = 0.0) -> float:
    x_tr, y_tr, x_va, y_va = data
    seed_everything(SEED)
    model = Forecaster(ForecasterConfig(cell="lstm", input_size=1, hidden_size=HIDDEN, horizon=H))
    cfg = TrainConfig(epochs=epochs, lr=LR, weight_decay=WD, clip=CLIP, patience=0, device="cpu",
                      seed=SEED, progress=False, ema=ema)
    t0 = time.perf_counter()
    fit(model,
        lambda gen: tensor_batches(x_tr, y_tr, batch_size=BATCH, generator=gen),
        lambda: tensor_batches(x_va, y_va, batch_size=VAL_BATCH),
        mse_objective, cfg)
    return time.perf_counter() - t0


class PlainLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(1, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, H)

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return self.head(h[-1])


def run_plain(data, epochs: int) -> float:
    x_tr, y_tr, x_va, y_va = data
    torch.manual_seed(SEED)
    model = PlainLSTM()
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.perf_counter()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    n = len(x_tr)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, BATCH):
            idx = order[i : i + BATCH]
            loss = nn.functional.mse_loss(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
        model.eval()
        with torch.no_grad():
            for i in range(0, len(x_va), VAL_BATCH):
                nn.functional.mse_loss(model(x_va[i : i + VAL_BATCH]), y_va[i : i + VAL_BATCH]).item()
    return time.perf_counter() - t0


class TutorialLSTM(nn.Module):
    """The tutorials' model: one LSTMCell stepped over time in Python, one window at a time."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(1, HIDDEN)
        self.head = nn.Linear(HIDDEN, H)

    def forward(self, x):  # x (1, L, 1)
        h = c = torch.zeros(1, HIDDEN)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


def time_tutorial(data, n_train: int, n_val: int) -> tuple[float, float]:
    """Seconds per training window and per validation window of the batch-size-1 loop."""
    x_tr, y_tr, x_va, y_va = data
    torch.manual_seed(SEED)
    model = TutorialLSTM()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    order = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(SEED))[:n_train]
    model.train()
    t0 = time.perf_counter()
    for i in order.tolist():
        loss = nn.functional.mse_loss(model(x_tr[i : i + 1]), y_tr[i : i + 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    per_train = (time.perf_counter() - t0) / n_train
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(n_val):
            nn.functional.mse_loss(model(x_va[i : i + 1]), y_va[i : i + 1]).item()
    per_val = (time.perf_counter() - t0) / n_val
    return per_train, per_val


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--points", type=int, default=4000)
    ap.add_argument("--tutorial-windows", type=int, default=400, help="training windows timed for the tutorial loop")
    args = ap.parse_args()

    data = build_data(args.points)
    n_tr, n_va = len(data[0]), len(data[2])
    samples = n_tr * args.epochs  # training windows seen, as FitResult.samples counts them
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; sine({args.points}): "
          f"{n_tr} train / {n_va} val windows, L={L} H={H} hidden={HIDDEN} batch={BATCH}, "
          f"{args.epochs} epochs, {args.repeats} repeats")

    run_rnnflow(data, 1), run_rnnflow(data, 1, EMA), run_plain(data, 1)  # warm-up: allocations, lazy inits
    times = {"rnnflow": [], "rnnflow+ema": [], "plain": []}
    for _ in range(args.repeats):  # interleaved so drift hits all alike
        times["rnnflow"].append(run_rnnflow(data, args.epochs))
        times["rnnflow+ema"].append(run_rnnflow(data, args.epochs, EMA))
        times["plain"].append(run_plain(data, args.epochs))

    n_sub = min(args.tutorial_windows, n_tr)
    per_tr, per_va = time_tutorial(data, n_sub, min(n_sub // 4, n_va))
    tutorial = args.epochs * (n_tr * per_tr + n_va * per_va)

    plain_min, plain_med = min(times["plain"]), statistics.median(times["plain"])
    rows = [(k, min(v), statistics.median(v)) for k, v in times.items()]
    rows.append(("tutorial*", tutorial, tutorial))
    print(f"\n{'path':<10} {'min s':>8} {'median s':>9} {'samples/s':>10} {'x plain (min)':>14} {'x plain (median)':>17}")
    for name, mn, md in rows:
        print(f"{name:<10} {mn:>8.3f} {md:>9.3f} {samples / mn:>10.0f} {mn / plain_min:>14.2f} {md / plain_med:>17.2f}")
    print(f"\n* tutorial: one timing (not repeated), extrapolated from {n_sub} training windows ({n_sub * L / (n_sub * per_tr):.0f} "
          f"time steps/s)\n  and {min(n_sub // 4, n_va)} validation windows to {n_tr} x {args.epochs} + {n_va} x {args.epochs}")
    for path in ("rnnflow", "rnnflow+ema"):
        ratio = min(times[path]) / plain_min
        print(f"{path} / plain = {ratio:.2f}x (target <= 1.25x): {'OK' if ratio <= 1.25 else 'OVER TARGET'}")
    print("all runs, s:", {k: [round(t, 3) for t in v] for k, v in times.items()})


if __name__ == "__main__":
    main()

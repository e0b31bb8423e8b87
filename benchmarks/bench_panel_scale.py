"""How a global model's training scales with the number of series: seconds per epoch and peak
memory, on the CPU and (where present) on a CUDA GPU. Plain PyTorch (``rnn_models`` only), so
it runs on a GPU box without Prefect or MLflow.

    .venv/bin/python benchmarks/bench_panel_scale.py [--cases 400x1000,10000x500] [--devices cpu,cuda]
                                                      [--batch-size 256] [--epochs 1]

Each case (S series x T points, generated: daily seasons, scales 1 to 10^4) runs in its own
process, so its peak resident memory (``ru_maxrss``) is its own; on CUDA the peak is
``torch.cuda.max_memory_allocated`` (beside it, the process's resident memory once torch is
imported and the series generated, before training). One epoch is every training window of every series (the
first 70 % of each series, the validation part at least a horizon; horizon 48, stride 1,
window-norm last; by default the global model's settings for hourly data when this was written: a lookback of 168
read 24 steps per recurrent step), one step per
batch, then the validation windows (the next 10 %): what ``python -m flows.timeseries
--id-column`` does per epoch with these options, the moving average (--ema 0.98) included.
The "materialised" column is what the same windows would take as one float32 array
(windows x (lookback + horizon) x 4 bytes): computed, not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
H = 48


def generate(series: int, length: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    scale = 10 ** rng.uniform(0, 4, size=(series, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(series, 1))
    values = scale * (5 + 2 * np.sin(2 * np.pi * t / 24 + phase) + 0.4 * rng.standard_normal((series, length)))
    return list(values.astype(np.float32))


def one_case(series: int, length: int, device: str, batch_size: int, epochs: int, L: int, patch: int) -> dict:
    import torch

    from rnn_models.forecasting import mse_objective
    from rnn_models.panel import Panel, PanelWindows, encoded_batches
    from rnn_models.recurrent import Forecaster, ForecasterConfig
    from rnn_models.training import TrainConfig, fit
    from rnn_models.transforms import Chain, WindowNorm
    from rnn_models.windows import Split

    values = generate(series, length)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, the series in numpy
    panel = Panel.from_series(values, device=device)
    del values
    split = Split.by_fraction(length, 0.1, 0.2, H)  # the flow's default split
    train_end, val_end = split.train_end, split.val_end
    train = PanelWindows(panel, L, H, np.zeros(series, int), np.full(series, train_end))
    val = PanelWindows(panel, L, H, np.full(series, train_end), np.full(series, val_end))
    chain = Chain([WindowNorm("last")])
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(hidden_size=64, horizon=H, patch=patch)).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fit(model, lambda g: encoded_batches(train, chain, batch_size, g),
                 lambda: encoded_batches(val, chain, 4096), mse_objective,
                 TrainConfig(epochs=epochs, patience=0, ema=0.98, device=device, progress=False))
    seconds = (time.perf_counter() - start) / epochs
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"case": f"{series}x{length}", "device": device, "batch": batch_size, "train_windows": len(train),
            "val_windows": len(val), "seconds_per_epoch": seconds, "windows_per_s": result.samples_per_second,
            "peak_mib": peak, "rss_before_training_mib": rss_data,
            "materialised_mib": (len(train) + len(val)) * (L + H) * 4 / 2**20, "lookback": L, "patch": patch, "val_loss": result.best_val_loss,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else "", "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="400x1000,10000x500")
    p.add_argument("--devices", default="cpu,cuda")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lookback", type=int, default=168)
    p.add_argument("--patch", type=int, default=24)
    p.add_argument("--json", default="", help="also append each row to this JSON-lines file")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # SxT@device: run one case in this process
    args = p.parse_args()
    if args.one:
        case, device = args.one.split("@")
        s, t = map(int, case.split("x"))
        print(json.dumps(one_case(s, t, device, args.batch_size, args.epochs, args.lookback, args.patch)))
        return
    import torch

    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs; lookback {args.lookback}, patch "
          f"{args.patch}, horizon {H}, LSTM 64, "
          f"batch {args.batch_size}, {args.epochs} epoch(s) per case")
    print("\n| series x points | device | train windows | s / epoch | windows/s | peak memory MiB | "
          "process before training MiB | materialised windows MiB |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for device in devices:
        for case in args.cases.split(","):
            out = subprocess.run([sys.executable, __file__, "--one", f"{case}@{device}", "--batch-size",
                                  str(args.batch_size), "--epochs", str(args.epochs), "--lookback", str(args.lookback),
                                  "--patch", str(args.patch)], capture_output=True, text=True)
            if out.returncode:
                print(f"| {case} | {device} | failed: {out.stderr.strip().splitlines()[-1]} |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
            where = f"{device} ({r['gpu']})" if r["gpu"] else f"{device} ({r['threads']} threads)"
            print(f"| {case} | {where} | {r['train_windows']:,} | {r['seconds_per_epoch']:.1f} | "
                  f"{r['windows_per_s']:,.0f} | {r['peak_mib']:,.0f} | {r['rss_before_training_mib']:,.0f} | "
                  f"{r['materialised_mib']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()

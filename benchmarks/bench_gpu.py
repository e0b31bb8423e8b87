"""GPU throughput and quality of rnnflow's training paths, each beside a plain PyTorch loop
doing the same work in the same run. Pure PyTorch (+ numpy): it runs on a GPU machine that
has no Prefect or MLflow. ``scripts/gpu-check.sh`` runs it and keeps its report.

Sections (``--sections``, all by default):

charlm      training tokens/s of ``rnn_models.training.fit`` on a ``CharLM`` (sequential streams,
            state carried, bf16 autocast, fused AdamW, clipping: what ``tasks.training`` runs)
            against a plain loop (``nn.Embedding`` + ``nn.LSTM`` + ``nn.Linear``, the same
            streams, autocast, optimizer and clipping, loss summed on the device). Rows: the
            char-LM flow's default recipe and 2 x 512 LSTMs. Tiny Shakespeare.
forecaster  training windows/s of the default forecaster (LSTM 64, batch 32, moving average of
            the weights) on one M4 Hourly series, against a plain loop.
global      windows/s of one network over all 414 M4 Hourly series: windows gathered lazily
            on the device (``rnn_models.panel``) against the same windows materialised.
scale       seconds per epoch and peak GPU memory of the global model on generated panels:
            400 series x 1,000 points and 10,000 series x 500 points.
quality     the Tiny Shakespeare validation loss (nats/char) ``fit`` reaches in ``--minutes``
            of training (``TrainConfig.minutes``: cosine learning rate over the budget, the
            best epoch kept), one process per ``--recipe`` running side by side on the device.

Timings synchronise the device before reading the clock; each path gets an untimed warm-up
and the two paths of a row run interleaved, ``--repeats`` times (median shown).

Run:  python benchmarks/bench_gpu.py [--sections charlm,forecaster,global,scale,quality] [--json out.jsonl]
      python benchmarks/bench_gpu.py --device cpu --quick   # a smoke run of every section on a CPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a bare checkout on a GPU box, without installing

from bench_charlm import plain_step  # noqa: E402  (benchmarks/ is on the path when run as a script)

from rnn_models.forecasting import mse_objective  # noqa: E402
from rnn_models.panel import Panel, PanelWindows, encode, encoded_batches  # noqa: E402
from rnn_models.recurrent import CharLM, CharLMConfig, Forecaster, ForecasterConfig, Recurrent, RecurrentConfig  # noqa: E402
from rnn_models.text import LanguageModelLoss, Vocab, sequential_batches, val_batch_size  # noqa: E402
from rnn_models.training import TrainConfig, autocast, fit, tensor_batches  # noqa: E402
from rnn_models.transforms import Chain, WindowNorm  # noqa: E402
from rnn_models.windows import make_windows, window_origins  # noqa: E402

DATA = Path(os.environ.get("RNNFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))
WD, CLIP, SEED = 0.01, 1.0, 0
RECIPES = {  # name: (layers, hidden, embedding, dropout, batch, num_steps, lr, weight decay)
    "2x1024-d0.4": (2, 1024, 128, 0.4, 128, 128, 2e-3, 0.1),
    "3x512-d0.3": (3, 512, 128, 0.3, 128, 128, 2e-3, 0.1),
    "2x512-d0.25": (2, 512, 64, 0.25, 64, 100, 2e-3, 0.05),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def emit(args, row: dict) -> None:
    row = {"device": device_name(args.device), **row}
    print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def interleave(paths: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each path, after one untimed warm-up each, the paths interleaved."""
    for fn in paths.values():
        fn()
    times = {k: [] for k in paths}
    for _ in range(repeats):
        for k, fn in paths.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------- char LM speed


def shakespeare(device: str) -> tuple[Vocab, torch.Tensor, torch.Tensor]:
    path = DATA / "tinyshakespeare.txt"
    text = path.read_text(encoding="utf-8").lstrip("\ufeff")
    n_val = int(len(text) * 0.1)
    vocab = Vocab.build(text[:-n_val])
    ids = [torch.tensor(vocab.encode(t), dtype=torch.int64, device=device) for t in (text[:-n_val], text[-n_val:])]
    return vocab, ids[0], ids[1]


class PlainLM(nn.Module):
    """CharLM's layers written out (same creation order, so the same seed gives the same weights)."""

    def __init__(self, vocab: int, embedding: int, hidden: int, layers: int, fp16_rnn: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, embedding)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)
        self.fp16_rnn = fp16_rnn  # True: what bare autocast does to cuDNN's LSTM (float16, no loss scaling)

    def forward(self, x, state=None):
        with torch.autocast("cuda", enabled=self.fp16_rnn and torch.is_autocast_enabled("cuda")):
            out, state = self.lstm(self.embed(x), state)
        return self.head(out), state


def charlm_rnnflow(vocab, train, val, layers, hidden, emb, batch, steps_t, n_steps, device):
    torch.manual_seed(SEED)
    model = CharLM(CharLMConfig(hidden_size=hidden, num_layers=layers, vocab_size=len(vocab),
                                embedding_dim=emb)).to(device)
    val_one = val[: batch * steps_t + 1]  # fit() validates each epoch: one (B, T) batch, as the plain loop does
    cfg = TrainConfig(epochs=1, lr=2e-3, weight_decay=WD, clip=CLIP, patience=0, device=device, seed=SEED,
                      progress=False)
    return lambda: fit(model, lambda g: itertools.islice(sequential_batches(train, batch, steps_t, g), n_steps),
                       lambda: sequential_batches(val_one, batch, steps_t), LanguageModelLoss(carry_state=True), cfg)


def charlm_plain(vocab, train, val, layers, hidden, emb, batch, steps_t, n_steps, device, fp16_rnn=False):
    torch.manual_seed(SEED)
    model = PlainLM(len(vocab), emb, hidden, layers, fp16_rnn).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=WD, fused=device.startswith("cuda"))
    xs = train[: (len(train) - 1) // batch * batch].view(batch, -1)
    ys = train[1 : (len(train) - 1) // batch * batch + 1].view(batch, -1)
    vx, vy = val[: batch * steps_t].view(batch, -1), val[1 : batch * steps_t + 1].view(batch, -1)

    def run():
        state, total = None, torch.zeros((), device=device)
        model.train()
        for t in range(0, n_steps * steps_t, steps_t):
            loss, state = plain_step(model, opt, xs[:, t : t + steps_t], ys[:, t : t + steps_t], state,
                                     lambda: autocast(device))
            total += loss
        model.eval()
        with torch.no_grad(), autocast(device):
            logits, _ = model(vx)
            nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), vy.reshape(-1)).item()
        return total.item()

    return run


def dtypes_under_autocast(device: str) -> str:
    """The dtype a bare nn.LSTM and rnnflow's Recurrent compute in under rnnflow's autocast."""
    lstm, ours = nn.LSTM(8, 8, batch_first=True).to(device), Recurrent(RecurrentConfig(input_size=8, hidden_size=8)).to(device)
    x = torch.randn(2, 3, 8, device=device)
    with autocast(device):
        return f"under autocast nn.LSTM computes in {lstm(x)[0].dtype}, rnnflow's Recurrent in {ours(x)[0].dtype}"


def section_charlm(args) -> None:
    vocab, train, val = shakespeare(args.device)
    emit(args, {"section": "charlm", "note": dtypes_under_autocast(args.device)})
    rows = [("flow default (1x256, emb 64, B32 x T35)", 1, 256, 64, 32, 35),
            ("2x512, emb 64, B64 x T64", 2, 512, 64, 64, 64),
            ("2x512, emb 64, B256 x T128", 2, 512, 64, 256, 128)]
    for label, layers, hidden, emb, batch, steps_t in rows:
        n_steps = min(12 if args.quick else 150, (len(train) - 1) // batch // steps_t)  # one pass at most
        spec = (vocab, train, val, layers, hidden, emb, batch, steps_t, n_steps, args.device)
        paths = {"rnnflow": charlm_rnnflow(*spec), "plain": charlm_plain(*spec)}
        if args.device.startswith("cuda"):
            paths["plain, fp16 RNN"] = charlm_plain(*spec, fp16_rnn=True)
        med = interleave(paths, args.repeats, args.device)
        tokens = n_steps * batch * steps_t
        emit(args, {"section": "charlm", "config": label, "steps": n_steps,
                    **{f"{k} tokens/s": round(tokens / v) for k, v in med.items()},
                    "rnnflow_over_plain": round(med["plain"] / med["rnnflow"], 3)})


# ---------------------------------------------------------------- time series


def m4_hourly() -> tuple[list[str], list[np.ndarray]]:
    """M4 Hourly's training part: ids and one array per series (wide CSV, empty cells after the end)."""
    import pandas as pd

    frame = pd.read_csv(DATA / "m4" / "Hourly-train.csv")
    ids = frame.iloc[:, 0].astype(str).tolist()
    values = frame.iloc[:, 1:].to_numpy(dtype=np.float64)
    return ids, [row[~np.isnan(row)] for row in values]


class PlainForecaster(nn.Module):
    def __init__(self, hidden: int, horizon: int):
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, horizon)

    def forward(self, x):
        with torch.autocast("cuda", enabled=False):  # the recurrence in float32, as rnnflow runs it
            _, (h, _) = self.lstm(x.float())
        return self.head(h[-1])


def plain_forecaster_loop(x_tr, y_tr, x_va, y_va, hidden, horizon, batch, epochs, device, ema=0.98):
    torch.manual_seed(SEED)
    model = PlainForecaster(hidden, horizon).to(device)
    avg = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=WD, fused=device.startswith("cuda"))
    gen = torch.Generator().manual_seed(SEED)

    def run():
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(x_tr), generator=gen).to(device)
            for i in range(0, len(x_tr), batch):
                idx = order[i : i + batch]
                with autocast(device):
                    loss = nn.functional.mse_loss(model(x_tr[idx]).float(), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                opt.step()
                with torch.no_grad():
                    torch._foreach_lerp_(avg, list(model.parameters()), 1 - ema)
            model.eval()
            with torch.no_grad(), autocast(device):
                nn.functional.mse_loss(model(x_va).float(), y_va).item()

    return run


def section_forecaster(args) -> None:
    ids, series = m4_hourly()
    y = series[0]
    L, H, hidden, batch, epochs = 96, 48, 64, 32, (2 if args.quick else 20)
    y = (y - y[:-H].mean()) / y[:-H].std()
    cut = len(y) - H
    arrays = [torch.from_numpy(a).to(args.device) for part in ((0, cut - H), (cut - H, cut))
              for a in make_windows(y[:, None], y, window_origins(*part, L, H), L, H)]
    x_tr, y_tr, x_va, y_va = arrays

    def rnnflow():
        torch.manual_seed(SEED)
        model = Forecaster(ForecasterConfig(hidden_size=hidden, horizon=H)).to(args.device)
        from rnn_models.forecasting import mse_objective

        fit(model, lambda g: tensor_batches(x_tr, y_tr, batch_size=batch, generator=g),
            lambda: tensor_batches(x_va, y_va, batch_size=4096), mse_objective,
            TrainConfig(epochs=epochs, patience=0, ema=0.98, device=args.device, seed=SEED, progress=False))

    med = interleave({"rnnflow": rnnflow, "plain": plain_forecaster_loop(x_tr, y_tr, x_va, y_va, hidden, H, batch,
                                                                          epochs, args.device)},
                     args.repeats, args.device)
    n = len(x_tr) * epochs
    emit(args, {"section": "forecaster", "config": f"M4 {ids[0]}: LSTM {hidden}, L={L} H={H}, batch {batch}, ema 0.98, "
                f"{len(x_tr)} windows x {epochs} epochs", "rnnflow_windows_per_s": round(n / med["rnnflow"]),
                "plain_windows_per_s": round(n / med["plain"]), "rnnflow_over_plain": round(med["plain"] / med["rnnflow"], 3)})


def global_fit(panel: Panel, L: int, H: int, hidden: int, batch: int, epochs: int, device: str, max_steps=None):
    """One network over every series of ``panel``: all but the last H points train, the last H validate."""
    lengths = panel.lengths.cpu().numpy()
    train = PanelWindows(panel, L, H, np.zeros(len(lengths), int), lengths - H)
    val = PanelWindows(panel, L, H, lengths - H, lengths)
    torch.manual_seed(SEED)
    model = Forecaster(ForecasterConfig(hidden_size=hidden, horizon=H)).to(device)
    cfg = TrainConfig(epochs=epochs, patience=0, ema=0.98, device=device, seed=SEED, progress=False)
    cut = (lambda it: itertools.islice(it, max_steps)) if max_steps else (lambda it: it)
    chain = Chain([WindowNorm("last")])  # each window normalised by itself, as a global model's are
    result = fit(model, lambda g: cut(encoded_batches(train, chain, batch, g)), lambda: encoded_batches(val, chain, 8192),
                 mse_objective, cfg)
    return train, val, result


def section_global(args) -> None:
    ids, series = m4_hourly()
    panel = Panel.from_series(series, ids, device=args.device)
    for batch, steps in ((256, 300), (1024, 150)):  # steps per timed run: windows/s needs no whole epoch
        global_row(args, panel, batch, 5 if args.quick else steps)


def global_row(args, panel: Panel, batch: int, steps: int, L=168, H=48, hidden=128) -> None:
    lazy = lambda: global_fit(panel, L, H, hidden, batch, 1, args.device, steps)  # noqa: E731
    train, val, _ = lazy()
    # the same windows materialised up front: what the lazy gather must not be slower than
    chain = Chain([WindowNorm("last")])
    x_all, y_all = encode(chain, *train.gather(torch.arange(len(train), device=args.device))[:2])
    x_val, y_val = encode(chain, *val.gather(torch.arange(len(val), device=args.device))[:2])

    def materialised():
        torch.manual_seed(SEED)
        model = Forecaster(ForecasterConfig(hidden_size=hidden, horizon=H)).to(args.device)
        fit(model, lambda g: itertools.islice(tensor_batches(x_all, y_all, batch_size=batch, generator=g), steps),
            lambda: tensor_batches(x_val, y_val, batch_size=8192), mse_objective,
            TrainConfig(epochs=1, patience=0, ema=0.98, device=args.device, seed=SEED, progress=False))

    med = interleave({"lazy": lazy, "materialised": materialised}, args.repeats, args.device)
    n = min(len(train), steps * batch)
    emit(args, {"section": "global", "config": f"M4 Hourly, {len(panel)} series, LSTM {hidden}, L={L} H={H}, "
                f"batch {batch}, ema 0.98, {len(train):,} windows/epoch, {steps} steps timed",
                "lazy_windows_per_s": round(n / med["lazy"]), "materialised_windows_per_s": round(n / med["materialised"]),
                "lazy_over_materialised": round(med["materialised"] / med["lazy"], 3)})


def section_scale(args) -> None:
    rng = np.random.default_rng(0)
    L, H, hidden, batch = 96, 24, 64, 1024
    for n_series, length in ((400, 1000), (10_000, 500)) if not args.quick else ((40, 300), (200, 200)):
        t = np.arange(length)
        series = [a * (3 + np.sin(2 * np.pi * t / 24 + p)) + rng.normal(0, 0.1 * a, length)
                  for a, p in zip(rng.lognormal(0, 2, n_series), rng.uniform(0, 6.3, n_series), strict=True)]
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        panel = Panel.from_series(series, device=args.device)
        train, _, result = global_fit(panel, L, H, hidden, batch, 1, args.device)
        peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else float("nan")
        emit(args, {"section": "scale", "config": f"{n_series:,} series x {length:,} points, LSTM {hidden}, L={L} H={H}, "
                    f"batch {batch}", "windows_per_epoch": len(train), "seconds_per_epoch": round(result.train_seconds, 2),
                    "windows_per_s": round(result.samples_per_second), "peak_gpu_mib": round(peak, 1),
                    "panel_mib": round(panel.values.numel() * 4 / 2**20, 1),
                    "materialised_windows_would_be_mib": round(len(train) * (L + H) * 4 / 2**20, 1)})
        del panel, train


# ---------------------------------------------------------------- quality in a time budget


def quality_one(args, recipe: str) -> None:
    layers, hidden, emb, dropout, batch, steps_t, lr, wd = RECIPES[recipe]
    vocab, train, val = shakespeare(args.device)
    torch.manual_seed(SEED)
    model = CharLM(CharLMConfig(hidden_size=hidden, num_layers=layers, dropout=dropout, vocab_size=len(vocab),
                                embedding_dim=emb)).to(args.device)
    history = []
    cfg = TrainConfig(epochs=100_000, lr=lr, weight_decay=wd, clip=CLIP, patience=0, minutes=args.minutes,
                      device=args.device, seed=SEED, progress=False)
    vb = val_batch_size(len(val), batch, steps_t)
    result = fit(model, lambda g: sequential_batches(train, batch, steps_t, g), lambda: sequential_batches(val, vb, steps_t),
                 LanguageModelLoss(carry_state=True), cfg,
                 on_epoch=lambda s, m: history.append((s.epoch, round(s.train_loss, 4), round(s.val_loss, 4))))
    emit(args, {"section": "quality", "recipe": recipe, "config": f"LSTM {layers}x{hidden}, emb {emb}, dropout {dropout}, "
                f"B{batch} x T{steps_t}, AdamW lr {lr} cosine to 10 %, wd {wd}", "minutes": args.minutes,
                "best_val_nats": round(result.best_val_loss, 4), "best_epoch": result.best_epoch,
                "epochs": len(result.history), "train_seconds": round(result.train_seconds, 1),
                "tokens_per_s": round(result.samples_per_second), "history": history})


def section_quality(args) -> None:
    """Each recipe in its own process, side by side on the device (so the budget is shared wall time)."""
    if len(args.recipe) == 1:
        return quality_one(args, args.recipe[0])
    procs = [subprocess.Popen([sys.executable, __file__, "--sections", "quality", "--recipe", r, "--device", args.device,
                               "--minutes", str(args.minutes)] + (["--json", args.json] if args.json else []))
             for r in args.recipe]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"quality recipes exited with {codes}")


SECTIONS = {"charlm": section_charlm, "forecaster": section_forecaster, "global": section_global,
            "scale": section_scale, "quality": section_quality}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--minutes", type=float, default=3.0, help="quality: training budget")
    ap.add_argument("--recipe", action="append", choices=sorted(RECIPES), help="quality: repeat for several")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not figures")
    ap.add_argument("--json", help="append every row to this JSON-lines file")
    args = ap.parse_args()
    args.recipe = args.recipe or ["2x1024-d0.4"]
    print(f"torch {torch.__version__}, device {device_name(args.device)}, data {DATA}", flush=True)
    failed = []
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            SECTIONS[name](args)
        except Exception as e:  # one broken section must not cost the others their device time
            failed.append(name)
            emit(args, {"section": name, "error": f"{type(e).__name__}: {e}"})
        print(f"# section {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Character LM on Tiny Shakespeare: rnnflow's training speed against a plain PyTorch loop, and
the validation loss rnnflow's CharLM reaches in a fixed wall-clock budget.

Data (both modes): ``shared/data/tinyshakespeare.txt`` next to the repository, as is (no
lower-casing), last 10 % held out for validation, vocabulary ``rnn_models.text.Vocab`` built on
the training part -- the split and vocabulary ``tasks.text.load_corpus`` makes with
``--val-fraction 0.1`` and lower-casing off.

--mode speed (default): training tokens/s for a fixed number of gradient steps, two ways --

1. rnnflow -- ``rnn_models.training.fit`` (epochs=1, patience=0, progress off) with
              ``sequential_batches`` cut to the first ``--steps`` batches (``itertools.islice``),
              ``LanguageModelLoss(carry_state=True)`` and a ``CharLM`` with embedding input,
              built as ``tasks.training.train_charlm`` builds them.
2. plain   -- the ceiling: ``nn.Embedding`` + ``nn.LSTM`` + ``nn.Linear`` written out here, the
              same B contiguous streams, hidden state carried and detached, AdamW,
              ``clip_grad_norm_(1.0)``, cross-entropy, running loss summed on the device.

fit() always ends its epoch with a validation pass; both paths run the same one, ONE batch of
(B, T) validation characters, so it is inside both timings and costs < 1 % of them. Same seed,
same initial weights and same batches, so both print the same mean training loss. The two are
run ``--repeats`` times, interleaved, after a short untimed warm-up each; min and median shown.

--mode quality: trains rnnflow's CharLM with ``LanguageModelLoss(carry_state=True)`` on the
sequential stream with exactly the step of ``rnn_models.training`` (AdamW, ``--weight-decay``,
gradient clipping, ``--precision``'s autocast) and ONE optimizer for the whole budget -- fit()
builds a fresh AdamW per call, so calling it per chunk would reset Adam's moments. The learning
rate is constant or (``--schedule cosine``) on the flow's ``--minutes`` cosine. Training stops
after ``--minutes`` of TRAINING wall-clock, or after ``--budget-steps`` optimizer steps (the
cosine then over the steps: a CPU run's steps replayed on a faster machine, ``--device cuda``);
every ``--eval-every`` minutes (``--eval-steps`` steps) it evaluates the whole validation part
the way the flow does (sequential streams, state carried, batch min(B, (N_val-1)//T), float32);
evaluation time is not counted in the budget but is printed. The final row is the figure to
compare with issue #15's bar: 1.42 nats/char in 15 minutes on the 2-core CPU.

Run:  cd /work/main && .venv/bin/python benchmarks/bench_charlm.py [--steps 150 --repeats 3]
      cd /work/main && .venv/bin/python benchmarks/bench_charlm.py --mode quality --minutes 15 --threads 2 \
          --layers 2 --hidden 512 --dropout 0.3 --input-dropout 0.1 --lr 4e-3 --warmup 100 --schedule cosine \
          --precision bf16 --batch 32 --num-steps 64 --weight-decay 0.1   # the flow's default recipe
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from rnn_models import PRECISIONS
from rnn_models.recurrent import CharLM, CharLMConfig
from rnn_models.text import LanguageModelLoss, Vocab, mean_loss, sequential_batches
from rnn_models.training import Budget, MovingAverage, TrainConfig, autocast, cosine, fit, warmed_up

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
VAL_FRACTION, WD, CLIP, SEED = 0.1, 0.01, 1.0, 0
BAR_NATS = 1.42  # issue #15's bar for 15 minutes on the 2-core CPU (nanoGPT's GPU transformer: 1.47)


def load_data(path: Path = DATA) -> tuple[Vocab, torch.Tensor, torch.Tensor]:
    """(vocab, train (N,), val (N_val,)) int64, split as tasks.text.load_corpus does."""
    text = path.read_text(encoding="utf-8").lstrip("\ufeff")
    n_val = int(len(text) * VAL_FRACTION)
    train_text, val_text = text[:-n_val], text[-n_val:]
    vocab = Vocab.build(train_text)
    return (vocab, torch.tensor(vocab.encode(train_text), dtype=torch.int64),
            torch.tensor(vocab.encode(val_text), dtype=torch.int64))


# ---------------------------------------------------------------- speed


def charlm(args, vocab_size: int) -> CharLM:
    return CharLM(CharLMConfig(cell="lstm", hidden_size=args.hidden, num_layers=args.layers, dropout=0.0,
                               vocab_size=vocab_size, input="embedding", embedding_dim=args.embedding))


def run_rnnflow(args, vocab_size: int, train, val, steps: int) -> tuple[float, float]:
    torch.manual_seed(SEED)
    model = charlm(args, vocab_size)
    val_batch = val[: args.batch * args.num_steps + 1]  # one (B, T) batch: the tiny pass fit() insists on
    cfg = TrainConfig(epochs=1, lr=args.lr, weight_decay=WD, clip=CLIP, patience=0, device="cpu", seed=SEED,
                      progress=False)
    t0 = time.perf_counter()
    result = fit(model,
                 lambda gen: itertools.islice(sequential_batches(train, args.batch, args.num_steps, gen), steps),
                 lambda: sequential_batches(val_batch, args.batch, args.num_steps),
                 LanguageModelLoss(carry_state=True), cfg)
    seconds = time.perf_counter() - t0
    assert result.samples == steps * args.batch * args.num_steps, result.samples
    return seconds, result.history[-1].train_loss


class PlainLM(nn.Module):
    """Same layers, created in the same order as CharLM's, so the same seed gives the same weights."""

    def __init__(self, vocab_size: int, embedding: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embedding)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, idx, state=None):
        out, state = self.lstm(self.embed(idx), state)
        return self.head(out), state


def plain_step(model, opt, x, y, state, precision=contextlib.nullcontext):
    """One step of the plain loop: forward (state carried in, detached out), cross-entropy,
    backward, clipping, AdamW. Returns (loss, state)."""
    with precision():
        logits, state = model(x, state)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    return loss.detach(), tuple(s.detach() for s in state)


def run_plain(args, vocab_size: int, train, val, steps: int) -> tuple[float, float]:
    torch.manual_seed(SEED)
    model = PlainLM(vocab_size, args.embedding, args.hidden, args.layers)
    B, T = args.batch, args.num_steps
    t0 = time.perf_counter()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=WD)
    # the offset fit()'s generator gives sequential_batches, so both see the same characters
    offset = int(torch.randint(T, (1,), generator=torch.Generator().manual_seed(SEED)))
    n = ((len(train) - 1 - offset) // B) * B
    xs = train[offset : offset + n].view(B, -1)  # B contiguous streams
    ys = train[offset + 1 : offset + 1 + n].view(B, -1)
    model.train()
    state, total = None, torch.zeros(())
    for k in range(steps):
        loss, state = plain_step(model, opt, xs[:, k * T : (k + 1) * T], ys[:, k * T : (k + 1) * T], state)
        total += loss
    model.eval()
    with torch.no_grad():  # the same one-batch validation pass as rnnflow's fit() above
        vx = val[: B * T].view(B, T)
        vy = val[1 : B * T + 1].view(B, T)
        logits, _ = model(vx)
        nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), vy.reshape(-1)).item()
    train_loss = total.item() / steps
    return time.perf_counter() - t0, train_loss


def speed(args, vocab, train, val) -> None:
    tokens = args.steps * args.batch * args.num_steps
    n_params = sum(p.numel() for p in charlm(args, len(vocab)).parameters())
    print(f"mode speed: LSTM {args.layers}x{args.hidden}, embedding {args.embedding}, vocabulary {len(vocab)}, "
          f"{n_params:,} parameters; batch {args.batch} x num_steps {args.num_steps}, {args.steps} steps "
          f"= {tokens:,} training tokens per run, {args.repeats} repeats")

    warm = max(1, min(10, args.steps))
    run_rnnflow(args, len(vocab), train, val, warm), run_plain(args, len(vocab), train, val, warm)  # warm-up
    times: dict[str, list[float]] = {"rnnflow": [], "plain": []}
    losses: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved so drift hits both alike
        for name, run in (("rnnflow", run_rnnflow), ("plain", run_plain)):
            seconds, losses[name] = run(args, len(vocab), train, val, args.steps)
            times[name].append(seconds)

    plain_min, plain_med = min(times["plain"]), statistics.median(times["plain"])
    print(f"\n{'path':<8} {'min s':>8} {'median s':>9} {'tokens/s (min)':>15} {'tokens/s (median)':>18} "
          f"{'x plain (min)':>14} {'x plain (median)':>17} {'train loss':>11}")
    for name, ts in times.items():
        mn, md = min(ts), statistics.median(ts)
        print(f"{name:<8} {mn:>8.3f} {md:>9.3f} {tokens / mn:>15.0f} {tokens / md:>18.0f} "
              f"{plain_min / mn:>14.2f} {plain_med / md:>17.2f} {losses[name]:>11.4f}")
    ratio, ratio_med = plain_min / min(times["rnnflow"]), plain_med / statistics.median(times["rnnflow"])
    print(f"\nrnnflow / plain tokens/s = {ratio:.2f} (min), {ratio_med:.2f} (median) "
          f"(target >= 0.8): {'OK' if ratio >= 0.8 else 'BELOW TARGET'}")
    print("all runs, s:", {k: [round(t, 3) for t in v] for k, v in times.items()})


# ---------------------------------------------------------------- quality


def evaluate(model: CharLM, val: torch.Tensor, batch: int, num_steps: int) -> float:
    """Mean validation cross-entropy (nats/char), computed as tasks.training.train_charlm's fit() does."""
    model.eval()
    loss = mean_loss(model, val, batch, num_steps)
    model.train()
    return loss


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Variational dropout (Gal & Ghahramani): one mask per stream, the same at every time step."""
    if not training or p == 0:
        return x
    return x * x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - p) / (1 - p)


class LockedLM(nn.Module):
    """SCREENING ONLY: a char LM with variational dropout on the embedding, between layers and
    on the output (AWD-LSTM without weight drop), one nn.LSTM a layer."""

    def __init__(self, cfg: CharLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embedding_dim)
        self.layers = nn.ModuleList(nn.LSTM(cfg.embedding_dim if i == 0 else cfg.hidden_size, cfg.hidden_size,
                                            batch_first=True) for i in range(cfg.num_layers))
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, idx, state=None):
        x = locked_dropout(self.embed(idx), self.cfg.input_dropout, self.training)
        hs, cs = [], []
        for i, layer in enumerate(self.layers):
            x, (h, c) = layer(x, None if state is None else (state[0][i : i + 1], state[1][i : i + 1]))
            hs.append(h)
            cs.append(c)
            x = locked_dropout(x, self.cfg.dropout, self.training)
        return self.head(x), (torch.cat(hs), torch.cat(cs))


def build_model(args, vocab_size: int) -> nn.Module:
    cfg = CharLMConfig(cell=args.cell, hidden_size=args.hidden, num_layers=args.layers, dropout=args.dropout,
                       vocab_size=vocab_size, input="embedding", embedding_dim=args.embedding,
                       input_dropout=args.input_dropout)
    return LockedLM(cfg) if args.locked else CharLM(cfg)


def lr_factor(args, frac: float) -> float:
    """The schedule's factor ``frac`` of the way through a budget of steps."""
    if args.schedule == "linear":
        return 1 - (1 - args.lr_floor) * min(frac, 1.0)
    return cosine(frac, args.lr_floor) if args.schedule == "cosine" else 1.0


def quality(args, vocab, train, val) -> None:
    device = args.device
    train, val = train.to(device), val.to(device)
    torch.manual_seed(args.seed)
    model = build_model(args, len(vocab)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"mode quality: {args.cell.upper()} {args.layers}x{args.hidden}, embedding {args.embedding}, dropout "
          f"{args.dropout} (input {args.input_dropout}), vocabulary {len(vocab)}, {n_params:,} parameters; batch "
          f"{args.batch} x num_steps {args.num_steps}, AdamW lr {args.lr} ({args.schedule}, warm-up {args.warmup} "
          f"steps) weight decay {args.weight_decay}, clip {args.clip}, "
          f"seed {args.seed}; "
          f"{len(train):,} train / {len(val):,} val characters")
    if args.budget_steps:
        print(f"budget {args.budget_steps} optimizer steps (lr {args.schedule} over them), validation every "
              f"{args.eval_steps} steps\n")
    else:
        print(f"budget {args.minutes} min of training wall-clock (lr {args.schedule}), validation every "
              f"{args.eval_every} min of training (evaluation time not counted)\n")

    objective = LanguageModelLoss(carry_state=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=(0.9, args.beta2))  # one for the budget
    ema = MovingAverage(model, args.ema) if args.ema else None
    gen = torch.Generator().manual_seed(args.seed)
    budget, every = args.minutes * 60.0, args.eval_every * 60.0
    # --schedule cosine: the flow's --minutes schedule (rnn_models.training.Budget); with --budget-steps
    # the same cosine over steps instead of seconds, to replay a CPU run's steps on a faster machine
    clock = Budget(opt, budget, args.lr_floor) if args.schedule == "cosine" and not args.budget_steps else None
    trained, next_eval, steps, epoch, eval_seconds = 0.0, every, 0, 0, 0.0
    rows: list[tuple[float, int, float, float]] = []
    print(f"{'train min':>9} {'steps':>7} {'epochs':>7} {'train loss':>11} {'val nats/char':>14} {'val bits/char':>14}")

    def report(train_loss: float) -> None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        v = evaluate(ema.module if ema else model, val, args.batch, args.num_steps)
        eval_seconds += time.perf_counter() - t0
        rows.append((trained / 60, steps, v, v / math.log(2)))
        print(f"{trained / 60:>9.2f} {steps:>7d} {steps / steps_per_epoch:>7.2f} {train_loss:>11.4f} "
              f"{v:>14.4f} {v / math.log(2):>14.4f}", flush=True)

    steps_per_epoch = ((len(train) - 1) // args.batch) // args.num_steps
    def done() -> bool:
        return steps >= args.budget_steps if args.budget_steps else trained >= budget

    def eval_due() -> bool:
        return steps % args.eval_steps == 0 if args.budget_steps else trained >= next_eval

    model.train()
    while not done():
        epoch += 1
        objective.reset()  # a new pass starts the streams from a fresh state, as fit() does
        window, window_n = torch.zeros((), device=device), 0
        for batch in sequential_batches(train, args.batch, args.num_steps, gen):
            t0 = time.perf_counter()
            with autocast(device, args.precision):
                loss, n = objective(model, batch)  # the step of rnn_models.training._run_pass
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            with warmed_up(opt, steps, args.warmup):  # the flow's warm-up, on top of either schedule
                opt.step()
            if ema is not None:
                ema.update(model)
            window += loss.detach()
            window_n += 1
            steps += 1
            if clock is not None:
                clock.step()
            elif args.budget_steps and args.schedule != "constant":
                for group in opt.param_groups:
                    group["lr"] = args.lr * lr_factor(args, steps / args.budget_steps)
            trained += time.perf_counter() - t0
            if eval_due() or done():
                report(window.item() / window_n)
                window, window_n = torch.zeros((), device=device), 0
                next_eval += every
            if done():
                break

    final, best = rows[-1], min(rows, key=lambda r: r[2])
    print(f"\nfinal after {final[0]:.2f} min of training ({steps} steps, {steps / steps_per_epoch:.2f} epochs, "
          f"{steps * args.batch * args.num_steps / trained:.0f} tokens/s): validation {final[2]:.4f} nats/char = "
          f"{final[3]:.4f} bits/char (best {best[2]:.4f} at {best[0]:.2f} min); the bar: {BAR_NATS} nats/char "
          f"({'reached' if final[2] <= BAR_NATS else f'{final[2] - BAR_NATS:+.4f} nats/char'})")
    print(f"evaluation {eval_seconds:.1f} s in total (not in the budget); config: {vars(args)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("speed", "quality"), default="speed")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--steps", type=int, default=150, help="speed: gradient steps per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="speed: timed runs of each path")
    ap.add_argument("--minutes", type=float, default=15.0, help="quality: training wall-clock budget")
    ap.add_argument("--eval-every", type=float, default=1.0, help="quality: minutes of training between evaluations")
    ap.add_argument("--cell", default="lstm", help="quality: lstm, gru, rnn or elman (speed is always LSTM)")
    ap.add_argument("--hidden", type=int, default=None, help="default: 256 (speed), 512 (quality)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--embedding", type=int, default=64)
    ap.add_argument("--dropout", type=float, default=0.0, help="quality: between stacked layers and on the output")
    ap.add_argument("--num-steps", type=int, default=None, help="default: 64 (speed), 128 (quality)")
    ap.add_argument("--batch", type=int, default=None, help="default: 32 (speed), 64 (quality)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=WD, help="quality: AdamW's decoupled weight decay")
    ap.add_argument("--schedule", choices=("constant", "cosine", "linear"), default="constant",
                    help="quality: the learning rate over the budget (cosine: the flow's --minutes schedule)")
    ap.add_argument("--lr-floor", type=float, default=0.1, help="quality: the cosine's end, a fraction of --lr")
    ap.add_argument("--budget-steps", type=int, default=0,
                    help="quality: a budget of optimizer steps instead of --minutes (replays a CPU run's steps)")
    ap.add_argument("--eval-steps", type=int, default=200, help="quality, with --budget-steps: steps between evaluations")
    ap.add_argument("--device", default="cpu", help="quality: cpu or cuda")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="quality: the training step's autocast (rnn_models.training.autocast)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--clip", type=float, default=CLIP, help="quality: the gradient norm clip")
    ap.add_argument("--warmup", type=int, default=0, help="quality: the flow's --warmup (steps of linear warm-up)")
    ap.add_argument("--input-dropout", type=float, default=0.0, help="quality: the flow's --input-dropout")
    # screening only (the GPU replays of docs/gpu/charlm-recipes2): options the flow does not have
    ap.add_argument("--beta2", type=float, default=0.999, help="quality: AdamW's second-moment decay")
    ap.add_argument("--locked", action="store_true", help="quality: variational (time-locked) dropout masks")
    ap.add_argument("--ema", type=float, default=0.0, help="quality: evaluate an EMA of the weights (decay)")
    args = ap.parse_args()
    quality_mode = args.mode == "quality"
    for name, s, q in (("hidden", 256, 512), ("num_steps", 64, 128), ("batch", 32, 64)):
        if getattr(args, name) is None:
            setattr(args, name, q if quality_mode else s)

    torch.set_num_threads(args.threads)
    vocab, train, val = load_data(args.data)
    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}; {args.data.name}: "
          f"{len(train):,} train / {len(val):,} val characters (last {VAL_FRACTION:.0%}), vocabulary {len(vocab)}")
    (quality if quality_mode else speed)(args, vocab, train, val)


if __name__ == "__main__":
    main()

"""K forecasters of one shape trained as one batched network on the CPU.

Ensemble members differ only in their seed: same shape, own weights, own shuffling of the same
windows (``--auto``'s candidates: same shape, each its own windows). :class:`GroupedForecasters`
runs the K members' forward and backward passes as one operation per layer
(``csrc/grouped_lstm.cpp``: every member and slice of the batch an independent recurrence,
spread over the threads; one recurrent product and one fused gate pass per time step), so that
K members cost far less than K times one network. The members stay ordinary
:class:`~rnn_models.recurrent.Forecaster` modules: their parameters are the ones trained, and
what is saved and served is unchanged.

The operation is C++ compiled on first use (``torch.utils.cpp_extension``, 10-30 s, cached in
the Python environment; ``python -m rnn_models.grouped`` builds it ahead, as ``make install``
does). Where it cannot be built, or a member's shape is not one it covers (:func:`groupable`),
members train one by one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rnn_models.checkpoint import Checkpoint
from rnn_models.cores import SHARE, cpu_flags
from rnn_models.forecasting import ForecastObjective
from rnn_models.recurrent import Forecaster, ForecasterConfig
from rnn_models.training import EpochStats, FitResult, TrainConfig, TrainingRun, between_steps, mean_over

SOURCE = Path(__file__).resolve().parent / "csrc" / "grouped_lstm.cpp"
# -ffast-math lets the gate loops call glibc's vector exp and tanh; it is not passed to the link,
# which would set flush-to-zero for the whole process
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
log = logging.getLogger(__name__)


def build_directory() -> Path:
    """Where the compiled operation is cached: inside the Python environment, keyed by the
    source, the flags, torch's version and the CPU's instruction sets (it is compiled for this
    CPU: an environment copied to another machine builds its own rather than crash)."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([torch.__version__, *CFLAGS, cpu_flags()]).encode())
    return Path(sys.prefix) / "rnnflow-ext" / f"grouped-{key.hexdigest()[:12]}"


def available() -> bool:
    """Whether the grouped operation is loaded (built first if need be); False, with the reason
    logged once, where it cannot be built (no C++ compiler, say). A build happens in a folder of
    its own and its library is renamed into place whole, so runs that start at once on a fresh
    install each build or load a complete one, and an interrupted build leaves nothing behind.
    Threads of one process (a sweep's trials) take turns: the library is loaded once.
    ``RNNFLOW_GROUPED=0`` turns it off: every network then trains through ``nn.LSTM``."""
    if turned_off():
        return False
    with _LOADING:
        return _load()


_LOADING = threading.Lock()


def turned_off() -> bool:
    """``RNNFLOW_GROUPED=0``: the operation is not used, as where it cannot be built."""
    return os.environ.get("RNNFLOW_GROUPED", "1").strip() == "0"


@functools.cache
def _load() -> bool:
    library = build_directory() / "rnnflow_grouped.so"
    try:
        if library.exists():
            torch.ops.load_library(str(library))
        else:
            from torch.utils import cpp_extension

            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent, prefix="build-") as tmp:
                cpp_extension.load("rnnflow_grouped", [str(SOURCE)], build_directory=tmp, extra_cflags=CFLAGS,
                                   extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
                os.replace(Path(tmp) / library.name, library)  # loaded already, from its build folder
    except Exception as exc:  # noqa: BLE001 -- any build failure means: train one by one
        log.warning("grouped training unavailable, members train one by one (%s)",
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
        return False
    return True


def groupable(model: Forecaster) -> bool:
    """Whether a forecaster is one the grouped operation covers: a shape it covers
    (``groupable_shape``), float32 on the CPU."""
    return groupable_shape(model.cfg) and all(p.dtype == torch.float32 and p.device.type == "cpu"
                                              for p in model.parameters())


def groupable_shape(cfg: ForecasterConfig) -> bool:
    """LSTM cells, one direction, a hidden size that is a multiple of 16 (the operation's vector
    blocks), no dropout between layers (random masks could not match one-by-one training). Read
    from the config alone: building a network to ask would draw its weights from torch's global
    random generator, which another thread may have just seeded for its own network."""
    return (cfg.cell == "lstm" and not cfg.bidirectional and (cfg.num_layers == 1 or cfg.dropout == 0.0)
            and cfg.hidden_size % 16 == 0)


class GroupedForecasters:
    """K forecasters of one groupable shape, run together without autograd: ``forward(x)`` with
    x (K, B, L, F), member k's windows in x[k], gives every member's output (K, B, H[, Q]) and
    what its backward pass needs; ``backward(tape, grad)`` gives each member's parameter gradients
    from the outputs' gradient, in ``params`` order (each member's ``parameters()`` in turn). The
    recurrence runs in the C++ operation, one call per layer for all members; the heads are batched
    matrix products. No autograd: the outputs' gradient comes from the objective's own derivative
    (``GroupStep``)."""

    def __init__(self, members: list[Forecaster]):
        first = members[0].cfg
        if not all(groupable(m) and m.cfg == first for m in members):
            raise ValueError("grouped members must share one groupable shape (see rnn_models.grouped.groupable)")
        self.members, self.cfg = members, first
        rnns = [m.encoder.rnn for m in members]
        self.layers = [[[getattr(r, f"{name}_l{layer}") for r in rnns]
                        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                       for layer in range(first.num_layers)]
        self.params = [p for m in members for p in m.parameters()]
        names = [f"encoder.rnn.{n}_l{layer}" for layer in range(first.num_layers)
                 for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")] + ["head.weight", "head.bias"]
        assert [n for n, _ in members[0].named_parameters()] == names, "backward's gradients follow this order"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        cfg = self.cfg
        if cfg.patch > 1:  # as Forecaster.forward: the window in segments of P steps
            P = cfg.patch
            x = x[:, :, x.shape[2] % P:].reshape(*x.shape[:2], -1, P * x.shape[3])
        seq, tape = x.transpose(1, 2).contiguous(), []  # time-major (K, T, B, I)
        for w_ih, w_hh, b_ih, b_hh in self.layers:
            h, c, gates = torch.ops.rnnflow_grouped.lstm_forward(seq, w_ih, w_hh, b_ih, b_hh)
            tape.append((seq, h, c, gates))
            seq = h[:, 1:]
        last = h[:, -1]  # (K, B, H)
        w_out = torch.stack([m.head.weight for m in self.members])  # (K, O, H)
        b_out = torch.stack([m.head.bias for m in self.members])  # (K, O)
        out = torch.baddbmm(b_out.unsqueeze(1), last, w_out.transpose(1, 2))  # (K, B, O)
        tape.append((last, w_out))
        return (out.view(*out.shape[:2], cfg.horizon, -1) if cfg.quantiles else out), tape

    @torch.no_grad()
    def backward(self, tape: list, grad: torch.Tensor) -> list[torch.Tensor]:
        """The gradients of every member, stacked: one (K, ...) tensor per parameter of a member,
        in ``parameters()`` order (see ``unstacked``); b_ih's and b_hh's are one tensor, twice."""
        grad = grad.reshape(*grad.shape[:2], -1)  # (K, B, O)
        last, w_out = tape.pop()
        head_w = torch.bmm(grad.transpose(1, 2), last)  # (K, O, H)
        head_b = grad.sum(1)  # (K, O)
        grad = torch.bmm(grad, w_out)  # dL/dh_T (K, B, H)
        per_layer = []
        for layer in reversed(range(len(self.layers))):
            seq, h, c, gates = tape[layer]
            w_ih, w_hh, _, _ = self.layers[layer]
            grad, dw_ih, dw_hh, db = torch.ops.rnnflow_grouped.lstm_backward(grad, seq, w_ih, w_hh, h, c, gates,
                                                                           layer > 0)
            per_layer.insert(0, (dw_ih, dw_hh, db))
        return [t for dw_ih, dw_hh, db in per_layer for t in (dw_ih, dw_hh, db, db)] + [head_w, head_b]


def unstacked(stacked: list[torch.Tensor]) -> list[torch.Tensor]:
    """``GroupedForecasters.backward``'s gradients, member k's (K, ...) slices in turn: the order
    of ``GroupedForecasters.params``."""
    return [t[k] for k in range(len(stacked[0])) for t in stacked]


def fit_grouped(members: list[Forecaster], train_batches: list[Callable[[torch.Generator], Iterable]],
                val_batches: list[Callable[[], Iterable]], objective: ForecastObjective, cfgs: list[TrainConfig],
                checkpoints: list[Checkpoint | None] | None = None) -> list[FitResult] | None:
    """Train K members at once: what ``rnn_models.training.fit`` does for each, one optimizer
    step for all per batch. Each member keeps its own state as ``fit`` keeps it (its data, its
    seed's shuffling of it, AdamW, gradient clipping, moving average, learning-rate plateau,
    early stopping, best weights, checkpoint), so each ends as it would trained alone, to float
    rounding; a member that stops early leaves the group and costs nothing after. Member k's
    training and validation batches are ``train_batches[k]`` and ``val_batches[k]`` (the same
    function for every member, or each its own data set); every member's pass over its training
    data must hold as many batches, of one size at each step.

    Returns each member's result, or None where the members cannot go on together: a budget
    (``minutes``), or checkpoints that stopped at different places (a run killed between two
    members' writes); the caller then trains them one by one, from the same checkpoints."""
    with SHARE.claim():
        return _fit_grouped(members, train_batches, val_batches, objective, cfgs, checkpoints)


def _fit_grouped(members, train_batches, val_batches, objective, cfgs, checkpoints) -> list[FitResult] | None:
    checkpoints = checkpoints or [None] * len(members)
    runs = [TrainingRun(m, objective, cfg) for m, cfg in zip(members, cfgs, strict=True)]
    if any(run.budget is not None for run in runs):
        return None
    for run, ckpt in zip(runs, checkpoints, strict=True):
        run.resume_from(ckpt)
    active = [k for k, run in enumerate(runs) if not run.finished]
    if len({(runs[k].epoch, runs[k].step) for k in active}) > 1:
        return None
    cfg = cfgs[0]
    bar = tqdm(total=cfg.epochs, initial=runs[active[0]].epoch if active else cfg.epochs, desc=f"train {len(members)}",
               unit="epoch", leave=False, disable=None if cfg.progress and active else True)
    while active:
        t0 = time.perf_counter()
        group = GroupedForecasters([members[k] for k in active])
        epoch = runs[active[0]].epoch + 1
        lrs = [runs[k].begin_epoch(epoch) for k in active]
        losses = _train_pass_grouped(group, [runs[k] for k in active], [train_batches[k] for k in active],
                                     objective, [checkpoints[k] for k in active])
        seconds = (time.perf_counter() - t0) / len(active)  # each member's share of the group's time
        for k, lr, train_loss in zip(active, lrs, losses, strict=True):
            run = runs[k]
            val_loss = run.validate(val_batches[k](), run.partial[1])
            run.end_epoch(EpochStats(epoch, train_loss, val_loss, seconds, lr), checkpoints[k])
        bar.update(1)
        active = [k for k in active if not runs[k].finished]
    bar.close()
    for run in runs:
        run.keep_best()
    return [run.result for run in runs]


def _train_pass_grouped(group: GroupedForecasters, runs: list[TrainingRun], train_batches: list, objective,
                        checkpoints: list[Checkpoint | None]) -> list[float]:
    """One pass over every member's shuffling of the batches; the members' mean losses. Leaves
    each run's ``partial`` at (summed loss, count) of the whole pass, for the caller."""
    start = runs[0].step
    streams = [batches(run.start_epoch()) for run, batches in zip(runs, train_batches, strict=True)]
    total = torch.tensor([run.partial[0] for run in runs])
    count = runs[0].partial[1]
    step = GroupStep(group, runs, objective)
    for i, batches in enumerate(zip(*streams, strict=True)):
        if i < start:
            continue
        between_steps()
        losses = step(torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches]))
        n = len(batches[0][0])
        total += losses * n
        count += n
        if any(c is not None and c.due() for c in checkpoints):
            for run, ckpt, t in zip(runs, checkpoints, total.tolist(), strict=True):
                run.step, run.partial = i + 1, (t, count)
                if ckpt is not None:
                    ckpt.write(*run.snapshot())
    step.close()
    for run, t in zip(runs, total.tolist(), strict=True):
        run.partial = (t, count)
    return [mean_over(t, count, "training") for t in total]  # no batch: the data's fault, said as in fit


@functools.cache
def keep_freed_memory() -> None:
    """glibc gives freed blocks over 128 KiB back to the OS at once, so the grouped step's buffers
    (megabytes, made and freed every step) come back as fresh pages, each one faulted in and
    zeroed (docs/BENCHMARKS.md, "Ensemble members trained together"). Keep them in the heap instead
    (blocks up to 32 MiB, 256 MiB of free heap before trimming). A setting of the whole process,
    made once, and only where the C library has ``mallopt``."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
        mallopt(M_TRIM_THRESHOLD, 256 << 20)


class GroupStep:
    """One optimizer step of every member of ``group`` (its members being ``runs``' models): the
    members' outputs in one pass, each member's loss, one backward pass, each member's gradient
    clipped to its own norm, then one fused AdamW update and one moving-average update for all
    members. Each member's optimizer state stays in its own optimizer, as a step of its own
    (``fused=True``, as ``TrainingRun`` makes it) would leave it."""

    def __init__(self, group: GroupedForecasters, runs: list[TrainingRun], objective: ForecastObjective):
        self.group, self.runs, self.objective = group, runs, objective
        keep_freed_memory()
        self.params = group.params
        assert all(a is b for a, b in zip(self.params, [p for run in runs for p in run.model.parameters()],
                                          strict=True)), "the runs must be the group's members, in order"
        self.per_member = len(self.params) // len(runs)
        clips = [run.cfg.clip for run in runs]
        self.clip = torch.tensor(clips) if all(clips) else None
        if self.clip is None and any(clips):
            raise ValueError("grouped members clip alike: all of them or none")
        self.states: list[list[torch.Tensor]] = []  # each parameter's step, exp_avg, exp_avg_sq
        # every member's gradients in one row of one buffer, so that clipping each member to its own
        # norm is two operations; the parameters' .grad are views into it, set once
        shapes = [p.shape for p in self.params[:self.per_member]]
        sizes = [p.numel() for p in self.params[:self.per_member]]
        self.flat = torch.zeros(len(runs), sum(sizes))
        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        self.stacked = [self.flat[:, a:a + n].view(len(runs), *shape) for a, n, shape in zip(starts, sizes, shapes,
                                                                                               strict=True)]
        self.grads = unstacked(self.stacked)
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (K, B, L, F), y (K, B, H): member k's batch in [k]. Returns the losses (K,), detached."""
        out, tape = self.group.forward(x)
        losses, grad_out = self.objective.per_member(out, y)
        for into, grad in zip(self.stacked, self.group.backward(tape, grad_out), strict=True):
            into.copy_(grad)
        if self.clip is not None:  # nn.utils.clip_grad_norm_ on each member's gradients
            coef = (self.clip / (torch.linalg.vector_norm(self.flat, dim=1) + 1e-6)).clamp_(max=1.0)
            self.flat.mul_(coef[:, None])
        self._adamw(self.grads)
        self._average()
        return losses

    def close(self) -> None:
        """Let go of the gradient buffer (the parameters' .grad)."""
        for p in self.params:
            p.grad = None

    def _adamw(self, grads: list[torch.Tensor]) -> None:
        plan: dict[tuple, list[int]] = {}
        for k, run in enumerate(self.runs):
            scale = (run.updates + 1) / run.cfg.warmup if run.updates < run.cfg.warmup else 1.0  # as warmed_up
            (group,) = run.opt.param_groups
            plan.setdefault((group["lr"] * scale, *group["betas"], group["weight_decay"], group["eps"]), []).append(k)
            run.updates += 1
        if not self.states:  # AdamW's own lazy initialisation, for a fused optimizer
            for k, run in enumerate(self.runs):
                for p in self.params[k * self.per_member:(k + 1) * self.per_member]:
                    state = run.opt.state[p]
                    if not state:
                        state.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                                     exp_avg_sq=torch.zeros_like(p))
            self.states = [[run.opt.state[p][name] for run in self.runs for p in run.model.parameters()]
                           for name in ("step", "exp_avg", "exp_avg_sq")]
        steps, exp_avgs, exp_avg_sqs = self.states
        for (lr, beta1, beta2, weight_decay, eps), members in plan.items():
            chosen = None if len(plan) == 1 else [k * self.per_member + j for k in members
                                                  for j in range(self.per_member)]
            ps, gs, ms, vs, ss = (ts if chosen is None else [ts[i] for i in chosen]
                                  for ts in (self.params, grads, exp_avgs, exp_avg_sqs, steps))
            torch._foreach_add_(ss, 1)
            torch._fused_adamw_(ps, gs, ms, vs, [], ss, amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
                                weight_decay=weight_decay, eps=eps, maximize=False, grad_scale=None, found_inf=None)

    def _average(self) -> None:
        averaged = [run.averaged for run in self.runs]
        if all(a is None for a in averaged):
            return
        if any(a is None for a in averaged) or len({(a.decay, a.started) for a in averaged}) > 1:
            for run in self.runs:
                if run.averaged is not None:
                    run.averaged.update(run.model)
            return
        targets = [p for a in averaged for p in a.averaged]
        with torch.no_grad():
            if averaged[0].started:
                torch._foreach_lerp_(targets, self.params, 1.0 - averaged[0].decay)
            else:
                torch._foreach_copy_(targets, self.params)
        for a in averaged:
            a.started = True


if __name__ == "__main__":  # `python -m rnn_models.grouped`: build the operation now, not at the first run
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok = available()
    print(f"grouped LSTM operation {'ready' if ok else 'NOT available'}: {build_directory()}")
    sys.exit(0 if ok else 1)

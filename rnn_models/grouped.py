"""K forecasters of one shape trained as one batched network on the CPU.

Ensemble members differ only in their seed: same shape, own weights, own shuffling of the same
windows (``--auto``'s candidates: same shape, each its own windows). :class:`GroupedForecasters`
is a model made of them (``rnn_models.members``) whose forward pass is one PyTorch operator,
``torch.ops.rnnflow_grouped.forecast`` (``csrc/``: every member and slice of the batch an
independent recurrence, spread over the threads; one recurrent product and one fused gate pass
per time step), with its backward pass registered for autograd. So the one training loop
(``rnn_models.training.fit_members``) trains it as any model, and K members cost far less than
K times one network. The members stay ordinary :class:`~rnn_models.recurrent.Forecaster`
modules: their parameters are the ones trained, and what is saved and served is unchanged.

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
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from rnn_models.checkpoint import Checkpoint
from rnn_models.cores import cpu_flags
from rnn_models.forecasting import ForecastObjective
from rnn_models.members import Members
from rnn_models.recurrent import Forecaster, ForecasterConfig
from rnn_models.training import FitResult, MembersApart, TrainConfig, fit_members

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / "grouped_lstm.cpp", CSRC / "grouped_forecast.cpp"]
# -ffast-math lets the gate loops call glibc's vector exp and tanh, at the CPU's widest vectors
# (GCC prefers 256-bit ones on some AVX-512 CPUs: docs/BENCHMARKS.md, "One training loop"); it is
# not passed to the link, which would set flush-to-zero for the whole process
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-ffast-math"]
log = logging.getLogger(__name__)


def build_directory() -> Path:
    """Where the compiled operation is cached: inside the Python environment, keyed by the
    sources, the flags, torch's version and the CPU's instruction sets (it is compiled for this
    CPU: an environment copied to another machine builds its own rather than crash)."""
    code = b"".join(path.read_bytes() for path in SOURCES)
    key = hashlib.sha256(code + " ".join([torch.__version__, *CFLAGS, cpu_flags()]).encode())
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
                cpp_extension.load("rnnflow_grouped", [str(path) for path in SOURCES], build_directory=tmp,
                                   extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], is_python_module=False,
                                   verbose=False)
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
    """LSTM cells, one direction, no decoder of covariates known ahead, a hidden size that is a
    multiple of 16 (the operation's vector blocks), no dropout between layers (random masks could
    not match one-by-one training). Read from the config alone: building a network to ask would
    draw its weights from torch's global random generator, which another thread may have just
    seeded for its own network."""
    return (cfg.cell == "lstm" and not cfg.bidirectional and not cfg.future_size
            and (cfg.num_layers == 1 or cfg.dropout == 0.0) and cfg.hidden_size % 16 == 0)


class GroupedForecasters(Members):
    """K forecasters of one groupable shape as one model (``rnn_models.members``): x (K, B, L, F),
    member k's windows in x[k], gives each active member's output (K, B, H) or (K, B, H, Q), as
    each member's own forward would: one call of the operator for every layer and head of all of
    them, one node in autograd's graph. Autograd, the public optimizers and
    ``rnn_models.training.fit_members`` work on it unchanged."""

    def __init__(self, members: list[Forecaster]):
        first = members[0].cfg
        if not all(groupable(m) and m.cfg == first for m in members):
            raise ValueError("grouped members must share one groupable shape (see rnn_models.grouped.groupable)")
        super().__init__(members)
        self.cfg = first
        self._weights: dict[tuple[int, ...], tuple[list, list, list]] = {}
        keep_freed_memory()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (K, B, L, F) -> (K, B, H) or (K, B, H, Q)
        cfg = self.cfg
        if cfg.patch > 1:  # as Forecaster.forward: the window in segments of P steps
            P = cfg.patch
            x = x[:, :, x.shape[2] % P:].reshape(*x.shape[:2], -1, P * x.shape[3])
        out = torch.ops.rnnflow_grouped.forecast(x, *self.weights())  # (K, B, O)
        return out.view(*out.shape[:2], cfg.horizon, -1) if cfg.quantiles else out

    def weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The active members' parameters in the operation's order: (LSTM tensors, head weights,
        head biases). Kept per set of active members: looking them up through the modules at every
        step costs as much as the step's small operations."""
        key = tuple(self.active)
        if key not in self._weights:
            running = [self.members[k] for k in key]
            lstm = [getattr(m.encoder.rnn, f"{name}_l{layer}") for layer in range(self.cfg.num_layers)
                    for name in LSTM_WEIGHTS for m in running]
            self._weights[key] = lstm, [m.head.weight for m in running], [m.head.bias for m in running]
        return self._weights[key]


LSTM_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")  # the operation's order, each for all members


def fit_grouped(members: list[Forecaster], train_batches: list[Callable[[torch.Generator], Iterable]],
                val_batches: list[Callable[[], Iterable]], objective: ForecastObjective, cfgs: list[TrainConfig],
                checkpoints: list[Checkpoint | None] | None = None) -> list[FitResult] | None:
    """Train K members at once (``rnn_models.training.fit_members`` on their
    :class:`GroupedForecasters`): each keeps its own state as ``fit`` keeps it (its data, its
    seed's shuffling of it, AdamW, gradient clipping, moving average, learning-rate plateau, early
    stopping, best weights, checkpoint), so each ends as it would trained alone, to float rounding;
    a member that stops early leaves the group and costs nothing after. Member k's training and
    validation batches are ``train_batches[k]`` and ``val_batches[k]`` (the same function for every
    member, or each its own data set); every member's pass over its training data must hold as
    many batches, of one size at each step.

    Returns each member's result, or None where the members cannot go on together: a budget
    (``minutes``: each member's clock would run on the group's time), or checkpoints that stopped
    at different places (a run killed between two members' writes); the caller then trains them
    one by one, from the same checkpoints."""
    if any(cfg.minutes > 0 for cfg in cfgs):
        return None
    try:
        return fit_members(GroupedForecasters(members), train_batches, val_batches, objective, cfgs, checkpoints)
    except MembersApart:
        return None


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


if __name__ == "__main__":  # `python -m rnn_models.grouped`: build the operation now, not at the first run
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok = available()
    print(f"grouped LSTM operation {'ready' if ok else 'NOT available'}: {build_directory()}")
    sys.exit(0 if ok else 1)

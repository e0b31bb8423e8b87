"""One recurrent network whose cell is chosen by name, and the two heads rnnflow puts on it:
a direct multi-step forecaster and a character language model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from rnn_models import CELL_NAMES
from rnn_models.cells import ElmanRNN
from rnn_models.generation import sample_next

CELLS: dict[str, type[nn.Module]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU, "elman": ElmanRNN}
assert tuple(CELLS) == CELL_NAMES, "rnn_models.CELL_NAMES must list CELLS' keys"

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # LSTM carries (h, c); the rest carry h


def detach_state(state: State | None) -> State | None:
    """Cut the graph at a batch boundary (truncated BPTT); the one place LSTM's (h, c) differs."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


def last_hidden(state: State) -> torch.Tensor:
    """The hidden states h_n (layers*dirs, B, H) of any cell's state."""
    return state[0] if isinstance(state, tuple) else state


@dataclass
class RecurrentConfig:
    cell: str = "lstm"
    input_size: int = 1
    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.0
    bidirectional: bool = False

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; expected one of {sorted(CELLS)}")


class Recurrent(nn.Module):
    """A stacked recurrent encoder: ``forward(x, state) -> (output, state)``."""

    def __init__(self, cfg: RecurrentConfig):
        super().__init__()
        self.cfg = cfg
        self.directions = 2 if cfg.bidirectional else 1
        self.rnn = CELLS[cfg.cell](
            cfg.input_size,
            cfg.hidden_size,
            num_layers=cfg.num_layers,
            # nn.RNN warns when dropout is set on a single layer, where it does nothing
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
            bidirectional=cfg.bidirectional,
            batch_first=True,
        )

    @property
    def output_size(self) -> int:
        return self.cfg.hidden_size * self.directions

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        # x (B, T, I) -> out (B, T, dirs*H), state (layers*dirs, B, H) [x2 for LSTM]
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            # CUDA autocast runs cuDNN's RNNs in float16 whatever dtype it was asked for (ATen's
            # AutocastRNN.cpp), and float16 gradients underflow without loss scaling: the
            # recurrence runs in float32 (TF32 matmuls), the layers around it in bf16
            with torch.autocast("cuda", enabled=False):
                return self.rnn(x.float(), state)
        return self.rnn(x, state)


@dataclass
class ForecasterConfig(RecurrentConfig):
    horizon: int = 1
    quantiles: tuple[float, ...] = ()  # empty: one point forecast per step
    patch: int = 1  # input steps read per recurrent step (segments of the window, as SegRNN does)
    future_size: int = 0  # covariates known for each horizon step, read by the decoder

    def __post_init__(self):
        super().__post_init__()
        self.quantiles = tuple(float(q) for q in self.quantiles)  # JSON gives a list back


class Forecaster(nn.Module):
    """Reads a window of L steps of F features and outputs the next H target values at once
    (B, H), or Q quantiles of each (B, H, Q) when ``cfg.quantiles`` is set. With
    ``cfg.future_size`` C it also reads the C covariates known for each of the H steps ahead
    (B, H, C): a decoder adds to each step's forecast what a small network makes of the encoder's
    state, the step and that step's covariates (MQ-RNN's local decoder, Wen et al. 2017)."""

    def __init__(self, cfg: ForecasterConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Recurrent(replace(cfg, input_size=cfg.input_size * cfg.patch))
        outputs = max(len(cfg.quantiles), 1)
        self.head = nn.Linear(self.encoder.output_size, cfg.horizon * outputs)
        self.decoder = FutureDecoder(self.encoder.output_size, cfg, outputs) if cfg.future_size else None

    def forward(self, x: torch.Tensor, future: torch.Tensor | None = None) -> torch.Tensor:
        # x (B, L, F)[, future (B, H, C)] -> (B, H) or (B, H, Q)
        if self.cfg.patch > 1:  # (B, L, F) -> (B, L // P, P * F): the oldest L % P steps are left out
            P = self.cfg.patch
            x = x[:, x.shape[1] % P :].reshape(x.shape[0], -1, P * x.shape[2])
        _, state = self.encoder(x)
        h = last_hidden(state)[-self.encoder.directions :]  # last layer, every direction: (dirs, B, Hd)
        h = h.transpose(0, 1).reshape(x.shape[0], -1)  # (B, dirs*Hd)
        out = self.head(h).view(x.shape[0], self.cfg.horizon, -1)  # (B, H, Q or 1)
        if self.decoder is not None:
            if future is None:
                raise ValueError(f"this forecaster reads {self.cfg.future_size} covariates known for the horizon")
            out = out + self.decoder(h, future.to(h.dtype))
        return out if self.cfg.quantiles else out[..., 0]

    def config_dict(self) -> dict:
        return asdict(self.cfg)


class FutureDecoder(nn.Module):
    """(encoder state (B, D), future covariates (B, H, C)) -> each step's addition (B, H, Q)."""

    def __init__(self, state_size: int, cfg: ForecasterConfig, outputs: int):
        super().__init__()
        width = cfg.hidden_size
        self.context = nn.Linear(state_size, width)
        self.step = nn.Parameter(torch.zeros(cfg.horizon, width))
        self.covariates = nn.Linear(cfg.future_size, width, bias=False)
        self.out = nn.Linear(width, outputs)

    def forward(self, h: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        z = self.context(h)[:, None, :] + self.step[None] + self.covariates(future)  # (B, H, width)
        return self.out(torch.relu(z))


@dataclass
class CharLMConfig(RecurrentConfig):
    vocab_size: int = 0
    input: str = "embedding"  # or "onehot"
    embedding_dim: int = 64
    input_dropout: float = 0.0  # on the embedded (or one-hot) characters, before the first layer

    def __post_init__(self):
        super().__post_init__()
        if self.bidirectional:
            raise ValueError("bidirectional=True would let a language model read the characters it predicts")
        if self.input not in ("embedding", "onehot"):
            raise ValueError(f"unknown input {self.input!r}; expected 'embedding' or 'onehot'")


class CharLM(nn.Module):
    """Character language model: ``forward(idx, state) -> (logits, state)``."""

    def __init__(self, cfg: CharLMConfig):
        super().__init__()
        width = cfg.embedding_dim if cfg.input == "embedding" else cfg.vocab_size
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, width) if cfg.input == "embedding" else None
        self.drop_in = nn.Dropout(cfg.input_dropout)
        self.encoder = Recurrent(RecurrentConfig(**{**_recurrent_fields(cfg), "input_size": width}))
        # dropout on the last layer's output too, not only between layers (Zaremba et al., 2014):
        # a one-layer char LM on a small corpus otherwise overfits within a few epochs
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(self.encoder.output_size, cfg.vocab_size)

    def forward(self, idx: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        # idx (B, T) int64 -> logits (B, T, V)
        if self.embed is not None:
            x = self.embed(idx)  # (B, T, E)
        else:
            x = nn.functional.one_hot(idx, self.cfg.vocab_size).to(self.head.weight.dtype)  # (B, T, V)
        out, state = self.encoder(self.drop_in(x), state)  # (B, T, H)
        return self.head(self.drop(out)), state

    @torch.no_grad()
    def generate(self, prefix: torch.Tensor, max_new: int, temperature: float = 1.0,
                 top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Warm the state on the whole prefix (T,), then sample ``max_new`` indices after it."""
        logits, state = self(prefix[None])  # (1, T, V)
        out = []
        for _ in range(max_new):
            nxt = sample_next(logits[0, -1], temperature, top_k, generator)  # (1,)
            out.append(nxt)
            logits, state = self(nxt[None], state)  # (1, 1, V)
        return torch.cat(out) if out else prefix.new_empty(0)

    def config_dict(self) -> dict:
        return asdict(self.cfg)


def _recurrent_fields(cfg: RecurrentConfig) -> dict:
    return {k: getattr(cfg, k) for k in RecurrentConfig.__dataclass_fields__}

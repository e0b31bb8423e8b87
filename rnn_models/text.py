"""Characters to indices and back, and the two ways of cutting a corpus into batches.

* random sampling: independent windows at random places; each batch starts from a fresh state.
* sequential sampling: each batch row is a contiguous stream, so batch k+1 continues batch k
  and the hidden state is carried across batches (truncated BPTT).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from rnn_models import checkpoint
from rnn_models.recurrent import CharLM, CharLMConfig, detach_state, last_hidden

UNK = "<unk>"


class Vocab:
    """Characters sorted by frequency (most common first) after a reserved ``<unk>`` at 0."""

    def __init__(self, tokens: list[str]):
        if not tokens or tokens[0] != UNK:
            raise ValueError(f"a vocabulary starts with {UNK!r}")
        self.itos = list(tokens)
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def build(cls, text: str) -> Vocab:
        counts = Counter(text)
        # ties broken by the character, so the same text always gives the same indices
        return cls([UNK, *sorted(counts, key=lambda c: (-counts[c], c))])

    def __len__(self) -> int:
        return len(self.itos)

    def unknown(self, text: str) -> list[str]:
        return sorted({c for c in text if c not in self.stoi})

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(c, 0) for c in text]

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] if int(i) > 0 else "\ufffd" for i in ids)

    def to_json(self) -> str:
        return json.dumps({"tokens": self.itos}, ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str) -> Vocab:
        return cls(json.loads(s)["tokens"])


def normalize(text: str, lower: bool = False, letters_only: bool = False) -> str:
    """Optional lower-casing, and d2l-style clean-up: every run of non-letters becomes one
    space. Letters of any script count (Chinese stays), digits and punctuation go."""
    if lower:
        text = text.lower()
    if letters_only:
        text = re.sub(r"[\W\d_]+", " ", text).strip()
    return text


def random_batches(data: torch.Tensor, batch_size: int, num_steps: int,
                   generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(X, Y) pairs of shape (B, T): windows at a random offset, in random order."""
    offset = int(torch.randint(num_steps, (1,), generator=generator))
    n = (len(data) - 1 - offset) // num_steps
    # drawn on the CPU generator (same order on any device), moved once per pass, not per batch
    starts = (offset + num_steps * torch.randperm(n, generator=generator)).to(data.device)  # (n,)
    steps = torch.arange(num_steps, device=data.device)
    for i in range(0, n, batch_size):
        idx = starts[i : i + batch_size, None] + steps[None, :]  # (B, T)
        yield data[idx], data[idx + 1]


def sequential_batches(data: torch.Tensor, batch_size: int, num_steps: int,
                       generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(X, Y) pairs of shape (B, T) where row b of batch k+1 continues row b of batch k."""
    offset = int(torch.randint(num_steps, (1,), generator=generator)) if generator is not None else 0
    n = ((len(data) - 1 - offset) // batch_size) * batch_size
    xs = data[offset : offset + n].view(batch_size, -1)  # (B, n/B): B contiguous streams
    ys = data[offset + 1 : offset + 1 + n].view(batch_size, -1)
    for t in range(0, (xs.shape[1] // num_steps) * num_steps, num_steps):
        yield xs[:, t : t + num_steps], ys[:, t : t + num_steps]


class LanguageModelLoss:
    """Cross-entropy per character. With ``carry_state`` the hidden state flows from one batch
    to the next (sequential sampling), detached so the graph never grows past one batch."""

    def __init__(self, carry_state: bool):
        self.carry_state = carry_state
        self.state = None

    def reset(self) -> None:
        self.state = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The carried state, for a checkpoint taken half-way through an epoch."""
        if self.state is None:
            return {}
        return dict(zip(("h", "c"), self.state, strict=True)) if isinstance(self.state, tuple) else {"h": self.state}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = (state["h"], state["c"]) if "c" in state else state.get("h")

    def __call__(self, model, batch) -> tuple[torch.Tensor, int]:
        x, y = batch  # (B, T), (B, T)
        if self.state is not None and last_hidden(self.state).shape[1] != x.shape[0]:
            self.state = None  # a short final batch cannot continue the streams
        logits, state = model(x, self.state if self.carry_state else None)  # (B, T, V)
        self.state = detach_state(state) if self.carry_state else None
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        return loss, y.numel()


MIN_BATCHES = 16  # a text that fills fewer training batches of the asked shape trains with a smaller one
SHAPE_FLOORS = ((4, 16, MIN_BATCHES), (1, 8, 1))  # (streams, steps, batches wanted): halving stops at these


def batches_in(n_tokens: int, batch_size: int, num_steps: int) -> int:
    """Whole (B, T) batches that ``n_tokens`` fill whatever the epoch's random offset (up to T - 1)."""
    return max(0, (n_tokens - num_steps) // (batch_size * num_steps))


def fit_batch_shape(n_tokens: int, batch_size: int, num_steps: int) -> tuple[int, int]:
    """The (streams, steps) a text of ``n_tokens`` trains with: as asked where it fills
    ``MIN_BATCHES`` batches of that shape (33k training characters or more at the default
    32 x 64). A smaller text halves the larger of the two in turn (relative to 4 x 16) until it
    does, then, if it fills no batch at all, goes down to 1 x 8; never above what was asked.
    Returns (0, 0) when not even one 1 x 8 batch fits."""
    b, t = batch_size, num_steps
    for floor_b, floor_t, wanted in SHAPE_FLOORS:
        while batches_in(n_tokens, b, t) < wanted and (b > floor_b or t > floor_t):
            if b > floor_b and (t <= floor_t or b / floor_b >= t / floor_t):
                b = max(b // 2, floor_b)
            else:
                t = max(t // 2, floor_t)
    return (b, t) if batches_in(n_tokens, b, t) else (0, 0)


def val_batch_size(n_tokens: int, batch_size: int, num_steps: int) -> int:
    """Streams for the validation pass: as many as the text fills with one window each, at most B."""
    return max(1, min(batch_size, (n_tokens - 1) // num_steps))


@torch.no_grad()
def mean_loss(model: CharLM, ids: torch.Tensor, batch_size: int, num_steps: int) -> float:
    """Mean cross-entropy (nats/char) over ``ids`` read as sequential streams with carried
    state, exactly as the training loop's validation pass reads them."""
    loss_fn, total, count = LanguageModelLoss(carry_state=True), 0.0, 0
    for batch in sequential_batches(ids, val_batch_size(len(ids), batch_size, num_steps), num_steps):
        loss, n = loss_fn(model, batch)
        total, count = total + loss.item() * n, count + n
    return total / count


VOCAB = "vocab.json"


def save_charlm(model: CharLM, vocab: Vocab, directory: str | Path, meta: dict) -> dict[str, str]:
    """Weights (safetensors), config and vocabulary (JSON) into ``directory``; no pickle."""
    paths = checkpoint.save(model, directory, {"model": model.config_dict(), **meta})
    (Path(directory) / VOCAB).write_text(vocab.to_json(), encoding="utf-8")
    return {**paths, "vocab": str(Path(directory) / VOCAB)}


def load_charlm(weights: str | Path, vocab: str | Path, config: str | Path) -> tuple[CharLM, Vocab, dict]:
    meta = checkpoint.load_config(config)
    model = checkpoint.load_weights(CharLM(CharLMConfig(**meta.pop("model"))), weights).eval()
    return model, Vocab.from_json(Path(vocab).read_text(encoding="utf-8")), meta

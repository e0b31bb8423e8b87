"""The character corpus: read and check the text, build the vocabulary, split train/validation."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from rnn_models.text import MIN_BATCHES, Vocab, batches_in, fit_batch_shape, normalize
from tasks.config import CharLMFlowConfig
from tasks.data import DataError


@dataclass
class Corpus:
    """Encoded train and validation characters with the vocabulary that made them."""

    vocab: Vocab
    train: np.ndarray  # (N_train,) int64
    val: np.ndarray  # (N_val,) int64
    source: str
    sha256: str  # of the file's bytes
    eval_sha256: str  # of the validation text after normalisation: what scores are comparable on
    chars: int
    val_text: str  # kept as text: another model reads it through its own vocabulary
    batch_size: int  # the batch shape it trains and is scored with: the config's, or smaller for a small
    num_steps: int  # text (rnn_models.text.fit_batch_shape)

    def fitted_note(self, cfg: CharLMFlowConfig) -> str:
        """One line when the batch shape was fitted to a small text, else ''."""
        if (self.batch_size, self.num_steps) == (cfg.batch_size, cfg.num_steps):
            return ""
        return (f"{self.source}: {len(self.train):,} training characters fill fewer than {MIN_BATCHES} batches of "
                f"--batch-size {cfg.batch_size} x --num-steps {cfg.num_steps}: training with {self.batch_size} x "
                f"{self.num_steps}")


def load_corpus(path: str, sha256: str, cfg: CharLMFlowConfig) -> Corpus:
    label = cfg.corpus
    raw = open(path, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{label}: not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} ({e.reason})") from e
    text = normalize(text.lstrip("\ufeff"), lower=cfg.lower, letters_only=cfg.letters_only)
    if not text.strip():
        raise DataError(f"{label}: the corpus is empty" + (" after --letters-only" if cfg.letters_only else ""))
    n_val = int(len(text) * cfg.val_fraction)
    batch_size, num_steps = fit_batch_shape(len(text) - n_val, cfg.batch_size, cfg.num_steps)
    n_val = max(n_val, num_steps + 1)  # at least one validation window
    if not batch_size or not batches_in(len(text) - n_val, batch_size, num_steps):
        raise DataError(f"{label}: {len(text)} characters is too small to train on: beside its validation part "
                        f"(--val-fraction {cfg.val_fraction}) it fills no batch of even 1 sequence x 8 characters "
                        f"(--batch-size x --num-steps); give a longer text")
    train_text, val_text = text[:-n_val], text[-n_val:]
    vocab = Vocab.build(train_text)  # characters seen only in validation are <unk>, as at serving time
    return Corpus(vocab, np.asarray(vocab.encode(train_text), dtype=np.int64),
                  np.asarray(vocab.encode(val_text), dtype=np.int64), label, sha256,
                  hashlib.sha256(val_text.encode("utf-8")).hexdigest(), len(text), val_text, batch_size, num_steps)

"""The character corpus: read and check the text, build the vocabulary, split train/validation."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from rnn_models.text import Vocab, normalize
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
    n_val = max(int(len(text) * cfg.val_fraction), cfg.num_steps + 1)
    need = 2 * cfg.num_steps + n_val
    if len(text) < need:
        raise DataError(f"{label}: {len(text)} characters is too small for --num-steps {cfg.num_steps} "
                        f"x 2 + {n_val} validation characters (needs at least {need})")
    train_text, val_text = text[:-n_val], text[-n_val:]
    vocab = Vocab.build(train_text)  # characters seen only in validation are <unk>, as at serving time
    return Corpus(vocab, np.asarray(vocab.encode(train_text), dtype=np.int64),
                  np.asarray(vocab.encode(val_text), dtype=np.int64), label, sha256,
                  hashlib.sha256(val_text.encode("utf-8")).hexdigest(), len(text), val_text)

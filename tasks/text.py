"""The character language model's steps: read and check the text, build the vocabulary, split
train/validation; train on it, continuing the prompts as it goes."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rnn_models.generation import complete
from rnn_models.recurrent import CharLM, CharLMConfig
from rnn_models.text import (
    MIN_BATCHES,
    LanguageModelLoss,
    Vocab,
    batches_in,
    fit_batch_shape,
    normalize,
    random_batches,
    sequential_batches,
    val_batch_size,
)
from rnn_models.training import FitResult, TrainConfig, fit, native_bf16_cpu, resolve_device
from tasks import run_logger
from tasks.config import CharLMFlowConfig, project
from tasks.data import DataError
from tasks.training import EPOCHS_UNBOUNDED, init_lock, open_checkpoint, seed_everything


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


def load_corpus(path: str, sha256: str, cfg: CharLMFlowConfig) -> Corpus:
    label = cfg.corpus
    raw = Path(path).read_bytes()
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


# ---------------------------------------------------------------- training


@dataclass
class TrainedLM:
    state_dict: dict[str, torch.Tensor]
    model_config: dict
    fit: FitResult
    device: str
    samples: dict[int, dict[str, str]]  # epoch -> prefix -> generated text

    def model(self) -> CharLM:
        model = CharLM(CharLMConfig(**self.model_config))
        model.load_state_dict(self.state_dict)
        return model.eval()


SampleHook = Callable[[int, dict[str, str]], None]  # (epoch, {prefix: text}); epoch 0: the final model


def train_charlm(corpus: Corpus, cfg: CharLMFlowConfig, on_samples: SampleHook | None = None,
                 checkpoints: Path | None = None) -> TrainedLM:
    """Train the config's char LM; every ``--sample-every`` epochs (and at the end, as epoch 0)
    continue the prompts and hand the texts to ``on_samples``. ``checkpoints``: a folder for
    the run's checkpoint, resumed from if there."""
    logger, device = run_logger(), resolve_device(cfg.device)
    with init_lock():
        seed_everything(cfg.seed)
        model = CharLM(project(CharLMConfig, cfg, vocab_size=len(corpus.vocab))).to(device)
    samples: dict[int, dict[str, str]] = {}

    def take_samples(epoch: int, m) -> None:
        samples[epoch] = continue_prompts(m, corpus, cfg)
        if on_samples is not None:
            on_samples(epoch, samples[epoch])

    def on_epoch(stats, m) -> None:
        logger.info("epoch %d: train %.4f, val %.4f nats/char (%.3f bits/char), %.1f s", stats.epoch,
                    stats.train_loss, stats.val_loss, stats.val_loss / math.log(2), stats.seconds)
        if cfg.sample_every and stats.epoch % cfg.sample_every == 0:
            take_samples(stats.epoch, m)

    result = fit_charlm(model, corpus, cfg, device, on_epoch, open_checkpoint(checkpoints, cfg, ""))
    take_samples(0, model)  # 0: the restored best weights, what gets registered
    logger.info("best epoch %d: %.4f bits/char, %.0f tokens/s", result.best_epoch,
                result.best_val_loss / math.log(2), result.samples_per_second)
    if result.diverged:
        logger.warning("%s", result.divergence)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return TrainedLM(state, model.config_dict(), result, device, samples)


def fit_charlm(model: CharLM, corpus: Corpus, cfg: CharLMFlowConfig, device: str, on_epoch, checkpoint) -> FitResult:
    """The training loop on the corpus, in the batch shape fitted to it, with a cosine schedule."""
    train, val = torch.from_numpy(corpus.train).to(device), torch.from_numpy(corpus.val).to(device)
    sample = random_batches if cfg.sampling == "random" else sequential_batches
    batch_size, num_steps = corpus.batch_size, corpus.num_steps  # the config's, or fitted to a small text
    val_batch = val_batch_size(len(val), batch_size, num_steps)
    run_logger().info("training %s char LM on %s: %d train / %d validation characters, vocabulary %d",
                      cfg.cell, device, len(train), len(val), len(corpus.vocab))
    if (batch_size, num_steps) != (cfg.batch_size, cfg.num_steps):
        run_logger().info(f"{corpus.source}: {len(train):,} training characters fill fewer than {MIN_BATCHES} batches "
                          f"of --batch-size {cfg.batch_size} x --num-steps {cfg.num_steps}: training with "
                          f"{batch_size} x {num_steps}")
    tcfg = project(TrainConfig, cfg, device=device, epochs=EPOCHS_UNBOUNDED if cfg.minutes else cfg.epochs,
                   cosine=True, precision=charlm_precision(cfg.precision, device))
    return fit(model, lambda gen: sample(train, batch_size, num_steps, gen),
               lambda: sequential_batches(val, val_batch, num_steps),
               LanguageModelLoss(carry_state=cfg.sampling == "sequential"), tcfg, on_epoch=on_epoch,
               checkpoint=checkpoint)


def charlm_precision(precision: str, device: str) -> str:
    """``auto`` on a CPU that multiplies bf16 natively is bf16 for the char LM: its LSTM trains
    about 1.7x faster in the same minutes (docs/BENCHMARKS.md). Forecasters keep float32 on CPU:
    their small networks gain nothing from it."""
    return "bf16" if precision == "auto" and device == "cpu" and native_bf16_cpu() else precision


def continue_prompts(model: CharLM, corpus: Corpus, cfg: CharLMFlowConfig) -> dict[str, str]:
    """Each prompt, read as the corpus was, continued by ``model`` with the config's sampling."""
    model.eval()
    return {p: complete(model, corpus.vocab, normalize(p, cfg.lower, cfg.letters_only), cfg.sample_chars,
                        cfg.temperature, cfg.top_k, seed=cfg.seed + i) for i, p in enumerate(cfg.prompts)}

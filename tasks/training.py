"""Training as a Prefect task: device choice, seeding, and the lean loop from ``rnn_models``."""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import asdict, dataclass

import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from rnn_models.forecasting import ForecastPipeline, PinballObjective, mse_objective
from rnn_models.generation import complete
from rnn_models.recurrent import CharLM, CharLMConfig, Forecaster, ForecasterConfig
from rnn_models.text import LanguageModelLoss, normalize, random_batches, sequential_batches, val_batch_size
from rnn_models.training import FitResult, TrainConfig, fit, resolve_device, tensor_batches
from tasks import run_logger
from tasks.config import CharLMFlowConfig, TimeSeriesConfig
from tasks.data import Series
from tasks.features import Windows
from tasks.text import Corpus


@dataclass
class Trained:
    """What leaves the training task: the pipeline on the CPU, never a model on a device."""

    forecaster: ForecastPipeline
    fits: list[FitResult]  # one per ensemble member
    device: str

    @property
    def fit(self) -> FitResult:
        """The first member's training, the one whose curves the run shows."""
        return self.fits[0]

    @property
    def train_seconds(self) -> float:
        """Every member's training (a member kept from --auto counts its own training)."""
        return sum(f.train_seconds for f in self.fits)

    @property
    def val_loss(self) -> float:
        return sum(f.best_val_loss for f in self.fits) / len(self.fits)

    def pipeline(self) -> ForecastPipeline:
        return self.forecaster


@functools.cache
def init_lock() -> threading.Lock:
    """Weight initialisation draws from torch's global RNG: trials running in threads of one
    process take turns so each seed still gives the same weights. (A function, not a global
    lock, so that tasks shipped to Dask workers do not try to pickle a lock.)"""
    return threading.Lock()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # seeds CUDA too; CPU kernels are deterministic, so same seed, same weights


@task(name="train-forecaster", cache_policy=NO_CACHE)
def train_forecaster(series: Series, windows: Windows, cfg: TimeSeriesConfig, first: Trained | None = None) -> Trained:
    """Train the config's network, or each of its ``--ensemble`` members in turn (seed + i).
    ``first``: member 1 already trained on these windows with this config (--auto's choice)."""
    logger = run_logger()
    device = resolve_device(cfg.device)
    quantiles = cfg.quantile_levels
    objective = PinballObjective(quantiles) if quantiles else mse_objective
    # the whole data set lives on the device; batches are index slices, not a DataLoader
    x_tr, y_tr = (torch.from_numpy(a).to(device) for a in (windows.x_train, windows.y_train))
    x_va, y_va = (torch.from_numpy(a).to(device) for a in (windows.x_val, windows.y_val))
    members, fits = [], []
    for i, cell in enumerate(cfg.member_cells):
        seed = cfg.seed + i
        who = f"member {i + 1}/{cfg.ensemble}: " if cfg.ensemble > 1 else ""
        if i == 0 and first is not None:
            logger.info("%s%s trained by --auto, kept", who, cell)
            members.append(first.forecaster.members[0])
            fits.append(first.fit)
            continue
        model_cfg = ForecasterConfig(cell=cell, input_size=windows.x_train.shape[2], hidden_size=cfg.hidden_size,
                                     num_layers=cfg.num_layers, dropout=cfg.dropout,
                                     bidirectional=cfg.bidirectional, horizon=cfg.horizon, quantiles=quantiles)
        with init_lock():
            seed_everything(seed)
            model = Forecaster(model_cfg).to(device)
        tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, clip=cfg.clip,
                           patience=cfg.patience, lr_patience=cfg.lr_patience, ema=cfg.ema, device=device, seed=seed)
        logger.info("%straining %s on %s: %d train / %d validation windows", who, cell, device, len(x_tr), len(x_va))
        result = fit(
            model,
            lambda gen: tensor_batches(x_tr, y_tr, batch_size=cfg.batch_size, generator=gen),
            lambda: tensor_batches(x_va, y_va, batch_size=4096),
            objective,
            tcfg,
        )
        logger.info("%sbest epoch %d of %d, validation loss %.5f, %.1f s (%.0f windows/s)", who, result.best_epoch,
                    len(result.history), result.best_val_loss, result.train_seconds, result.samples_per_second)
        members.append(model.cpu())
        fits.append(result)
    meta = {"lookback": cfg.lookback, "value_column": series.value_column,
            "covariate_columns": series.covariate_columns, "frequency": series.freq,
            "season_length": series.season_length, "trained_on": series.source, "data_sha256": series.sha256}
    return Trained(ForecastPipeline(members, windows.chain, meta), fits, device)


# ---------------------------------------------------------------- character language model


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


@task(name="train-charlm", cache_policy=NO_CACHE)
def train_charlm(corpus: Corpus, cfg: CharLMFlowConfig) -> TrainedLM:
    logger = run_logger()
    device = resolve_device(cfg.device)
    model_cfg = CharLMConfig(cell=cfg.cell, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                             dropout=cfg.dropout, vocab_size=len(corpus.vocab), input=cfg.input,
                             embedding_dim=cfg.embedding_dim)
    with init_lock():
        seed_everything(cfg.seed)
        model = CharLM(model_cfg).to(device)
    train = torch.from_numpy(corpus.train).to(device)
    val = torch.from_numpy(corpus.val).to(device)
    sample = random_batches if cfg.sampling == "random" else sequential_batches
    val_batch = val_batch_size(len(val), cfg.batch_size, cfg.num_steps)
    samples: dict[int, dict[str, str]] = {}
    name = cfg.registered_name

    def take_samples(epoch: int, m) -> None:
        m.eval()
        samples[epoch] = {p: complete(m, corpus.vocab, normalize(p, cfg.lower, cfg.letters_only), cfg.sample_chars,
                                      cfg.temperature, cfg.top_k, seed=cfg.seed + i) for i, p in enumerate(cfg.prompts)}
        body = "\n\n".join(f"**{p!r}** →\n\n```\n{t}\n```" for p, t in samples[epoch].items())
        create_markdown_artifact(f"### {name}, epoch {epoch}\n\n{body}", key=f"{name}-samples".lower(),
                                 description=f"samples after epoch {epoch}")

    def on_epoch(stats, m) -> None:
        logger.info("epoch %d: train %.4f, val %.4f nats/char (%.3f bits/char), %.1f s", stats.epoch,
                    stats.train_loss, stats.val_loss, stats.val_loss / math.log(2), stats.seconds)
        if cfg.sample_every and stats.epoch % cfg.sample_every == 0:
            take_samples(stats.epoch, m)

    logger.info("training %s char LM on %s: %d train / %d validation characters, vocabulary %d",
                cfg.cell, device, len(train), len(val), len(corpus.vocab))
    result = fit(
        model,
        lambda gen: sample(train, cfg.batch_size, cfg.num_steps, gen),
        lambda: sequential_batches(val, val_batch, cfg.num_steps),
        LanguageModelLoss(carry_state=cfg.sampling == "sequential"),
        TrainConfig(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, clip=cfg.clip,
                    patience=cfg.patience, device=device, seed=cfg.seed),
        on_epoch=on_epoch,
    )
    take_samples(0, model)  # 0: the restored best weights, what gets registered
    logger.info("best epoch %d: %.4f bits/char, %.0f tokens/s", result.best_epoch,
                result.best_val_loss / math.log(2), result.samples_per_second)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return TrainedLM(state, asdict(model_cfg), result, device, samples)

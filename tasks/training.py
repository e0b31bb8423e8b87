"""Training as a Prefect task: device choice, seeding, and the lean loop from ``rnn_models``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from rnn_models.forecasting import Affine, ForecastPipeline
from rnn_models.recurrent import Forecaster, ForecasterConfig
from rnn_models.training import FitResult, TrainConfig, fit, resolve_device, tensor_batches
from tasks.config import TimeSeriesConfig
from tasks.data import Series
from tasks.features import Windows


@dataclass
class Trained:
    """What leaves the training task: weights on the CPU, never a model on a device."""

    state_dict: dict[str, torch.Tensor]
    model_config: dict
    scaler: Affine
    meta: dict  # what the served model needs to read its input: lookback, columns, frequency
    fit: FitResult
    device: str

    def pipeline(self) -> ForecastPipeline:
        model = Forecaster(ForecasterConfig(**self.model_config))
        model.load_state_dict(self.state_dict)
        return ForecastPipeline(model, self.scaler, self.meta)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # seeds CUDA too; CPU kernels are deterministic, so same seed, same weights


def mse_objective(model, batch):
    x, y = batch  # (B, L, F), (B, H)
    return torch.nn.functional.mse_loss(model(x).float(), y), len(x)


@task(name="train-forecaster", cache_policy=NO_CACHE)
def train_forecaster(series: Series, windows: Windows, cfg: TimeSeriesConfig) -> Trained:
    logger = get_run_logger()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model_cfg = ForecasterConfig(cell=cfg.cell, input_size=windows.x_train.shape[2], hidden_size=cfg.hidden_size,
                                 num_layers=cfg.num_layers, dropout=cfg.dropout, bidirectional=cfg.bidirectional,
                                 horizon=cfg.horizon)
    model = Forecaster(model_cfg).to(device)
    # the whole data set lives on the device; batches are index slices, not a DataLoader
    x_tr, y_tr = (torch.from_numpy(a).to(device) for a in (windows.x_train, windows.y_train))
    x_va, y_va = (torch.from_numpy(a).to(device) for a in (windows.x_val, windows.y_val))
    tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, clip=cfg.clip,
                       patience=cfg.patience, device=device, seed=cfg.seed)
    logger.info("training %s on %s: %d train / %d validation windows", cfg.cell, device, len(x_tr), len(x_va))
    result = fit(
        model,
        lambda gen: tensor_batches(x_tr, y_tr, batch_size=cfg.batch_size, generator=gen),
        lambda: tensor_batches(x_va, y_va, batch_size=4096),
        mse_objective,
        tcfg,
    )
    logger.info("best epoch %d of %d, validation MSE %.5f, %.1f s (%.0f windows/s)", result.best_epoch,
                len(result.history), result.best_val_loss, result.train_seconds, result.samples_per_second)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    meta = {"lookback": cfg.lookback, "value_column": series.value_column,
            "covariate_columns": series.covariate_columns, "frequency": series.freq,
            "season_length": series.season_length, "trained_on": series.source, "data_sha256": series.sha256}
    return Trained(state, model_cfg.__dict__.copy(), windows.scaler, meta, result, device)

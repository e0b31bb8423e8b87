"""Scoring registered versions again, side by side on one data set: what ``promote`` and
``compare`` rest on. A version's data is rebuilt from the params its training run logged."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields

import mlflow
import torch

from rnn_models.text import mean_loss
from rnn_models.windows import Split
from tasks.config import CharLMFlowConfig, TimeSeriesConfig, parse_value
from tasks.data import Series, with_calendar
from tasks.evaluation import Backtest, forecast_with, history_windows
from tasks.evaluation import score as score_forecasts
from tasks.features import Data, Origins, origins, split_series
from tasks.ingest import fetch_data, read_series
from tasks.panel import PanelBacktest, PanelSplit
from tasks.registry import RegistryError, client
from tasks.text import load_corpus

METRIC = {"forecaster": "test MASE", "charlm": "validation bits/char"}


def load_registered(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """A registered version, loaded to be scored in this process. Without MLflow's check of the
    model's pinned requirements against the installed packages: it only warns, and it reads
    every installed package's metadata (its cost: docs/BENCHMARKS.md, "Everyday runs")."""
    return mlflow.pyfunc.load_model(model_uri, suppress_warnings=True)


@dataclass
class EvalData:
    kind: str  # forecaster | charlm
    description: str
    cfg: TimeSeriesConfig | CharLMFlowConfig
    forecast_data: Data | None = None  # a forecaster's: one series, or a global model's many
    val_text: str = ""
    batch_size: int = 0  # the char LM's batch shape as fitted to its corpus
    num_steps: int = 0


def config_from_params(cls, params: dict[str, str]):
    """Rebuild a flow config from the string params an MLflow run logged."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: parse_value(hints[f.name], params[f.name], f.name) for f in fields(cls) if f.name in params})


def kind_of(version) -> str:
    kind = version.tags.get("kind")
    if kind not in METRIC:
        raise RegistryError(f"{version.name} v{version.version} was not registered by rnnflow (no 'kind' tag)")
    return kind


def evaluation_data(version, latest: bool = False) -> EvalData:
    """The test series (forecaster) or validation text (char LM) of ``version``'s training run; with
    ``latest``, its data source as it reads now (a --sha256 pin dropped: the data has grown since)."""
    kind, params = kind_of(version), client().get_run(version.run_id).data.params
    if latest:
        params = {**params, "sha256": ""}
    if kind == "forecaster":
        cfg = config_from_params(TimeSeriesConfig, params)
        data = with_calendar(read_series(cfg), cfg)
        part = f"test parts of the {len(data)} series" if cfg.panel else "test part"
        return EvalData(kind, f"{part} of {data.source} (v{version.version}'s data)", cfg, forecast_data=data)
    cfg = config_from_params(CharLMFlowConfig, params)
    corpus = load_corpus(*fetch_data(cfg.corpus, cfg.sha256), cfg)
    return EvalData(kind, f"validation text of {corpus.source} (v{version.version}'s data)", cfg,
                    val_text=corpus.val_text, batch_size=corpus.batch_size, num_steps=corpus.num_steps)


def backtest_registered(model_uri: str, data: Data, split: Split | PanelSplit, origins: Origins,
                        horizon: int) -> float:
    """Test MASE (of one series, or the mean over many) of a registered forecaster loaded from the
    registry: what the champion gate compares."""
    return rescore_registered(model_uri, data, split, origins, horizon).scores[RESCORED]["mase"]


RESCORED = "registered"  # the registered model's name in ``rescore_registered``'s scores


def rescore_registered(model_uri: str, data: Data, split: Split | PanelSplit, origins: Origins,
                       horizon: int) -> Backtest | PanelBacktest:
    """A registered forecaster's rolling-origin scores (MAE, RMSE, sMAPE, MASE; of each of many series
    too) at ``origins``, MASE scaled by ``split``'s training part: the champion gate's test MASE, and
    the monitor's live error on the data that arrived after the champion was trained. An rnnflow
    forecaster (tasks/pyfunc/forecaster.py) answers a history with its pipeline's forecast from the
    last ``lookback`` values of each series, so every origin's window goes through that pipeline in
    one batch (the same numbers, tests/test_flow_timeseries.py; one call per origin through MLflow's
    predict took seconds); any other model of one series is called as a user calls it, one origin
    at a time."""
    model = load_registered(model_uri)
    pipeline = getattr(model.unwrap_python_model(), "pipeline", None)
    if hasattr(pipeline, "lookback") and hasattr(pipeline, "predict"):  # this rnnflow's class, or the one it saved
        windows = history_windows(data, origins, pipeline.lookback, getattr(pipeline, "ahead", 0))
        forecasts = pipeline.point(pipeline.predict(windows[..., read_by(pipeline.meta, data, model_uri)]))[:, :horizon]
    elif isinstance(data, Series):
        forecasts = forecast_with(model.predict, data, origins, horizon)
    else:
        raise RegistryError(f"{model_uri} is not an rnnflow global model: it cannot be scored on many series")
    return score_forecasts(data, split, origins, horizon, {RESCORED: forecasts})


def read_by(meta: dict, data: Data, model_uri: str) -> list[int]:
    """The positions in ``data``'s windows of the columns a registered model reads, in its order: a
    champion scored on a challenger's data may read fewer covariates, or the same in another order."""
    have = [data.value_column, *data.covariate_columns]
    wants = meta.get("covariate_columns", [])
    missing = [c for c in wants if c not in have]
    if missing:
        raise RegistryError(f"{model_uri} reads {missing}, which this data lacks (it has {have[1:]})")
    return [0, *(have.index(c) for c in wants)]


def score(version, data: EvalData) -> float:
    """``version``'s test MASE or validation bits/char on ``data`` (lower is better)."""
    if kind_of(version) != data.kind:
        raise RegistryError(f"v{version.version} is a {kind_of(version)}, the data is for a {data.kind}")
    uri = f"models:/{version.name}/{version.version}"
    if data.kind == "forecaster":
        split = split_series(data.forecast_data, data.cfg)
        return backtest_registered(uri, data.forecast_data, split, origins(split, "test", data.cfg), data.cfg.horizon)
    lm = load_registered(uri).unwrap_python_model()
    ids = torch.tensor(lm.vocab.encode(data.val_text), dtype=torch.long)
    return mean_loss(lm.model, ids, data.batch_size, data.num_steps) / math.log(2)

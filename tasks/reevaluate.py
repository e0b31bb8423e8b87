"""Scoring registered versions again, side by side on one data set: what ``promote`` and
``compare`` rest on. A version's data is rebuilt from the params its training run logged."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields

import mlflow
import numpy as np
import pandas as pd
import torch

from rnn_models.forecasting import ForecastPipeline
from rnn_models.text import mean_loss
from rnn_models.windows import Split, window_origins
from tasks.config import CharLMFlowConfig, TimeSeriesConfig, parse_value
from tasks.data import SERIES_SUFFIXES, Series, fetch_data, read_series
from tasks.evaluation import forecast_with, run_backtest
from tasks.features import split_series
from tasks.panel import PanelData, PanelSplit, load_panel, score_panel, split_panel
from tasks.registry import RegistryError, client
from tasks.text import load_corpus

METRIC = {"forecaster": "test MASE", "charlm": "validation bits/char"}


def load_registered(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """A registered version, loaded to be scored in this process. Without MLflow's check of the
    model's pinned requirements against the installed packages: it only warns, and it reads
    every installed package's metadata, 0.7 s of a one-network run's start-up (measured)."""
    return mlflow.pyfunc.load_model(model_uri, suppress_warnings=True)


@dataclass
class EvalData:
    kind: str  # forecaster | charlm
    description: str
    cfg: TimeSeriesConfig | CharLMFlowConfig
    series: Series | None = None
    panel: PanelData | None = None  # a global model's many series
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


def evaluation_data(version) -> EvalData:
    """The test series (forecaster) or validation text (char LM) of ``version``'s training run."""
    kind, params = kind_of(version), client().get_run(version.run_id).data.params
    if kind == "forecaster":
        cfg = config_from_params(TimeSeriesConfig, params)
        if cfg.panel:
            panel = load_panel(*fetch_data(cfg.data, cfg.sha256, SERIES_SUFFIXES), cfg)
            return EvalData(kind, f"test parts of the {len(panel)} series of {panel.source} "
                            f"(v{version.version}'s data)", cfg, panel=panel)
        series = read_series(cfg)
        return EvalData(kind, f"test part of {series.source} (v{version.version}'s data)", cfg, series=series)
    cfg = config_from_params(CharLMFlowConfig, params)
    corpus = load_corpus(*fetch_data(cfg.corpus, cfg.sha256), cfg)
    return EvalData(kind, f"validation text of {corpus.source} (v{version.version}'s data)", cfg,
                    val_text=corpus.val_text, batch_size=corpus.batch_size, num_steps=corpus.num_steps)


def backtest_registered(model_uri: str, series: Series, split: Split, origins, horizon: int) -> float:
    """Test MASE of a registered forecaster loaded from the registry. An rnnflow forecaster
    (tasks/pyfunc/forecaster.py) answers a history with its pipeline's forecast from the last
    ``lookback`` rows, so every origin's window goes through that pipeline in one batch (the
    same numbers, tests/test_flow_timeseries.py; one call per origin through MLflow's predict
    took seconds); any other model is called as a user calls it, one origin at a time."""
    model = load_registered(model_uri)
    pipeline = getattr(model.unwrap_python_model(), "pipeline", None)
    if isinstance(pipeline, ForecastPipeline):
        values = series.features  # (T, F): the value column, then the covariates, as the pyfunc reads them
        windows = np.stack([values[o - pipeline.lookback : o] for o in origins])  # (N, L, F)
        forecasts = pipeline.point(pipeline.predict(windows))[:, :horizon]
    else:
        forecasts = forecast_with(model.predict, series, origins, horizon)
    return run_backtest(series, split, origins, horizon, {"m": forecasts}).scores["m"]["mase"]


def backtest_registered_panel(model_uri: str, panel: PanelData, split: PanelSplit, origins: list[np.ndarray],
                              horizon: int) -> float:
    """Mean test MASE over series of a registered global model, called as a user calls it: at
    each step of the test part, one request holding every series' history."""
    model = load_registered(model_uri)
    pipeline = model.unwrap_python_model().pipeline
    L, id_col, value_col = pipeline.lookback, pipeline.meta["id_column"], pipeline.meta["value_column"]
    out = [np.empty((len(o), horizon)) for o in origins]
    for k in range(max(len(o) for o in origins)):
        alive = [i for i, o in enumerate(origins) if len(o) > k]
        frame = pd.DataFrame({id_col: np.repeat([panel.ids[i] for i in alive], L),
                              value_col: np.concatenate([panel.values[i][origins[i][k] - L : origins[i][k]]
                                                         for i in alive])})
        forecast = model.predict(frame)["forecast"].to_numpy().reshape(len(alive), -1)[:, :horizon]
        for j, i in enumerate(alive):
            out[i][k] = forecast[j]
    return score_panel(panel, split, origins, horizon, {"m": np.concatenate(out)}).scores["m"]["mase"]


def score(version, data: EvalData) -> float:
    """``version``'s test MASE or validation bits/char on ``data`` (lower is better)."""
    if kind_of(version) != data.kind:
        raise RegistryError(f"v{version.version} is a {kind_of(version)}, the data is for a {data.kind}")
    uri = f"models:/{version.name}/{version.version}"
    if data.panel is not None:
        cfg, panel = data.cfg, data.panel
        split = split_panel(panel, cfg)
        return backtest_registered_panel(uri, panel, split, split.origins("test", cfg.lookback, cfg.horizon),
                                         cfg.horizon)
    if data.kind == "forecaster":
        cfg, series = data.cfg, data.series
        split = split_series(series, cfg)
        origins = window_origins(*split.part("test"), cfg.lookback, cfg.horizon)
        return backtest_registered(uri, series, split, origins, cfg.horizon)
    lm = load_registered(uri).unwrap_python_model()
    ids = torch.tensor(lm.vocab.encode(data.val_text), dtype=torch.long)
    return mean_loss(lm.model, ids, data.batch_size, data.num_steps) / math.log(2)

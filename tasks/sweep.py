"""Hyper-parameter sweep trials: each one trains and backtests one time-series config and logs
a nested MLflow run under the sweep's parent run, its model's plain files (safetensors + JSON)
among the run's artifacts. Only small things cross between workers: configs, paths, run ids,
scores."""

from __future__ import annotations

import itertools
import random
import re
import tempfile
import time
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import mlflow
import torch

from rnn_models import checkpoint
from rnn_models.forecasting import ForecastPipeline
from rnn_models.training import FitResult
from tasks.config import ConfigError, TimeSeriesConfig, flag, parse_value
from tasks.data import SERIES_SUFFIXES, DataError, _read_table
from tasks.evaluation import backtest
from tasks.ingest import fetch_data, read_series
from tasks.publish import log_history
from tasks.registry import client
from tasks.selection import train_models
from tasks.training import Trained

TRIAL_MODEL = "model"  # artifact folder of a trial's run holding its weights and config
# values that are lists or names themselves, never grid axes
NOT_SWEPT = ("covariate_columns", "future_covariate_columns", "static_columns", "holidays", "quantiles", "intervals",
             "ensemble_cells", "model_name", "experiment")


def build_grid(options: dict[str, str], samples: int = 0, seed: int = 0) -> list[dict]:
    """Configs (as dicts) from options whose values may be comma-separated lists: the full
    grid, or ``samples`` points drawn from it. Every point is validated before any trial runs."""
    hints = typing.get_type_hints(TimeSeriesConfig)
    axes: dict[str, list] = {}
    for f in fields(TimeSeriesConfig):
        if f.name not in options:
            continue
        raw = str(options[f.name])
        parts = [raw] if f.name in NOT_SWEPT else [p.strip() for p in raw.split(",")]
        if not [p for p in parts if p] and raw != "":
            raise ConfigError(f"{flag(f.name)}: the grid has no values")
        axes[f.name] = [parse_value(hints[f.name], p, f.name) for p in parts if p or raw == ""]
    names = list(axes)
    grid = [dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values())]
    if samples and samples < len(grid):
        grid = random.Random(seed).sample(grid, samples)
    for point in grid:
        TimeSeriesConfig(**point)  # a bad value anywhere stops the sweep before it starts
    return grid


def split_grid(grid: list[dict]) -> tuple[dict, list[dict]]:
    """(base config with everything that does not vary, points holding only what varies)."""
    varying = [k for k in grid[0] if any(p[k] != grid[0][k] for p in grid)]
    base = {k: v for k, v in TimeSeriesConfig(**grid[0]).to_params().items() if k not in varying}
    return base, [{k: p[k] for k in varying} for p in grid]


@dataclass
class TrialResult:
    index: int
    params: dict  # the swept values
    val_loss: float
    test_mase: float
    seconds: float
    run_id: str  # its nested MLflow run, which holds its model files under "model/"
    fit: FitResult  # per-epoch numbers only


def run_trials(trials: list[tuple[int, dict, dict]], parent_run_id: str, experiment_id: str) -> list[TrialResult]:
    """Trials (index, grid point, base config) on one worker, one core: their networks of one
    shape (ensemble members, --auto candidates, across trials alike) train together as one
    batched network (``tasks.selection.train_models``); each trial is then backtested and
    logged as its own nested run. A trial's seconds are the group's work shared evenly."""
    torch.set_num_threads(1)  # one core per worker: trials in parallel beat threads fighting
    t0 = time.perf_counter()
    cfgs = {f"trial {index}": TimeSeriesConfig(**{**base, **point}) for index, point, base in trials}
    series = {name: read_series(cfg) for name, cfg in cfgs.items()}
    outcomes = train_models({name: (series[name], cfg) for name, cfg in cfgs.items()})
    done = []
    for (index, point, _), name in zip(trials, cfgs, strict=True):
        cfg, windows, model = outcomes[name].settings.cfg, outcomes[name].windows, outcomes[name].trained
        pipeline = model.pipeline()
        bt = backtest(outcomes[name].data, windows, pipeline, cfg.label)
        done.append((index, point, cfg, model, pipeline, bt))
    c, results = client(), []
    seconds = (time.perf_counter() - t0) / len(trials)
    for index, point, cfg, model, pipeline, bt in done:
        t1 = time.perf_counter()
        run = c.create_run(experiment_id, run_name=f"trial-{index:03d}",
                           tags={"mlflow.parentRunId": parent_run_id, "sweep_trial": str(index),
                                 "trained_with": ", ".join(f"trial {i}" for i, _, _ in trials)})
        with mlflow.start_run(run_id=run.info.run_id), tempfile.TemporaryDirectory() as tmp:
            mlflow.log_params({**cfg.to_params(), "trial": index})
            log_history(model.first_fit.history)
            scores = bt.scores[cfg.label]
            mlflow.log_metrics({"best_val_loss": model.val_loss, "work_seconds": seconds,
                                **{f"test_{k}": v for k, v in scores.items()}})
            # the model travels through the tracking store, not a file system the flow must share
            pipeline.save(tmp)
            mlflow.log_artifacts(tmp, TRIAL_MODEL)
        # its work: its share of the group's training and backtests, and its own MLflow run
        results.append(TrialResult(index, point, model.val_loss, scores["mase"], seconds + time.perf_counter() - t1,
                                   run.info.run_id, model.first_fit))
    return results


def trained_from(result: TrialResult, directory: str) -> Trained:
    """The best trial's model back from its MLflow run (into ``directory``), as the single-run tasks expect it."""
    d = Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path=TRIAL_MODEL,
                                                 dst_path=str(Path(directory) / result.run_id)))
    return Trained(ForecastPipeline.load(d / checkpoint.WEIGHTS, d / checkpoint.CONFIG), [result.fit], "cpu")


def results_markdown(results: list[TrialResult], best: TrialResult) -> str:
    keys = sorted({k for r in results for k in r.params if len({str(x.params.get(k)) for x in results}) > 1})
    head = "| trial | " + " | ".join(keys) + " | val loss | test MASE | seconds |"
    rows = [f"| {r.index}{' (best)' if r is best else ''} | " + " | ".join(str(r.params.get(k, "")) for k in keys)
            + f" | {r.val_loss:.5g} | {r.test_mase:.4g} | {r.seconds:.1f} |" for r in results]
    return "\n".join([head, "|" + "---|" * (len(keys) + 4), *rows])


def split_by_id(data: str, sha256: str, id_column: str, out_dir: str) -> dict[str, str]:
    """One CSV per series of a long-format file, in ``out_dir``: {series id: path}."""
    frame = _read_table(fetch_data(data, sha256, SERIES_SUFFIXES)[0], data)
    if id_column not in frame.columns:
        raise DataError(f"{data}: no id column {id_column!r}; the columns are {list(frame.columns)}")
    files = {}
    for key, part in frame.groupby(id_column, sort=True):
        sid = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(key)).strip("_") or "series"
        if sid in files:
            raise DataError(f"{data}: ids {key!r} and another one both become {sid!r} in a model name")
        files[sid] = str(Path(out_dir) / f"{sid}.csv")
        part.drop(columns=[id_column]).to_csv(files[sid], index=False)
    return files

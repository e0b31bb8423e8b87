"""Every MLflow call of rnnflow: the tracking store, one run per flow run, model-from-code
registration and the champion gate.

A run is written only after training and evaluation succeeded, and if anything fails while
it is written the run and the new model version are deleted again: no half-written run, no
stray version, and the ``champion`` alias only ever moves as the last step.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException
from mlflow.models import infer_signature
from mlflow.types.schema import AnyType, ColSpec, Schema

import rnn_models

CHAMPION = "champion"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
PYFUNC_DIR = Path(__file__).resolve().parent / "pyfunc"
CODE_PATHS = [str(Path(rnn_models.__file__).resolve().parent)]  # the models import only rnn_models


# ---------------------------------------------------------------- the store


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store in ./mlruns."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path.cwd() / 'mlruns' / 'mlflow.db').resolve()}"


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside a SQLite store (mlruns/artifacts); a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


def client() -> MlflowClient:
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, uri)


def ensure_experiment(name: str) -> str:
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = _artifact_root(tracking_uri())
    return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


# ---------------------------------------------------------------- the registry


def champion_version(name: str):
    """The ModelVersion holding the ``champion`` alias, or None."""
    try:
        return client().get_model_version_by_alias(name, CHAMPION)
    except (MlflowException, RestException):
        return None


def load_champion(name: str) -> mlflow.pyfunc.PyFuncModel:
    """The pyfunc model of ``NAME@champion``, with a clear error when there is none."""
    if champion_version(name) is None:
        raise LookupError(f"no registered model {name!r} has a {CHAMPION!r} alias in {tracking_uri()}")
    return mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")


@dataclass
class Registration:
    run_id: str
    version: str
    model_uri: str
    promoted: bool
    reason: str


@dataclass
class ChampionScore:
    """The current champion's score on the challenger's test data, or why there is none."""

    version: str | None
    score: float | None = None
    error: str = ""


def promotion_decision(challenger: float, champion: ChampionScore, metric: str) -> tuple[bool, str]:
    """Promote when there is no champion, or when the challenger scores lower on the same data."""
    if champion.version is None:
        return True, "no champion yet"
    if champion.score is None:
        return False, f"kept champion v{champion.version}: it could not be scored on this data ({champion.error})"
    if not np.isfinite(challenger):
        return False, f"kept champion v{champion.version}: challenger {metric} is {challenger}"
    if challenger < champion.score:
        return True, f"{metric} {challenger:.4g} beats champion v{champion.version}'s {champion.score:.4g} on the same test data"
    return False, (f"kept champion v{champion.version}: its {metric} {champion.score:.4g} is not worse than "
                   f"the challenger's {challenger:.4g} on the same test data")


@contextlib.contextmanager
def atomic_run(experiment: str, run_name: str, model_name: str) -> Iterator[dict]:
    """An MLflow run that disappears, with any model version it registered, if its body fails.

    The body records a registered version in the yielded dict under ``"version"``.
    """
    c = client()
    exp_id = ensure_experiment(experiment)
    created: dict = {}
    run = mlflow.start_run(experiment_id=exp_id, run_name=run_name)
    try:
        yield created
    except BaseException:
        mlflow.end_run(status="FAILED")
        if created.get("version"):
            with contextlib.suppress(MlflowException):
                c.delete_model_version(model_name, created["version"])
        c.delete_run(run.info.run_id)
        raise
    mlflow.end_run()


def log_history(history) -> None:
    for s in history:
        mlflow.log_metrics({"train_loss": s.train_loss, "val_loss": s.val_loss, "epoch_seconds": s.seconds}, step=s.epoch)


def log_pyfunc(model_name: str, python_model: str, artifacts_dir_writer, input_example: pd.DataFrame,
               output_example: pd.DataFrame, params: dict | None = None, lenient_inputs: bool = False) -> str:
    """Log a model from code and register it under ``model_name``; returns the new version.

    ``lenient_inputs`` declares the input columns by name only (type Any): MLflow's schema
    check refuses int64 for a double column, but a history of 70, 80, 90 is a fair input; the
    model itself converts and checks the values.
    """
    signature = infer_signature(input_example, output_example, params=params)
    if lenient_inputs:
        signature.inputs = Schema([ColSpec(AnyType(), c) for c in input_example.columns])
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = artifacts_dir_writer(tmp)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_DIR / python_model),
            artifacts=artifacts,
            code_paths=CODE_PATHS,
            signature=signature,
            input_example=input_example,
            pip_requirements=pip_requirements(),
            registered_model_name=model_name,
        )
    return str(info.registered_model_version)


def pip_requirements() -> list[str]:
    """What a served model needs, pinned to what trained it (skips MLflow's slow inference)."""
    import safetensors
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"safetensors=={safetensors.__version__}", f"numpy=={np.__version__}", f"pandas=={pd.__version__}"]


def finish_registration(model_name: str, version: str, challenger: float, champion: ChampionScore,
                        metric: str, tags: dict[str, str]) -> Registration:
    """Tag the version, apply the champion gate, and record the decision on the run."""
    c = client()
    for k, v in tags.items():
        c.set_model_version_tag(model_name, version, k, v)
    promoted, reason = promotion_decision(challenger, champion, metric)
    mlflow.set_tags({"promoted": str(promoted).lower(), "promotion_reason": reason, "model_version": version})
    c.set_model_version_tag(model_name, version, "promotion_reason", reason)
    if promoted:
        previous = champion.version or ""
        c.set_model_version_tag(model_name, version, "previous_champion", previous)
        c.set_registered_model_alias(model_name, CHAMPION, version)
    run_id = mlflow.active_run().info.run_id
    return Registration(run_id, version, f"models:/{model_name}/{version}", promoted, reason)


# ---------------------------------------------------------------- the forecaster's tasks

from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from rnn_models.forecasting import ForecastPipeline  # noqa: E402
from rnn_models.windows import Split  # noqa: E402
from tasks.config import TimeSeriesConfig  # noqa: E402
from tasks.data import Series  # noqa: E402
from tasks.evaluation import Backtest, forecast_with, run_backtest  # noqa: E402


@task(name="score-champion", cache_policy=NO_CACHE)
def score_champion(name: str, series: Series, split: Split, origins: np.ndarray, horizon: int) -> ChampionScore:
    """Backtest the current champion, as loaded from the registry, on the challenger's test data."""
    current = champion_version(name)
    if current is None:
        return ChampionScore(None)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
        forecast = forecast_with(model.predict, series, origins, horizon)
        bt = run_backtest(series, split, origins, horizon, {"champion": forecast})
        return ChampionScore(str(current.version), bt.scores["champion"]["mase"])
    except Exception as e:  # a champion of another shape (columns, horizon) cannot compete here
        return ChampionScore(str(current.version), None, f"{type(e).__name__}: {e}".strip()[:300])


@task(name="register-forecaster", cache_policy=NO_CACHE)
def register_forecaster(cfg: TimeSeriesConfig, series: Series, pipeline: ForecastPipeline, fit, bt: Backtest,
                        label: str, champion: ChampionScore, plots: list[str]) -> Registration:
    name = cfg.registered_name
    with atomic_run(cfg.experiment, f"{name}-{cfg.cell}", name) as created:
        mlflow.log_params(cfg.to_params())
        mlflow.log_params({"resolved_season_length": series.season_length, "frequency": series.freq or "",
                           "resolved_value_column": series.value_column, "rows": len(series.frame)})
        log_history(fit.history)
        mlflow.log_metrics({"train_seconds": fit.train_seconds,
                            "train_samples_per_second": fit.samples_per_second,
                            "best_epoch": fit.best_epoch, "best_val_loss": fit.best_val_loss})
        for model, scores in bt.scores.items():
            prefix = "test" if model == label else model.replace("-", "_")
            mlflow.log_metrics({f"{prefix}_{k}": v for k, v in scores.items()})
        if champion.score is not None:
            mlflow.log_metric("champion_test_mase", champion.score)
        dataset = mlflow.data.from_pandas(series.frame, source=_dataset_source(series), name=name,
                                          targets=series.value_column, digest=series.sha256[:16])
        mlflow.log_input(dataset, context="training")
        for p in plots:
            mlflow.log_artifact(p, "plots")
        mlflow.log_text(bt.markdown(f"{name} backtest"), "backtest.md")

        cols = [series.value_column, *series.covariate_columns]
        example = series.frame[cols].iloc[: pipeline.lookback].astype("float64").reset_index(drop=True)
        forecast = pipeline.predict(example.to_numpy()[None])[0]
        output = pd.DataFrame({"step": np.arange(1, len(forecast) + 1, dtype=np.int64), "forecast": forecast})
        created["version"] = log_pyfunc(name, "forecaster.py", pipeline.save, example, output, lenient_inputs=True)
        return finish_registration(
            name, created["version"], bt.scores[label]["mase"], champion, "test MASE",
            {"test_mase": f"{bt.scores[label]['mase']:.6g}", "data_sha256": series.sha256,
             "source": series.source, "cell": cfg.cell, "lookback": str(cfg.lookback), "horizon": str(cfg.horizon)},
        )


def _dataset_source(series: Series) -> str | None:
    s = series.source
    if s.startswith(("http://", "https://")):
        return s
    if not s.startswith("generated:") and Path(s).exists():
        return str(Path(s).resolve())
    return None

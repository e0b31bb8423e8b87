"""The load steps of each flow: score the current champion on the new model's data, log the
run (params, curves, scores, data, plots), log and register the model from code (plain files:
safetensors weights, JSON config, the ``tasks/pyfunc`` module that serves them), and apply the
champion gate (``tasks.registry``)."""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.types.schema import AnyType, ColSpec, Schema

import rnn_models
from rnn_models.forecasting import ForecastPipeline
from rnn_models.text import save_charlm
from tasks.config import CharLMFlowConfig, TimeSeriesConfig
from tasks.evaluation import Backtest
from tasks.features import Data, Windows
from tasks.monitoring import DATA_END, data_ends
from tasks.panel import PanelBacktest, PanelData, panel_windows, per_series_csv
from tasks.reevaluate import backtest_registered
from tasks.registry import (
    ChampionScore,
    Registration,
    SharedLock,
    atomic_run,
    champion_version,
    client,
    finish_registration,
    unreachable,
    with_retries,
)
from tasks.selection import Selection
from tasks.text import Corpus, TrainedLM
from tasks.training import Settings, Trained

PYFUNC_DIR = Path(__file__).resolve().parent / "pyfunc"
CODE_PATHS = [str(Path(rnn_models.__file__).resolve().parent)]  # the models import only rnn_models


def score_champion(name: str, data: Data, windows: Windows, horizon: int, retry_minutes: float = 0.0) -> ChampionScore:
    """Backtest the current champion, as loaded from the registry, on the challenger's test data
    (one series, or the mean over many; retrying for ``retry_minutes`` while the tracking server
    does not answer); a champion of another shape (columns, horizon) has none, and the reason."""
    def attempt() -> ChampionScore:
        current = champion_version(name)
        if current is None:
            return ChampionScore(None)
        try:  # by number, not alias: the alias may move while we score
            return ChampionScore(str(current.version), backtest_registered(
                f"models:/{name}/{current.version}", data, windows.split, windows.test_origins, horizon))
        except Exception as e:
            if unreachable(e):
                raise
            return ChampionScore(str(current.version), None,
                                 f"it could not be scored on this data ({type(e).__name__}: {e})"[:300])
    return with_retries(attempt, retry_minutes, "scoring the champion")


def register_forecaster(settings: Settings, data: Data, windows: Windows, trained: Trained,
                        bt: Backtest | PanelBacktest, champion: ChampionScore, plots: list[str],
                        shared_lock: SharedLock | None = None) -> Registration:
    """Log the run (params, curves, backtest, data, plots, --auto's choice), register the model
    from code and apply the champion gate (``shared_lock``: see ``tasks.registry.champion_lock``);
    nothing is left registered if any of it fails. While the tracking server does not answer,
    all of it is tried again for --registry-retry-minutes."""
    return with_retries(
        lambda: _register_forecaster(settings, data, windows, trained, bt, champion, plots, shared_lock),
        settings.cfg.registry_retry_minutes, "registering the model")


def _register_forecaster(settings: Settings, data: Data, windows: Windows, trained: Trained,
                         bt: Backtest | PanelBacktest, champion: ChampionScore, plots: list[str],
                         shared_lock: SharedLock | None) -> Registration:
    cfg, pipeline = settings.cfg, trained.pipeline()
    name, mase = cfg.registered_name, bt.scores[cfg.label]["mase"]
    with atomic_run(cfg.experiment, f"{name}-{cfg.cell}", name) as created, tempfile.TemporaryDirectory() as tmp:
        log_training(cfg, trained, bt.scores, cfg.label, data_params(data))
        log_data(data, bt, cfg.label, name, tmp)
        mlflow.log_dict(data_ends(data), DATA_END)  # where the monitor's new data will start
        log_intervals(pipeline, bt)
        for p in plots:
            mlflow.log_artifact(p, "plots")
        mlflow.log_text(bt.markdown(f"{name} backtest"), "backtest.md")
        log_selection(settings.selection)
        if champion.score is not None:
            mlflow.log_metric("champion_test_mase", champion.score)
        example, output, optional = model_example(data, pipeline)
        created["version"] = log_pyfunc(name, "forecaster.py", pipeline.save, example, output, lenient_inputs=True,
                                        optional_inputs=optional)
        tags = {"kind": "forecaster", "test_mase": f"{mase:.6g}", "data_sha256": data.sha256, "source": data.source,
                "cell": ",".join(sorted(set(cfg.member_cells))), **data_tags(data), "lookback": str(cfg.lookback),
                "horizon": str(cfg.horizon), "ensemble": str(cfg.ensemble),
                "quantiles": ",".join(map(str, pipeline.quantiles)), "transforms": pipeline.describe(),
                "intervals": ",".join(f"{a:g}" for a in cfg.interval_levels)}
        metric = "mean test MASE over series" if isinstance(data, PanelData) else "test MASE"
        return finish_registration(name, created["version"], mase, champion, metric, tags,
                                   rescore=lambda: score_champion(name, data, windows, cfg.horizon),
                                   shared_lock=shared_lock)


def data_params(data: Data) -> dict:
    """The MLflow params that say what data the forecaster was trained on."""
    common = {"frequency": data.freq or "", "resolved_season_length": data.season_length,
              "resolved_value_column": data.value_column}
    if isinstance(data, PanelData):
        return {"series": len(data), "skipped_series": len(data.skipped), "rows": int(data.lengths.sum()), **common}
    return {"rows": len(data.frame), **common}


def data_tags(data: Data) -> dict:
    return {"id_column": data.id_column, "series": str(len(data))} if isinstance(data, PanelData) else {}


def log_data(data: Data, bt: Backtest | PanelBacktest, label: str, name: str, tmp: str) -> None:
    """One series as the run's input dataset, and its quantile intervals' scores; many series'
    scores one by one (per_series.csv), and those too short to use (skipped.csv)."""
    if isinstance(data, PanelData):
        mlflow.log_artifact(str(per_series_csv(bt, tmp)))
        if data.skipped:
            mlflow.log_text("id,rows\n" + "".join(f"{k},{n}\n" for k, n in data.skipped.items()), "skipped.csv")
        return
    for model, scores in bt.intervals.items():
        prefix = model.replace(label, "test", 1).replace("-", "_")
        mlflow.log_metrics({f"{prefix}_coverage": scores["coverage"], f"{prefix}_spl": scores["spl"]})
    with no_integer_hint():
        log_input(mlflow.data.from_pandas(data.frame, source=_source(data.source), name=name,
                                          targets=data.value_column, digest=data.sha256[:16]), context="training")


def log_intervals(pipeline: ForecastPipeline, bt: Backtest | PanelBacktest) -> None:
    """--intervals: each level's coverage and MSIS on the test part, and the calibration table."""
    if pipeline.calibration is None:
        return
    mlflow.log_param("intervals_calibrated_on", pipeline.calibration.calibrated_on)
    for a, s in bt.conformal.items():
        mlflow.log_metrics({f"test_coverage_{a:g}": s["coverage"], f"test_msis_{a:g}": s["msis"]})
    mlflow.log_text(pipeline.calibration.markdown(), "intervals.md")


def model_example(data: Data, pipeline: ForecastPipeline) -> tuple[pd.DataFrame, pd.DataFrame, tuple[str, ...]]:
    """The registered model's input example (one series' first ``lookback`` rows, or two series'
    last ones), its answer, and the columns it reads when sent (a global model's time column)."""
    L = pipeline.lookback
    if isinstance(data, PanelData):
        return panel_example(data, pipeline)
    cols, ahead = [data.value_column, *data.covariate_columns], pipeline.ahead
    window = data.frame[cols].iloc[: L + ahead].astype("float64").reset_index(drop=True)
    window.loc[L:, data.value_column] = np.nan  # the steps ahead: covariates known, the value to forecast
    output = pipeline.answer(window.to_numpy()[None])
    if not data.calendar_columns:
        return window, output, ()
    # the model makes its calendar features from the time column: a request sends that instead, and
    # rows ahead only for the covariates known ahead that it must give
    given_ahead = len(data.future_columns) > len(data.calendar_columns)
    example = window.drop(columns=data.calendar_columns).iloc[: L + ahead if given_ahead else L]
    example.insert(0, data.time_column, data.frame[data.time_column].iloc[: len(example)].astype(str).to_numpy())
    return example, output, ()


def panel_example(data: PanelData, pipeline: ForecastPipeline) -> tuple[pd.DataFrame, pd.DataFrame, tuple[str, ...]]:
    """``model_example`` of a global model: two series' last ``lookback`` rows (and the rows ahead, when
    it reads covariates given ahead) with the columns a request holds: the calendar's and the encoded
    attributes' are made from the time column and the attribute columns."""
    L, ahead, two = pipeline.lookback, pipeline.ahead, data.subset([0, 1])
    ends = [np.array([len(v) - ahead]) for v in two.values]
    windows = panel_windows(two, ends, L, ahead)  # (2, L + ahead, F)
    output = pipeline.answer(windows, ids=pd.Index(two.ids, name=data.id_column))
    made = [*data.calendar_columns, *(data.statics.columns if data.statics else [])]
    given = [c for c in data.future_columns if c not in made]
    rows = L + ahead if given or not data.calendar_columns else L
    columns = [data.value_column, *data.future_columns]
    example = pd.concat([pd.DataFrame(w[:rows], columns=columns).assign(**{data.id_column: sid}) for sid, w in
                         zip(two.ids, windows, strict=True)], ignore_index=True)
    example.loc[example.groupby(data.id_column).cumcount() >= L, data.value_column] = np.nan  # the steps ahead
    timed = bool(data.calendar_columns)  # a time column the model needs; else one it reads when sent
    if timed:
        example[data.time_column] = np.concatenate([t[len(t) - ahead - L:][:rows].astype(str) for t in two.times])
    if data.statics:
        example = example.drop(columns=data.statics.columns).join(data.attributes, on=data.id_column)
    example = example[[data.id_column, *([data.time_column] if timed else []), data.value_column, *given,
                       *(data.statics.order if data.statics else [])]]
    return example, output, (data.time_column,) if data.time_column and not timed else ()


def log_training(cfg: TimeSeriesConfig, trained: Trained, scores: dict[str, dict[str, float]], label: str,
                 data_params: dict) -> None:
    """A forecaster's params, curves, training figures and backtest scores on the active run:
    test_mase for the model, test_member2_mase for its members, naive_mase for the baselines."""
    fit, pipeline = trained.first_fit, trained.pipeline()
    mlflow.log_params(cfg.to_params())
    mlflow.log_params({"resolved_device": trained.device, "transforms": pipeline.describe(),
                       "member_cells": ",".join(cfg.member_cells), "members_fitted": len(trained.fits),
                       "quantile_levels": ",".join(map(str, pipeline.quantiles)), **data_params})
    log_history(fit.history)
    mlflow.log_metrics({"train_seconds": trained.train_seconds, "train_samples_per_second": fit.samples_per_second,
                        "best_epoch": fit.best_epoch, "best_val_loss": trained.val_loss,
                        "members_diverged": sum(bool(f.diverged) for f in trained.fits)})
    for model, by_metric in scores.items():
        prefix = model.replace(label, "test", 1).replace("-", "_")
        mlflow.log_metrics({f"{prefix}_{k}": v for k, v in by_metric.items() if math.isfinite(v)})


def log_selection(selection: Selection | None) -> None:
    """--auto's choice and each candidate's validation score (MASE, or OWA) on the active run."""
    if selection is not None:
        mlflow.log_param("auto_choice", selection.choice)
        if selection.members:  # --ensemble-candidates: the settings the members take in turn
            mlflow.log_param("auto_members", ", ".join(selection.members))
        prefix = f"auto_val_{selection.measure.lower()}_"  # auto_val_owa_log_window_norm_mean
        mlflow.log_metrics({prefix + k.replace(" + ", "_").replace(" ", "_").replace("-", "_"): v
                            for k, v in selection.scores.items() if math.isfinite(v)})
        mlflow.log_text(selection.markdown(), "auto.md")


def log_history(history) -> None:
    """Per-epoch losses (and learning rate) of the active run, in one request rather than one per epoch."""
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, s.epoch) for s in history
               for k, v in (("train_loss", s.train_loss), ("val_loss", s.val_loss), ("epoch_seconds", s.seconds),
                            ("lr", s.lr)) if math.isfinite(v)]
    client().log_batch(mlflow.active_run().info.run_id, metrics=metrics)


def log_input(dataset, context: str) -> None:
    """``mlflow.log_input``, tried again if another run created the same dataset at that moment:
    MLflow's get-or-create of a dataset is not atomic, so two runs at once on one store can hit
    its UNIQUE constraint (seen against a tracking server on SQLite); the retry finds the row."""
    for attempt in range(3):
        try:
            return mlflow.log_input(dataset, context=context)
        except MlflowException as e:
            if attempt == 2 or not any(s in str(e) for s in ("UNIQUE constraint", "IntegrityError")):
                raise
            time.sleep(0.2 * (attempt + 1))


@contextlib.contextmanager
def no_integer_hint():
    """Silence MLflow's "Inferred schema contains integer column(s)" hint, which it prints for
    every schema it infers: a forecast's ``step`` and a series' time step are integers on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        yield


def log_pyfunc(model_name: str, python_model: str, artifacts_dir_writer, input_example: pd.DataFrame,
               output_example: pd.DataFrame, params: dict | None = None, lenient_inputs: bool = False,
               optional_inputs: tuple[str, ...] = ()) -> str:
    """Log a model from code and register it under ``model_name``; returns the new version.

    ``lenient_inputs`` declares the input columns by name only (type Any): MLflow's schema
    check refuses int64 for a double column, but a history of 70, 80, 90 is a fair input; the
    model itself converts and checks the values. ``optional_inputs``: columns the model reads
    when they are sent (MLflow drops a column its signature does not name).
    """
    with no_integer_hint(), tempfile.TemporaryDirectory() as tmp:
        signature = infer_signature(input_example, output_example, params=params)
        if lenient_inputs:
            signature.inputs = Schema([ColSpec(AnyType(), c) for c in input_example.columns]
                                      + [ColSpec(AnyType(), c, required=False) for c in optional_inputs])
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
    import holidays
    import safetensors
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"safetensors=={safetensors.__version__}", f"numpy=={np.__version__}", f"pandas=={pd.__version__}",
            f"holidays=={holidays.__version__}"]  # calendar features flag public holidays


def _source(s: str) -> str | None:
    """A dataset source MLflow can record: a URL or an existing file (not a generator)."""
    if s.startswith(("http://", "https://")):
        return s
    if not s.startswith("generated:") and Path(s).exists():
        return str(Path(s).resolve())
    return None


# ---------------------------------------------------------------- character language model


def score_charlm_champion(name: str, corpus: Corpus) -> ChampionScore:
    """The champion's validation bits/char, comparable only on the same validation text."""
    current = champion_version(name)
    if current is None:
        return ChampionScore(None)
    tags = current.tags
    if tags.get("eval_sha256") != corpus.eval_sha256:
        return ChampionScore(str(current.version), None,
                             f"it was trained on another corpus ({tags.get('source', '?')}, sha256 "
                             f"{tags.get('corpus_sha256', '?')[:12]}), so bits/char are not comparable")
    return ChampionScore(str(current.version), float(tags["val_bpc"]))


def register_charlm(cfg: CharLMFlowConfig, corpus: Corpus, trained: TrainedLM,
                    shared_lock: SharedLock | None = None) -> Registration:
    """Score the champion, log the run, register the model and apply the champion gate, all of
    it tried again for --registry-retry-minutes while the tracking server does not answer."""
    return with_retries(lambda: _register_charlm(cfg, corpus, trained, shared_lock), cfg.registry_retry_minutes,
                        "registering the model")


def _register_charlm(cfg: CharLMFlowConfig, corpus: Corpus, trained: TrainedLM,
                     shared_lock: SharedLock | None) -> Registration:
    name = cfg.registered_name
    champion = score_charlm_champion(name, corpus)
    fit = trained.fit
    bpc = fit.best_val_loss / math.log(2)
    with atomic_run(cfg.experiment, f"{name}-{cfg.cell}", name) as created:
        mlflow.log_params(cfg.to_params())
        mlflow.log_params({"vocab_size": len(corpus.vocab), "corpus_chars": corpus.chars,
                           "trained_batch_size": corpus.batch_size, "trained_num_steps": corpus.num_steps,
                           "resolved_device": trained.device})
        log_history(fit.history)
        for s in fit.history:
            mlflow.log_metrics({"val_perplexity": math.exp(s.val_loss), "val_bpc": s.val_loss / math.log(2)},
                               step=s.epoch)
        mlflow.log_metrics({"best_val_loss": fit.best_val_loss, "best_val_bpc": bpc,
                            "best_val_perplexity": math.exp(fit.best_val_loss), "best_epoch": fit.best_epoch,
                            "train_seconds": fit.train_seconds, "train_tokens_per_second": fit.samples_per_second})
        if champion.score is not None:
            mlflow.log_metric("champion_val_bpc", champion.score)
        for epoch, texts in trained.samples.items():
            label = f"epoch_{epoch:03d}" if epoch else "final"
            mlflow.log_text("\n\n".join(f"[{p}]\n{t}" for p, t in texts.items()), f"samples/{label}.txt")
        log_input(mlflow.data.from_pandas(pd.DataFrame({"corpus": [corpus.source]}), name=name,
                                          source=_source(corpus.source), digest=corpus.sha256[:16]), context="training")
        meta = {"lower": cfg.lower, "letters_only": cfg.letters_only, "trained_on": corpus.source,
                "corpus_sha256": corpus.sha256}
        example = pd.DataFrame({"prefix": cfg.prompts[:1]})
        output = pd.DataFrame({"text": [next(iter(trained.samples[0].values()))]})
        created["version"] = log_pyfunc(
            name, "charlm.py", lambda d: save_charlm(trained.model(), corpus.vocab, d, meta), example, output,
            params={"max_new_chars": 200, "temperature": 1.0, "top_k": 0, "seed": -1})
        return finish_registration(
            name, created["version"], bpc, champion, "validation bits/char",
            {"kind": "charlm", "val_bpc": f"{bpc:.6g}", "corpus_sha256": corpus.sha256,
             "eval_sha256": corpus.eval_sha256,
             "source": corpus.source, "cell": cfg.cell},
            rescore=lambda: score_charlm_champion(name, corpus), shared_lock=shared_lock,
        )

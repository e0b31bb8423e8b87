"""The registration tasks of each flow: score the current champion on the new model's data,
log the run, register the model from code, and apply the champion gate."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from rnn_models.text import save_charlm
from rnn_models.windows import Split
from tasks.config import CharLMFlowConfig, TimeSeriesConfig
from tasks.data import Series
from tasks.evaluation import Backtest
from tasks.panel import PanelBacktest, PanelData, PanelSplit, per_series_csv
from tasks.reevaluate import backtest_registered, backtest_registered_panel
from tasks.registry import (
    ChampionScore,
    Registration,
    atomic_run,
    champion_version,
    finish_registration,
    log_history,
    log_input,
    log_pyfunc,
    no_integer_hint,
    unreachable,
    with_retries,
)
from tasks.selection import Selection
from tasks.text import Corpus
from tasks.training import Trained, TrainedLM


def score_champion(name: str, series: Series, split: Split, origins: np.ndarray, horizon: int,
                   retry_minutes: float = 0.0) -> ChampionScore:
    """Backtest the current champion, as loaded from the registry, on the challenger's test data
    (retrying for ``retry_minutes`` while the tracking server does not answer)."""
    return _score_champion(name, lambda uri: backtest_registered(uri, series, split, origins, horizon),
                           retry_minutes)


def _score_champion(name: str, backtest: Callable[[str], float], retry_minutes: float) -> ChampionScore:
    """The current champion's score by ``backtest(model URI)``, or why it has none."""
    def attempt() -> ChampionScore:
        current = champion_version(name)
        if current is None:
            return ChampionScore(None)
        try:  # by number, not alias: the alias may move while we score
            return ChampionScore(str(current.version), backtest(f"models:/{name}/{current.version}"))
        except Exception as e:  # a champion of another shape (columns, horizon) cannot compete here
            if unreachable(e):
                raise
            return ChampionScore(str(current.version), None,
                                 f"it could not be scored on this data ({type(e).__name__}: {e})"[:300])
    return with_retries(attempt, retry_minutes, "scoring the champion")


def register_forecaster(cfg: TimeSeriesConfig, series: Series, split: Split, trained: Trained, bt: Backtest,
                        label: str, champion: ChampionScore, plots: list[str],
                        selection: Selection | None = None) -> Registration:
    """Log the run (params, curves, backtest, data, plots, --auto's choice), register the model
    from code and apply the champion gate; nothing is left registered if any of it fails. While
    the tracking server does not answer, all of it is tried again for --registry-retry-minutes."""
    return with_retries(lambda: _register_forecaster(cfg, series, split, trained, bt, label, champion, plots,
                                                     selection), cfg.registry_retry_minutes, "registering the model")


def _register_forecaster(cfg: TimeSeriesConfig, series: Series, split: Split, trained: Trained, bt: Backtest,
                         label: str, champion: ChampionScore, plots: list[str],
                         selection: Selection | None) -> Registration:
    name, pipeline, mase = cfg.registered_name, trained.pipeline(), bt.scores[label]["mase"]
    with atomic_run(cfg.experiment, f"{name}-{cfg.cell}", name) as created:
        log_forecaster_run(cfg, series, trained, bt, label, plots, selection)
        if champion.score is not None:
            mlflow.log_metric("champion_test_mase", champion.score)
        cols = [series.value_column, *series.covariate_columns]
        example = series.frame[cols].iloc[: pipeline.lookback].astype("float64").reset_index(drop=True)
        output = pipeline.to_frame(pipeline.predict(example.to_numpy()[None])[0])
        created["version"] = log_pyfunc(name, "forecaster.py", pipeline.save, example, output, lenient_inputs=True)
        tags = {"kind": "forecaster", "test_mase": f"{mase:.6g}", "data_sha256": series.sha256,
                "source": series.source, "cell": ",".join(sorted(set(cfg.member_cells))),
                "lookback": str(cfg.lookback), "horizon": str(cfg.horizon), "ensemble": str(cfg.ensemble),
                "quantiles": ",".join(map(str, pipeline.quantiles)), "transforms": pipeline.chain.describe()}
        return finish_registration(name, created["version"], mase, champion, "test MASE", tags,
                                   rescore=lambda: score_champion(name, series, split, bt.origins, cfg.horizon))


def log_forecaster_run(cfg: TimeSeriesConfig, series: Series, trained: Trained, bt: Backtest, label: str,
                       plots: list[str], selection: Selection | None) -> None:
    """Everything the active MLflow run records about a trained forecaster, but the model."""
    log_training(cfg, trained, bt.scores, label, {"rows": len(series.frame), "frequency": series.freq or "",
                                                  "resolved_season_length": series.season_length,
                                                  "resolved_value_column": series.value_column})
    prefix = {m: m.replace(label, "test", 1).replace("-", "_") for m in bt.scores}
    for model, scores in bt.intervals.items():
        mlflow.log_metrics({f"{prefix[model]}_coverage": scores["coverage"], f"{prefix[model]}_spl": scores["spl"]})
    with no_integer_hint():
        log_input(mlflow.data.from_pandas(series.frame, source=_source(series.source), name=cfg.registered_name,
                                          targets=series.value_column, digest=series.sha256[:16]), context="training")
    for p in plots:
        mlflow.log_artifact(p, "plots")
    mlflow.log_text(bt.markdown(f"{cfg.registered_name} backtest"), "backtest.md")
    log_selection(selection)


def log_training(cfg: TimeSeriesConfig, trained: Trained, scores: dict[str, dict[str, float]], label: str,
                 data_params: dict) -> None:
    """A forecaster's params, curves, training figures and backtest scores on the active run:
    test_mase for the model, test_member2_mase for its members, naive_mase for the baselines."""
    fit, pipeline = trained.first_fit, trained.pipeline()
    mlflow.log_params(cfg.to_params())
    mlflow.log_params({"resolved_device": trained.device, "transforms": pipeline.chain.describe(),
                       "member_cells": ",".join(cfg.member_cells),
                       "quantile_levels": ",".join(map(str, pipeline.quantiles)), **data_params})
    log_history(fit.history)
    mlflow.log_metrics({"train_seconds": trained.train_seconds, "train_samples_per_second": fit.samples_per_second,
                        "best_epoch": fit.best_epoch, "best_val_loss": trained.val_loss})
    for model, by_metric in scores.items():
        prefix = model.replace(label, "test", 1).replace("-", "_")
        mlflow.log_metrics({f"{prefix}_{k}": v for k, v in by_metric.items() if math.isfinite(v)})


def log_selection(selection: Selection | None) -> None:
    """--auto's choice and each candidate's validation MASE on the active run."""
    if selection is not None:
        mlflow.log_param("auto_choice", selection.choice)
        mlflow.log_metrics({f"auto_val_mase_{k.replace(' + ', '_').replace(' ', '_').replace('-', '_')}": v
                            for k, v in selection.scores.items() if math.isfinite(v)})
        mlflow.log_text(selection.markdown(), "auto.md")


# ---------------------------------------------------------------- many series, one network


def score_panel_champion(name: str, panel: PanelData, split: PanelSplit, origins: list[np.ndarray], horizon: int,
                         retry_minutes: float = 0.0) -> ChampionScore:
    """``score_champion`` for a global model: the champion's mean test MASE over the series."""
    return _score_champion(name, lambda uri: backtest_registered_panel(uri, panel, split, origins, horizon),
                           retry_minutes)


def register_panel_forecaster(cfg: TimeSeriesConfig, panel: PanelData, split: PanelSplit, trained: Trained,
                              bt: PanelBacktest, label: str, champion: ChampionScore,
                              selection: Selection | None = None) -> Registration:
    """``register_forecaster`` for a global model over many series: the per-series table is
    logged as per_series.csv beside the mean scores."""
    return with_retries(lambda: _register_panel(cfg, panel, split, trained, bt, label, champion, selection),
                        cfg.registry_retry_minutes, "registering the model")


def _register_panel(cfg: TimeSeriesConfig, panel: PanelData, split: PanelSplit, trained: Trained,
                    bt: PanelBacktest, label: str, champion: ChampionScore, selection: Selection | None
                    ) -> Registration:
    name, pipeline, mase = cfg.registered_name, trained.pipeline(), bt.scores[label]["mase"]
    with atomic_run(cfg.experiment, f"{name}-{cfg.cell}", name) as created, tempfile.TemporaryDirectory() as tmp:
        log_training(cfg, trained, bt.scores, label, {
            "series": len(panel), "skipped_series": len(panel.skipped), "rows": int(panel.lengths.sum()),
            "frequency": panel.freq or "", "resolved_season_length": panel.season_length,
            "resolved_value_column": panel.value_column})
        if champion.score is not None:
            mlflow.log_metric("champion_test_mase", champion.score)
        mlflow.log_artifact(str(per_series_csv(bt, tmp)))
        if panel.skipped:
            mlflow.log_text("id,rows\n" + "".join(f"{k},{n}\n" for k, n in panel.skipped.items()), "skipped.csv")
        mlflow.log_text(bt.markdown(f"{name} backtest"), "backtest.md")
        log_selection(selection)
        ids, L = panel.ids[:2], pipeline.lookback  # the example: two series' last lookback values
        tails = np.stack([v[-L:] for v in panel.values[:2]])  # (2, L)
        example = pd.DataFrame({panel.id_column: np.repeat(ids, L), panel.value_column: tails.ravel()})
        output = pipeline.to_frame(pipeline.predict(tails[..., None]), ids=pd.Index(ids, name=panel.id_column))
        created["version"] = log_pyfunc(name, "forecaster.py", pipeline.save, example, output, lenient_inputs=True,
                                        optional_inputs=(panel.time_column,) if panel.time_column else ())
        tags = {"kind": "forecaster", "test_mase": f"{mase:.6g}", "data_sha256": panel.sha256,
                "source": panel.source, "cell": ",".join(sorted(set(cfg.member_cells))), "id_column": panel.id_column,
                "series": str(len(panel)), "lookback": str(cfg.lookback), "horizon": str(cfg.horizon),
                "ensemble": str(cfg.ensemble), "quantiles": ",".join(map(str, pipeline.quantiles)),
                "transforms": pipeline.chain.describe()}
        return finish_registration(name, created["version"], mase, champion, "mean test MASE over series", tags,
                                   rescore=lambda: score_panel_champion(name, panel, split, bt.origins, cfg.horizon))


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


def register_charlm(cfg: CharLMFlowConfig, corpus: Corpus, trained: TrainedLM) -> Registration:
    """Score the champion, log the run, register the model and apply the champion gate, all of
    it tried again for --registry-retry-minutes while the tracking server does not answer."""
    return with_retries(lambda: _register_charlm(cfg, corpus, trained), cfg.registry_retry_minutes,
                        "registering the model")


def _register_charlm(cfg: CharLMFlowConfig, corpus: Corpus, trained: TrainedLM) -> Registration:
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
            rescore=lambda: score_charlm_champion(name, corpus),
        )

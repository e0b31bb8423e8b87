"""The pipeline's steps as Prefect tasks, for the flows to compose. Each wraps a plain function
of ``tasks/`` with a name, retries where it does I/O, and a cache policy, and nothing more:
the logic stays callable without Prefect (sweep trials, re-scoring, tests and benchmarks call
the plain functions), so it is written once."""

from __future__ import annotations

import contextlib
import gc

# Importing this module loads torch, MLflow, pandas and matplotlib, most of a run's objects, once per
# process, and they live as long as it does: they load with the cyclic collector paused and then move
# into its permanent generation (gc.freeze), so that later passes walk only what the run itself makes
# (docs/BENCHMARKS.md, "Everyday runs").
_collecting = gc.isenabled()
gc.disable()
try:
    import numpy as np
    import pandas as pd
    from prefect import task
    from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CachePolicy
    from prefect.utilities.hashing import hash_objects

    from tasks import data, evaluation, features, ingest, monitoring, panel, publish, selection, sweep, text, training

    evaluation.pyplot()  # matplotlib too, which tasks/ imports when it draws
finally:
    gc.freeze()
    if _collecting:
        gc.enable()


def _libraries(ctx, params: dict) -> str:
    # a persisted result is a pickle of pandas and numpy objects: one written under other versions
    # can load as objects this pandas cannot use (pandas 3's Arrow-backed columns read by pandas 2
    # broke the registration of a run that reused them), so a new version means new results
    return hash_objects(np.__version__, pd.__version__, raise_on_failure=True)


LIBRARIES = CachePolicy.from_cache_key_fn(_libraries)
# Cached by what goes in (a file's sha256, the config), the step's code and the versions of the
# libraries its result is made of: a scheduled run whose data and config did not change reuses
# the persisted result instead of redoing the work.
CONTENT = INPUTS + TASK_SOURCE + LIBRARIES


def _by_series_content(ctx, params: dict) -> str:
    # series are keyed by their data's sha256 (they are what the config made of that data);
    # hashing the DataFrame itself proved unstable from one flow run to the next
    return hash_objects(params["data"].sha256, params["cfg"], params.get("split"), raise_on_failure=True)


SERIES_CONTENT = CachePolicy.from_cache_key_fn(_by_series_content) + TASK_SOURCE + LIBRARIES


def _transient(task, run, state) -> bool:
    return isinstance(state.data, ingest.TransientDataError)  # network trouble, 5xx, 429: not a bad checksum


# --- extract
fetch_data = task(name="fetch-data", retries=3, retry_delay_seconds=[1, 2, 4],
                  retry_condition_fn=_transient)(ingest.fetch_data)
generate_series = task(name="generate-series", cache_policy=CONTENT, persist_result=True)(data.generate_series)
load_series = task(name="load-series", cache_policy=CONTENT, persist_result=True)(data.load_series)
split_by_id = task(name="split-by-id", cache_policy=NO_CACHE)(sweep.split_by_id)
load_panel = task(name="load-panel", cache_policy=CONTENT, persist_result=True)(panel.load_panel)
load_corpus = task(name="load-corpus", cache_policy=NO_CACHE)(text.load_corpus)

# --- transform
choose_settings = task(name="choose-settings", cache_policy=NO_CACHE)(selection.choose_settings)
with_calendar = task(name="calendar-features", cache_policy=NO_CACHE)(data.with_calendar)
split_series = task(name="split-series", cache_policy=SERIES_CONTENT, persist_result=True)(features.split_series)
scale_and_window = task(name="scale-and-window", cache_policy=SERIES_CONTENT,
                        persist_result=True)(features.scale_and_window)
train_forecaster = task(name="train-forecaster", cache_policy=NO_CACHE)(training.train_forecaster)
train_charlm = task(name="train-charlm", cache_policy=NO_CACHE)(text.train_charlm)
run_trials = task(name="sweep-trials", cache_policy=NO_CACHE)(sweep.run_trials)
calibrate_intervals = task(name="calibrate-intervals", cache_policy=NO_CACHE)(evaluation.calibrate_intervals)
backtest = task(name="backtest", cache_policy=NO_CACHE)(evaluation.backtest)
plot_backtest = task(name="plot-backtest", cache_policy=NO_CACHE)(evaluation.plot_backtest)

# --- load
score_champion = task(name="score-champion", cache_policy=NO_CACHE)(publish.score_champion)
register_forecaster = task(name="register-forecaster", cache_policy=NO_CACHE)(publish.register_forecaster)
register_charlm = task(name="register-charlm", cache_policy=NO_CACHE)(publish.register_charlm)

# --- monitor
check_model = task(name="check-model", task_run_name="check-{name}", cache_policy=NO_CACHE)(monitoring.check_model)
log_check = task(name="log-check", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)(monitoring.log_check)


@contextlib.contextmanager
def champion_gate_lock(model_name: str, timeout_seconds: float = 600):
    """The champion gate's lock for runs on several machines sharing a tracking server: a
    Prefect global concurrency limit of one slot named after the model, on the Prefect server
    they share (created on first use; its lease lapses if the holder dies)."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = f"rnnflow-champion-{model_name}"
    with get_client(sync_client=True) as c:
        try:
            c.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it a moment ago
                c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield


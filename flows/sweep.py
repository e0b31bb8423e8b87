"""Hyper-parameter sweep of the time-series flow on a thread pool or a Dask cluster.

    python -m flows.sweep --cell lstm,gru --hidden-size 32,64 --lookback 24,48 [--samples 4]
                          [--task-runner thread|dask] [--workers 2] [--dask-address tcp://host:8786]

Every option of ``python -m flows.timeseries`` is accepted, and any of them may be a
comma-separated list. Each trial is a nested MLflow run under one parent run; the trial with
the lowest validation loss is then backtested, registered and gated by the same tasks as a
single run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import fields

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal
from prefect.task_runners import ThreadPoolTaskRunner

from flows import exit_process
from flows.cli import USER_ERRORS, Terminated, registration_note, terminate
from flows.parsing import Parser
from flows.server import prefect_api
from flows.steps import run_trials, scale_and_window, split_by_id, split_series
from flows.timeseries import evaluate_and_register
from rnn_models.training import STOP, resolve_device
from tasks.config import ConfigError, TimeSeriesConfig, flag, safe_name
from tasks.data import SERIES_SUFFIXES, with_calendar
from tasks.ingest import fetch_data, read_series
from tasks.registry import client, ensure_experiment
from tasks.sweep import build_grid, results_markdown, split_grid, trained_from
from tasks.tracking import CHAMPION, check_tracking_server
from tasks.training import GROUP_PER_THREAD, Settings, why_not_grouped


def train_trials(jobs: list[tuple[dict, dict]], parent_id: str, experiment_id: str, workers: int):
    """Every (base, grid point) as a trial, in parallel on the flow's task runner, in ``packs``.
    Returns the results in job order and the wall time of the phase."""
    workers = start_workers(workers)  # not part of the phase: a cluster's start is paid once per sweep
    groups = packs([(i, point, base) for i, (base, point) in enumerate(jobs)], workers)
    t0 = time.perf_counter()
    with stopping_trials():
        futures = [run_trials.with_options(task_run_name=f"sweep-trials-{'-'.join(str(i) for i, _, _ in pack)}")
                   .submit(pack, parent_id, experiment_id) for pack in groups]
        results = sorted((r for f in futures for r in f.result()), key=lambda r: r.index)
    return results, time.perf_counter() - t0


@contextlib.contextmanager
def stopping_trials():
    """While trials train in threads of this process, Ctrl-C or SIGTERM first tells them to stop at
    their next step (``rnn_models.training.STOP``), then does what it did before: the main thread,
    which alone gets signals, would otherwise see it only once every trial had finished."""
    STOP.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def stop(signum, frame):
        STOP.set()
        handler = before[signum]
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated

    for sig, handler in before.items():
        if handler != signal.SIG_IGN:
            signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


# what decides whether trials' networks can train as one (tasks.training.Network.group_key): a field
# left out here costs only grouping, never correctness (networks train together only where they match)
SHAPE_FIELDS = ("source", "data", "length", "value_column", "covariate_columns", "future_covariate_columns",
                "max_gap", "lookback", "horizon", "stride", "val_size", "test_size", "cell", "ensemble_cells",
                "hidden_size", "num_layers", "dropout", "bidirectional", "patch", "batch_size", "loss", "quantiles",
                "clip", "device")


def packs(trials: list[tuple[int, dict, dict]], workers: int) -> list[list[tuple[int, dict, dict]]]:
    """The trials (index, point, base) as the tasks that run them, largest first. Trials alike in
    ``SHAPE_FIELDS`` whose LSTMs the grouped operation covers and that leave room in a group of
    ``GROUP_PER_THREAD`` networks (no --auto, whose candidates fill one; an ensemble of at most half
    a group) go in groups spread over the workers, each trained as one (tasks.sweep.run_trials).
    Every other trial is a task of its own, for whichever worker is free."""
    classes: dict[tuple, list] = {}
    for trial in trials:
        cfg = TimeSeriesConfig(**{**trial[2], **trial[1]})
        roomy = not cfg.auto and 2 * cfg.ensemble <= GROUP_PER_THREAD and "lstm" in cfg.member_cells
        device, ahead = resolve_device(cfg.device), len(cfg.future_covariates)
        groupable = roomy and not why_not_grouped("lstm", cfg, device, 1, ahead)
        key = (cfg.ensemble, *(str(getattr(cfg, f)) for f in SHAPE_FIELDS)) if groupable else ("alone", trial[0])
        classes.setdefault(key, []).append(trial)
    out = []
    for key, alike in classes.items():
        # spread over every worker, no more trials a group than it holds networks of theirs
        n = 1 if key[0] == "alone" else min(-(-len(alike) // workers), GROUP_PER_THREAD // key[0])
        out += [alike[i:i + n] for i in range(0, len(alike), n)]
    return sorted(out, key=len, reverse=True)


def start_workers(workers: int) -> int:
    """Start (or connect to) the flow's Dask cluster now, not inside the first trials as
    DaskTaskRunner would, and return how many workers it has (``workers`` threads otherwise)."""
    from prefect_dask import DaskTaskRunner

    runner = FlowRunContext.get().task_runner
    if isinstance(runner, DaskTaskRunner):
        return len(runner.client.scheduler_info()["workers"]) or workers  # the property starts the cluster
    return workers


def register_best(base: dict, best, out: str):
    """The best trial through the single run's last steps: backtest, champion gate, registration."""
    cfg = TimeSeriesConfig(**{**base, **best.params})
    series = with_calendar(read_series(cfg), cfg)  # the calendar features, if the trial had them
    windows = scale_and_window(series, split_series(series, cfg), cfg)
    bt, _, reg = evaluate_and_register(Settings(cfg, None), series, windows, trained_from(best, out))
    return bt, reg


@contextlib.contextmanager
def parent_run(experiment: str, name: str, tags: dict):
    """The sweep's parent MLflow run; on failure it is deleted with every nested trial run."""
    experiment_id = ensure_experiment(experiment)
    c = client()
    parent_id = c.create_run(experiment_id, run_name=name, tags={"sweep": "true", **tags}).info.run_id
    try:
        yield experiment_id, parent_id
    except BaseException:
        for run in c.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"):
            c.delete_run(run.info.run_id)
        c.delete_run(parent_id)
        raise


@flow(name="timeseries-sweep", log_prints=True)
def sweep_flow(base: dict, grid: list[dict], workers: int = 2) -> dict:
    base_cfg = TimeSeriesConfig(**base)
    name = base_cfg.registered_name
    with parent_run(base_cfg.experiment, f"sweep-{name}", {"trials": str(len(grid))}) as (experiment_id, parent_id):
        with tempfile.TemporaryDirectory() as out:
            results, trials_wall = train_trials([(base, p) for p in grid], parent_id, experiment_id, workers)
            best = min(results, key=lambda r: r.val_loss)
            bt, reg = register_best(base, best, out)
    table = results_markdown(results, best)
    with mlflow.start_run(run_id=parent_id):
        mlflow.log_params({"grid_points": len(grid), "best_trial": best.index})
        mlflow.log_metrics({"best_val_loss": best.val_loss, "best_test_mase": best.test_mase,
                            "trials_wall_seconds": trials_wall})
        mlflow.log_text(table, "sweep.md")
        mlflow.set_tags({"best_trial_run": best.run_id, "registered_version": reg.version})
    report = (f"### Sweep of {len(grid)} trials for {name}\n\n{table}\n\n"
              f"{bt.markdown(f'best trial, {name} v{reg.version}')}\n\n{registration_note(name, reg)}")
    create_markdown_artifact(report, key=f"{safe_name(name)}-sweep", description=f"sweep of {len(grid)} trials")
    return {"parent_run_id": parent_id, "best": best.index, "best_params": best.params, "version": reg.version,
            "promoted": reg.promoted, "reason": reg.reason, "report": report, "trials": len(results),
            "trials_wall_seconds": trials_wall, "trial_seconds": [r.seconds for r in results],
            "champion_uri": f"models:/{name}@{CHAMPION}"}


@flow(name="timeseries-many-series", log_prints=True)
def many_series_flow(base: dict, grid: list[dict], id_column: str, workers: int = 2) -> dict:
    """One model per series of a long-format file (id, time, value), all trials in parallel,
    each series' best registered under NAME-<id> with its own champion gate."""
    base_cfg = TimeSeriesConfig(**base)
    name = base_cfg.registered_name
    with tempfile.TemporaryDirectory() as out:
        files = split_by_id(base_cfg.data, base_cfg.sha256, id_column, out)
        bases = {sid: {**base, "data": path, "sha256": "", "model_name": f"{name}-{sid}"}
                 for sid, path in files.items()}
        with parent_run(base_cfg.experiment, f"many-series-{name}", {"series": str(len(files))}) as (exp_id, parent_id):
            results, wall = train_trials([(b, p) for b in bases.values() for p in grid], parent_id, exp_id, workers)
            rows = []
            for k, sid in enumerate(bases):  # the results come in job order: each series' grid in turn
                best = min(results[k * len(grid):(k + 1) * len(grid)], key=lambda r: r.val_loss)
                rows.append((sid, best, register_best(bases[sid], best, out)[1]))
    table = "\n".join(["| series | model | best trial | val loss | test MASE | version | champion |",
                        "|---|---|---|---:|---:|---:|---|",
                        *(f"| {sid} | {name}-{sid} | {b.index} | {b.val_loss:.5g} | {b.test_mase:.4g} | "
                          f"{reg.version} | {'promoted' if reg.promoted else 'kept'} |" for sid, b, reg in rows)])
    with mlflow.start_run(run_id=parent_id):
        mlflow.log_params({"series": len(files), "grid_points": len(grid)})
        mlflow.log_metric("trials_wall_seconds", wall)
        mlflow.log_text(table, "summary.md")
    report = f"### {len(files)} series, {len(grid)} grid point(s) each\n\n{table}"
    create_markdown_artifact(report, key=f"{safe_name(name)}-many-series", description=f"{len(files)} series")
    return {"parent_run_id": parent_id, "series": sorted(files), "report": report,
            "versions": {sid: reg.version for sid, _, reg in rows}}


def task_runner(kind: str, workers: int, address: str):
    """Threads, a local Dask cluster, or the Dask scheduler at ``address`` (which must answer now,
    before any trial)."""
    if address:
        from distributed.comm import parse_address, parse_host_port  # Dask's own reading of its addresses

        try:
            socket.create_connection(parse_host_port(parse_address(address)[1], default_port=8786), timeout=5.0).close()
        except (OSError, ValueError) as e:
            raise ConfigError(f"--dask-address {address}: cannot reach the Dask scheduler ({e})") from None
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    import dask

    # the workers' profiler samples every 10 ms, CPU taken from training (they take this process's config)
    dask.config.set({"distributed.worker.profile.enabled": False})
    # warnings and errors only: its INFO log is the cluster's own start and stop, and a connection closed
    # as it stops comes with a traceback (tasks.dask_worker does the same in each worker)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "preload": ["tasks.dask_worker"]})


# what the input checks read (flows.timeseries.check_input): grid points alike in these are checked once
DATA_FIELDS = ("source", "data", "sha256", "time_column", "value_column", "covariate_columns",
               "future_covariate_columns", "max_gap", "length", "lookback", "horizon", "stride", "val_size",
               "test_size", "season_length", "scaler", "transform", "difference", "window_norm", "baseline")


def check_data(base: dict, grid: list[dict], id_column: str) -> None:
    """Before Prefect starts: the tracking server answers, and the data of each distinct data setting
    reads, has its columns and is long enough (``flows.timeseries.check_input``). With ``id_column``
    the file is split per series inside the flow, so only its existence is checked here."""
    from flows.timeseries import check_input

    check_tracking_server()
    distinct = {}
    for point in grid:
        cfg = TimeSeriesConfig(**{**base, **point})
        distinct.setdefault(tuple(str(getattr(cfg, f)) for f in DATA_FIELDS), cfg)
    for cfg in distinct.values():
        if not id_column:
            check_input(cfg)
        elif cfg.source != "file":
            raise ConfigError("--id-column needs --source file --data LONG_FORMAT_FILE")
        else:
            fetch_data(cfg.data, cfg.sha256, SERIES_SUFFIXES)


def parser() -> Parser:
    p = Parser(prog="python -m flows.sweep", description=__doc__.split("\n")[0],
               epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("sweep")
    g.add_argument("--samples", type=int, default=0, help="random sample of N grid points (0 = the whole grid)")
    g.add_argument("--task-runner", choices=("thread", "dask"), default="thread")
    g.add_argument("--workers", type=int, default=2, help="parallel trials (threads or local Dask workers)")
    g.add_argument("--dask-address", default="", help="an existing Dask scheduler, e.g. tcp://host:8786")
    g.add_argument("--id-column", default="", help="long-format --data: one model per value of this column, "
                   "registered as NAME-<id> (one global model over every series: python -m flows.timeseries "
                   "--id-column)")
    t = p.add_argument_group("time-series options (any may be a comma-separated list)")
    for f in fields(TimeSeriesConfig):
        if f.name == "id_column":  # here --id-column means one model per series (above)
            continue
        t.add_argument(flag(f.name), dest=f.name, default=None, metavar="V[,V...]", help=f.metadata.get("help"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, terminate)
    options = {f.name: getattr(args, f.name) for f in fields(TimeSeriesConfig)
               if f.name != "id_column" and getattr(args, f.name) is not None}
    try:
        base, grid = split_grid(build_grid(options, args.samples))
        check_data(base, grid, args.id_column)
        runner = task_runner(args.task_runner, args.workers, args.dask_address)
        per_series = {"id_column": args.id_column} if args.id_column else {}
        sweep_fn = (many_series_flow if per_series else sweep_flow).with_options(task_runner=runner)
        with prefect_api():  # one server for the sweep and its Dask workers (they inherit its URL)
            result = sweep_fn(base=base, grid=grid, workers=args.workers, **per_series)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, TerminationSignal) as e:
        STOP.set()
        print("interrupted: nothing registered; the sweep's MLflow runs were deleted", file=sys.stderr)
        return 130 if type(e) is KeyboardInterrupt else 143
    print(result["report"])
    return 0


if __name__ == "__main__":
    # run as the module flows.sweep, not as __main__: a Dask task carries the flow run's context, the
    # flow among it, and a worker can import the flow by its module's name only (a flow of __main__ is
    # pickled by value, its module's globals with it, and a thread lock among them does not pickle)
    from flows.sweep import main as sweep_main

    exit_process(sweep_main())

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
import os
import sys
import tempfile
import time
from dataclasses import fields

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.cli import registration_note
from rnn_models.windows import window_origins
from tasks.config import ConfigError, TimeSeriesConfig, flag
from tasks.evaluation import backtest, plot_backtest
from tasks.features import split_series
from tasks.register import register_forecaster, score_champion
from tasks.registry import CHAMPION, TrackingUnavailable, check_tracking_server, client, ensure_experiment
from tasks.sweep import build_grid, load, results_markdown, run_trial, trained_from


@flow(name="timeseries-sweep", log_prints=True)
def sweep_flow(base: dict, grid: list[dict]) -> dict:
    cfg0 = TimeSeriesConfig(**base)
    experiment_id = ensure_experiment(cfg0.experiment)
    parent = client().create_run(experiment_id, run_name=f"sweep-{cfg0.registered_name}",
                                 tags={"sweep": "true", "trials": str(len(grid))})
    parent_id = parent.info.run_id
    try:
        with tempfile.TemporaryDirectory() as out:
            # --- train every point (in parallel on the task runner)
            t0 = time.perf_counter()
            futures = [run_trial.submit(i, point, base, parent_id, experiment_id, out) for i, point in enumerate(grid)]
            results = [f.result() for f in futures]
            trials_wall = time.perf_counter() - t0
            best = min(results, key=lambda r: r.val_loss)

            # --- the best trial goes through the single-run tasks: backtest, champion gate, register
            cfg = TimeSeriesConfig(**{**base, **best.params})
            series = load(cfg)
            split = split_series(series, cfg)
            trained = trained_from(best)
            label = f"rnnflow-{cfg.cell}"
            origins = window_origins(*split.part("test"), cfg.lookback, cfg.horizon)
            bt = backtest(series, split, origins, trained.pipeline(), label)
            champion = score_champion(cfg.registered_name, series, split, origins, cfg.horizon)
            plots = plot_backtest(series, bt, trained.fit, label, out)
            reg = register_forecaster(cfg, series, split, trained, bt, label, champion, plots)
    except BaseException:
        c = client()
        for run in c.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"):
            c.delete_run(run.info.run_id)
        c.delete_run(parent_id)
        raise
    table = results_markdown(results, best)
    with mlflow.start_run(run_id=parent_id):
        mlflow.log_params({"grid_points": len(grid), "best_trial": best.index})
        mlflow.log_metrics({"best_val_loss": best.val_loss, "best_test_mase": best.test_mase,
                            "trials_wall_seconds": trials_wall})
        mlflow.log_text(table, "sweep.md")
        mlflow.set_tags({"best_trial_run": best.run_id, "registered_version": reg.version})
    name = cfg.registered_name
    report = (f"### Sweep of {len(grid)} trials for {name}\n\n{table}\n\n"
              f"{bt.markdown(f'best trial, {name} v{reg.version}')}\n\n{registration_note(name, reg)}")
    create_markdown_artifact(report, key=f"{name}-sweep".lower(), description=f"sweep of {len(grid)} trials")
    return {"parent_run_id": parent_id, "best": best.index, "best_params": best.params, "version": reg.version,
            "promoted": reg.promoted, "reason": reg.reason, "report": report, "trials": len(results),
            "trials_wall_seconds": trials_wall, "trial_seconds": [r.seconds for r in results],
            "champion_uri": f"models:/{name}@{CHAMPION}"}


def task_runner(kind: str, workers: int, address: str):
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})


@contextlib.contextmanager
def shared_api(needed: bool):
    """Without PREFECT_API_URL every Dask worker would start a temporary Prefect server of its
    own (~10 s each); start one here and hand its address to the workers through the
    environment they inherit."""
    from prefect.settings import PREFECT_API_URL

    if not needed or os.environ.get("PREFECT_API_URL"):
        yield
        return
    if PREFECT_API_URL.value():  # a server this process already uses (a profile, a test harness)
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        try:
            yield
        finally:
            os.environ.pop("PREFECT_API_URL", None)
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=120)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        yield
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)  # the run's last logs go to this server: send them before it stops
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def check_dask_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast, before any trial, if an existing Dask scheduler cannot be reached."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(address)
    try:
        socket.create_connection((u.hostname, u.port or 8786), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"--dask-address {address}: cannot reach the Dask scheduler ({e})") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.split("\n")[0],
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("sweep")
    g.add_argument("--samples", type=int, default=0, help="random sample of N grid points (0 = the whole grid)")
    g.add_argument("--task-runner", choices=("thread", "dask"), default="thread")
    g.add_argument("--workers", type=int, default=2, help="parallel trials (threads or local Dask workers)")
    g.add_argument("--dask-address", default="", help="an existing Dask scheduler, e.g. tcp://host:8786")
    t = p.add_argument_group("time-series options (any may be a comma-separated list)")
    for f in fields(TimeSeriesConfig):
        t.add_argument(flag(f.name), dest=f.name, default=None, metavar="V[,V...]", help=f.metadata.get("help"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    sweep = {k: args.pop(k) for k in ("samples", "task_runner", "workers", "dask_address")}
    options = {k: v for k, v in args.items() if v is not None}
    try:
        grid = build_grid(options, sweep["samples"])
        if sweep["dask_address"]:
            check_dask_address(sweep["dask_address"])
        check_tracking_server()
        base = {k: v for k, v in TimeSeriesConfig(**grid[0]).to_params().items() if k not in grid[0]}
        runner = task_runner(sweep["task_runner"], sweep["workers"], sweep["dask_address"])
        with shared_api(sweep["task_runner"] == "dask"):
            result = sweep_flow.with_options(task_runner=runner)(base=base, grid=grid)
    except (ConfigError, TrackingUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result["report"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

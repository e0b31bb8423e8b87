"""Scaling of a sweep on a local Dask cluster: the same 8-trial sweep with 1 and 2 workers.

    .venv/bin/python benchmarks/bench_sweep.py [--workers 1,2]

Prints, per worker count: the wall time of the trial phase (submit -> all results back), the
sum of the trials' own seconds (load, window, train, backtest, save, its nested MLflow run:
measured inside each trial), the speed-up against 1 worker, and the orchestration overhead per trial, i.e.
(wall x workers - sum of trial seconds) / trials: what Prefect and Dask add to each trial (with
several workers, plus the idle tail while the last trial finishes). The cluster's start and its
workers' warm-up come before the trial phase (flows.sweep.start_workers) and are in the flow total.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

GRID = {"cell": "lstm,gru", "hidden_size": "32,48", "lookback": "24,36", "length": "4000", "epochs": "5",
        "patience": "0", "batch_size": "32", "device": "cpu", "auto": "false",
        "ensemble": "1", "ema": "0"}  # one plain network per trial, as when the published figures were taken


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp(prefix='bench-sweep-')}/mlflow.db"

    from flows.sweep import shared_api, sweep_flow, task_runner
    from tasks.config import TimeSeriesConfig
    from tasks.registry import ensure_experiment
    from tasks.sweep import build_grid, split_grid

    base, grid = split_grid(build_grid(GRID))
    ensure_experiment(TimeSeriesConfig().experiment)  # create the store before workers race to
    rows = []
    with shared_api(True):
        for n in [int(w) for w in args.workers.split(",")]:
            t0 = time.perf_counter()
            r = sweep_flow.with_options(task_runner=task_runner("dask", n, ""))(
                base={**base, "model_name": f"bench-{n}"}, grid=grid)
            rows.append((n, r["trials_wall_seconds"], sum(r["trial_seconds"]), time.perf_counter() - t0))
    one = rows[0][1]
    print(f"{len(grid)}-trial sweep (LSTM/GRU x hidden 32/48 x lookback 24/36, sine 4000 points, 5 epochs), "
          f"local Dask cluster, 1 torch thread per worker, {os.cpu_count()} CPUs")
    print(f"{'workers':>7} {'trial phase s':>14} {'sum of trials s':>16} {'speed-up':>9} {'overhead/trial s':>17} {'flow total s':>13}")
    for n, wall, busy, total in rows:
        print(f"{n:>7} {wall:>14.1f} {busy:>16.1f} {one / wall:>8.2f}x {(wall * n - busy) / len(grid):>17.2f} {total:>13.1f}")


if __name__ == "__main__":
    main()

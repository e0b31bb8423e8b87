"""Scaling of a sweep on a local Dask cluster: the same 8-trial sweep with 1 and 2 workers; and
what training a worker's trials together saves.

    .venv/bin/python benchmarks/bench_sweep.py [--workers 1,2] [--same-shape]
    .venv/bin/python benchmarks/bench_sweep.py --together [--auto] [--repeats 3]

Prints, per worker count: the wall time of the trial phase (submit -> all results back), the
sum of the trials' own seconds (load, window, train, backtest, save, its nested MLflow run:
measured inside each trial), the speed-up against 1 worker, and the orchestration overhead per trial, i.e.
(wall x workers - sum of trial seconds) / trials: what Prefect and Dask add to each trial (with
several workers, plus the idle tail while the last trial finishes). The cluster's start and its
workers' warm-up come before the trial phase (flows.sweep.start_workers) and are in the flow total.
``--same-shape``: 8 trials of one LSTM shape instead (lr 1e-3/3e-3 x seed 0-3, hidden 32), which
each worker trains as one group (flows.sweep.packs).

With ``--together``: one worker's share of a sweep whose trials share a network shape (4 trials:
lr 1e-3/3e-3 x seed 0/1, an LSTM ensemble of ``--ensemble`` members (3, the default), hidden 64,
lookback 24, on a 4,000-point sine, 8 epochs; ``--auto`` adds --auto's candidates), on one core as a worker runs it, through the
sweep's own step ``tasks.sweep.run_trials``: the 4 trials as one group (their networks of one
shape trained as one batched network, what a worker does now), against the same 4 trials one
group each (one after another, as a worker ran them before). Alternated ``--repeats`` times;
prints each wall time, the ratio of each pair and its median, and the largest difference of a
trial's validation loss between the two.
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


SAME_SHAPE = {"lr": "0.001,0.003", "seed": "0,1,2,3", "hidden_size": "32", "lookback": "24", "length": "4000",
              "epochs": "5", "patience": "0", "batch_size": "32", "device": "cpu", "auto": "false", "ensemble": "1",
              "ema": "0"}
TOGETHER = {"lr": "0.001,0.003", "seed": "0,1", "hidden_size": "64", "lookback": "24", "length": "4000",
            "epochs": "8", "patience": "0", "device": "cpu"}


def together(auto: bool, ensemble: int, repeats: int) -> None:
    import statistics

    from mlflow import MlflowClient

    from tasks.registry import ensure_experiment
    from tasks.sweep import build_grid, run_trials, split_grid

    base, grid = split_grid(build_grid({**TOGETHER, "auto": str(auto).lower(), "ensemble": str(ensemble)}))
    trials = [(i, point, base) for i, point in enumerate(grid)]
    exp = ensure_experiment("bench-together")
    parent = MlflowClient().create_run(exp).info.run_id
    rows = []
    for r in range(repeats):
        times, losses = {}, {}
        for mode in (("together", "one by one") if r % 2 == 0 else ("one by one", "together")):
            t0 = time.perf_counter()
            results = (run_trials(trials, parent, exp) if mode == "together"
                       else [x for t in trials for x in run_trials([t], parent, exp)])
            times[mode], losses[mode] = time.perf_counter() - t0, [x.val_loss for x in results]
        diff = max(abs(a - b) / b for a, b in zip(losses["together"], losses["one by one"], strict=True))
        rows.append((times["together"], times["one by one"], diff))
        print(f"repeat {r + 1}: together {times['together']:.1f} s, one by one {times['one by one']:.1f} s, "
              f"ratio {times['together'] / times['one by one']:.2f}, largest val-loss difference {diff:.1e}",
              flush=True)
    print(f"{len(trials)} trials (lr x seed) of a {base['ensemble']}-member LSTM ensemble{' with --auto' if auto else ''}"
          f", one core: together / one by one, median ratio "
          f"{statistics.median(a / b for a, b, _ in rows):.2f} (fastest {min(a for a, _, _ in rows):.1f} s against "
          f"{min(b for _, b, _ in rows):.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--together", action="store_true", help="a worker's trials together against one by one")
    ap.add_argument("--auto", action="store_true", help="with --together: the trials run --auto")
    ap.add_argument("--ensemble", type=int, default=3, help="with --together: members per trial")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--same-shape", action="store_true", help="the scaling sweep over 8 trials of one network "
                    "shape (lr x seed), which workers train in groups")
    args = ap.parse_args()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp(prefix='bench-sweep-')}/mlflow.db"
    if args.together:
        return together(args.auto, args.ensemble, args.repeats)

    from flows.server import prefect_api
    from flows.sweep import sweep_flow, task_runner
    from tasks.config import TimeSeriesConfig
    from tasks.registry import ensure_experiment
    from tasks.sweep import build_grid, split_grid

    base, grid = split_grid(build_grid(SAME_SHAPE if args.same_shape else GRID))
    ensure_experiment(TimeSeriesConfig().experiment)  # create the store before workers race to
    rows = []
    with prefect_api():
        for n in [int(w) for w in args.workers.split(",")]:
            t0 = time.perf_counter()
            r = sweep_flow.with_options(task_runner=task_runner("dask", n, ""))(
                base={**base, "model_name": f"bench-{n}"}, grid=grid, workers=n)
            rows.append((n, r["trials_wall_seconds"], sum(r["trial_seconds"]), time.perf_counter() - t0))
    one = rows[0][1]
    what = "LSTM hidden 32 x lr 1e-3/3e-3 x seed 0-3" if args.same_shape else "LSTM/GRU x hidden 32/48 x lookback 24/36"
    print(f"{len(grid)}-trial sweep ({what}, sine 4000 points, 5 epochs), "
          f"local Dask cluster, 1 torch thread per worker, {os.cpu_count()} CPUs")
    print(f"{'workers':>7} {'trial phase s':>14} {'sum of trials s':>16} {'speed-up':>9} {'overhead/trial s':>17} {'flow total s':>13}")
    for n, wall, busy, total in rows:
        print(f"{n:>7} {wall:>14.1f} {busy:>16.1f} {one / wall:>8.2f}x {(wall * n - busy) / len(grid):>17.2f} {total:>13.1f}")


if __name__ == "__main__":
    main()

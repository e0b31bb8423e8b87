"""US consumption with income known ahead: ``../shared/data/uschange.csv`` (quarterly changes in US
consumption, income, production, savings and unemployment, 1970 Q1-2016 Q3; the textbook
dynamic-regression example), issue #29.

    .venv/bin/python benchmarks/bench_uschange.py [--seeds 0,1,2] [--horizon 4] [--stats-python PY]

rnnflow reads the file as ``rnnflow forecast --source file --data uschange.csv --value-column
Consumption --future-covariate-columns Income --horizon 4`` does (its ``1970 Q1`` quarters as
quarterly periods, season 4), with its own split (the last 20 % test, the 10 % before it
validation) and every other default, and is scored by the flow's own backtest: rolling origins
over the test part, every origin forecasting ``horizon`` quarters, MASE scaled by the in-sample
seasonal-naive error. Every row is scored on the same origins:

- rnnflow with Income as a known-future input, and rnnflow without covariates;
- naive and seasonal naive (the backtest's own baselines);
- statsforecast's AutoARIMA (season 4) with Income as an exogenous regressor, its future values
  given as they are to rnnflow, and AutoARIMA alone; both refitted at every origin on the
  quarters before it.

statsforecast is a benchmark-only dependency that wants pandas < 3: ``--stats-python`` names the
Python of an environment that has it (``python3 -m venv /tmp/sf && /tmp/sf/bin/pip install
statsforecast 'pandas<3'``); by default this Python, and the AutoARIMA rows are left out, saying
why, where it cannot import it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
DATA = Path(os.environ.get("RNNFLOW_SHARED_DATA", ROOT.parent / "shared" / "data")) / "uschange.csv"
TARGET, KNOWN = "Consumption", "Income"


def rnnflow(seed: int, horizon: int, with_income: bool):
    """(the flow's backtest of this model, its series and split, training seconds)."""
    from tasks.config import TimeSeriesConfig
    from tasks.data import load_series
    from tasks.evaluation import backtest
    from tasks.ingest import fetch_data
    from tasks.selection import train_models

    cfg = TimeSeriesConfig(source="file", data=str(DATA), value_column=TARGET, horizon=horizon, seed=seed,
                           future_covariate_columns=KNOWN if with_income else "")
    series = load_series(*fetch_data(str(DATA)), cfg)
    start = time.perf_counter()
    out = train_models({"uschange": (series, cfg)})["uschange"]
    seconds = time.perf_counter() - start
    return backtest(out.data, out.windows, out.trained.pipeline(), "rnnflow"), out, seconds


def arima_forecasts(python: str, y: np.ndarray, x: np.ndarray, origins: np.ndarray, horizon: int) -> dict | str:
    """AutoARIMA's forecasts at every origin, with and without the regressor, from ``python``'s
    statsforecast: {name: (N, H)}, or why there are none."""
    job = {"y": y.tolist(), "x": x.tolist(), "origins": origins.tolist(), "horizon": horizon}
    done = subprocess.run([python, __file__, "--arima-child"], input=json.dumps(job), capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        return done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    return {name: np.array(f) for name, f in json.loads(done.stdout).items()}


def arima_child() -> None:
    """Run in the statsforecast environment: read the job on stdin, print the forecasts."""
    from statsforecast.models import AutoARIMA

    job = json.load(sys.stdin)
    y, x, h = np.array(job["y"]), np.array(job["x"])[:, None], job["horizon"]
    out = {f"AutoARIMA + {KNOWN.lower()} (statsforecast)": [], "AutoARIMA (statsforecast)": []}
    for o in job["origins"]:
        with_x = AutoARIMA(season_length=4).forecast(y=y[:o], h=h, X=x[:o], X_future=x[o : o + h])["mean"]
        alone = AutoARIMA(season_length=4).forecast(y=y[:o], h=h)["mean"]
        for name, f in zip(out, (with_x, alone), strict=True):
            out[name].append(f.tolist())
    print(json.dumps(out))


def main() -> None:
    from tasks.evaluation import run_backtest

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--horizon", type=int, default=4)
    p.add_argument("--stats-python", default=sys.executable)
    args = p.parse_args()
    print(f"{DATA.name}: {TARGET} with {KNOWN} known ahead, horizon {args.horizon}; load average "
          f"{os.getloadavg()[0]:.2f}; torch threads {__import__('torch').get_num_threads()}")
    rows: dict[str, list[tuple[float, float, float]]] = {}
    reference = None  # the first run: its origins, baselines and data are every row's
    for seed in map(int, args.seeds.split(",")):
        for with_income in (True, False):
            bt, out, seconds = rnnflow(seed, args.horizon, with_income)
            reference = reference or (bt, out)
            assert np.array_equal(bt.origins, reference[0].origins), "every model is scored on the same origins"
            name = f"rnnflow {'+ ' + KNOWN.lower() + ' known ahead' if with_income else 'without covariates'}"
            rows.setdefault(name, []).append((bt.scores["rnnflow"]["mase"], bt.scores["rnnflow"]["rmse"], seconds))
    bt, out = reference
    for name in ("naive", "seasonal-naive"):
        rows[name] = [(bt.scores[name]["mase"], bt.scores[name]["rmse"], 0.0)]
    start = time.perf_counter()
    arima = arima_forecasts(args.stats_python, out.data.frame[TARGET].to_numpy(float),
                            out.data.frame[KNOWN].to_numpy(float), bt.origins, args.horizon)
    if isinstance(arima, str):
        print(f"AutoARIMA rows left out: {args.stats_python} could not run statsforecast: {arima}")
    else:
        seconds = (time.perf_counter() - start) / 2
        scored = run_backtest(out.data, out.windows.split, bt.origins, args.horizon, arima).scores
        rows.update({name: [(scored[name]["mase"], scored[name]["rmse"], seconds)] for name in arima})
    print(f"\n{len(bt.origins)} origins x {args.horizon} quarters (the test part); rnnflow: mean ± std over seeds "
          f"{args.seeds}\n\n| model | MASE | RMSE | seconds (training or all fits) |\n|---|---:|---:|---:|")
    for name, runs in rows.items():
        mase, rmse, sec = np.array(runs).T
        spread = f" ± {mase.std():.3f}" if len(runs) > 1 else ""
        print(f"| {name} | {mase.mean():.3f}{spread} | {rmse.mean():.3f} | {sec.mean():.1f} |")


if __name__ == "__main__":
    arima_child() if sys.argv[1:] == ["--arima-child"] else main()

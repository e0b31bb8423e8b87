"""Forecast accuracy: rnnflow's settings against statsforecast's classical models, one protocol.

    .venv/bin/pip install statsforecast            # benchmark-only, not a runtime dependency
    .venv/bin/python benchmarks/bench_accuracy.py [--seeds 0,1,2] [--series airline,births]
    .venv/bin/python benchmarks/bench_accuracy.py --rnnflow-only --variants default   # no statsforecast

Protocol, the same for every model and taken from the flow itself: the flow's chronological
split (last 20 % test, 10 % before it validation); every test step whose full horizon lies in
the test part is a forecast origin; each model is fitted once on the data before the test part
(rnnflow: trained on the training part, early-stopped on validation, exactly as the flow does)
and then forecasts H steps from each origin given the actual history up to it (statsforecast:
``forward``, the fitted model applied to the longer history without re-estimating). MASE is
scaled by the in-sample seasonal-naive error of the training part, as in the flow's backtest.
rnnflow figures are the mean (and spread) over ``--seeds`` training seeds; a generated series is
always its seed-0 realization, the one statsforecast sees (the flow's --seed also seeds the
generator, so without that the seeds would score other data).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
SHARED = ROOT.parent / "shared" / "data"

# name -> (options, what is stated about it)
SERIES = {
    "airline": dict(source="file", data=str(SHARED / "airline-passengers.csv"), horizon=12, lookback=36),
    "births": dict(source="file", data=str(SHARED / "daily-total-female-births.csv"), horizon=7, lookback=28),
    "sine": dict(source="sine", horizon=10, lookback=48),
    "trend-season": dict(source="trend-season", length=600, horizon=12, lookback=48),
    "arithmetic": dict(source="arithmetic", horizon=3, lookback=12),
}

# label -> options over the flow's defaults; "default" is the flow exactly as it ships (--auto)
VARIANTS = {
    "default": {},
    "plain z-scored": dict(auto=False),
    "window-norm last": dict(auto=False, window_norm="last"),
    "window-norm mean": dict(auto=False, window_norm="mean"),
    "baseline seasonal-naive": dict(auto=False, baseline="seasonal-naive"),
    "difference seasonal": dict(auto=False, difference="seasonal"),
    "log + difference seasonal": dict(auto=False, transform="log", difference="seasonal"),
    "default --ensemble 1": dict(ensemble=1),
    "default --ensemble 1 --ema 0": dict(ensemble=1, ema=0.0),
}


def config(series: str, variant: str, seed: int, intervals: str = ""):
    from tasks.config import TimeSeriesConfig

    return TimeSeriesConfig(**{**SERIES[series], **VARIANTS[variant], "seed": seed, "device": "cpu",
                               "intervals": intervals})


def run_rnnflow(job: tuple, intervals: str = "") -> tuple[str, str, int, float, float, str, dict]:
    """One (series, variant, seed[, data seed]): the flow's own tasks, minus MLflow. Returns test MASE
    and, with ``intervals``, the conformal intervals' test coverage and MSIS per level."""
    import torch

    from tasks.data import DataError
    from tasks.evaluation import backtest, calibrate_intervals
    from tasks.ingest import read_series
    from tasks.selection import train_models

    torch.set_num_threads(1)  # two jobs at once on two cores
    series_name, variant, seed, data_seed = (*job, 0)[:4]
    cfg = config(series_name, variant, seed, intervals)
    t0 = time.perf_counter()
    series = read_series(replace(cfg, seed=data_seed))  # the same data for every training seed and every model
    try:
        out = train_models({series_name: (series, cfg)})[series_name]
    except DataError as e:  # log of a series with values <= 0
        return series_name, variant, seed, float("nan"), 0.0, f"not applicable: {e}", {}
    note = out.settings.selection.choice if out.settings.selection else ""
    calibrate_intervals(out.data, out.windows, out.trained, cfg.interval_levels)  # as the flow does
    bt = backtest(out.data, out.windows, out.trained.pipeline(), "rnnflow")
    return series_name, variant, seed, bt.scores["rnnflow"]["mase"], time.perf_counter() - t0, note, bt.conformal


def noiseless(series_name: str, cfg) -> np.ndarray | None:
    """The generated series without its noise, where the generator adds noise."""
    from rnn_models import synthetic

    if series_name == "sine":
        return synthetic.sine(cfg.length, noise=0.0)["value"].to_numpy()
    if series_name == "trend-season":
        return synthetic.trend_season(cfg.length, noise=0.0)["value"].to_numpy()
    return None


def run_classical(series_name: str, data_seed: int = 0, arima: bool = True) -> tuple[dict[str, float], dict, dict]:
    """statsforecast's models on the flow's split and origins; also the flow's own baselines.
    ``data_seed``: which realization of a generated series."""
    from statsforecast.models import AutoARIMA, AutoETS, SeasonalNaive

    from rnn_models.windows import window_origins
    from tasks.evaluation import run_backtest
    from tasks.features import split_series
    from tasks.ingest import read_series

    cfg = config(series_name, "plain z-scored", data_seed)
    series = read_series(cfg)
    split = split_series(series, cfg)
    origins = window_origins(*split.part("test"), cfg.lookback, cfg.horizon)
    y = series.features[:, 0].astype(np.float64)
    m, H = series.season_length, cfg.horizon
    forecasts, seconds = {}, {}
    models = {"SeasonalNaive": SeasonalNaive(season_length=m), "AutoETS": AutoETS(season_length=m)}
    if arima:
        models["AutoARIMA"] = AutoARIMA(season_length=m)
    for name, model in models.items():
        t0 = time.perf_counter()
        model.fit(y[: split.val_end])
        forecasts[name] = np.stack([model.forward(y[:o], h=H)["mean"] for o in origins])
        seconds[name] = time.perf_counter() - t0
    signal = noiseless(series_name, cfg)
    if signal is not None:  # the generator's own signal: the best any forecaster can do on average
        forecasts["oracle"] = signal[origins[:, None] + np.arange(H)[None, :]]
    bt = run_backtest(series, split, origins, H, forecasts)
    return {name: bt.scores[name]["mase"] for name in [*forecasts, "seasonal-naive", "naive"]}, seconds, dict(
        rows=len(y), season=m, horizon=H, origins=f"{len(origins)} (rows {origins[0]}..{origins[-1]})",
        lookback=cfg.lookback)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--series", default=",".join(SERIES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--realizations", type=int, default=4,
                    help="also score the default and AutoETS on this many other noise draws of each noisy generated "
                         "series (data seeds 1..N), 0 to skip")
    ap.add_argument("--rnnflow-only", action="store_true",
                    help="only rnnflow's rows, without statsforecast (which needs pandas < 3): a before/after check")
    ap.add_argument("--intervals", default="", help="also give rnnflow conformal intervals at these levels "
                    "(e.g. 0.8,0.95) and print their test coverage and MSIS")
    args = ap.parse_args()
    rnnflow = functools.partial(run_rnnflow, intervals=args.intervals)
    seeds = [int(s) for s in args.seeds.split(",")]
    names, variants = args.series.split(","), args.variants.split(",")

    jobs = [(s, v, seed) for s in names for v in variants for seed in seeds]
    if args.rnnflow_only:
        t0 = time.perf_counter()
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(rnnflow, jobs))
        print(f"# {len(jobs)} rnnflow runs in {time.perf_counter() - t0:.0f} s on {args.jobs} processes\n")
        print("| model | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        print_rnnflow_rows(names, variants, seeds, results)
        print_intervals(names, results)
        return
    draws = [(s, d) for s in names if noiseless(s, config(s, "default", 0)) is not None
             for d in range(1, args.realizations + 1)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        slow_first = pool.map(run_classical, names)  # AutoARIMA with a long season takes minutes
        other_draws = pool.map(run_classical, *zip(*[(s, d, False) for s, d in draws], strict=True)) if draws else []
        everything = list(pool.map(rnnflow, jobs + [(s, "default", 0, d) for s, d in draws]))
        results, draw_results = everything[: len(jobs)], everything[len(jobs) :]
        classical = dict(zip(names, slow_first, strict=True))
        on_draws = {key: (c[0], r[3]) for key, c, r in zip(draws, other_draws, draw_results, strict=True)}
    print(f"# {len(jobs) + len(draws)} rnnflow runs and {len(names)} x 3 + {len(draws)} x 2 statsforecast fits in "
          f"{time.perf_counter() - t0:.0f} s on {args.jobs} processes\n")

    for s in names:
        scores, secs, info = classical[s]
        print(f"{s}: " + ", ".join(f"{k} {v}" for k, v in info.items())
              + "; statsforecast seconds " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))
    print()
    cols = ["SeasonalNaive", "AutoETS", "AutoARIMA"]
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for c in cols:
        print(f"| statsforecast {c} | " + " | ".join(f"{classical[s][0][c]:.3f}" for s in names) + " |")
    print("| rnnflow's seasonal-naive baseline | " + " | ".join(f"{classical[s][0]['seasonal-naive']:.3f}"
                                                              for s in names) + " |")
    print("| oracle: the generator's noiseless signal | " + " | ".join(
        f"{classical[s][0]['oracle']:.3f}" if "oracle" in classical[s][0] else "-" for s in names) + " |")
    print_rnnflow_rows(names, variants, seeds, results)
    print_intervals(names, results)
    # what the default beats, per series (to 3 decimals: both exact on a straight line is a tie)
    for s in names if "default" in variants else []:
        d = round(float(np.mean([r[3] for r in results if r[0] == s and r[1] == "default"])), 3)
        verdicts = []
        for c in ("SeasonalNaive", "AutoETS", "AutoARIMA"):
            other = round(classical[s][0][c], 3)
            verdicts.append(f"{c} {other:.3f} ({'beats' if d < other else 'ties' if d == other else 'LOSES'})")
        print(f"{s}: default {d:.3f} vs " + ", ".join(verdicts))
    if on_draws:
        print_draws(names, classical, results, on_draws)


def print_rnnflow_rows(names, variants, seeds, results) -> None:
    """One table row per variant (mean ± std of test MASE over the seeds), what --auto chose, times."""
    for v in variants:
        cells = []
        for s in names:
            mase = np.array([r[3] for r in results if r[0] == s and r[1] == v])
            if not np.isfinite(mase).all():
                cells.append("n/a")
            else:
                cells.append(f"{mase.mean():.3f} ± {mase.std():.3f}" if len(mase) > 1 else f"{mase.mean():.3f}")
        print(f"| rnnflow {v} | " + " | ".join(cells) + " |")
    print(f"\nrnnflow cells: mean ± std over seeds {seeds}; lower is better.")
    for s in names:
        chosen = [f"{r[5]} (seed {r[2]})" for r in results if r[0] == s and r[1] == "default"]
        if chosen:
            print(f"--auto on {s} chose: " + "; ".join(chosen))
    secs = {v: np.mean([r[4] for r in results if r[1] == v]) for v in variants}
    print("\nmean seconds per rnnflow training: " + ", ".join(f"{v} {t:.1f}" for v, t in secs.items()))


def print_intervals(names, results) -> None:
    """The default's conformal intervals on each series: coverage and MSIS per level, mean over seeds."""
    levels = sorted({a for r in results for a in r[6]})
    if not levels:
        return
    print("\n| rnnflow default --intervals | " + " | ".join(f"{a:g}: coverage, MSIS" for a in levels) + " |")
    print("|---|" + "---:|" * len(levels))
    for s in names:
        mine = [r[6] for r in results if r[0] == s and r[1] == "default" and r[6]]
        cells = [f"{100 * np.mean([c[a]['coverage'] for c in mine]):.1f} %, {np.mean([c[a]['msis'] for c in mine]):.2f}"
                 for a in levels] if mine else ["n/a"] * len(levels)
        print(f"| {s} | " + " | ".join(cells) + " |")


def print_draws(names, classical, results, on_draws) -> None:
    """The default (training seed 0) against AutoETS on other noise draws of the generated series."""
    print("\nOther noise draws of the generated series (the flow's --seed as data seed; rnnflow default, training "
          "seed 0; AutoARIMA left out, minutes per fit):\n")
    print("| series | data seed | oracle | AutoETS | rnnflow default | default vs AutoETS |")
    print("|---|---:|---:|---:|---:|---|")
    for s in names:
        rows = [(d, scores, mase) for (name, d), (scores, mase) in on_draws.items() if name == s]
        first = [r[3] for r in results if r[0] == s and r[1] == "default" and r[2] == 0]
        if not rows:
            continue
        if first:  # the main table's draw, when training seed 0 was among its seeds
            rows.insert(0, (0, classical[s][0], first[0]))
        for d, scores, mase in rows:
            ets = scores["AutoETS"]
            verdict = "beats" if round(mase, 3) < round(ets, 3) else "ties" if round(mase, 3) == round(ets, 3) else "LOSES"
            print(f"| {s} | {d} | {scores['oracle']:.3f} | {ets:.3f} | {mase:.3f} | {verdict} |")
        means = [np.mean([r[1][k] for r in rows]) for k in ("oracle", "AutoETS")] + [np.mean([r[2] for r in rows])]
        print(f"| {s} | mean of {len(rows)} | " + " | ".join(f"{m:.3f}" for m in means) + " | |")

if __name__ == "__main__":
    main()


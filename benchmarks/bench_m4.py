"""M4 Hourly: one global rnnflow network over the 414 series against the competition's figures.

    .venv/bin/pip install statsforecast           # benchmark-only, for AutoETS and MSTL
    .venv/bin/python benchmarks/bench_m4.py [--seeds 0] [--option value ...] [--no-stats] [--save F.npy]
    .venv/bin/python benchmarks/bench_m4.py --seeds '' --no-stats --mean-of A.npy,B.npy   # their mean forecast

Protocol (``../shared/data/m4/README.md``): train on ``Hourly-train.csv``, forecast the next 48
values of every series, score each series against ``Hourly-test.csv`` with the competition's
sMAPE and MASE (MASE scaled by the in-sample error of the 24-step seasonal naive over the whole
training part), and average over the 414 series.

rnnflow is the time-series flow's own steps exactly as ``python -m flows.timeseries --id-column
id --season-length 24 --horizon 48`` runs them (the training file is read as the flow reads a
long-format file: its own split into train/validation/test per series, --auto, ensemble), with
its defaults unless options are given here (``--lookback 168`` passes ``lookback=168``). The
registered model would then be called with each series' history: here the same pipeline is
called once, on all 414 series, in one batched forward pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
M4 = Path(os.environ.get("RNNFLOW_SHARED_DATA", ROOT.parent / "shared" / "data")) / "m4"
H, M = 48, 24
PUBLISHED = {"ES-RNN (Smyl, the winner; published)": (9.328, 0.893),
             "Doornik, Hendry & Castle (#238, best on Hourly; published)": (8.913, 0.801)}
HALF_SEED = 0  # the fixed random half of the series that defaults are chosen on (issue #31)


def read_wide(path: Path) -> tuple[list[str], list[np.ndarray]]:
    df = pd.read_csv(path)
    return df.iloc[:, 0].astype(str).tolist(), [row[~np.isnan(row)] for row in df.iloc[:, 1:].to_numpy(float)]


def series_scores(train: list[np.ndarray], test: list[np.ndarray], forecast: np.ndarray) -> np.ndarray:
    """Each series' sMAPE (percent) and MASE (season 24) as the M4 competition scored them: (n, 2)."""
    return np.array([(200 * np.mean(np.abs(y - f) / (np.abs(y) + np.abs(f))),
                      np.mean(np.abs(y - f)) / np.mean(np.abs(y_in[M:] - y_in[:-M])))
                     for y_in, y, f in zip(train, test, forecast, strict=True)])


def competition_scores(train: list[np.ndarray], test: list[np.ndarray], forecast: np.ndarray) -> tuple[float, float]:
    """Mean over series of sMAPE and MASE, the competition's figures."""
    smape, mase = series_scores(train, test, forecast).mean(0)
    return float(smape), float(mase)


def halves_and_wins(train: list[np.ndarray], test: list[np.ndarray], forecast: np.ndarray, snaive: np.ndarray) -> str:
    """sMAPE / MASE on the fixed random half the defaults were chosen on (A) and on the other (B),
    and the share of series where the forecast's sMAPE beats seasonal naive's."""
    ours, theirs = series_scores(train, test, forecast), series_scores(train, test, snaive)
    a = np.zeros(len(train), bool)
    a[np.random.default_rng(HALF_SEED).permutation(len(train))[: len(train) // 2]] = True
    return (f"half A {ours[a, 0].mean():.3f} / {ours[a, 1].mean():.3f}, half B {ours[~a, 0].mean():.3f} / "
            f"{ours[~a, 1].mean():.3f}; beats seasonal naive on {100 * np.mean(ours[:, 0] < theirs[:, 0]):.0f} % "
            "of series (sMAPE)")


def long_file(ids: list[str], train: list[np.ndarray], directory: str) -> str:
    path = Path(directory) / "m4-hourly-train.csv"
    pd.DataFrame({"id": np.repeat(ids, [len(v) for v in train]),
                  "t": np.concatenate([np.arange(len(v)) for v in train]),
                  "value": np.concatenate(train)}).to_csv(path, index=False)
    return str(path)


def rnnflow(path: str, ids: list[str], seed: int, options: dict) -> tuple[np.ndarray, float, str, dict, list]:
    """(forecasts (414, 48), training seconds, what ran (--auto's choice, each member's epochs),
    --intervals' level -> (lower, upper), each ensemble member's forecasts) of the flow's default
    global model."""
    from tasks.config import TimeSeriesConfig
    from tasks.evaluation import calibrate_intervals
    from tasks.ingest import fetch_data
    from tasks.panel import load_panel
    from tasks.selection import train_models

    cfg = TimeSeriesConfig(source="file", data=path, id_column="id", season_length=M, horizon=H, seed=seed,
                           **options)
    panel = load_panel(*fetch_data(path), cfg)
    start = time.perf_counter()
    out = train_models({"m4": (panel, cfg)})["m4"]
    seconds = time.perf_counter() - start
    cfg, selection, pipeline = out.settings.cfg, out.settings.selection, out.trained.pipeline()
    calibrate_intervals(panel, out.windows, out.trained, cfg.interval_levels)  # as the flow does before registering
    windows = np.stack([v[-cfg.lookback :] for v in panel.values])[..., None]
    raw, each = pipeline.predict(windows, members=True)
    order = [list(panel.ids).index(i) for i in ids]
    bounds = {a: (lo[order], hi[order]) for a, (lo, hi) in pipeline.bounds(windows, raw).items()}
    tried = ", ".join(f"{k} {v:.4f}" for k, v in selection.scores.items()) if selection else ""
    epochs = ", ".join(f"{f.best_epoch} / {f.history[-1].epoch}" for f in out.trained.fits)
    members = f"; the members take in turn {', '.join(selection.members)}" if selection and selection.members else ""
    ran = (f"--auto: {selection.choice} (validation {selection.measure}: {tried})" if selection else "--auto: off") + \
        f"{members}; each member's best / last epoch: {epochs}"
    return pipeline.point(raw)[order], seconds, ran, bounds, [pipeline.point(f)[order] for f in each]


def members_line(train: list[np.ndarray], test: list[np.ndarray], each: list[np.ndarray]) -> str:
    """Each member's sMAPE / MASE alone, and those of the members' median in place of their mean."""
    alone = ", ".join("%.3f / %.3f" % competition_scores(train, test, f) for f in each)
    return (f"each member alone: {alone}; the members' median in place of their mean: "
            "%.3f / %.3f" % competition_scores(train, test, np.median(each, axis=0)))


def statsforecast_models(ids: list[str], train: list[np.ndarray]) -> dict[str, np.ndarray]:
    from statsforecast import StatsForecast
    from statsforecast.models import MSTL, AutoETS

    df = pd.DataFrame({"unique_id": np.repeat(ids, [len(v) for v in train]),
                       "ds": np.concatenate([np.arange(len(v)) for v in train]), "y": np.concatenate(train)})
    sf = StatsForecast(models=[AutoETS(season_length=M), MSTL(season_length=[M, 7 * M])], freq=1, n_jobs=-1)
    out = sf.forecast(df=df, h=H).set_index("unique_id").loc[ids]
    return {name: out[col].to_numpy().reshape(len(ids), H)
            for name, col in (("AutoETS", "AutoETS"), ("MSTL (24, 168)", "MSTL"))}


def main() -> None:
    from rnn_models.conformal import interval_scores

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0")
    p.add_argument("--no-stats", action="store_true", help="skip statsforecast's AutoETS and MSTL")
    p.add_argument("--save", default="", help="write rnnflow's forecasts (seeds, 414, 48), series in the files' "
                   "order, to this .npy file, and each member's (seeds, members, 414, 48) to F.members.npy; "
                   "--mean-of adds a row averaging such files")
    p.add_argument("--mean-of", default="", help="comma-separated .npy files of --save: score the mean of every "
                   "forecast they hold")
    args, rest = p.parse_known_args()
    options = parse_options(rest)
    (ids, train), (_, test) = read_wide(M4 / "Hourly-train.csv"), read_wide(M4 / "Hourly-test.csv")
    print(f"M4 Hourly: {len(ids)} series, {min(map(len, train))}-{max(map(len, train))} training values, "
          f"horizon {H}, season {M}; load average {os.getloadavg()[0]:.2f}; torch threads "
          f"{__import__('torch').get_num_threads()}; options {options or 'defaults'}")
    rows, intervals, saved, members = [], [], [], []
    snaive = np.tile(np.stack([v[-M:] for v in train]), H // M)
    rows.append(("seasonal naive", *competition_scores(train, test, snaive), ""))
    rows.append(("naive", *competition_scores(train, test, np.repeat(np.stack([v[-1:] for v in train]), H, 1)), ""))
    with tempfile.TemporaryDirectory() as tmp:
        path = long_file(ids, train, tmp)
        for seed in [int(s) for s in args.seeds.split(",") if s]:  # --seeds '': only --mean-of's row
            forecast, seconds, ran, bounds, each = rnnflow(path, ids, seed, options)
            rows.append((f"rnnflow global (seed {seed})", *competition_scores(train, test, forecast),
                         f"{seconds:.0f} s training, {ran}; "
                         f"{halves_and_wins(train, test, forecast, snaive)}; {members_line(train, test, each)}"))
            intervals += [(seed, a, interval_scores(np.stack(test), lo, hi, a, *m4_scales(train)))
                          for a, (lo, hi) in bounds.items()]
            saved.append(forecast)
            members.append(np.stack(each))
    rows += saved_and_mixed(args, saved, members, train, test, snaive)
    if not args.no_stats:
        start = time.perf_counter()
        for name, f in statsforecast_models(ids, train).items():
            rows.append((name, *competition_scores(train, test, f), ""))
        rows[-1] = (*rows[-1][:3], f"both: {time.perf_counter() - start:.0f} s")
    rows += [(name, s, m, "") for name, (s, m) in PUBLISHED.items()]
    print_tables(rows, intervals)


def saved_and_mixed(args, saved: list[np.ndarray], members: list[np.ndarray], train: list[np.ndarray],
                    test: list[np.ndarray], snaive: np.ndarray) -> list[tuple]:
    """--save's files written; --mean-of's row, if asked for."""
    if args.save:
        np.save(args.save, np.stack(saved))
        np.save(args.save.removesuffix(".npy") + ".members.npy", np.stack(members))
    if not args.mean_of:
        return []
    forecast = np.concatenate([np.load(f) for f in args.mean_of.split(",")]).mean(0)  # every seed of each
    return [(f"mean of {args.mean_of}", *competition_scores(train, test, forecast),
             halves_and_wins(train, test, forecast, snaive))]


def print_tables(rows: list[tuple], intervals: list[tuple]) -> None:
    """The methods' scores, each beside seasonal naive's (the first row), and the intervals'."""
    base = rows[0]
    print("\n| method | sMAPE | MASE | vs seasonal naive (sMAPE / MASE) | note |\n|---|---:|---:|---:|---|")
    for name, s, m, note in rows:
        print(f"| {name} | {s:.3f} | {m:.3f} | {100 * (s / base[1] - 1):+.1f} % / {100 * (m / base[2] - 1):+.1f} % "
              f"| {note} |")
    if intervals:
        print("\n| rnnflow --intervals | level | coverage | MSIS |\n|---|---:|---:|---:|")
        for seed, a, scores in intervals:
            print(f"| seed {seed} | {a:g} | {100 * scores['coverage']:.1f} % | {scores['msis']:.3f} |")


def m4_scales(train: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each series' MSIS denominator (the in-sample error of the 24-step seasonal naive over the
    whole training part, as for MASE) and its number."""
    return np.array([np.mean(np.abs(v[M:] - v[:-M])) for v in train]), np.arange(len(train))


def parse_options(rest: list[str]) -> dict:
    """``--name value`` pairs as the flow's fields, read by the flow's own rule (``parse_value``)."""
    import typing

    from tasks.config import TimeSeriesConfig, parse_value

    hints = typing.get_type_hints(TimeSeriesConfig)
    names = [k.lstrip("-").replace("-", "_") for k in rest[::2]]
    return {k: parse_value(hints[k], v, k) for k, v in zip(names, rest[1::2], strict=True)}


if __name__ == "__main__":
    main()

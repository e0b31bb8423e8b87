"""A global model with inputs known ahead, against itself without them and against darts (issue #29).

    .venv/bin/python benchmarks/bench_panel_covariates.py [--stores 40] [--days 730] [--horizon 14]
        [--seeds 0] [--darts-python /tmp/dartsenv/bin/python] [--darts-epochs 30]

The panel is ``benchmarks/panel_data.py``'s: store sales lifted 1.6x on promotion days (runs of 3-5
days at random, cheaper ``price``), halved on US public holidays, with a weekday rhythm set by each
store's ``store_type`` and a level set by its ``size``. rnnflow reads it as ``rnnflow forecast --source
file --data stores.csv --id-column store --value-column sales --horizon 14`` does, every other option
at its default, scored by the flow's own backtest (each series split at the same relative point, the
last 20 % its test part; rolling origins, MASE scaled by each series' in-sample seasonal-naive error,
the mean over series):

- with ``--future-covariate-columns promo,price --static-columns store_type,size --holidays US``;
- without covariates (``--no-calendar``: the value column alone);
- naive and seasonal naive (the backtest's own baselines);
- darts' ``RNNModel`` and ``BlockRNNModel`` (LSTM) with the same covariates, trained on the same
  training rows and forecasting the same test origins (``benchmarks/darts_panel.py``, run by the
  Python of an environment that has darts: ``--darts-python``; the darts rows are left out, saying
  why, where it cannot run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
KNOWN = {"future_covariate_columns": "promo,price", "static_columns": "store_type,size", "holidays": "US"}


def rnnflow(path: Path, seed: int, horizon: int, known: bool):
    """(the flow's backtest of this model, what it trained on, training seconds)."""
    from tasks.config import TimeSeriesConfig
    from tasks.evaluation import backtest
    from tasks.ingest import fetch_data
    from tasks.panel import load_panel
    from tasks.selection import train_models

    cfg = TimeSeriesConfig(source="file", data=str(path), id_column="store", value_column="sales", horizon=horizon,
                           seed=seed, **(KNOWN if known else {"calendar": False}))
    panel = load_panel(*fetch_data(str(path)), cfg)
    start = time.perf_counter()
    out = train_models({"stores": (panel, cfg)})["stores"]
    seconds = time.perf_counter() - start
    return backtest(out.data, out.windows, out.trained.pipeline(), "rnnflow"), out, seconds


def darts(python: str, path: Path, out, epochs: int, seed: int) -> dict | str:
    """darts' forecasts of every test origin, {model: ((N, H) in rnnflow's series order, seconds, note)},
    or why there are none."""
    cfg = out.settings.cfg
    job = {"csv": str(path), "id": "store", "time": "date", "value": "sales", "future": ["promo", "price"],
           "holidays": "US", "static": ["store_type", "size"], "lookback": cfg.lookback, "horizon": cfg.horizon,
           "val_size": cfg.val_size, "test_size": cfg.test_size, "epochs": epochs, "hidden": cfg.hidden_size,
           "batch_size": cfg.batch_size, "seed": seed, "models": ["RNNModel", "BlockRNNModel"]}
    done = subprocess.run([python, str(ROOT / "benchmarks" / "darts_panel.py")], input=json.dumps(job),
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    ids = out.data.ids
    return {name: (np.concatenate([np.asarray(r["forecasts"][sid], dtype=float) for sid in ids]),
                   r["train_seconds"], r.get("note", "")) for name, r in json.loads(done.stdout).items()}


def main() -> None:
    from panel_data import stores

    from tasks.evaluation import score

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stores", type=int, default=40)
    p.add_argument("--days", type=int, default=730)
    p.add_argument("--horizon", type=int, default=14)
    p.add_argument("--seeds", default="0")
    p.add_argument("--darts-python", default=sys.executable)
    p.add_argument("--darts-epochs", type=int, default=30)
    args = p.parse_args()
    path, table = Path(tempfile.mkdtemp()) / "stores.csv", stores(args.stores, args.days, seed=0, mean=True)
    table.drop(columns="mean").to_csv(path, index=False)
    print(f"{args.stores} stores x {args.days} days, horizon {args.horizon}; load average {os.getloadavg()[0]:.2f}; "
          f"torch threads {__import__('torch').get_num_threads()}")
    rows: dict[str, list[tuple[float, float, float]]] = {}
    reference = None  # the first run: its origins, baselines and data are every row's
    for seed in map(int, args.seeds.split(",")):
        for known in (True, False):
            bt, out, seconds = rnnflow(path, seed, args.horizon, known)
            reference = reference or (bt, out)
            name = "rnnflow + promo, price, holidays, store attributes" if known else "rnnflow without covariates"
            rows.setdefault(name, []).append((bt.scores["rnnflow"]["mase"], bt.scores["rnnflow"]["smape"], seconds))
    bt, out = reference
    for name in ("naive", "seasonal-naive"):
        rows[name] = [(bt.scores[name]["mase"], bt.scores[name]["smape"], 0.0)]
    # the generator's own noise-free sales at every forecast step: what no model beats on average
    means = [table.loc[table["store"] == sid, "mean"].to_numpy() for sid in out.data.ids]
    floor = np.concatenate([m[o[:, None] + np.arange(args.horizon)] for m, o in zip(means, bt.origins, strict=True)])
    scored = score(out.data, out.windows.split, bt.origins, args.horizon, {"floor": floor}).scores["floor"]
    rows["the noise-free sales (the floor)"] = [(scored["mase"], scored["smape"], 0.0)]
    found = darts(args.darts_python, path, out, args.darts_epochs, int(args.seeds.split(",")[0]))
    if isinstance(found, str):
        print(f"darts rows left out: {args.darts_python} could not run benchmarks/darts_panel.py: {found}")
    else:
        for name, (forecast, seconds, note) in found.items():
            scored = score(out.data, out.windows.split, bt.origins, args.horizon, {name: forecast}).scores[name]
            rows[name] = [(scored["mase"], scored["smape"], seconds)]
            print(f"{name}: {note}")
    print(f"\n{int(sum(len(o) for o in bt.origins))} origins x {args.horizon} days over {len(out.data)} stores (each "
          f"store's test part); rnnflow chose: {out.settings.selection.choice if out.settings.selection else '-'}\n"
          "\n| model | mean MASE | mean sMAPE % | training seconds |\n|---|---:|---:|---:|")
    for name, runs in rows.items():
        mase, smape, sec = np.array(runs).T
        spread = f" ± {mase.std():.3f}" if len(runs) > 1 else ""
        print(f"| {name} | {mase.mean():.4f}{spread} | {smape.mean():.3f} | {sec.mean():.1f} |")


if __name__ == "__main__":
    main()

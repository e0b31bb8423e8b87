"""The generated panels: a global model's defaults on the tests' kind of data, so that defaults
tuned on M4 Hourly show if they cost elsewhere (issue #31).

    .venv/bin/python benchmarks/bench_generated_panels.py [--panels 3:24,5:40,7:24,11:40] [--option value ...]

Each panel is ``rnn_models.synthetic.panel(SERIES, 400, seed=SEED, min_length=200)``: series of
very different scales, daily or half-daily seasons, 200-400 steps. rnnflow runs the flow's own
steps as ``python -m flows.timeseries --id-column id --season-length 24 --horizon 12`` runs them
(--auto, ensemble, its own split), minus MLflow, and is scored by the flow's backtest on each
series' test part. OWA: sMAPE and MASE each as a share of seasonal naive's, averaged.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def main() -> None:
    from bench_m4 import parse_options

    from rnn_models import synthetic
    from tasks.config import TimeSeriesConfig
    from tasks.evaluation import backtest
    from tasks.panel import load_panel
    from tasks.selection import train_models

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--panels", default="3:24,5:40,7:24,11:40", help="comma-separated SEED:SERIES")
    args, rest = p.parse_known_args()
    options = parse_options(rest)
    print(f"load average {os.getloadavg()[0]:.2f}; options {options or 'defaults'}\n")
    print("| panel | --auto chose | members' settings | sMAPE | MASE | OWA | seconds |\n|---|---|---|---:|---:|---:|---:|")
    for seed, series in (map(int, item.split(":")) for item in args.panels.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "panel.csv"
            synthetic.panel(series, 400, seed=seed, min_length=200).to_csv(path, index=False)
            cfg = TimeSeriesConfig(source="file", data=str(path), id_column="id", season_length=24, horizon=12,
                                   device="cpu", **options)
            start = time.perf_counter()
            out = train_models({"panel": (load_panel(str(path), "", cfg), cfg)})["panel"]
            bt = backtest(out.data, out.windows, out.trained.pipeline(), "rnnflow")
        sel, ours, ref = out.settings.selection, bt.scores["rnnflow"], bt.scores["seasonal-naive"]
        owa = (ours["smape"] / ref["smape"] + ours["mase"] / ref["mase"]) / 2
        print(f"| seed {seed}, {series} series | {sel.choice if sel else '-'} | "
              f"{', '.join(sel.members) if sel and sel.members else '-'} | {ours['smape']:.3f} | {ours['mase']:.3f} | "
              f"{owa:.4f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""Runs at once on one machine: each run's training seconds alone and beside a second run, with
the cores shared (``rnn_models.cores``, the default) and without (``RNNFLOW_SHARE_CORES=0``:
PyTorch's own threads, every process on every core, as before).

    .venv/bin/python benchmarks/bench_runs_at_once.py [--repeats 2] [--only timeseries|charlm]

Each case starts the command lines as a user does (``python -m flows.timeseries``, ``python -m
flows.charlm``) in fresh processes against one local Prefect server and a throwaway MLflow store,
and reads the seconds each run prints ("trained on cpu in X s"). Two runs "at once" are started
together and both are timed. Printed per workload: the median over ``--repeats`` of one run alone
and of each run of a pair, and the pair's ratio to alone, off and on side by side. The issue's
target: a pair within 2.5x of alone, alone no more than 10 % slower than before.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TRAINED = re.compile(r"trained on cpu in ([0-9.]+) s")
# the char LM on a page of text: lyrics, a poem, notes (1,576 characters; the batch shape fits itself)
PAGE = "".join(chr(0x4E00 + (i * 7919) % 260) + ("，\n" if i % 11 == 10 else "") for i in range(1350))[:1576]


def workloads(tmp: Path) -> dict[str, list[str]]:
    page = tmp / "notes.txt"
    page.write_text(PAGE, encoding="utf-8")
    return {"timeseries": ["flows.timeseries"],
            "charlm": ["flows.charlm", "--data", str(page), "--epochs", "3", "--sample-every", "0"]}


def start(args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def seconds(proc: subprocess.Popen) -> float:
    out, _ = proc.communicate(timeout=900)
    found = TRAINED.search(out)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"a run failed (exit {proc.returncode}):\n{out[-3000:]}")
    return float(found.group(1))


def run(args: list[str], together: int, env: dict, tmp: Path) -> list[float]:
    procs = [start([*args, "--model-name", f"bench-{i}"], env, tmp) for i in range(together)]
    return [seconds(p) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", choices=("timeseries", "charlm"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
                "RNNFLOW_CHECKPOINTS": str(tmp / "checkpoints"), "PREFECT_LOGGING_LEVEL": "WARNING",
                "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_API_PORT": os.environ.get("PORT", "4377")}
        run(workloads(tmp)["timeseries"][:1] + ["--epochs", "1"], 1, base, tmp)  # store, server, first imports
        print(f"load average before: {os.getloadavg()[0]:.2f}; cores: {len(os.sched_getaffinity(0))}")
        print("| workload | cores | alone s | each of two at once s | two / alone |")
        print("|---|---|---:|---:|---:|")
        for name, args in workloads(tmp).items():
            if a.only and name != a.only:
                continue
            for share in ("0", "1"):
                env = {**base, "RNNFLOW_SHARE_CORES": share}
                alone, pair = [], []
                for _ in range(a.repeats):
                    alone += run(args, 1, env, tmp)
                    pair += run(args, 2, env, tmp)
                m1, m2 = statistics.median(alone), statistics.median(pair)
                print(f"| {name} | {'shared' if share == '1' else 'not shared (before)'} | {m1:.2f} | {m2:.2f} "
                      f"(max {max(pair):.2f}) | {m2 / m1:.2f}x |", flush=True)
        subprocess.run([sys.executable, "-m", "flows.server", "stop"], env=base, capture_output=True)


if __name__ == "__main__":
    main()

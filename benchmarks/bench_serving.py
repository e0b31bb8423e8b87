"""Latency of a one-series forecast from a registered model: over HTTP (``mlflow models serve``)
and in process (``mlflow.pyfunc.load_model(...).predict``), in one run; then under load:
``--clients`` client processes at once against ``python -m flows.serve`` (``make serve-model``)
with ``--workers`` workers.

    .venv/bin/python benchmarks/bench_serving.py [--requests 500] [--clients 8] [--load-requests 800] [--workers 2]

It trains and registers a small sine forecaster (the flow's defaults: an ensemble of three
LSTMs, hidden 64, L=24, H=1) in a temporary store first. The sequential requests come one at a
time from one client on the same machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from tests.serving import invoke, rnnflow_served, served  # noqa: E402


def client(base: str, payload: dict, n: int) -> tuple[list[float], int]:
    """One client process: ``n`` requests one after another on one keep-alive connection, as an
    HTTP client library's session sends them; (latencies in ms, errors)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body, headers = json.dumps(payload).encode(), {"Content-Type": "application/json"}
    times, errors = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("POST", "/invocations", body, headers)
        response = conn.getresponse()
        response.read()
        times.append(1000 * (time.perf_counter() - t0))
        errors += response.status != 200
    conn.close()
    return times, errors


def percentiles(samples_ms: list[float]) -> str:
    q = np.percentile(samples_ms, [50, 90, 99])
    return f"p50 {q[0]:6.2f} ms   p90 {q[1]:6.2f} ms   p99 {q[2]:6.2f} ms   mean {statistics.mean(samples_ms):6.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--load-requests", type=int, default=800, help="requests over all clients under load")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-serving-")
    uri = f"sqlite:///{tmp}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri

    import mlflow

    from flows.timeseries import timeseries_flow

    timeseries_flow(epochs=3, device="cpu")
    history = np.sin(2 * np.pi * np.arange(48) / 40)
    payload = {"dataframe_split": {"columns": ["value"], "data": [[float(v)] for v in history]}}

    model = mlflow.pyfunc.load_model("models:/sine-forecaster@champion")
    frame = pd.DataFrame({"value": history})
    local = []
    for i in range(args.requests + 20):
        t0 = time.perf_counter()
        model.predict(frame)
        if i >= 20:  # warm-up
            local.append(1000 * (time.perf_counter() - t0))

    with served("models:/sine-forecaster@champion", uri) as base:
        remote = []
        for i in range(args.requests + 20):
            t0 = time.perf_counter()
            status, _ = invoke(base, payload)
            assert status == 200
            if i >= 20:
                remote.append(1000 * (time.perf_counter() - t0))

    with rnnflow_served("sine-forecaster", uri, workers=args.workers) as base:
        client(base, payload, 20)  # warm-up of both workers
        with ProcessPoolExecutor(args.clients) as pool:
            t0 = time.perf_counter()
            results = list(pool.map(client, [base] * args.clients, [payload] * args.clients,
                                    [args.load_requests // args.clients] * args.clients))
            wall = time.perf_counter() - t0
    loaded = [t for times, _ in results for t in times]
    errors = sum(e for _, e in results)

    print(f"one-series forecast (48 rows of history, L=24, H=1), {args.requests} sequential requests each")
    print(f"  HTTP  /invocations : {percentiles(remote)}")
    print(f"  in process predict : {percentiles(local)}")
    print(f"  HTTP / in-process p50 = {np.median(remote) / np.median(local):.1f}x")
    print(f"under load: {args.clients} client processes at once, {len(loaded)} requests, python -m flows.serve with "
          f"{args.workers} workers")
    print(f"  HTTP  /invocations : {percentiles(loaded)}   errors {errors}   {len(loaded) / wall:.0f} requests/s")


if __name__ == "__main__":
    main()

"""The monitor (python -m flows.monitor): a champion scored on the data that arrived after it was
trained, its live error logged to MLflow, a degradation emitted as a Prefect event, and the
time-series deployment's trigger retraining that model once per cooldown. Real Prefect servers,
real MLflow stores on SQLite, the command line in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from flows.timeseries import timeseries_flow
from tasks.monitoring import DATA_END, MonitorConfig, check_model, log_check, report

NAME = "hourly"
ROWS, NEW = 240, 48  # 10 days of hourly data, then 2 more
# a tiny network, no --auto search, one member: a champion in a few seconds
TINY = dict(source="file", time_column="time", value_column="value", lookback=24, hidden_size=8, epochs=3,
            batch_size=32, patience=0, device="cpu", auto=False, ensemble=1, model_name=NAME)
LINE = re.compile(rf"^{NAME} v1: live MASE [\d.]+ over {NEW} new points \(registered [\d.]+\): (ok|degraded \(.+\))$")


def write_series(path: Path, rows: int, shift: float = 0.0) -> Path:
    """A daily cycle in hourly data with noise; from row ROWS on, ``shift`` added (a new regime)."""
    t = np.arange(rows)
    noise = np.random.default_rng(7).normal(0, 0.1, rows)
    y = 10 + np.sin(2 * np.pi * t / 24) + noise + np.where(t >= ROWS, shift, 0.0)
    pd.DataFrame({"time": pd.date_range("2026-01-01", periods=rows, freq="h"), "value": y}).to_csv(path, index=False)
    return path


@pytest.fixture
def champion(mlflow_store, tmp_path) -> Path:
    """NAME v1, trained on the first ROWS rows of a file; returns the file."""
    path = write_series(tmp_path / "hourly.csv", ROWS)
    result = timeseries_flow(**TINY, data=str(path))
    assert result["promoted"]
    return path


def test_registration_records_where_the_data_ended_and_the_monitor_scores_only_what_came_after(champion,
                                                                                             mlflow_store):
    c = MlflowClient(mlflow_store, mlflow_store)
    version = c.get_model_version_by_alias(NAME, "champion")
    ends = json.loads(Path(c.download_artifacts(version.run_id, DATA_END, str(champion.parent))).read_text())
    assert ends == {"": {"last": "2026-01-10 23:00:00", "rows": ROWS}}

    check = check_model(NAME, MonitorConfig())
    assert check.status == "nothing" and "no new data since 2026-01-10 23:00:00" in check.line()

    write_series(champion, ROWS + NEW)  # the same process goes on
    check = check_model(NAME, MonitorConfig())
    assert (check.status, check.new_points, check.drift) == ("ok", NEW, [])
    assert 0 < check.live_mase < 1.3 * check.registered_mase and check.registered_mase == float(
        version.tags["test_mase"])
    assert check.parameters["data"] == str(champion) and check.parameters["hidden_size"] == 8
    log_check(check, "monitoring")

    write_series(champion, ROWS + NEW, shift=3.0)  # a level shift after the champion was trained
    check = check_model(NAME, MonitorConfig())
    assert check.status == "degraded" and check.live_mase > 1.3 * check.registered_mase
    assert "above --degrade-ratio 1.3" in check.reason and "level shifted by +" in check.reason
    # with a looser ratio the drift test alone still finds the shift
    assert "level shifted" in check_model(NAME, MonitorConfig(degrade_ratio=100)).reason

    history = log_check(check, "monitoring")  # each check one point of the version's curve
    assert [h["step"] for h in history] == [0, 1] and history[1]["live_mase"] == pytest.approx(check.live_mase)
    assert history[1]["registered_mase"] == pytest.approx(check.registered_mase)
    markdown = report(check, history, 1.3)
    assert "](data:image/png;base64,iVBOR" in markdown and markdown.count(f"| {NEW} |") == 2


def test_drift_needs_no_error_growth_and_the_min_new_points_gate_holds(champion):
    write_series(champion, ROWS + NEW, shift=3.0)
    check = check_model(NAME, MonitorConfig(min_new_points=NEW + 1))  # too few points for the ratio ...
    assert check.status == "degraded" and "degrade-ratio" not in check.reason  # ... the drift test still counts
    assert check.drift and check.drift[0].startswith("level shifted")


def write_panel(path: Path, rows: int, shifted: str = "") -> Path:
    """Three series (ids a, b, c) of different scales in long format; ``shifted`` moves up from row ROWS on."""
    frames = []
    for i, sid in enumerate("abc"):
        t = np.arange(rows)
        noise = np.random.default_rng(i).normal(0, 0.1, rows)
        y = (10 + np.sin(2 * np.pi * t / 24) + noise + np.where((t >= ROWS) & (sid == shifted), 3.0, 0)) * 10 ** i
        frames.append(pd.DataFrame({"id": sid, "time": pd.date_range("2026-01-01", periods=rows, freq="h"),
                                    "value": y}))
    pd.concat(frames).to_csv(path, index=False)
    return path


def test_many_series_are_scored_as_a_mean_and_the_shifted_one_is_named(mlflow_store, tmp_path):
    path = write_panel(tmp_path / "meters.csv", ROWS)
    timeseries_flow(**{**TINY, "id_column": "id", "window_norm": "mean", "model_name": "meters"}, data=str(path))
    c = MlflowClient(mlflow_store, mlflow_store)
    version = c.get_model_version_by_alias("meters", "champion")
    ends = json.loads(Path(c.download_artifacts(version.run_id, DATA_END, str(tmp_path))).read_text())
    assert sorted(ends) == ["a", "b", "c"] and {e["rows"] for e in ends.values()} == {ROWS}

    write_panel(path, ROWS + NEW, shifted="b")
    check = check_model("meters", MonitorConfig())
    assert check.status == "degraded" and check.new_points == 3 * NEW
    assert check.worst_series.startswith("b (MASE ")
    assert {d.split(":")[0] for d in check.drift} == {"series b"}  # a, c unchanged
    assert "series b: level shifted by +" in check.reason


def _monitor(env: dict | None = None, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.monitor", *args], capture_output=True, text=True,
                          timeout=240, env={**os.environ, **(env or {})}, check=False)


def _events(api_url: str) -> list[dict]:
    body = json.dumps({"filter": {"event": {"name": ["rnnflow.model.degraded"]}}, "limit": 50}).encode()
    req = urllib.request.Request(f"{api_url}/events/filter", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["events"]
    except urllib.error.URLError:  # the local server is not up yet: the first command line starts it
        return []


def _wait_for_events(api_url: str, n: int, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(events := _events(api_url)) < n and time.monotonic() < deadline:
        time.sleep(1)
    return events


@pytest.mark.slow
def test_the_command_line_says_ok_or_degraded_in_one_line_each_and_logs_the_curve(champion, mlflow_store, tmp_path):
    api_url = f"http://127.0.0.1:{os.environ['PREFECT_SERVER_API_PORT']}/api"  # tests' local server (conftest)
    steady = write_series(tmp_path / "steady.csv", ROWS)
    timeseries_flow(**{**TINY, "model_name": "steady"}, data=str(steady))
    write_series(steady, ROWS + NEW)  # the same process goes on
    write_series(champion, ROWS + NEW, shift=3.0)  # a new regime
    before = len(_events(api_url))

    out = _monitor()  # every model with a champion
    assert out.returncode == 0, out.stderr  # degraded is a finding, not a failure
    lines = out.stdout.strip().splitlines()[-2:]
    assert LINE.match(lines[0]) and ": degraded (" in lines[0], out.stdout[-2000:]
    assert re.match(rf"^steady v1: live MASE [\d.]+ over {NEW} new points \(registered [\d.]+\): ok$", lines[1])
    events = _wait_for_events(api_url, before + 1)
    assert len(events) == before + 1  # the steady model's check emitted nothing
    event = events[0]
    assert event["resource"]["prefect.resource.id"] == f"rnnflow.model.{NAME}"
    assert event["payload"]["parameters"]["data"] == str(champion) and event["payload"]["parameters"]["sha256"] == ""
    assert event["payload"]["live_mase"] > 1.3 * event["payload"]["registered_mase"]

    c = MlflowClient(mlflow_store, mlflow_store)
    runs = c.search_runs([c.get_experiment_by_name("monitoring").experiment_id])
    assert {r.data.tags["monitor_of"]: r.data.tags["last_status"] for r in runs} == {
        "hourly-v1": "degraded", "steady-v1": "ok"}
    assert [len(c.get_metric_history(r.info.run_id, "live_mase")) for r in runs] == [1, 1]

    champion.unlink()  # the source is gone: one line naming it, Failed, exit 1, no event
    gone = _monitor(None, "--model-name", NAME)
    assert gone.returncode == 1
    assert re.search(rf"^{NAME} v1: error: its data source cannot be read: .*hourly.csv: no such file$",
                     gone.stdout, re.M), gone.stdout[-2000:]
    assert "Traceback" not in gone.stdout + gone.stderr
    time.sleep(3)
    assert len(_events(api_url)) == before + 1


@pytest.mark.slow
def test_no_champion_is_nothing_to_check(mlflow_store):
    out = _monitor(None, "--model-name", "never-registered")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == ("never-registered: nothing to check (no registered model "
                                                   "'never-registered'; there are none)")
    bad = _monitor(None, "--degrade-ratio", "0")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --degrade-ratio must be a positive number, got 0.0"


def test_the_deployments_follow_retrain_on_and_cooldown():
    from flows.deploy import deployments

    def made(retrain_on: str) -> dict:
        args = Namespace(only=None, interval=None, retrain_on=retrain_on, cooldown_hours=6.0, timeseries_cron="0 3 * * *",
                         charlm_cron="0 4 * * 0", monitor_cron="0 * * * *", timeseries_params={}, charlm_params={},
                         monitor_params={})
        return {d.name: d for d in deployments(args)}

    both = made("both")
    assert set(both) == {"nightly-retrain", "weekly-retrain", "hourly-check"}
    (trigger,) = both["nightly-retrain"].triggers
    assert trigger.expect == {"rnnflow.model.degraded"} and trigger.within.total_seconds() == 6 * 3600
    assert trigger.for_each == {"prefect.resource.id"}
    assert trigger.parameters["data"] == "{{ event.payload.parameters.data }}"
    assert both["nightly-retrain"].schedules and both["hourly-check"].schedules
    assert not made("drift")["nightly-retrain"].schedules and made("drift")["nightly-retrain"].triggers
    assert made("schedule")["nightly-retrain"].schedules and not made("schedule")["nightly-retrain"].triggers


@pytest.mark.slow
@pytest.mark.journey  # make journeys: a Prefect server, the served deployments and a retrain (about 2 minutes)
def test_a_degraded_champion_is_retrained_by_the_trigger_once_per_cooldown(champion, mlflow_store, tmp_path):
    """The champion's data shifts; two monitor runs each emit the event; the time-series deployment's
    trigger starts one retrain (the cooldown holds back the second), on the champion's own params and
    the grown data, and the new model, better on the new data, becomes the champion."""
    from tests.prefect_server import flow_runs, prefect_server, served_deployments

    write_series(champion, 2 * ROWS, shift=3.0)  # long enough a regime for the retrain to train on it
    with prefect_server(tmp_path, mlflow_store) as env, \
            served_deployments(env, tmp_path, "--only", "timeseries", "--retrain-on", "drift",
                               "--cooldown-hours", "6"):
        for _ in range(2):
            out = _monitor(env, "--model-name", NAME)
            assert out.returncode == 0 and ": degraded (" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
        assert len(_wait_for_events(env["PREFECT_API_URL"], 2)) == 2
        deadline = time.monotonic() + 240
        while not any(r["state_type"] == "COMPLETED" for r in flow_runs(env, "nightly-retrain")):
            runs = flow_runs(env, "nightly-retrain")
            assert time.monotonic() < deadline and not any(r["state_type"] in ("FAILED", "CRASHED") for r in runs), runs
            time.sleep(2)
        time.sleep(5)  # a second trigger firing would have made its run by now
        runs = flow_runs(env, "nightly-retrain")
    assert [r["state_type"] for r in runs] == ["COMPLETED"]  # one retrain, and no cron (--retrain-on drift)
    c = MlflowClient(mlflow_store, mlflow_store)
    new = c.get_model_version_by_alias(NAME, "champion")
    assert str(new.version) == "2", c.get_model_version(NAME, "2").tags.get("promotion_reason")
    params = c.get_run(new.run_id).data.params
    assert params["rows"] == str(2 * ROWS) and params["data"] == str(champion)  # the grown data
    assert params["hidden_size"] == "8" and params["auto"] == "False"  # the champion's own options

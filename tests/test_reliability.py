"""Runs that survive, over real processes: several command lines at once on a busy machine,
``kill -9`` then the same command again, Ctrl-C and SIGTERM mid-training."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from tests.serving import free_port, tracking_ui

pytestmark = [pytest.mark.slow, pytest.mark.journey]  # make journeys: many processes, servers and signals (about 5 minutes)


def start(module: str, *args: str, env: dict, out: Path) -> subprocess.Popen:
    """A command line in a process group of its own (so a signal reaches it as a terminal's
    Ctrl-C would), SIGINT at its default even where the test runner ignores it."""
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=open(out, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(out: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, out.read_text()):
            return
        assert proc.poll() is None, f"exited {proc.returncode} before {pattern!r}:\n{out.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n{out.read_text()[-3000:]}")


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
            "RNNFLOW_CHECKPOINTS": str(tmp_path / "checkpoints"), "PREFECT_LOGGING_LEVEL": "INFO"}


@pytest.fixture
def corpus(tmp_path, shared_data) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text((shared_data / "timemachine.txt").read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


CHARLM = ("--hidden-size", "48", "--embedding-dim", "16", "--num-steps", "20", "--sample-every", "0",
          "--sample-chars", "20", "--patience", "0")


def best_val_losses(uri: str, name: str) -> dict[int, float]:
    c = MlflowClient(uri, uri)
    return {int(v.version): c.get_run(v.run_id).data.metrics["best_val_loss"]
            for v in c.search_model_versions(f"name='{name}'")}


def test_kill_9_then_the_same_command_resumes_and_ends_like_an_uninterrupted_run(env, corpus, tmp_path):
    args = ("--data", str(corpus), "--epochs", "8", *CHARLM)
    out = tmp_path / "killed.log"
    proc = start("flows.charlm", *args, env=env, out=out)
    wait_for(out, r"epoch 3: train", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    again = subprocess.run([sys.executable, "-m", "flows.charlm", *args], env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed_at = int(re.search(r"resuming from epoch (\d+) of 8", again.stdout + again.stderr).group(1))
    assert 3 <= resumed_at < 8
    assert not list((tmp_path / "checkpoints").glob("*/*")), "the checkpoint outlived the registration"

    fresh = subprocess.run([sys.executable, "-m", "flows.charlm", *args, "--no-resume"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "resuming" not in fresh.stdout + fresh.stderr
    losses = best_val_losses(env["MLFLOW_TRACKING_URI"], "corpus-charlm")
    assert losses[1] == pytest.approx(losses[2], abs=1e-6)  # resumed == uninterrupted, same seed
    runs = MlflowClient(env["MLFLOW_TRACKING_URI"]).search_runs(
        [e.experiment_id for e in MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]  # the killed attempt left no RUNNING run


def signalled(proc: subprocess.Popen, sig: int, status: int, out: Path) -> str:
    """Send ``sig`` to the command's process group, as a terminal's Ctrl-C would; it must end with
    ``status`` within 15 s and no traceback. Returns its last line."""
    os.killpg(proc.pid, sig)
    t0 = time.monotonic()
    assert proc.wait(timeout=60) == status, out.read_text()[-3000:]
    assert time.monotonic() - t0 < 15
    text = out.read_text()
    assert "Traceback" not in text
    return text.strip().splitlines()[-1]


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_stop_the_run_within_seconds(env, corpus, tmp_path, sig, status):
    out = tmp_path / "run.log"
    proc = start("flows.charlm", "--data", str(corpus), "--epochs", "200", *CHARLM, env=env, out=out)
    wait_for(out, r"epoch 2: train", proc)
    last = signalled(proc, sig, status, out)
    assert last.startswith("interrupted: nothing registered; the training checkpoint is kept in "), last
    kept = Path(last.split(" kept in ")[1].split(":")[0])
    assert (kept / "checkpoint.safetensors").is_file()
    uri = env["MLFLOW_TRACKING_URI"]
    assert MlflowClient(uri, uri).search_registered_models() == []  # (registry named: the default is process-wide)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_stop_a_sweeps_trial_threads_within_seconds(env, tmp_path, sig, status):
    """The trials train in threads, which a signal does not reach: they stop at their next step
    (rnn_models.training.STOP), so the sweep ends at once, with nothing registered or left."""
    out = tmp_path / "sweep.log"
    proc = start("flows.sweep", "--lr", "0.001,0.003", "--auto", "false", "--ensemble", "1", "--epochs", "500",
                 "--patience", "0", "--length", "2000", "--hidden-size", "16", env=env, out=out)
    wait_for(out, r"trial 1: training lstm", proc)
    time.sleep(1)
    assert signalled(proc, sig, status, out) == "interrupted: nothing registered; the sweep's MLflow runs were deleted"
    c = MlflowClient(env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_URI"])
    assert c.search_registered_models() == []
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()], run_view_type=ViewType.ALL)
    assert runs and all(r.info.lifecycle_stage == "deleted" for r in runs)


def test_four_command_lines_at_once_on_a_busy_machine_each_register_and_the_best_is_champion(env, tmp_path):
    """No PREFECT_API_URL and no server yet: the four race to start the shared local one; and
    on a new SQLite store, to create its tables. A CPU-burning process runs beside them."""
    t = np.arange(300)
    values = np.sin(2 * np.pi * t / 12) * 10 + 50 + np.random.default_rng(0).normal(0, 1, 300)
    data = tmp_path / "series.csv"
    pd.DataFrame({"date": pd.date_range("2000-01-01", periods=300, freq="D"), "value": values}).to_csv(data,
                                                                                                       index=False)
    env = {**env, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_API_PORT": str(free_port())}
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        procs = [start("flows.timeseries", "--source", "file", "--data", str(data), "--no-auto", "--ensemble", "1",
                       "--epochs", "3", "--hidden-size", "16", "--seed", str(i), env=env, out=tmp_path / f"{i}.log")
                 for i in range(4)]
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        burner.kill()
        subprocess.run([sys.executable, "-m", "flows.server", "stop"], env=env, capture_output=True, timeout=60)
    logs = [(tmp_path / f"{i}.log").read_text() for i in range(4)]
    assert codes == [0, 0, 0, 0], "\n\n".join(log[-2000:] for log in logs)
    assert not [log for log in logs if "Traceback" in log or "database is locked" in log]
    c = MlflowClient(env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_URI"])
    versions = c.search_model_versions("name='series-forecaster'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    best = min(versions, key=lambda v: float(v.tags["test_mase"]))
    assert c.get_model_version_by_alias("series-forecaster", "champion").version == best.version


def test_a_tracking_server_gone_after_training_keeps_the_model_for_register_later(env, tmp_path):
    """The server stops once training has started: the run retries for --registry-retry-minutes,
    then fails in one line naming the kept folder; `flows.models register FOLDER --name` registers
    it once the server is back, without training again, through the same champion gate."""
    store, artifacts, port = f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "artifacts"), free_port()
    env = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    args = ("--length", "400", "--no-auto", "--ensemble", "1", "--epochs", "30", "--patience", "0",
            "--hidden-size", "16", "--registry-retry-minutes", "0.1")
    out = tmp_path / "run.log"
    with tracking_ui(store, artifacts, port=port):
        proc = start("flows.timeseries", *args, env=env, out=out)
        wait_for(out, r"training lstm on cpu", proc)
    t0 = time.monotonic()
    assert proc.wait(timeout=300) == 1, out.read_text()[-3000:]
    text = out.read_text()
    assert "does not answer; trying again in" in text and "Traceback" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: MLFLOW_TRACKING_URI") and "did not answer for 0.1 min" in last, last
    kept = Path(re.search(r"the trained model is kept in (\S+):", last).group(1))
    assert list(kept.rglob("checkpoint.safetensors")), "the trained model was not kept"
    assert time.monotonic() - t0 < 120

    with tracking_ui(store, artifacts, port=port):
        later = subprocess.run([sys.executable, "-m", "flows.models", "register", str(kept), "--name", "kept"],
                               env=env, capture_output=True, text=True, timeout=300)
        assert later.returncode == 0, later.stdout[-3000:] + later.stderr[-3000:]
        assert "already trained" in later.stdout + later.stderr and "epoch 1:" not in later.stdout + later.stderr
        c = MlflowClient(env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_URI"])
        assert c.get_model_version_by_alias("kept", "champion").version == "1"
        runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
        assert [r.info.status for r in runs] == ["FINISHED"]
    assert not kept.exists() and not list((tmp_path / "checkpoints").glob("*/*.safetensors"))


def test_runs_on_two_machines_sharing_a_tracking_server_end_on_the_better_champion(env, tmp_path):
    """Two processes with their own working and temp folders (two machines' worth: no file lock
    in common) race for one tracking server's champion, twice; the gate's lock is a Prefect
    global concurrency limit on the Prefect server they share, and champion ends on the best."""
    store, port = f"sqlite:///{tmp_path / 'server.db'}", free_port()
    t = np.arange(300)
    data = tmp_path / "shared.csv"
    pd.DataFrame({"date": pd.date_range("2000-01-01", periods=300, freq="D"),
                  "value": np.sin(2 * np.pi * t / 12) * 10 + 50 + np.random.default_rng(1).normal(0, 1, 300)}
                 ).to_csv(data, index=False)
    with tracking_ui(store, str(tmp_path / "artifacts"), port=port) as base:
        for round_ in range(2):
            procs = []
            for machine in ("a", "b"):
                home = tmp_path / f"{machine}{round_}"
                (home / "tmp").mkdir(parents=True)
                menv = {**env, "MLFLOW_TRACKING_URI": base, "TMPDIR": str(home / "tmp"),
                        "RNNFLOW_CHECKPOINTS": str(home / "checkpoints")}
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "flows.timeseries", "--source", "file", "--data", str(data), "--no-auto",
                     "--ensemble", "1", "--epochs", "3", "--hidden-size", "16", "--seed", str(2 * round_ + (machine == "b"))],
                    cwd=home, env=menv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            outs = [p.communicate(timeout=300)[0] for p in procs]
            assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
        c = MlflowClient(base, base)
        versions = c.search_model_versions("name='shared-forecaster'")
        assert len(versions) == 4
        best = min(versions, key=lambda v: float(v.tags["test_mase"]))
        assert c.get_model_version_by_alias("shared-forecaster", "champion").version == best.version
    api = f"http://127.0.0.1:{os.environ['PREFECT_SERVER_API_PORT']}/api"
    with urllib.request.urlopen(f"{api}/v2/concurrency_limits/rnnflow-champion-shared-forecaster") as r:
        assert json.loads(r.read())["limit"] == 1  # the gate took the shared lock

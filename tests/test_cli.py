"""The command line: generated from the config dataclass, errors that name the option."""

import logging
import os
import subprocess
import sys
from dataclasses import fields

import pytest

from rnn_models.training import native_bf16_cpu
from tasks.config import TimeSeriesConfig, flag


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flows.timeseries", *args], capture_output=True, text=True,
                          timeout=120)


def test_help_lists_every_config_field():
    out = _cli("--help")
    assert out.returncode == 0
    for f in fields(TimeSeriesConfig):
        assert flag(f.name) in out.stdout, f.name
    assert "{rnn,lstm,gru,elman}" in out.stdout and "{standard,minmax,none}" in out.stdout


def test_bad_option_value_exits_2_naming_it():
    out = _cli("--horizon", "0")
    assert out.returncode == 2 and "--horizon must be at least 1, got 0" in out.stderr
    out = _cli("--batches-per-epoch", "-1")
    assert out.returncode == 2 and "--batches-per-epoch must be 0 or more, got -1" in out.stderr
    out = _cli("--cell", "tcn")
    assert out.returncode == 2 and "invalid choice: 'tcn'" in out.stderr


@pytest.mark.skipif(native_bf16_cpu(), reason="this CPU computes bf16: --precision bf16 trains on it")
def test_bf16_on_a_cpu_without_bf16_arithmetic_is_one_line():
    out = subprocess.run([sys.executable, "-m", "flows.charlm", "--precision", "bf16", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: --precision bf16: this CPU has no bf16 "
                                                                 "arithmetic"), out.stderr
    assert "Traceback" not in out.stderr


DEAD_URL = "http://127.0.0.1:9/x.csv"  # nothing listens on port 9 (discard)


def _run(module, *args, env=None):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=180,
                          env=env)


@pytest.mark.parametrize("module, args, message", [
    ("flows.timeseries", ["--source", "file", "--data", "{tmp}/nope.csv"], "{tmp}/nope.csv: no such file"),
    ("flows.timeseries", ["--source", "file", "--data", "{tmp}/air.csv", "--value-column", "sales"],
     "{tmp}/air.csv: no value column 'sales'; the columns are ['Month', 'Passengers']"),
    ("flows.timeseries", ["--source", "file", "--data", "{tmp}/air.csv", "--lookback", "200"],
     "{tmp}/air.csv: the series has 144 rows, too short for --lookback 200"),
    ("flows.timeseries", ["--source", "file", "--data", "http://127.0.0.1:9/x.csv"],
     "http://127.0.0.1:9/x.csv: cannot download"),
    ("flows.charlm", ["--data", "{tmp}/latin1.txt"], "{tmp}/latin1.txt: not UTF-8 text: byte 0xe9 at offset 3"),
    ("flows.charlm", ["--data", "{tmp}"], "{tmp}: is a directory, not a file"),
])
def test_bad_input_is_one_error_line_before_prefect_starts(shared_data, tmp_path, module, args, message):
    (tmp_path / "air.csv").write_bytes((shared_data / "airline-passengers.csv").read_bytes())
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 500)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_LOGGING_LEVEL": "INFO"}
    out = _run(module, *(a.format(tmp=tmp_path) for a in args), env=env)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: " + message.format(tmp=tmp_path)), out.stderr
    assert "Traceback" not in out.stderr and "temporary server" not in out.stderr  # Prefect never started
    assert not (tmp_path / "mlflow.db").exists()  # nothing registered, no store even created


def test_ensemble_candidates_without_auto_is_one_line(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = _run("flows.timeseries", "--no-auto", "--window-norm", "last", "--ensemble-candidates", "2", env=env)
    assert out.returncode == 2 and out.stderr.strip() == ("error: --ensemble-candidates 2 keeps --auto's best "
                                                          "candidates: drop --no-auto or --ensemble-candidates")
    assert not (tmp_path / "mlflow.db").exists()


def test_a_user_error_inside_a_flow_run_is_logged_without_a_traceback(caplog, mlflow_store):
    """A dead URL: the download is retried (Prefect logs each failure), then the run fails."""
    from flows.timeseries import timeseries_flow
    from tasks.data import DataError

    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]  # they do not propagate
    for lg in loggers:
        lg.addHandler(caplog.handler)
    try:
        state = timeseries_flow(source="file", data=DEAD_URL, return_state=True)
        with pytest.raises(DataError, match="cannot download"):
            state.result()
    finally:
        for lg in loggers:
            lg.removeHandler(caplog.handler)
    runs = [r for r in caplog.records if r.name.startswith(("prefect.flow_runs", "prefect.task_runs"))]
    assert any("Retries are exhausted" in r.getMessage() for r in runs)
    assert not [r for r in runs if r.exc_info or "Traceback" in r.getMessage()]
    assert state.is_failed() and state.message.startswith(f"error: {DEAD_URL}: cannot download (")


@pytest.mark.parametrize("raw, value", [("true", True), ("True", True), ("YES", True), ("1", True),
                                        ("false", False), ("False", False), ("no", False), ("0", False)])
def test_one_rule_reads_booleans_everywhere(raw, value):
    from tasks.config import parse_value

    assert parse_value(bool, raw, "auto") is value


def test_a_value_that_is_not_a_boolean_is_refused_not_read_as_false():
    from tasks.config import ConfigError, parse_value
    from tasks.reevaluate import config_from_params
    from tasks.sweep import build_grid

    with pytest.raises(ConfigError, match="--auto: 'maybe' is not a boolean; use true or false"):
        parse_value(bool, "maybe", "auto")
    with pytest.raises(ConfigError, match="--auto: 'nein' is not a boolean"):
        build_grid({"auto": "true,nein"})
    assert config_from_params(TimeSeriesConfig, {"auto": "False", "epochs": "7"}).auto is False  # as MLflow logs it


def test_a_successful_run_prints_the_report_and_no_noise(tmp_path, fresh_store):
    """As a user runs it, twice (the second scores the champion it finds, loading it from the
    registry): the report and where the model went, no ERROR line, no MLflow schema hint, no
    download progress bars; the same seed and data give the same score, which keeps the champion."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": fresh_store(tmp_path / "mlflow.db"), "PREFECT_LOGGING_LEVEL": "INFO"}
    args = ["--length", "400", "--lookback", "12", "--hidden-size", "8", "--epochs", "2", "--ensemble", "1", "--no-auto"]
    runs = [_run("flows.timeseries", *args, env=env) for _ in range(2)]
    for out in runs:
        assert out.returncode == 0, out.stderr[-2000:]
        text = out.stdout + out.stderr
        for noise in ("ERROR", "Traceback", "Hint: Inferred schema", "Downloading artifacts"):
            assert noise not in text, noise
    assert "registered models:/sine-forecaster/1" in runs[0].stdout and "Promoted to `champion`" in runs[0].stdout
    assert "registered models:/sine-forecaster/2" in runs[1].stdout
    assert "kept champion v1: the challenger's test MASE" in runs[1].stdout and "ties it" in runs[1].stdout

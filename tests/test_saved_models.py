"""Versions registered by earlier code keep working: each model in tests/fixtures/saved_models/
was trained, logged and registered by the code of 2026-12-03 (before the pipeline and the
training loop were rewritten; ``tests/fixtures/make_saved_models.py`` made them). Each is put
back into a fresh registry as its champion, then loaded, served over HTTP, re-scored by
``flows.models`` and scored by the champion gate of a new run, as users' old versions are."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import fields
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from tasks.registry import client
from tests.serving import invoke, rnnflow_served

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "saved_models"
KINDS = sorted(p.name for p in FIXTURES.iterdir() if (p / "model.tar.gz").is_file())


@functools.cache
def model_folder(name: str) -> Path:
    """The saved model's artifacts, unpacked once per test session."""
    folder = Path(tempfile.mkdtemp(prefix=f"saved-{name}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with tarfile.open(FIXTURES / name / "model.tar.gz") as archive:
        archive.extractall(folder, filter="data")
    return folder


def saved(name: str) -> tuple[dict, dict]:
    """(version.json, expected.json) of a saved model; its data paths point into this checkout."""
    version, expected = (json.loads((FIXTURES / name / f).read_text()) for f in ("version.json", "expected.json"))
    for key in ("data",):
        if version["params"].get(key):
            version["params"][key] = str(FIXTURES / Path(version["params"][key]).name)
    return version, expected


def register_saved(name: str) -> None:
    """The saved model as version 1 of ``name`` and its champion, with its run's params and its tags."""
    version, _ = saved(name)
    c = client()  # the test's store, as every rnnflow command finds it
    mlflow.set_experiment("saved-models")
    with mlflow.start_run() as run:
        mlflow.log_params(version["params"])
        mlflow.log_artifacts(str(model_folder(name)), "model")
    c.create_registered_model(name)
    c.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id, tags=version["tags"])
    c.set_registered_model_alias(name, "champion", "1")


def answer(model_input: dict, name: str) -> pd.DataFrame:
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    return model.predict(pd.DataFrame(model_input), params={"seed": 0} if "prefix" in model_input else None)


def assert_same(got: pd.DataFrame | dict, expected: dict) -> None:
    got = got if isinstance(got, dict) else got.to_dict("list")
    assert list(got) == list(expected)
    for column, values in expected.items():
        if isinstance(values[0], str):
            assert got[column] == values
        else:
            np.testing.assert_allclose(np.asarray(got[column], dtype=float), values, rtol=1e-5, atol=1e-6)


def own_score(version: dict) -> float:
    return float(version["tags"]["test_mase" if version["tags"]["kind"] == "forecaster" else "val_bpc"])


@pytest.mark.parametrize("name", KINDS)
def test_a_saved_version_loads_answers_as_it_did_and_is_rescored_to_its_own_score(name, mlflow_store):
    from tasks.reevaluate import evaluation_data, score

    register_saved(name)
    version, expected = saved(name)
    assert_same(answer(expected["input"], name), expected["output"])
    registered = client().get_model_version(name, "1")
    assert score(registered, evaluation_data(registered)) == pytest.approx(own_score(version), rel=1e-3)


@pytest.mark.journey
@pytest.mark.parametrize("name", KINDS)
def test_flows_models_compare_rescores_a_saved_version_on_its_own_data(name, mlflow_store):
    register_saved(name)
    version, _ = saved(name)
    out = subprocess.run([sys.executable, "-m", "flows.models", "compare", name, "1", "1"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    row = next(line for line in out.stdout.splitlines() if line.startswith("v1 "))
    assert float(row.split()[-1]) == pytest.approx(own_score(version), rel=1e-3), out.stdout


@pytest.mark.journey
@pytest.mark.parametrize("name", [n for n in KINDS if not n.startswith("charlm")])
def test_the_champion_gate_of_a_new_run_scores_a_saved_champion_on_the_new_data(name, mlflow_store):
    from flows.timeseries import timeseries_flow
    from tasks.config import TimeSeriesConfig
    from tasks.reevaluate import config_from_params

    register_saved(name)
    version, _ = saved(name)
    cfg = config_from_params(TimeSeriesConfig, version["params"])
    result = timeseries_flow(**{**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, "epochs": 1})
    run = MlflowClient().get_run(result["run_id"])
    # the new run's data is the saved version's own: the gate gives the saved score back
    assert run.data.metrics["champion_test_mase"] == pytest.approx(float(version["tags"]["test_mase"]), rel=1e-3)


@pytest.mark.journey
@pytest.mark.parametrize("name", KINDS)
def test_a_saved_version_is_served_by_flows_serve_as_it_answered(name, mlflow_store):
    register_saved(name)
    _, expected = saved(name)
    payload = json.loads((model_folder(name) / "serving_input_example.json").read_text())
    if "prefix" in expected["input"]:
        payload["params"] = {"seed": 0}
    with rnnflow_served(name, mlflow_store, workers=1) as base:
        status, body = invoke(base, payload)
    assert status == 200, body
    assert_same(pd.DataFrame(body["predictions"]).to_dict("list"), expected["output"])

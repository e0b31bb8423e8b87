"""Paths a new user takes first, through the command lines as typed (each in a subprocess): hostile
or unusual model names, a small text for the char LM, a GPU asked for where there is none."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tasks.config import safe_name

ROOT = Path(__file__).resolve().parents[1]
TINY_SERIES = ["--length", "300", "--lookback", "12", "--epochs", "1", "--batch-size", "16", "--hidden-size", "8",
               "--ensemble", "1", "--no-auto"]
TINY_LM = ["--hidden-size", "16", "--num-layers", "1", "--epochs", "1", "--sample-chars", "10", "--embedding-dim", "8"]
# a page of text in another script: 1,576 characters, 264 distinct
PAGE = "".join(chr(0x4E00 + (i * 7919) % 260) + ("，\n" if i % 11 == 10 else "") for i in range(1350))[:1576]


def cli(module: str, *args: str, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


@pytest.fixture
def home(tmp_path, store_uri):
    """A user's working folder (the commands run from it), its store and checkpoints."""
    work = tmp_path / "work"
    work.mkdir()
    return work, {**os.environ, "PREFECT_LOGGING_LEVEL": "INFO", "RNNFLOW_CHECKPOINTS": str(work / "checkpoints")}


@pytest.mark.parametrize("module", ["flows.timeseries", "flows.charlm"])
@pytest.mark.parametrize("name, problem", [
    ("../../escape", "cannot contain '/' or ':'"),
    ("/tmp/escape", "cannot contain '/' or ':'"),
    ("a:b", "cannot contain '/' or ':'"),
    ("..", "cannot be a path"),
    ("  ", "is blank"),
    ("tab\there", "cannot contain control characters"),
])
def test_a_model_name_mlflow_refuses_is_one_line_before_anything_runs(home, store_uri, module, name, problem):
    work, env = home
    out = cli(module, "--model-name", name, env=env, cwd=work, timeout=60)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"error: --model-name: {name!r} {problem}"), line
    assert not any(work.iterdir()) and not Path(store_uri.removeprefix("sqlite:///")).exists()


@pytest.mark.journey
@pytest.mark.parametrize("name", ["my model", "Модель ☃ v2"])
def test_a_name_with_spaces_or_another_script_registers_and_stays_inside_its_folders(home, mlflow_store, name,
                                                                                   shared_data):
    work, env = home
    corpus = work / "page.txt"
    corpus.write_text(PAGE, encoding="utf-8")
    runs = [cli("flows.timeseries", *TINY_SERIES, "--model-name", name, env=env, cwd=work),
            cli("flows.charlm", "--data", str(corpus), *TINY_LM, "--model-name", f"{name} lm", env=env, cwd=work)]
    for out in runs:
        assert out.returncode == 0, out.stderr[-3000:]
        assert "Traceback" not in out.stderr
    c = MlflowClient(mlflow_store, mlflow_store)
    assert {m.name for m in c.search_registered_models()} == {name, f"{name} lm"}
    assert str(c.get_model_version_by_alias(name, "champion").version) == "1"
    # the checkpoints were written under a safe form of the name, inside their folder, and removed
    assert safe_name(name) != name and "/" not in safe_name(name)
    assert {p.name for p in work.iterdir()} <= {"page.txt", "checkpoints"}
    assert not list(work.glob("checkpoints/*"))


@pytest.mark.journey
def test_a_page_of_text_trains_at_the_default_batch_shape_fitted_to_it(home, mlflow_store):
    """1,576 characters are fewer than one batch of the default 32 x 64: the shape shrinks, one line
    says so, and the model continues a prefix in the text's own script."""
    work, env = home
    (work / "notes.txt").write_text(PAGE, encoding="utf-8")
    out = cli("flows.charlm", "--data", "notes.txt", "--epochs", "2", "--prefixes", PAGE[:3], "--sample-chars", "20",
              env=env, cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert ("notes.txt: 1,419 training characters fill fewer than 16 batches of --batch-size 32 x --num-steps 64: "
            "training with 4 x 16") in log
    c = MlflowClient(mlflow_store, mlflow_store)
    version = c.get_model_version_by_alias("notes-charlm", "champion")
    params = c.get_run(version.run_id).data.params
    assert (params["batch_size"], params["trained_batch_size"], params["trained_num_steps"]) == ("32", "4", "16")
    import mlflow

    text = mlflow.pyfunc.load_model("models:/notes-charlm@champion").predict(
        __import__("pandas").DataFrame({"prefix": [PAGE[:3]]}), params={"max_new_chars": 30, "seed": 1})["text"][0]
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in text[3:]) >= 15  # it continues in Chinese


@pytest.mark.journey
def test_the_default_flow_with_the_grouped_operation_turned_off_trains_through_nn_lstm(home, mlflow_store):
    work, env = home
    out = cli("flows.timeseries", "--epochs", "2", env={**env, "RNNFLOW_GROUPED": "0"}, cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "train one by one: the grouped operation is turned off (RNNFLOW_GROUPED=0)" in log
    assert "together as one batched network" not in log
    assert "registered models:/sine-forecaster/1" in out.stdout


def test_a_text_too_short_for_any_batch_is_one_line_naming_its_size(home, store_uri):
    work, env = home
    (work / "tiny.txt").write_text("abc defg hij", encoding="utf-8")
    out = cli("flows.charlm", "--data", "tiny.txt", env=env, cwd=work, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: tiny.txt: 12 characters is too small to train on: beside its validation part (--val-fraction 0.1) "
        "it fills no batch of even 1 sequence x 8 characters (--batch-size x --num-steps); give a longer text"]
    assert not Path(store_uri.removeprefix("sqlite:///")).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("module", ["flows.timeseries", "flows.charlm", "flows.sweep"])
def test_asking_for_cuda_without_a_gpu_is_one_line(home, module):
    work, env = home
    out = cli(module, "--device", "cuda", env=env, cwd=work, timeout=60)
    assert out.returncode in (1, 2), out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: --device cuda: PyTorch sees no CUDA GPU on this machine") and "Traceback" not in line


def test_a_safe_name_keeps_plain_names_and_keeps_others_apart():
    assert safe_name("sine-forecaster") == "sine-forecaster"
    assert safe_name("Sales-Forecaster") == "sales-forecaster"  # the artifact keys of before
    for name in ("../../x:y", "a b", "a_b", "Модель ☃", "☃"):
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", safe_name(name)), name
    assert len({safe_name(n) for n in ("a b", "a_b", "a-b", "A B")}) == 4

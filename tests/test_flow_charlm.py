"""The char-LM flow end to end: real Prefect (test harness), real MLflow on SQLite."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.charlm import charlm_flow
from rnn_models.generation import complete
from rnn_models.text import load_charlm
from tasks.config import ConfigError
from tasks.data import DataError

TINY = {"hidden_size": 32, "embedding_dim": 16, "num_steps": 20, "batch_size": 16, "epochs": 2, "patience": 0,
        "sample_every": 1, "sample_chars": 30, "device": "cpu"}


@pytest.fixture
def slice_corpus(shared_data, tmp_path) -> Path:
    """The first 30,000 characters of The Time Machine, under the corpus's own file name."""
    text = (shared_data / "timemachine.txt").read_text(encoding="utf-8")[:30_000]
    path = tmp_path / "timemachine.txt"
    path.write_text(text, encoding="utf-8")
    return path


def run(corpus: Path, **params):
    return charlm_flow(**{**TINY, "data": str(corpus), **params})


def test_flow_registers_a_charlm_that_continues_a_prefix(slice_corpus, mlflow_store, monkeypatch, caplog):
    result = run(slice_corpus)
    assert result["model_name"] == "timemachine-charlm" and result["promoted"]
    assert result["val_bpc"] < 4.5  # far below uniform over ~40 characters (5.3 bits)
    c = MlflowClient(mlflow_store, mlflow_store)
    r = c.get_run(result["run_id"])
    for key in ("best_val_bpc", "best_val_perplexity", "train_tokens_per_second", "train_seconds"):
        assert r.data.metrics[key] > 0, key
    assert len(c.get_metric_history(r.info.run_id, "val_bpc")) == 2
    assert {a.path for a in c.list_artifacts(r.info.run_id, "samples")} == {
        "samples/epoch_001.txt", "samples/epoch_002.txt", "samples/final.txt"}

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model("models:/timemachine-charlm@champion")
    frame = pd.DataFrame({"prefix": ["time traveller", "The Time Machine"]})
    out = model.predict(frame, params={"max_new_chars": 40, "temperature": 0.7, "seed": 3})
    assert list(out.columns) == ["text"]
    assert out["text"][0].startswith("time traveller") and len(out["text"][0]) == len("time traveller") + 40
    assert out["text"][1].startswith("The Time Machine")  # the user's prefix comes back as given
    again = model.predict(frame, params={"max_new_chars": 40, "temperature": 0.7, "seed": 3})
    assert again["text"].tolist() == out["text"].tolist()  # a seed makes it reproducible
    greedy = model.predict(frame[:1], params={"max_new_chars": 20, "temperature": 0.0})["text"][0]
    assert greedy == model.predict(frame[:1], params={"max_new_chars": 20, "temperature": 0.0, "seed": 5})["text"][0]
    assert greedy != out["text"][0][:len(greedy)]  # the seeded sample at 0.7 is not the greedy text
    local = Path(mlflow.artifacts.download_artifacts("models:/timemachine-charlm/1"))
    files = {p.name: p for p in local.rglob("*") if p.is_file()}
    # the same weights outside MLflow, decoded greedily by the plain PyTorch code, give the same text
    net, vocab, _ = load_charlm(files["weights.safetensors"], files["vocab.json"], files["config.json"])
    assert greedy == complete(net, vocab, "time traveller", 20, temperature=0)
    with pytest.raises(MlflowException, match=r"row 0: prefix must be a non-empty string, got ''"):
        model.predict(pd.DataFrame({"prefix": [""]}))
    with caplog.at_level("WARNING", logger="rnnflow.charlm"):
        odd = model.predict(pd.DataFrame({"prefix": ["time \u2603"]}), params={"max_new_chars": 5})
    assert odd["text"][0].startswith("time \u2603") and "read as <unk>" in caplog.text

    assert {"weights.safetensors", "vocab.json", "config.json"} <= set(files)
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".pth", ".pickle"))]

    with get_client(sync_client=True) as pc:
        keys = ["timemachine-charlm-samples", "timemachine-charlm-report"]
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    assert {a.key for a in arts} == set(keys)


def test_champion_gate_compares_only_on_the_same_corpus(slice_corpus, mlflow_store, tmp_path):
    first = run(slice_corpus, model_name="gated")
    worse = run(slice_corpus, model_name="gated", epochs=1, lr=1e-5)
    assert first["promoted"] and not worse["promoted"]
    assert "validation bits/char" in worse["reason"] and worse["reason"].startswith("kept champion v1")

    lyrics = tmp_path / "lyrics.txt"  # another corpus, another script, the same model name
    lyrics.write_text("天青色等烟雨 而我在等你 炊烟袅袅升起 隔江千万里\n" * 60, encoding="utf-8")
    other = run(lyrics, model_name="gated", prefixes="天青色", epochs=3)
    assert not other["promoted"] and "trained on another corpus" in other["reason"]
    assert other["samples"]["天青色"].startswith("天青色")
    c = MlflowClient(mlflow_store, mlflow_store)
    assert str(c.get_model_version_by_alias("gated", "champion").version) == "1"
    assert len(c.search_model_versions("name='gated'")) == 3


# ---------------------------------------------------------------- bad input


def _write(tmp: Path, name: str, data: bytes) -> str:
    (tmp / name).write_bytes(data)
    return str(tmp / name)


BAD = {
    "missing file": (lambda t, url: {"data": str(t / "none.txt")}, DataError, r"none\.txt: no such file"),
    "bad url": (lambda t, url: {"data": f"{url}/gone.txt"}, DataError, r"gone\.txt: HTTP 404"),
    "checksum": (lambda t, url: {"sha256": "b" * 64}, DataError, r"sha256 is [0-9a-f]{64}, expected b{64}"),
    "not utf-8": (lambda t, url: {"data": _write(t, "latin.txt", b"caf\xe9 " * 500)}, DataError,
                  r"latin\.txt: not UTF-8 text: byte 0xe9 at offset 3"),
    "empty": (lambda t, url: {"data": _write(t, "empty.txt", b"  \n\n ")}, DataError, r"empty\.txt: the corpus is empty"),
    "too small": (lambda t, url: {"data": _write(t, "small.txt", b"a tiny corpus")}, DataError,
                  r"small\.txt: 13 characters is too small to train on: .* no batch of even 1 sequence x 8 characters"),
    "sampling": (lambda t, url: {"sampling": "shuffled"}, ConfigError, r"--sampling: 'shuffled' is not one of sequential, random"),
    "num_steps": (lambda t, url: {"num_steps": 0}, ConfigError, r"--num-steps must be at least 1, got 0"),
    "temperature": (lambda t, url: {"temperature": -0.5}, ConfigError, r"--temperature must be 0 or more, got -0\.5"),
    "top_k": (lambda t, url: {"top_k": -1}, ConfigError, r"--top-k must be 0 or more, got -1"),
    "warmup": (lambda t, url: {"warmup": -5}, ConfigError, r"--warmup must be 0 or more, got -5"),
    "input dropout": (lambda t, url: {"input_dropout": 1.0}, ConfigError, r"--input-dropout must be in \[0, 1\), got 1\.0"),
    "empty prefix": (lambda t, url: {"prefixes": ","}, ConfigError, r"--prefixes holds no prompt"),
}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, shared_data, fresh_store):
    tmp = tmp_path_factory.mktemp("charlm-guarded")
    corpus = tmp / "timemachine.txt"
    corpus.write_text((shared_data / "timemachine.txt").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    uri = fresh_store(tmp / 'mlflow.db')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        run(corpus, model_name="guarded", epochs=1)
        yield uri, tmp, corpus


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_before_training(case, guarded, monkeypatch, http_root):
    uri, tmp, corpus = guarded
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    make, error, pattern = BAD[case]
    state = charlm_flow(**{**TINY, "data": str(corpus), "model_name": "guarded", **make(tmp, http_root[1])}, return_state=True)
    assert state.is_failed()
    with pytest.raises(error, match=pattern):
        raise state.result(raise_on_failure=False)
    c = MlflowClient(uri, uri)
    assert [str(v.version) for v in c.search_model_versions("name='guarded'")] == ["1"]
    assert str(c.get_model_version_by_alias("guarded", "champion").version) == "1"
    assert len(c.search_runs([c.get_experiment_by_name("charlm-training").experiment_id])) == 1


def test_minutes_train_to_a_time_budget_whatever_the_epochs(slice_corpus, mlflow_store):
    result = run(slice_corpus, minutes=0.1, epochs=2, sample_every=0)  # 6 s: far more than 2 tiny epochs
    c = MlflowClient(mlflow_store, mlflow_store)
    r = c.get_run(result["run_id"])
    assert r.data.params["minutes"] == "0.1"
    epochs = len(c.get_metric_history(r.info.run_id, "val_bpc"))
    assert epochs > 2 and 5 <= result["train_seconds"] < 12  # the 6 s budget ended it (time between epochs aside)

"""Model management: list, show, promote (gated on re-scoring), rollback, compare."""

import re

import pytest
from mlflow import MlflowClient

from flows.charlm import charlm_flow
from flows.models import main
from flows.timeseries import timeseries_flow
from rnn_models.training import native_bf16_cpu

TINY = {"length": 600, "lookback": 12, "hidden_size": 16, "epochs": 6, "batch_size": 16, "patience": 0,
        "device": "cpu", "model_name": "managed"}


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def champion(uri: str, name: str = "managed") -> str:
    return str(MlflowClient(uri, uri).get_model_version_by_alias(name, "champion").version)


def test_promote_rollback_compare_on_forecasters(mlflow_store, capsys):
    good = timeseries_flow(**TINY)
    bad = timeseries_flow(**{**TINY, "epochs": 1, "lr": 1e-5})
    assert good["promoted"] and not bad["promoted"]

    rc, out, _ = cli(capsys, "list")
    assert rc == 0 and "managed" in out and "champion" in out and "test_mase=" in out

    rc, out, _ = cli(capsys, "compare", "managed", "1", "2")
    assert rc == 0 and "v1" in out and "v2" in out
    scores = {line.split()[0]: float(line.split()[-1]) for line in out.splitlines() if re.match(r"v\d", line)}
    # scoring again through the registered models reproduces what each training run measured
    assert scores["v1"] == pytest.approx(good["scores"]["rnnflow-lstm"]["mase"], rel=1e-4)
    assert scores["v1"] < scores["v2"]

    rc, _, err = cli(capsys, "promote", "managed", "2")
    assert rc == 1 and "refusing: v2's test MASE" in err and "--force" in err
    assert champion(mlflow_store) == "1"

    rc, out, _ = cli(capsys, "promote", "managed", "2", "--force")
    assert rc == 0 and champion(mlflow_store) == "2"
    rc, out, _ = cli(capsys, "rollback", "managed")
    assert rc == 0 and "v1 (rolled back from v2)" in out and champion(mlflow_store) == "1"
    rc, _, err = cli(capsys, "rollback", "managed")
    assert rc == 1 and "v1 has no previous champion" in err

    history = MlflowClient(mlflow_store, mlflow_store).get_registered_model("managed").tags["champion_history"]
    assert history.count('"to"') == 3  # flow promotion, forced promotion, rollback

    rc, out, _ = cli(capsys, "show", "managed", "2")
    assert rc == 0 and "managed v2" in out and "test_mase" in out and "lookback = 12" in out


def test_charlm_rescoring_matches_training(mlflow_store, shared_data, tmp_path, capsys):
    corpus = tmp_path / "tm.txt"
    corpus.write_text((shared_data / "timemachine.txt").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    params = {"data": str(corpus), "hidden_size": 32, "embedding_dim": 16, "num_steps": 20, "batch_size": 16,
              "epochs": 2, "patience": 0, "sample_every": 0, "sample_chars": 10, "device": "cpu"}
    # trained in bf16 where this CPU computes it, validated and served in float32
    first = charlm_flow(**params, precision="bf16" if native_bf16_cpu() else "fp32")
    charlm_flow(**{**params, "epochs": 1, "lr": 1e-5})
    rc, out, _ = cli(capsys, "compare", "tm-charlm", "1", "2")
    assert rc == 0 and "validation bits/char" in out
    v1 = float(next(line for line in out.splitlines() if line.startswith("v1 ")).split()[-1])
    assert v1 == pytest.approx(first["val_bpc"], rel=1e-4)
    rc, _, err = cli(capsys, "promote", "tm-charlm", "2")
    assert rc == 1 and "refusing: v2's validation bits/char" in err


@pytest.mark.parametrize("argv, message", [
    (["show", "ghost"], "no registered model 'ghost'"),
    (["promote", "ghost", "1"], "no registered model 'ghost'"),
    (["rollback", "ghost"], "no registered model 'ghost'"),
])
def test_unknown_names_are_clear(mlflow_store, capsys, argv, message):
    rc, _, err = cli(capsys, *argv)
    assert rc == 1 and message in err

"""Registered models served over real HTTP by ``mlflow models serve``."""

import numpy as np
import pytest

from flows.charlm import charlm_flow
from flows.timeseries import timeseries_flow
from tests.serving import invoke, served


@pytest.fixture(scope="module")
def store(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    corpus = tmp / "timemachine.txt"
    corpus.write_text((shared_data / "timemachine.txt").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        timeseries_flow(length=600, lookback=12, horizon=3, hidden_size=16, epochs=3, device="cpu",
                        quantiles="0.1,0.9")
        charlm_flow(data=str(corpus), hidden_size=32, embedding_dim=16, num_steps=20, epochs=1, sample_every=0,
                    sample_chars=10, device="cpu")
    return uri


def test_forecaster_over_http(store):
    history = np.sin(2 * np.pi * np.arange(60) / 40).tolist()
    with served("models:/sine-forecaster@champion", store) as base:
        status, body = invoke(base, {"dataframe_split": {"columns": ["value"], "data": [[v] for v in history]}})
        assert status == 200, body
        rows = body["predictions"]
        assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["forecast"]) for r in rows)
        assert all(r["q0.1"] <= r["q0.5"] == r["forecast"] <= r["q0.9"] for r in rows), rows

        bad = {
            "missing column": {"dataframe_split": {"columns": ["other"], "data": [[1.0]] * 20}},
            "too-short history": {"dataframe_split": {"columns": ["value"], "data": [[1.0]] * 5}},
            "non-numeric": {"dataframe_split": {"columns": ["value"], "data": [["x"]] * 20}},
        }
        for case, payload in bad.items():
            status, body = invoke(base, payload)
            assert 400 <= status < 500, (case, status, body)
            assert body.get("message"), case
        assert "at least 12 rows" in invoke(base, bad["too-short history"])[1]["message"]
        # and it keeps serving
        assert invoke(base, {"dataframe_split": {"columns": ["value"], "data": [[v] for v in history]}})[0] == 200


def test_charlm_over_http_with_params(store):
    with served("models:/timemachine-charlm@champion", store) as base:
        payload = {"dataframe_split": {"columns": ["prefix"], "data": [["time traveller"], ["the "]]},
                   "params": {"max_new_chars": 25, "temperature": 0.5, "seed": 4}}
        status, body = invoke(base, payload)
        assert status == 200, body
        texts = [r["text"] for r in body["predictions"]]
        assert texts[0].startswith("time traveller") and len(texts[0]) == len("time traveller") + 25
        assert invoke(base, payload)[1] == body  # seeded: the same text again
        status, body = invoke(base, {"dataframe_split": {"columns": ["prefix"], "data": [[""]]}})
        assert 400 <= status < 500 and "non-empty" in body["message"]

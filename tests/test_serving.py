"""Registered models served over real HTTP by ``mlflow models serve``."""

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from flows.charlm import charlm_flow
from flows.timeseries import timeseries_flow
from tests.serving import invoke, post, rnnflow_served, served


@pytest.fixture(scope="module")
def store(tmp_path_factory, shared_data, fresh_store):
    tmp = tmp_path_factory.mktemp("serving")
    uri = fresh_store(tmp / 'mlflow.db')
    corpus = tmp / "timemachine.txt"
    corpus.write_text((shared_data / "timemachine.txt").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        timeseries_flow(length=600, lookback=12, horizon=3, hidden_size=16, epochs=3, device="cpu",
                        quantiles="0.1,0.9", intervals="0.8,0.95")
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
        assert all(r["lo0.95"] <= r["lo0.8"] <= r["forecast"] <= r["hi0.8"] <= r["hi0.95"] for r in rows), rows

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


def test_every_bad_request_answers_4xx_naming_it_and_the_server_goes_on(store):
    """``python -m flows.serve`` (``make serve-model``) with two workers: each bad request gets a
    4xx whose message names the problem; then a good request still gets its forecast."""
    good = json.dumps({"dataframe_split": {"columns": ["value"], "data": [[v] for v in np.sin(np.arange(30.0))]}})
    frame = lambda rows: json.dumps({"dataframe_split": {"columns": ["value"], "data": rows}})  # noqa: E731
    bad = {  # case: (body, content type, a word the message must hold)
        "invalid JSON": (b'{"dataframe_split": {"columns": ["value"], "data": [[1.0], [2.0', "application/json",
                         "json"),
        "wrong column": (json.dumps({"dataframe_split": {"columns": ["other"], "data": [[1.0]] * 20}}),
                         "application/json", "missing"),
        "text values": (frame([["x"]] * 20), "application/json", "numeric"),
        "NaN values": (frame([[1.0]] * 10 + [[float("nan")]] * 10), "application/json", "missing or infinite"),
        "empty frame": (frame([]), "application/json", "rows"),
        "too short a history": (frame([[1.0]] * 5), "application/json", "at least 12 rows"),
        "wrong content type": (good, "text/plain", "content type"),
        "10 MB body": (frame([[1.0]] * 1_200_000), "application/json", "limit"),
    }
    with rnnflow_served("sine-forecaster", store, workers=2) as base:
        wrong = {}
        for case, (body, content_type, word) in bad.items():
            status, answer = post(base, body if isinstance(body, bytes) else body.encode(), content_type)
            message = str(answer.get("message", answer))
            if not (400 <= status < 500 and word.lower() in message.lower() and "Traceback" not in message):
                wrong[case] = (status, message[-400:])
        assert not wrong, wrong
        status, answer = post(base, good.encode())
        assert status == 200 and len(answer["predictions"]) == 3, answer

        host, port = base.removeprefix("http://").split(":")  # a client that leaves half-way through its body
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n" + good.encode()[:100])
        assert post(base, good.encode())[0] == 200

        with ThreadPoolExecutor(8) as pool:  # 8 clients at once, 20 requests each: all answered
            codes = list(pool.map(lambda _: post(base, good.encode())[0], range(160)))
        assert codes == [200] * 160

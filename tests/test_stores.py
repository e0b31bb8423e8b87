"""--data from an object store: a real S3 API (moto's server mode on 127.0.0.1), reached as a
user reaches an S3-compatible server, through AWS_ENDPOINT_URL and the AWS key variables, and
read by s3fs; the command line trains from it, and its failures are one line each."""

import hashlib
import os
import subprocess
import sys

import boto3
import pytest
from moto.server import ThreadedMotoServer

from tasks.data import SERIES_SUFFIXES, DataError
from tasks.ingest import fetch_data
from tests.serving import free_port

BUCKET = "series"


@pytest.fixture(scope="module")
def s3(shared_data, tmp_path_factory):
    """An S3 server holding s3://series/air.csv (the airline series); yields (the environment a user
    sets to reach it, the file's bytes). The environment is also set in this process meanwhile."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    none = tmp_path_factory.mktemp("aws") / "none"  # not the machine's ~/.aws files
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_CONFIG_FILE": str(none),
           "AWS_SHARED_CREDENTIALS_FILE": str(none), "AWS_EC2_METADATA_DISABLED": "true"}
    body = (shared_data / "airline-passengers.csv").read_bytes()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            client = boto3.client("s3")  # the upload goes through boto3, not the code under test
            client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="air.csv", Body=body)
            yield env, body
    finally:
        server.stop()


def test_fetch_from_s3_is_cached_and_checked(s3, tmp_path, monkeypatch):
    _, body = s3
    downloads = tmp_path / "downloads"
    monkeypatch.setenv("RNNFLOW_DOWNLOADS", str(downloads))
    sha = hashlib.sha256(body).hexdigest()
    path, got = fetch_data(f"s3://{BUCKET}/air.csv", sha, SERIES_SUFFIXES)
    assert got == sha and open(path, "rb").read() == body
    assert os.path.basename(path) == f"{sha[:12]}-air.csv" and os.path.dirname(path) == str(downloads)
    with pytest.raises(DataError, match=rf"^s3://series/air\.csv: sha256 is {sha}, expected 0{{64}}$"):
        fetch_data(f"s3://{BUCKET}/air.csv", "0" * 64, SERIES_SUFFIXES)
    with pytest.raises(DataError, match=r"^s3://series/gone\.csv: not found \(The specified key does not exist\.\)$"):
        fetch_data(f"s3://{BUCKET}/gone.csv", "", SERIES_SUFFIXES)
    # the verified file alone: neither the refused copy nor the failed one left a .part- file
    assert sorted(p.name for p in downloads.iterdir()) == [os.path.basename(path)]


def _cli(args, env, s3fs_missing=False):
    """``python -m flows.timeseries ARGS`` as a user runs it; ``s3fs_missing``: as where s3fs is not installed."""
    run = [sys.executable, "-m", "flows.timeseries"]
    if s3fs_missing:
        run = [sys.executable, "-c", "import runpy, sys; sys.modules['s3fs'] = None; "
               "runpy.run_module('flows.timeseries', run_name='__main__', alter_sys=True)"]
    return subprocess.run([*run, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_train_from_s3_through_the_command_line(s3, tmp_path):
    s3_env, body = s3
    env = {**os.environ, **s3_env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "RNNFLOW_DOWNLOADS": str(tmp_path / "downloads"), "PREFECT_LOGGING_LEVEL": "INFO"}
    out = _cli(["--source", "file", "--data", f"s3://{BUCKET}/air.csv", "--lookback", "12", "--hidden-size", "8",
                "--epochs", "1", "--ensemble", "1", "--no-auto"], env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "registered models:/air-forecaster/1" in out.stdout  # the name comes from the key
    sha = hashlib.sha256(body).hexdigest()
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == [f"{sha[:12]}-air.csv"]


@pytest.mark.parametrize("data, args, unset, message", [
    (f"s3://{BUCKET}/gone.csv", [], [], f"s3://{BUCKET}/gone.csv: not found (The specified key does not exist.)"),
    ("s3://no-such-bucket/air.csv", [], [], "s3://no-such-bucket/air.csv: not found (The specified bucket does not exist)"),
    (f"s3://{BUCKET}/air.csv", ["--sha256", "0" * 64], [], f"s3://{BUCKET}/air.csv: sha256 is <sha>, expected {'0' * 64}"),
    (f"s3://{BUCKET}/air.csv", [], ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
     f"s3://{BUCKET}/air.csv: cannot download (Unable to locate credentials)"),
    (f"s3://{BUCKET}/air.csv", [], ["s3fs"], f"s3://{BUCKET}/air.csv: Install s3fs to access S3 (pip install 'rnnflow[s3]')"),
], ids=["missing key", "missing bucket", "checksum", "no credentials", "no s3fs"])
def test_store_failures_are_one_error_line_before_prefect_starts(s3, tmp_path, data, args, unset, message):
    s3_env, body = s3
    env = {**os.environ, **s3_env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "RNNFLOW_DOWNLOADS": str(tmp_path / "downloads"), "PREFECT_LOGGING_LEVEL": "INFO"}
    for key in unset:
        env.pop(key, None)
    out = _cli(["--source", "file", "--data", data, *args], env, s3fs_missing="s3fs" in unset)
    assert out.returncode == 1, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == "error: " + message.replace("<sha>", hashlib.sha256(body).hexdigest()), out.stderr
    assert "Traceback" not in out.stderr and "temporary server" not in out.stderr  # Prefect never started
    assert not (tmp_path / "mlflow.db").exists()  # nothing registered, no store even created
    assert not list((tmp_path / "downloads").glob(".part-*"))  # nothing half-written left behind

"""Task tests for ingestion: files, URLs over real local HTTP, checksums and bad data."""

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.config import TimeSeriesConfig
from tasks.data import SERIES_SUFFIXES, DataError, generate_series, load_series
from tasks.ingest import TransientDataError, fetch_data


def _cfg(path, **kw):
    return TimeSeriesConfig(source="file", data=str(path), **kw)


def _load(path, **kw):
    p, sha = fetch_data(str(path), kw.pop("sha256", ""), SERIES_SUFFIXES)
    return load_series(p, sha, _cfg(path, **kw))


def test_airline_csv_is_monthly_with_season_12(shared_data):
    s = _load(shared_data / "airline-passengers.csv")
    assert (s.time_column, s.value_column, s.freq, s.season_length) == ("Month", "Passengers", "MS", 12)
    assert len(s.frame) == 144 and s.frame["Passengers"].iloc[0] == 112
    assert s.sha256 == hashlib.sha256((shared_data / "airline-passengers.csv").read_bytes()).hexdigest()


@pytest.mark.parametrize("write", ["{y} Q{q}", "{y}-Q{q}", "{y}Q{q}"])
def test_quarters_as_spreadsheets_write_them_are_quarterly(tmp_path, write):
    """fpp3 and spreadsheets write quarters 1970 Q1, which pandas does not read as a time."""
    quarters = [write.format(y=1970 + i // 4, q=i % 4 + 1) for i in range(40)]
    path = tmp_path / "q.csv"
    pd.DataFrame({"Quarter": quarters, "Consumption": np.sin(np.arange(40.0))}).to_csv(path, index=False)
    series = load_series(str(path), "", TimeSeriesConfig(source="file", data=str(path)))
    assert series.time_column == "Quarter" and series.freq.startswith("QS") and series.season_length == 4
    assert series.frame["Quarter"].iloc[5] == pd.Timestamp("1971-04-01")


def test_uschange_reads_its_quarters(shared_data):
    cfg = TimeSeriesConfig(source="file", data=str(shared_data / "uschange.csv"), value_column="Consumption")
    series = load_series(cfg.data, "", cfg)
    assert series.time_column == "Quarter" and len(series.frame) == 187 and series.season_length == 4


def test_unsorted_rows_are_sorted_and_short_gaps_interpolated(tmp_path, caplog):
    days = pd.date_range("2024-01-01", periods=30, freq="D")
    df = pd.DataFrame({"day": days, "load": np.arange(30.0), "temp": np.arange(30.0) * 2})
    df = df.drop(index=[10, 11]).sample(frac=1, random_state=0)  # two missing days, shuffled
    df.to_csv(tmp_path / "load.csv", index=False)
    s = _load(tmp_path / "load.csv", value_column="load", covariate_columns="temp")
    assert s.freq == "D" and s.season_length == 7 and len(s.frame) == 30
    np.testing.assert_allclose(s.frame["load"], np.arange(30.0))  # linear gap filled exactly
    assert s.covariate_columns == ["temp"] and s.features.shape == (30, 2)
    assert "interpolated 2 missing time steps" in caplog.text


def test_parquet_is_read(tmp_path):
    df = pd.DataFrame({"t": pd.date_range("2024-01-01", periods=40, freq="h"), "y": np.sin(np.arange(40))})
    df.to_parquet(tmp_path / "s.parquet")
    s = _load(tmp_path / "s.parquet")
    assert s.freq == "h" and s.season_length == 24 and s.value_column == "y"


def test_long_gap_is_refused_with_its_place(tmp_path):
    days = pd.date_range("2024-01-01", periods=30, freq="D")
    pd.DataFrame({"day": days, "v": np.arange(30.0)}).drop(index=range(5, 10)).to_csv(tmp_path / "g.csv", index=False)
    with pytest.raises(DataError, match=r"g\.csv: 5 consecutive time steps are missing from 2024-01-06.*--max-gap 3"):
        _load(tmp_path / "g.csv")


def test_unknown_column_lists_the_columns(shared_data):
    with pytest.raises(DataError, match=r"no value column 'passengers'; the columns are \['Month', 'Passengers'\]"):
        _load(shared_data / "airline-passengers.csv", value_column="passengers")


def test_non_numeric_value_names_row_and_value(tmp_path):
    (tmp_path / "bad.csv").write_text("t,v\n1,1.0\n2,2.0\n3,oops\n4,4.0\n")
    with pytest.raises(DataError, match=r"bad\.csv: column 'v' has a non-numeric value 'oops' at row 3"):
        _load(tmp_path / "bad.csv", value_column="v")


def test_missing_file_and_wrong_type(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: no such file"):
        fetch_data(str(tmp_path / "nope.csv"), "", SERIES_SUFFIXES)
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        fetch_data(str(tmp_path / "x.txt"), "", SERIES_SUFFIXES)


def test_url_download_with_checksum(http_root, shared_data, tmp_path, monkeypatch):
    root, base = http_root
    downloads = tmp_path / "downloads"
    monkeypatch.setenv("RNNFLOW_DOWNLOADS", str(downloads))  # where fetch_data puts what it downloads
    body = (shared_data / "airline-passengers.csv").read_bytes()
    (root / "air.csv").write_bytes(body)
    sha = hashlib.sha256(body).hexdigest()
    path, got = fetch_data(f"{base}/air.csv", sha, SERIES_SUFFIXES)
    assert got == sha and open(path, "rb").read() == body
    assert Path(path).parent == downloads
    with pytest.raises(DataError, match=rf"air\.csv: sha256 is {sha}, expected 0{{64}}"):
        fetch_data(f"{base}/air.csv", "0" * 64, SERIES_SUFFIXES)
    with pytest.raises(DataError, match=r"gone\.csv: HTTP 404"):
        fetch_data(f"{base}/gone.csv", "", SERIES_SUFFIXES)
    # the verified file alone: neither the refused download nor the failed one left a .part- file
    assert sorted(p.name for p in downloads.iterdir()) == [Path(path).name]


def test_url_errors_are_clear(http_root, mlflow_store):
    _, base = http_root
    with pytest.raises(DataError, match=r"missing\.csv: HTTP 404 Not Found$") as missing:
        fetch_data(f"{base}/missing.csv", "", SERIES_SUFFIXES)
    assert not isinstance(missing.value, TransientDataError)  # a 404 is not retried
    with pytest.raises(TransientDataError, match=r"127\.0\.0\.1:9/x\.csv: cannot download"):
        fetch_data("http://127.0.0.1:9/x.csv", "", SERIES_SUFFIXES)  # retried in a flow, then refused


@pytest.mark.parametrize("data, name", [("data/air.csv", "air"), ("s3://bucket/m4/air.csv", "air"),
                                        ("https://host/air.csv?raw=1", "air"), ("hf://datasets/org/set/air.parquet", "air"),
                                        ("file:///tmp/air.csv", "air"), ("https://host", "series")])
def test_the_model_is_named_after_the_file_of_any_url(data, name):
    assert TimeSeriesConfig(source="file", data=data).registered_name == f"{name}-forecaster"


def test_generated_sources():
    s = generate_series(TimeSeriesConfig(source="sin-cos", length=100))
    assert s.value_column == "cos" and s.covariate_columns == ["sin"] and s.season_length == 40
    a = generate_series(TimeSeriesConfig(source="arithmetic", length=5))
    np.testing.assert_array_equal(a.frame["value"], [10, 20, 30, 40, 50])

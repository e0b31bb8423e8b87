"""darts' LSTM models on a panel with known-future covariates: the baseline that
``bench_panel_covariates.py`` runs, in darts' own environment, as a subprocess.

Install (a benchmark-only environment, kept apart from rnnflow's; torch pinned to the CPU build):

    python3 -m venv /tmp/dartsenv
    /tmp/dartsenv/bin/pip install torch==2.13.0 'darts[torch]==0.48.1' holidays 'pandas<3'

(plain ``darts`` lacks pytorch-lightning, so its torch models do not import: the ``[torch]`` extra is needed;
darts 0.48.1's ``historical_forecasts`` fails on pandas 3's daily frequency, ``Timedelta // Day``: hence pandas 2.)

Contract: ``/tmp/dartsenv/bin/python benchmarks/darts_panel.py`` reads ONE JSON job on stdin::

    {"csv": "/tmp/stores40.csv", "id": "store", "time": "date", "value": "sales",
     "future": ["promo", "price"], "holidays": "US", "static": ["store_type", "size"],
     "lookback": 28, "horizon": 14, "val_size": 0.1, "test_size": 0.2,
     "epochs": 30, "hidden": 64, "batch_size": 256, "seed": 0,
     "models": ["RNNModel", "BlockRNNModel"]}

(optional: ``"patience"``, epochs without a better validation loss before stopping, default 5, 0 for none;
``"lr"``, Adam's learning rate, default darts' 1e-3) and prints ONE JSON object on stdout, everything else
going to stderr::

    {"<label>": {"forecasts": {"<id>": [[h1..hH], ...one list per test origin...]},
                 "train_seconds": 12.3, "note": "..."}, ...}

Split, per series of n rows (the same as rnnflow's): n_test = max(round(n*test_size), H), n_val =
max(round(n*val_size), H), train_end = n - n_test - n_val, val_end = n - n_test; the test origins are
range(max(val_end, L), n - H + 1), origin o forecasting rows o..o+H-1 from rows < o and the covariates.
One global model is fit on rows [0, train_end) of every series; darts' ``val_series`` are the rows from just
before train_end to val_end, so that every validation window's targets lie in [train_end, val_end) (its
inputs reach back before train_end: L rows for BlockRNNModel, 1 for RNNModel, whose targets are its inputs
shifted by one step; further back when [train_end, val_end) is shorter than one training window, e.g. RNNModel's
L + H + 1 rows); the validation loss drives early stopping (patience as above) and the restore of the
best epoch's weights (``load_best``), as rnnflow does. Test origins are forecast without
retraining (``historical_forecasts(retrain=False)``). Target and covariates are scaled by darts' ``Scaler``
(min-max, one per series) fitted on the training rows; forecasts come back in the data's units.

Covariates: the ``future`` columns, a 0/1 flag for the ``holidays`` country's public holidays and darts'
cyclic day-of-week encoder (sine and cosine) are future covariates of both models (darts 0.48's
``BlockRNNModel`` takes future covariates: it reads them over the input window with the target and over the
output window beside the LSTM's output). The ``static`` columns (categorical one-hot, numeric min-max, by
``StaticCovariatesTransformer``) are static covariates of ``BlockRNNModel``; ``RNNModel`` takes no static
covariates, so it gets the same encoded values as constant future-covariate columns.

``--selftest`` makes a small panel with rnnflow's ``benchmarks/panel_data.py`` (``--stores/--days/--epochs``,
default 6 x 400, 2 epochs), runs the job on it and prints to stderr each model's forecast shape, seconds and
MASE beside the lag-7 seasonal naive's (``--report`` does the same for a job read from stdin); every run checks
that each forecast starts at its test origin's date.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import pandas as pd

HOLIDAY = "__holiday"
LABELS = {"RNNModel": "darts RNNModel (LSTM) + covariates", "BlockRNNModel": "darts BlockRNNModel (LSTM) + covariates"}


def split(n: int, job: dict) -> tuple[int, int, list[int]]:
    """(train_end, val_end, test origins) of a series of ``n`` rows, as rnnflow splits it."""
    lookback, horizon = job["lookback"], job["horizon"]
    n_test = max(round(n * job["test_size"]), horizon)
    n_val = max(round(n * job["val_size"]), horizon)
    train_end, val_end = n - n_test - n_val, n - n_test
    return train_end, val_end, list(range(max(val_end, lookback), n - horizon + 1))


def read_panel(job: dict) -> pd.DataFrame:
    """The long table, sorted by id and time, with the holiday flag added when ``holidays`` is set."""
    df = pd.read_csv(job["csv"])
    df[job["time"]] = pd.to_datetime(df[job["time"]])
    df = df.sort_values([job["id"], job["time"]]).reset_index(drop=True)
    if job.get("holidays"):
        import holidays

        years = range(df[job["time"]].dt.year.min(), df[job["time"]].dt.year.max() + 1)
        days = set(holidays.country_holidays(job["holidays"], years=years))
        df[HOLIDAY] = df[job["time"]].dt.date.isin(days).astype(float)
    return df


def covariate_columns(job: dict) -> list[str]:
    return list(job.get("future", [])) + ([HOLIDAY] if job.get("holidays") else [])


def make_series(df: pd.DataFrame, job: dict) -> tuple[list[str], list, list]:
    """(ids, targets, covariates): one darts series per id, float32, static covariates on the targets."""
    from darts import TimeSeries

    cols = covariate_columns(job)
    full = TimeSeries.from_group_dataframe(df, group_cols=job["id"], time_col=job["time"],
                                           value_cols=[job["value"], *cols], static_cols=job.get("static") or None,
                                           freq=pd.infer_freq(df[job["time"]].drop_duplicates().iloc[:10]))
    ids = [str(s.static_covariates[job["id"]].iloc[0]) for s in full]
    statics = [s.static_covariates.drop(columns=job["id"]) for s in full]
    targets = [s[job["value"]].astype(np.float32).with_static_covariates(st if len(st.columns) else None)
               for s, st in zip(full, statics, strict=True)]
    covs = [s[cols].astype(np.float32) for s in full] if cols else None
    return ids, targets, covs


def encode_statics(targets: list, job: dict) -> list:
    """Targets with their static covariates one-hot (categorical) and min-max scaled (numeric)."""
    if targets[0].static_covariates is None:
        return targets
    from darts.dataprocessing.transformers import StaticCovariatesTransformer
    from sklearn.preprocessing import MinMaxScaler, OneHotEncoder

    frame = targets[0].static_covariates
    numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
    categorical = [c for c in frame.columns if c not in numeric]
    transformer = StaticCovariatesTransformer(transformer_num=MinMaxScaler(), cols_num=numeric, cols_cat=categorical,
                                              transformer_cat=OneHotEncoder(handle_unknown="ignore"))
    return transformer.fit_transform(targets)


def scale(series: list | None, train_end: int) -> tuple[list | None, object]:
    """(scaled series, fitted Scaler): one min-max scaler per series, fitted on its first ``train_end`` rows."""
    if series is None:
        return None, None
    from darts.dataprocessing.transformers import Scaler

    scaler = Scaler(global_fit=False)
    scaler.fit([s[:train_end] for s in series])
    return scaler.transform(series), scaler


def statics_as_columns(targets: list, covs: list | None) -> list | None:
    """Covariates with each series' (encoded) static covariates appended as constant columns."""
    if targets[0].static_covariates is None:
        return covs
    from darts import TimeSeries

    out = []
    for target, cov in zip(targets, covs or [None] * len(targets), strict=True):
        frame = target.static_covariates
        times = target.time_index if cov is None else cov.time_index
        values = np.tile(frame.to_numpy(dtype=np.float32)[0], (len(times), 1))
        const = TimeSeries.from_times_and_values(times, values, columns=[f"static_{c}" for c in frame.columns])
        out.append(const if cov is None else cov.stack(const))
    return out


def build(name: str, job: dict, work_dir: str):
    """An untrained darts model ``name`` with the job's settings (LSTM, one layer, CPU, no progress bars)."""
    from darts.models import BlockRNNModel, RNNModel
    from pytorch_lightning.callbacks import EarlyStopping

    lookback, horizon, patience = job["lookback"], job["horizon"], job.get("patience", 5)
    callbacks = [EarlyStopping("val_loss", patience=patience, mode="min")] if patience else []
    common = dict(model="LSTM", hidden_dim=job["hidden"], n_rnn_layers=1, input_chunk_length=lookback,
                  n_epochs=job["epochs"], batch_size=job["batch_size"], random_state=job["seed"],
                  add_encoders={"cyclic": {"future": ["dayofweek"]}}, model_name=name, work_dir=work_dir,
                  save_checkpoints=bool(patience), force_reset=True,
                  optimizer_kwargs={"lr": job.get("lr", 1e-3)},
                  pl_trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False,
                                     "enable_model_summary": False, "logger": False, "callbacks": callbacks})
    if name == "RNNModel":  # training_length = what it runs over at inference: L history + H autoregressive steps
        return RNNModel(training_length=lookback + horizon, **common)
    if name == "BlockRNNModel":
        return BlockRNNModel(output_chunk_length=horizon, **common)
    raise ValueError(f"unknown model {name!r}: RNNModel or BlockRNNModel")


def note(name: str, job: dict) -> str:
    """In words, what the model read and how it was trained."""
    future = ", ".join(list(job.get("future", [])) + ([f"a {job['holidays']} public-holiday flag"]
                                                      if job.get("holidays") else []) + ["day-of-week sin/cos"])
    static = ", ".join(job.get("static") or [])
    read = f"target history ({job['lookback']} steps); future covariates: {future}"
    patience = job.get("patience", 5)
    tail = "; target and covariates min-max scaled per series on training rows; " + (
        f"early stopping on val rows (patience {patience}), best epoch restored" if patience else "no early stopping")
    if name == "RNNModel":
        extra = (f"; static {static} (RNNModel takes no static covariates) as constant future-covariate columns"
                 if static else "")
        return read + extra + "; autoregressive over the horizon, training_length = lookback + horizon" + tail
    extra = f"; static covariates {static} (one-hot/min-max), fed to the LSTM at every input step" if static else ""
    return (read + " (over the input window, and over the output window beside the LSTM's last H outputs)" + extra
            + "; one-shot H-step output" + tail)


def fit(model, data: dict, job: dict) -> float:
    """Fit on rows [0, train_end); validate on the windows whose targets lie in rows [train_end, val_end)
    (their inputs reach back before train_end; further if that section is shorter than one window); seconds."""
    patience, train_end = job.get("patience", 5), data["train_end"]
    rnn, lookback, horizon = type(model).__name__ == "RNNModel", job["lookback"], job["horizon"]
    back = 1 if rnn else lookback  # RNNModel's targets are its inputs shifted by one step
    first = max(0, min(train_end - back, data["val_end"] - (lookback + horizon + 1 if rnn else lookback + horizon)))
    val = [s[first : data["val_end"]] for s in data["series"]]
    val = dict(val_series=val, val_future_covariates=data["covs"]) if patience else {}
    start = time.perf_counter()
    model.fit([s[:train_end] for s in data["series"]], future_covariates=data["covs"], load_best=bool(patience),
              **val)
    return time.perf_counter() - start


def forecast(model, data: dict, scaler, job: dict) -> dict[str, list[list[float]]]:
    """Every test origin of every series, without retraining, in the data's units, checked for alignment."""
    first = data["origins"][0]
    start = data["series"][0].time_index[first]
    fcs = model.historical_forecasts(data["series"], future_covariates=data["covs"], start=start,
                                     forecast_horizon=job["horizon"], stride=1, retrain=False,
                                     last_points_only=False, overlap_end=False, verbose=False)
    out = {}
    for key, series, per_origin in zip(data["ids"], data["series"], scaler.inverse_transform(fcs), strict=True):
        if [series.time_index.get_loc(f.start_time()) for f in per_origin] != data["origins"]:
            raise RuntimeError(f"{key}: forecasts do not start at the test origins")
        out[key] = [f.values(copy=False)[:, 0].astype(float).round(4).tolist() for f in per_origin]
    return out


def prepare(job: dict) -> tuple[dict, object]:
    """The job's scaled data (ids, whole series, covariates, split, test origins) and the target's scaler."""
    ids, targets, covs = make_series(read_panel(job), job)
    lengths = {len(t) for t in targets}
    if len(lengths) != 1:
        raise ValueError(f"series of different lengths {sorted(lengths)}: each needs the same dates")
    train_end, val_end, origins = split(lengths.pop(), job)
    targets = encode_statics(targets, job)
    series, scaler = scale(targets, train_end)
    covs, _ = scale(covs, train_end)
    data = dict(ids=ids, series=series, covs=covs, origins=origins, train_end=train_end, val_end=val_end)
    return data, scaler


def run_job(job: dict) -> dict:
    """The JSON answer to ``job`` (see the module docstring)."""
    data, scaler = prepare(job)
    result = {}
    with tempfile.TemporaryDirectory() as work_dir:
        for name in job.get("models", ["RNNModel", "BlockRNNModel"]):
            model = build(name, job, work_dir)
            mine = dict(data, covs=statics_as_columns(data["series"], data["covs"])) if name == "RNNModel" else data
            seconds = fit(model, mine, job)
            result[LABELS[name]] = {"forecasts": forecast(model, mine, scaler, job),
                                    "train_seconds": round(seconds, 3), "note": note(name, job)}
    return result


@contextlib.contextmanager
def stdout_to_stderr():
    """Sends everything written to stdout (Python's or a library's own) to stderr; yields the real stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield os.fdopen(os.dup(saved), "w")
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def quiet() -> None:
    """Turns down darts' and lightning's chatter (it goes to stderr in any case)."""
    import pytorch_lightning  # noqa: F401  (it sets its loggers' levels on import: import it first)

    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "darts"):
        logging.getLogger(name).setLevel(logging.ERROR)


def mase(df: pd.DataFrame, job: dict, forecasts: dict) -> float:
    """Mean over series of MAE over every test origin and step / mean |y[t] - y[t-7]| over the training rows."""
    scores = []
    for key, rows in df.groupby(job["id"], sort=True):
        y = rows[job["value"]].to_numpy(dtype=float)
        train_end, _, origins = split(len(y), job)
        truth = np.stack([y[o:o + job["horizon"]] for o in origins])
        scores.append(np.abs(np.asarray(forecasts[str(key)]) - truth).mean()
                      / np.abs(y[7:train_end] - y[:train_end - 7]).mean())
    return float(np.mean(scores))


def seasonal_naive(df: pd.DataFrame, job: dict, season: int = 7) -> dict[str, list[list[float]]]:
    """Each origin's forecast repeats the last ``season`` observed values."""
    out = {}
    for key, rows in df.groupby(job["id"], sort=True):
        y = rows[job["value"]].to_numpy(dtype=float)
        _, _, origins = split(len(y), job)
        steps = np.arange(job["horizon"])
        out[str(key)] = [y[o - season + steps % season].tolist() for o in origins]
    return out


def report(job: dict, result: dict) -> None:
    """Prints (to stderr) each model's forecast shape, seconds and MASE, and the seasonal naive's MASE."""
    df = pd.read_csv(job["csv"]).sort_values([job["id"], job["time"]])
    for label, res in result.items():
        shapes = {np.asarray(v).shape for v in res["forecasts"].values()}
        print(f"{label}: {len(res['forecasts'])} series x {shapes} (origins, horizon), "
              f"{res['train_seconds']:.1f} s, MASE {mase(df, job, res['forecasts']):.3f}", file=sys.stderr)
    print(f"seasonal naive (lag 7): MASE {mase(df, job, seasonal_naive(df, job)):.3f}", file=sys.stderr)


def selftest(args: argparse.Namespace) -> dict:
    """A short job on a small panel made (in the temp folder) by rnnflow's panel_data.py."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import panel_data

    csv = os.path.join(tempfile.gettempdir(), f"darts_selftest_{args.stores}x{args.days}.csv")
    panel_data.stores(args.stores, args.days, seed=0).to_csv(csv, index=False)
    return {"csv": csv, "id": "store", "time": "date", "value": "sales", "future": ["promo", "price"],
            "holidays": "US", "static": ["store_type", "size"], "lookback": 28, "horizon": 14, "val_size": 0.1,
            "test_size": 0.2, "epochs": args.epochs, "hidden": 32, "batch_size": 256, "seed": 0,
            "models": ["RNNModel", "BlockRNNModel"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--selftest", action="store_true", help="run a short job on generated data instead of stdin's")
    p.add_argument("--report", action="store_true", help="also print shapes, seconds and MASEs to stderr")
    p.add_argument("--stores", type=int, default=6, help="--selftest: how many stores")
    p.add_argument("--days", type=int, default=400, help="--selftest: how many days")
    p.add_argument("--epochs", type=int, default=2, help="--selftest: epochs")
    args = p.parse_args()
    quiet()
    with stdout_to_stderr() as out:
        job = selftest(args) if args.selftest else json.load(sys.stdin)
        result = run_job(job)
        if args.selftest or args.report:
            report(job, result)
    out.write(json.dumps(result) + "\n")
    out.close()


if __name__ == "__main__":
    main()

"""The registered forecaster as MLflow loads it: plain artifacts (safetensors weights, JSON
config and transform numbers) read into :class:`rnn_models.forecasting.ForecastPipeline`; nothing pickled.

Input: a DataFrame whose value column (and any covariate columns) hold the history in
original units, at least ``lookback`` rows; only the last ``lookback`` rows are used. A model
trained with ``--future-covariate-columns`` also reads those columns for the ``horizon`` steps
ahead: the request ends with ``horizon`` rows whose value is empty and whose covariates are given.
Output: a DataFrame of ``horizon`` rows with columns ``step`` (1..H) and ``forecast``, with
quantiles one ``q<level>`` column each (``q0.1``, ``q0.5``, ``q0.9``; ``forecast`` is ``q0.5``),
and with ``--intervals`` a ``lo<level>`` and ``hi<level>`` column each (``lo0.8``, ``hi0.8``).

A model trained with calendar features (``--calendar``, or chosen by ``--auto``) makes them from the
time column, which the request must then hold; the horizon's times follow the last one at the
model's frequency (a request that gives rows ahead for other covariates gives their times too).

A global model (trained with ``--id-column ID``) reads many series at once: a long table with
columns ID and the value column (and optionally the time column, by which each series' rows are
ordered; otherwise the rows' order is the time order), and answers ``horizon`` rows per series,
``ID, step, forecast[, q...][, lo..., hi...]``, series in the order they first appear, from one batched forward
pass. A series it never saw is forecast from its own history.
"""

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from rnn_models.calendar import calendar_frame, times_ahead, to_datetime
from rnn_models.forecasting import ForecastPipeline
from rnn_models.panel import last_windows


class RecurrentForecaster(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.pipeline = ForecastPipeline.load(context.artifacts["weights"], context.artifacts["config"])
        self.columns = [self.pipeline.meta["value_column"], *self.pipeline.meta["covariate_columns"]]
        self.id_column = self.pipeline.meta.get("id_column")
        self.calendar = self.pipeline.meta.get("calendar")  # {"columns": [...], "countries": [...]}

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if self.id_column:
            return self._predict_many(model_input)
        if self.calendar:
            model_input = self._with_calendar(model_input)
        L = self.pipeline.lookback
        missing = [c for c in self.columns if c not in model_input.columns]
        if missing:
            raise _bad_input(f"missing column(s) {missing}; the model reads {self.columns}")
        try:
            rows = model_input[self.columns].to_numpy(dtype=np.float64)  # (T, F)
        except (TypeError, ValueError) as e:
            raise _bad_input(f"history must be numeric: {e}") from e
        ahead = self._ahead(rows)
        if len(rows) - ahead < L:
            raise _bad_input(f"need at least {L} rows of history (the lookback), got {len(rows) - ahead}")
        window = rows[len(rows) - ahead - L :]  # (L + ahead, F)
        if not np.isfinite(window[:L]).all():
            raise _bad_input(f"the last {L} rows of history of {self.columns} contain a missing or infinite value")
        try:
            return self.pipeline.answer(window[None])
        except ValueError as e:  # e.g. a value <= 0 in the history of a log-transformed model
            raise _bad_input(str(e)) from e

    def _with_calendar(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The request with the calendar features the model reads, made from its time column. With no
        other covariates known ahead, a request of history only gets the H times ahead as empty rows."""
        meta, H, value = self.pipeline.meta, self.pipeline.horizon, self.columns[0]
        time_col, freq = meta["time_column"], meta["frequency"]
        if time_col not in frame.columns:
            raise _bad_input(f"missing column {time_col!r}: this model makes calendar features from it")
        frame = frame.reset_index(drop=True)
        times = to_datetime(frame[time_col])  # as the training data's times were read
        if times.isna().any():
            row = int(np.flatnonzero(times.isna().to_numpy())[0])
            raise _bad_input(f"column {time_col!r} has a value that is not a time, {frame[time_col].iloc[row]!r} "
                             f"at row {row + 1}")
        given_ahead = [c for c in self.pipeline.future_columns if c not in self.calendar["columns"]]
        if not given_ahead and value in frame.columns and pd.notna(frame[value].iloc[-1]):
            ahead = times_ahead(times.iloc[-1], freq, H)
            frame = pd.concat([frame, pd.DataFrame({time_col: ahead})], ignore_index=True)
            times = pd.concat([times, pd.Series(ahead)], ignore_index=True)
        features = calendar_frame(times, freq, self.calendar["countries"])
        return pd.concat([frame.drop(columns=features.columns, errors="ignore"), features], axis=1)

    def _ahead(self, rows: np.ndarray) -> int:
        """The rows after the history: a model trained with --future-covariate-columns reads its
        horizon's H steps ahead from the last H rows, whose value is empty; every column they name
        must be given there. Other models read none."""
        future, H, value = self.pipeline.future_columns, self.pipeline.horizon, self.columns[0]
        empty = np.isnan(rows[:, 0])
        trailing = len(rows) - (np.flatnonzero(~empty)[-1] + 1) if (~empty).any() else len(rows)
        if not future:
            return 0
        if trailing != H:
            raise _bad_input(f"this model reads {future} for the {H} steps ahead: give them in {H} rows after the "
                             f"history, with {value!r} empty (got {trailing} such rows)")
        for j, col in enumerate(future, start=len(self.columns) - len(future)):
            bad = np.flatnonzero(~np.isfinite(rows[-H:, j]))
            if len(bad):
                raise _bad_input(f"column {col!r} is missing for step {bad[0] + 1} ahead ({len(bad)} of the {H} "
                                 f"steps ahead lack it)")
        return H

    def _predict_many(self, model_input: pd.DataFrame) -> pd.DataFrame:
        """Every series of a long table in one batched call (see the module docstring)."""
        L, id_col, value_col = self.pipeline.lookback, self.id_column, self.columns[0]
        missing = [c for c in (id_col, value_col) if c not in model_input.columns]
        if missing:
            raise _bad_input(f"missing column(s) {missing}; the model reads {[id_col, value_col]} "
                             f"(and optionally {self.pipeline.meta.get('time_column') or 'a time column'})")
        if model_input.empty:
            raise _bad_input("the input holds no rows")
        codes, ids = pd.factorize(model_input[id_col].astype(str))  # series in the order they first appear
        counts = np.bincount(codes)
        if counts.min() < L:
            short = ids[int(np.argmin(counts))]
            raise _bad_input(f"series {short!r} has {counts.min()} rows; each series needs at least {L} "
                             f"(the lookback)")
        try:
            values = model_input[value_col].to_numpy(dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise _bad_input(f"column {value_col!r} must be numeric: {e}") from e
        time_col = self.pipeline.meta.get("time_column")
        if time_col and time_col in model_input.columns:  # each series' rows in time order
            try:
                order = np.argsort(model_input[time_col].to_numpy(), kind="stable")
            except TypeError as e:  # e.g. numbers and text mixed
                raise _bad_input(f"column {time_col!r} cannot be put in order: {e}") from e
            values, codes = values[order], codes[order]
        windows = last_windows(values, codes, L)  # (S, L)
        bad = ~np.isfinite(windows).all(axis=1)
        if bad.any():
            raise _bad_input(f"series {ids[int(np.flatnonzero(bad)[0])]!r}: the last {L} values of "
                             f"{value_col!r} contain a missing or infinite value")
        return self.pipeline.answer(windows[..., None], ids=pd.Index(ids, name=id_col))


def _bad_input(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE makes the scoring server answer 400 instead of 500
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


mlflow.models.set_model(RecurrentForecaster())

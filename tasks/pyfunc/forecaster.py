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
pass. A series it never saw is forecast from its own history. The covariates known ahead come as for one
series, per series: each series' history followed by its ``horizon`` rows ahead (value empty). A model
trained with ``--static-columns`` reads those columns too, one value per series (a category it never saw
reads as none, and the server's log says so).
"""

import logging

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from rnn_models.calendar import calendar_frame, times_ahead, to_datetime
from rnn_models.forecasting import ForecastPipeline
from rnn_models.panel import last_windows
from rnn_models.statics import StaticEncoding, per_series


class RecurrentForecaster(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.pipeline = ForecastPipeline.load(context.artifacts["weights"], context.artifacts["config"])
        self.columns = [self.pipeline.meta["value_column"], *self.pipeline.meta["covariate_columns"]]
        self.id_column = self.pipeline.meta.get("id_column")
        self.calendar = self.pipeline.meta.get("calendar")  # {"columns": [...], "countries": [...]}
        self.statics = StaticEncoding.from_dict(self.pipeline.meta["statics"]) if "statics" in self.pipeline.meta \
            else None
        made = [*(self.calendar["columns"] if self.calendar else []), *(self.statics.columns if self.statics else [])]
        self.given = [c for c in self.columns[1:] if c not in made]  # the covariates a request holds as they are

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
        other covariates known ahead, a series whose history ends the request gets its H times ahead as
        empty rows."""
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
        frame = frame.assign(**{time_col: times})
        given_ahead = [c for c in self.pipeline.future_columns if c in self.given]
        if not given_ahead and value in frame.columns:
            frame = pd.concat([frame, *self._times_ahead(frame, time_col, freq, H)], ignore_index=True)
        features = calendar_frame(frame[time_col], freq, self.calendar["countries"])
        return pd.concat([frame.drop(columns=features.columns, errors="ignore"), features], axis=1)

    def _times_ahead(self, frame: pd.DataFrame, time_col: str, freq: str, H: int) -> list[pd.DataFrame]:
        """The H times after each series' last row (all of the frame, or each id's), for those whose last
        value is given: the rows a request of history only is forecast for."""
        parts = frame.groupby(self.id_column, sort=False) if self.id_column else [(None, frame)]
        ahead = []
        for sid, part in parts:
            last = part.loc[part[time_col].idxmax()]
            if pd.notna(last[self.columns[0]]):
                rows = pd.DataFrame({time_col: times_ahead(last[time_col], freq, H)})
                ahead.append(rows.assign(**{self.id_column: sid}) if self.id_column else rows)
        return ahead

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
            named = [c for c in future if c in self.given] or future  # not those it makes itself
            raise _bad_input(f"this model reads {named} for the {H} steps ahead: give them in {H} rows after the "
                             f"history, with {value!r} empty (got {trailing} such rows)")
        for j, col in enumerate(future, start=len(self.columns) - len(future)):
            bad = np.flatnonzero(~np.isfinite(rows[-H:, j]))
            if len(bad):
                raise _bad_input(f"column {col!r} is missing for step {bad[0] + 1} ahead ({len(bad)} of the {H} "
                                 f"steps ahead lack it)")
        return H

    def _predict_many(self, model_input: pd.DataFrame) -> pd.DataFrame:
        """Every series of a long table in one batched call (see the module docstring)."""
        id_col, value_col, time_col = self.id_column, self.columns[0], self.pipeline.meta.get("time_column")
        needed = [id_col, value_col, *self.given, *(self.statics.order if self.statics else [])]
        missing = [c for c in needed if c not in model_input.columns]
        if missing:
            raise _bad_input(f"missing column(s) {missing}; the model reads {needed} "
                             f"(and {'' if self.calendar else 'optionally '}{time_col or 'a time column'})")
        if model_input.empty:
            raise _bad_input("the input holds no rows")
        frame = model_input.assign(**{id_col: model_input[id_col].astype(str)})
        ids = pd.Index(pd.unique(frame[id_col]), name=id_col)  # series in the order they first appear
        if self.calendar:
            frame = self._with_calendar(frame)
        if time_col and time_col in frame.columns:  # each series' rows in time order
            try:
                frame = frame.sort_values(time_col, kind="stable")
            except TypeError as e:  # e.g. numbers and text mixed
                raise _bad_input(f"column {time_col!r} cannot be put in order: {e}") from e
        if self.statics:
            frame = self._with_statics(frame)
        codes = pd.Categorical(frame[id_col], categories=ids).codes
        try:
            rows = frame[self.columns].to_numpy(dtype=np.float64)  # (N, F)
        except (TypeError, ValueError) as e:
            raise _bad_input(f"columns {self.columns} must be numeric: {e}") from e
        order = np.argsort(codes, kind="stable")  # each series' rows together, in time order
        rows, codes = rows[order], codes[order]
        windows = last_windows(rows, codes, self.pipeline.lookback + self._ahead_of_each(rows, codes, ids))
        return self.pipeline.answer(windows, ids=ids)

    def _ahead_of_each(self, rows: np.ndarray, codes: np.ndarray, ids: pd.Index) -> int:
        """The steps ahead each series' window holds (see ``_ahead``), each series checked: long enough,
        its last ``lookback`` values and the covariates ahead given. ``rows`` grouped by series (``codes``)."""
        L, value = self.pipeline.lookback, self.columns[0]
        ends = np.cumsum(np.bincount(codes, minlength=len(ids)))
        ahead = 0
        for i in range(len(ids)):  # a request's series, each checked as one series' request is
            own = rows[(ends[i - 1] if i else 0) : ends[i]]
            try:
                ahead = self._ahead(own)
            except MlflowException as e:
                raise _bad_input(f"series {ids[i]!r}: {e.message}") from None
            if len(own) - ahead < L:
                raise _bad_input(f"series {ids[i]!r} has {len(own) - ahead} rows{' of history' if ahead else ''}; "
                                 f"each series needs at least {L} (the lookback)")
            if not np.isfinite(own[len(own) - ahead - L : len(own) - ahead]).all():
                raise _bad_input(f"series {ids[i]!r}: the last {L} values of {value!r} (and its covariates) contain "
                                 f"a missing or infinite value")
        return ahead

    def _with_statics(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The request with its per-series attribute columns encoded as the model was trained on them; a
        category it never saw reads as none, and is said."""
        try:
            attributes = per_series(frame, self.id_column, self.statics.order)
        except ValueError as e:
            raise _bad_input(str(e)) from None
        encoded, unseen = self.statics.encode(attributes)
        for col, new in unseen.items():
            logging.getLogger(__name__).warning("%s %s not seen in training: read as no category (column %r)",
                                                ", ".join(map(repr, new)), "was" if len(new) == 1 else "were", col)
        table = pd.DataFrame(encoded, index=attributes.index, columns=self.statics.columns)
        return frame.drop(columns=self.statics.columns, errors="ignore").join(table, on=self.id_column)


def _bad_input(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE makes the scoring server answer 400 instead of 500
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


mlflow.models.set_model(RecurrentForecaster())

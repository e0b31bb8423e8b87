"""The registered forecaster as MLflow loads it: plain artifacts (safetensors weights, JSON
config and transform numbers) read into :class:`rnn_models.forecasting.ForecastPipeline`; nothing pickled.

Input: a DataFrame whose value column (and any covariate columns) hold the history in
original units, at least ``lookback`` rows; only the last ``lookback`` rows are used.
Output: a DataFrame of ``horizon`` rows with columns ``step`` (1..H) and ``forecast``, and with
quantiles one ``q<level>`` column each (``q0.1``, ``q0.5``, ``q0.9``; ``forecast`` is ``q0.5``).
"""

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from rnn_models.forecasting import ForecastPipeline


class RecurrentForecaster(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.pipeline = ForecastPipeline.load(context.artifacts["weights"], context.artifacts["config"])
        self.columns = [self.pipeline.meta["value_column"], *self.pipeline.meta["covariate_columns"]]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        L = self.pipeline.lookback
        missing = [c for c in self.columns if c not in model_input.columns]
        if missing:
            raise _bad_input(f"missing column(s) {missing}; the model reads {self.columns}")
        if len(model_input) < L:
            raise _bad_input(f"need at least {L} rows of history (the lookback), got {len(model_input)}")
        try:
            window = model_input[self.columns].iloc[-L:].to_numpy(dtype=np.float64)  # (L, F)
        except (TypeError, ValueError) as e:
            raise _bad_input(f"history must be numeric: {e}") from e
        if not np.isfinite(window).all():
            raise _bad_input(f"the last {L} rows of {self.columns} contain a missing or infinite value")
        try:
            forecast = self.pipeline.predict(window[None])[0]  # (H,) or (H, Q)
        except ValueError as e:  # e.g. a value <= 0 in the history of a log-transformed model
            raise _bad_input(str(e)) from e
        return self.pipeline.to_frame(forecast)


def _bad_input(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE makes the scoring server answer 400 instead of 500
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


mlflow.models.set_model(RecurrentForecaster())

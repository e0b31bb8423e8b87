"""The registered character language model as MLflow loads it: safetensors weights, JSON
vocabulary and config; nothing pickled.

Input: a DataFrame with a ``prefix`` column. Params: ``max_new_chars`` (200), ``temperature``
(1.0; 0 is greedy), ``top_k`` (0 = all), ``seed`` (-1 = fresh randomness; >= 0 reproducible).
Output: a DataFrame with a ``text`` column, each prefix followed by its continuation.
"""

import logging

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from rnn_models.generation import complete
from rnn_models.text import load_charlm, normalize

DEFAULTS = {"max_new_chars": 200, "temperature": 1.0, "top_k": 0, "seed": -1}
log = logging.getLogger("rnnflow.charlm")


class CharLanguageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        a = context.artifacts
        self.model, self.vocab, self.meta = load_charlm(a["weights"], a["vocab"], a["config"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        p = {**DEFAULTS, **(params or {})}
        if "prefix" not in model_input.columns:
            raise _bad_input(f"missing column 'prefix'; got {list(model_input.columns)}")
        if int(p["max_new_chars"]) < 0 or float(p["temperature"]) < 0 or int(p["top_k"]) < 0:
            raise _bad_input(f"max_new_chars, temperature and top_k must be >= 0, got {p}")
        texts = []
        for i, prefix in enumerate(model_input["prefix"]):
            if not isinstance(prefix, str) or not prefix:
                raise _bad_input(f"row {i}: prefix must be a non-empty string, got {prefix!r}")
            # read the prefix as the corpus was read; one that normalises to nothing starts from a space
            prompt = normalize(prefix, self.meta["lower"], self.meta["letters_only"]) or " "
            unknown = self.vocab.unknown(prompt)
            if unknown:
                log.warning("prefix %r has characters the model never saw, read as <unk>: %s", prefix, unknown)
            seed = int(p["seed"]) + i if int(p["seed"]) >= 0 else None  # each row its own stream
            text = complete(self.model, self.vocab, prompt, int(p["max_new_chars"]), float(p["temperature"]),
                            int(p["top_k"]), seed)
            texts.append(prefix + text[len(prompt):])
        return pd.DataFrame({"text": texts})


def _bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


mlflow.models.set_model(CharLanguageModel())

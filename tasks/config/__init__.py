"""The flows' configurations: each one flat dataclass composed of pieces (``ModelOptions``, ...), at
once the flow's parameters, its command-line options (grouped by piece in ``--help``) and its MLflow
params. Lower layers' configs are projected from it by field name (``project``)."""

from tasks.config.base import (
                               BOOLEANS,
                               MAX_NAME,
                               ConfigError,
                               ModelOptions,
                               RegistryOptions,
                               TrainingOptions,
                               check_common,
                               check_model_name,
                               flag,
                               option,
                               override,
                               parse_value,
                               project,
                               safe_name,
)
from tasks.config.series import TRANSFORM_FIELDS, TimeSeriesConfig, parse_levels
from tasks.config.text import BUNDLED_CORPUS, CharLMFlowConfig

__all__ = ["BOOLEANS", "BUNDLED_CORPUS", "MAX_NAME", "TRANSFORM_FIELDS", "CharLMFlowConfig", "ConfigError",
           "ModelOptions", "RegistryOptions", "TimeSeriesConfig", "TrainingOptions", "check_common",
           "check_model_name", "flag", "option", "override", "parse_levels", "parse_value", "project", "safe_name"]

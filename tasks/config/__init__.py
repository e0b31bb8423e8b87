"""The flows' configurations: each one flat dataclass composed of pieces (``ModelOptions``, ...), at
once the flow's parameters, its command-line options (grouped by piece in ``--help``) and its MLflow
params. Lower layers' configs are projected from it by field name (``project``)."""

from tasks.config.base import ConfigError, check_model_name, flag, option, parse_value, project, safe_name
from tasks.config.series import TRANSFORM_FIELDS, TimeSeriesConfig
from tasks.config.text import CharLMFlowConfig

__all__ = ["TRANSFORM_FIELDS", "CharLMFlowConfig", "ConfigError", "TimeSeriesConfig", "check_model_name", "flag",
           "option", "parse_value", "project", "safe_name"]

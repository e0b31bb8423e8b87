"""Prefect tasks: the units of work the flows compose."""

import logging

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger


def run_logger():
    """Prefect's run logger inside a flow or task run; a plain logger when called directly
    (the model-management commands reuse tasks outside any flow)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("rnnflow")

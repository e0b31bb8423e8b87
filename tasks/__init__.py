"""The pipeline's steps: plain functions that anything (a flow, a sweep trial, a re-score, a
test, a benchmark) calls directly. None imports Prefect; ``flows.steps`` wraps them as Prefect
tasks (a name, retries on I/O, a cache policy). Every MLflow call lives here too."""

import logging
import sys


def run_logger():
    """Prefect's run logger inside a flow or task run, so the step's lines reach the run's log
    in the UI; the plain ``rnnflow`` logger anywhere else. Prefect is used only if something
    already loaded it: a step never imports it."""
    prefect_logging, exceptions = sys.modules.get("prefect.logging"), sys.modules.get("prefect.exceptions")
    if prefect_logging is not None and exceptions is not None:
        try:
            return prefect_logging.get_run_logger()
        except exceptions.MissingContextError:
            pass
    return logging.getLogger("rnnflow")

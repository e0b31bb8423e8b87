"""The pipeline's steps: plain functions that anything (a flow, a sweep trial, a re-score, a
test, a benchmark) calls directly. None imports Prefect; ``flows.steps`` wraps them as Prefect
tasks (a name, retries on I/O, a cache policy). Every MLflow call lives here too."""

import logging
import re
import sys
from pathlib import Path, PurePath

# texts shipped inside the package (a wheel installs them too): the char LM's default corpus
CORPORA = Path(__file__).resolve().parent / "corpora"


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


def file_name(location: str) -> str:
    """The file name a path or URL ends with, past any host or bucket and without a query:
    'air.csv' for data/air.csv, s3://bucket/m/air.csv or https://host/air.csv?raw=1; '' for none."""
    _, sep, rest = location.partition("://")
    if not sep:
        return PurePath(location).name
    return re.split(r"[?#]", rest, maxsplit=1)[0].partition("/")[2].rpartition("/")[2]

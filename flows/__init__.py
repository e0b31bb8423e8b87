"""The flows and their command lines. Importing this package sets the defaults a run needs:
no Prefect telemetry (it logs an ERROR when it cannot phone home offline), no MLflow download
progress bars in the middle of the training log, and MLflow HTTP requests that give up in
seconds rather than minutes (its default is 7 retries with back-off up to 2 minutes each), so
that ``--registry-retry-minutes`` bounds how long a run waits for a tracking server.
``exit_process`` ends a command line's process."""

import gc
import os
import sys
import typing

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


def exit_process(status: int) -> typing.NoReturn:
    """``sys.exit`` for a command line's own process, after moving every object alive into the
    collector's permanent generation (``gc.freeze``): the interpreter's teardown otherwise walks
    the objects of torch, MLflow and Prefect again and again, seconds of CPU each time a command
    ends (docs/BENCHMARKS.md, "Everyday runs"). The rest of the exit is as usual: atexit handlers
    (Prefect's log and event workers among them) run, and what is not caught in a reference
    cycle is freed."""
    gc.freeze()
    sys.exit(status)

"""The flows and their command lines. Importing this package sets the defaults a run needs:
no Prefect telemetry (it logs an ERROR when it cannot phone home offline), no MLflow download
progress bars in the middle of the training log, and MLflow HTTP requests that give up in
seconds rather than minutes (its default is 7 retries with back-off up to 2 minutes each), so
that ``--registry-retry-minutes`` bounds how long a run waits for a tracking server."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")

"""The flows and their command lines. Importing this package sets the quiet defaults a run
needs offline: no Prefect telemetry (it logs an ERROR when it cannot phone home) and no MLflow
download progress bars in the middle of the training log."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

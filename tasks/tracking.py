"""Where runs and models are tracked, and whether a tracking server answers: without importing
MLflow, so a command line can refuse an unreachable server in a second, before any work."""

from __future__ import annotations

import os
from pathlib import Path

CHAMPION = "champion"  # the alias the champion gate moves


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store in ./mlruns."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path.cwd() / 'mlruns' / 'mlflow.db').resolve()}"


def sqlite_folder(uri: str) -> Path | None:
    """The folder of a SQLite store's file, where its artifacts and locks go; None for a server."""
    return Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else None


class TrackingUnavailable(ConnectionError):
    """The tracking server named by MLFLOW_TRACKING_URI does not answer."""


def check_tracking_server(timeout: float = 10.0) -> None:
    """Fail before any training when a remote tracking server cannot be reached."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    import httpx  # here: a local store needs no HTTP client

    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=timeout, follow_redirects=True).raise_for_status()
    except httpx.HTTPError as e:
        raise TrackingUnavailable(f"MLFLOW_TRACKING_URI {uri}: the tracking server does not answer ({e})") from None

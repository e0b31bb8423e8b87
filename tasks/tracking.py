"""Where runs and models are tracked, and whether a tracking server answers and takes the login:
without importing MLflow, so a command line can refuse an unreachable server or a wrong password in
a second, before any work."""

from __future__ import annotations

import configparser
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


class TrackingRefused(PermissionError):
    """The tracking server answers no: to the login (none, or a wrong one), or to what it was asked
    to do (the login lacks the permission)."""


def credentials() -> tuple[str | None, str | None]:
    """The user name and password MLflow's client sends: MLFLOW_TRACKING_USERNAME and _PASSWORD, else
    ~/.mlflow/credentials (as ``mlflow.utils.credentials.read_mlflow_creds``, which imports MLflow)."""
    saved = configparser.ConfigParser()
    saved.read(os.path.expanduser("~/.mlflow/credentials"))
    section = saved["mlflow"] if saved.has_section("mlflow") else {}
    return (os.environ.get("MLFLOW_TRACKING_USERNAME") or section.get("mlflow_tracking_username"),
            os.environ.get("MLFLOW_TRACKING_PASSWORD") or section.get("mlflow_tracking_password"))


def login() -> str:
    """Who the tracking server sees."""
    user = credentials()[0]
    return f"user {user!r}" if user else "no login (MLFLOW_TRACKING_USERNAME is not set)"


def login_refused() -> TrackingRefused:
    """The one line for a 401: a wrong login, or none where the server asks for one."""
    uri = tracking_uri()
    if not credentials()[0]:
        return TrackingRefused(f"MLFLOW_TRACKING_URI {uri}: the tracking server asks for a login: "
                               "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    return TrackingRefused(f"MLFLOW_TRACKING_URI {uri}: the tracking server refused the login of {login()}: wrong "
                           "user name or password (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
                           "~/.mlflow/credentials)")


def check_tracking_server(timeout: float = 10.0) -> None:
    """Fail before any training when a remote tracking server cannot be reached, or refuses the
    login (a server with logins answers /health to anyone, so one read request tries it)."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    import httpx  # here: a local store needs no HTTP client

    (user, password), token = credentials(), os.environ.get("MLFLOW_TRACKING_TOKEN")
    # as MLflow's client logs in: a user name and password, else a token
    login_as = {"auth": (user, password or "")} if user else (
        {"headers": {"Authorization": f"Bearer {token}"}} if token else {})
    base = uri.rstrip("/")
    try:
        httpx.get(base + "/health", timeout=timeout, follow_redirects=True).raise_for_status()
        answer = httpx.get(base + "/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=timeout,
                           follow_redirects=True, **login_as)
    except httpx.HTTPError as e:
        raise TrackingUnavailable(f"MLFLOW_TRACKING_URI {uri}: the tracking server does not answer ({e})") from None
    if answer.status_code == 401:
        raise login_refused()

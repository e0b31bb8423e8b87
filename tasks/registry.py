"""The tracking store and the registry: one run per flow run, registered versions, the
champion alias and the gate that moves it, retries while the tracking server is away.

A run is written only after training and evaluation succeeded, and if anything fails while
it is written the run and the new model version are deleted again: no half-written run, no
stray version, and the ``champion`` alias only ever moves as the last step.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException

from tasks import run_logger
from tasks.tracking import (
    CHAMPION,
    TrackingRefused,
    TrackingUnavailable,
    login,
    login_refused,
    sqlite_folder,
    tracking_uri,
)

# ---------------------------------------------------------------- the store


def client() -> MlflowClient:
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        _initialise_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, uri)


@functools.cache
def _initialise_sqlite_store(uri: str) -> None:
    """Create (or migrate) a SQLite store's tables once, one process at a time: MLflow creates
    them on first use, and runs started at once on a new store raced there (seen: SQLAlchemy's
    CircularDependencyError in one of four runs)."""
    locks = sqlite_folder(uri) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / "init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(uri, uri).search_experiments(max_results=1)  # the tracking store's tables
        MlflowClient(uri, uri).search_registered_models(max_results=1)  # the registry's (the same file)


def ensure_experiment(name: str) -> str:
    c = client()
    if (exp := c.get_experiment_by_name(name)) is None:
        folder = sqlite_folder(tracking_uri())  # a server decides where artifacts go for itself
        try:
            return c.create_experiment(name, artifact_location=f"{(folder / 'artifacts').resolve().as_uri()}/{name}"
                                       if folder else None)
        except MlflowException:  # another run created it a moment ago
            if (exp := c.get_experiment_by_name(name)) is None:
                raise
    return exp.experiment_id


# ---------------------------------------------------------------- a server with logins

REFUSED = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}  # HTTP statuses and MLflow's error codes for them


def refusal(e: BaseException, on_model: str, on_experiment: str = "") -> TrackingRefused | None:
    """``e`` in one line if it is the tracking server refusing the login (401) or a permission (403),
    else None. ``on_model`` says what was being done to a model (``promote model 'x'``) and
    ``on_experiment`` to an experiment, the request refused telling which it was."""
    status = getattr(getattr(e, "response", None), "status_code", None)  # an artifact download's HTTPError
    code = getattr(e, "error_code", None) or REFUSED.get(status)
    if code == "UNAUTHENTICATED":
        return login_refused()
    if code != "PERMISSION_DENIED":
        return None
    m = re.search(r"endpoint (\S+)|for url: \w+://[^/\s]+(/[^?\s]+)", str(e))
    endpoint = (m.group(1) or m.group(2)) if m else "a request"
    registry = any(part in endpoint for part in ("registered-models", "model-versions"))
    what = on_experiment if on_experiment and not registry else on_model
    return TrackingRefused(f"permission denied: {login()} may not {what} (the tracking server {tracking_uri()} "
                           f"answered 403 to {endpoint}); its admin grants permissions")


@contextlib.contextmanager
def refusals_in_one_line(on_model: str, on_experiment: str = "") -> Iterator[None]:
    """Around MLflow calls: a refused login or permission becomes ``TrackingRefused`` (see ``refusal``)."""
    try:
        yield
    except Exception as e:  # an MlflowException, or an artifact download's HTTPError
        if (refused := refusal(e, on_model, on_experiment)) is None:
            raise
        raise refused from None


# ---------------------------------------------------------------- the registry


def champion_version(name: str):
    """The ModelVersion holding the ``champion`` alias, or None."""
    try:
        return client().get_model_version_by_alias(name, CHAMPION)
    except (MlflowException, RestException):
        return None


def load_champion(name: str) -> mlflow.pyfunc.PyFuncModel:
    """The pyfunc model of ``NAME@champion``, with a clear error when there is none."""
    if champion_version(name) is None:
        raise LookupError(f"no registered model {name!r} has a {CHAMPION!r} alias in {tracking_uri()}")
    return mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")


@dataclass
class Registration:
    run_id: str
    version: str
    model_uri: str
    promoted: bool
    reason: str
    run_url: str = ""


def run_url(experiment_id: str, run_id: str) -> str:
    """Where a person sees the run: on the tracking server, or in ``make ui`` for a local store."""
    uri = tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


@dataclass
class ChampionScore:
    """The current champion's score on the challenger's test data, or why there is none."""

    version: str | None
    score: float | None = None
    error: str = ""


def promotion_decision(challenger: float, champion: ChampionScore, metric: str) -> tuple[bool, str]:
    """Promote when there is no champion, or when the challenger scores lower on the same data;
    a tie keeps the champion. Scores within a millionth of each other tie: float32 rounding
    alone moves a score that much (the same model, scored in a batch and one origin at a time
    through the registry, differs in the 9th digit)."""
    if champion.version is None:
        return True, "no champion yet"
    if champion.score is None:
        return False, f"kept champion v{champion.version}: {champion.error}"
    if not np.isfinite(challenger):
        return False, f"kept champion v{champion.version}: challenger {metric} is {challenger}"
    if math.isclose(challenger, champion.score, rel_tol=1e-6, abs_tol=1e-12):
        return False, (f"kept champion v{champion.version}: the challenger's {metric} {challenger:.4g} ties it "
                       "on the same test data")
    ours, theirs = distinct(challenger, champion.score)
    if challenger < champion.score:
        return True, f"{metric} {ours} beats champion v{champion.version}'s {theirs} on the same test data"
    return False, (f"kept champion v{champion.version}: its {metric} {theirs} is better than "
                   f"the challenger's {ours} on the same test data")


def distinct(a: float, b: float) -> tuple[str, str]:
    """``a`` and ``b`` with 4 significant digits, or as many more as it takes to tell them apart."""
    for digits in range(4, 13):
        fa, fb = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if fa != fb:
            break
    return fa, fb


@contextlib.contextmanager
def atomic_run(experiment: str, run_name: str, model_name: str) -> Iterator[dict]:
    """An MLflow run that disappears, with any model version it registered (the body records it in the
    yielded dict under ``"version"``), if its body fails. A login the server refuses, or one without
    the permission on the experiment or the model, is ``TrackingRefused``."""
    with refusals_in_one_line(f"register model {model_name!r}", f"log runs in experiment {experiment!r}"):
        c = client()
        _clean_up_orphans(c)
        exp_id = ensure_experiment(experiment)
        created: dict = {}
        run = mlflow.start_run(experiment_id=exp_id, run_name=run_name)
        try:
            yield created
        except BaseException as e:  # Ctrl-C, SIGTERM (not Exceptions): KILLED, as MLflow's own runs mark them
            status = "FAILED" if isinstance(e, Exception) else "KILLED"
            with contextlib.suppress(Exception):  # the run leaves MLflow's stack first, even if the server is away
                mlflow.end_run(status=status)
            _ORPHANS.append((run.info.run_id, status, model_name, created.get("version")))
            _clean_up_orphans(c)
            raise
        mlflow.end_run()


# Runs (and versions) that a failed registration could not remove, the tracking server being
# away: removed by the next registration of this process that reaches it, not left RUNNING.
_ORPHANS: list[tuple[str, str, str, str | None]] = []


def _clean_up_orphans(c: MlflowClient) -> None:
    """Never raises: what fails stays listed for the next try, and the error that made the
    orphan (or the registration under way) is the one the caller sees."""
    for orphan in list(_ORPHANS):
        run_id, status, model_name, version = orphan
        try:
            if version:
                with contextlib.suppress(RestException):  # already gone
                    c.delete_model_version(model_name, version)
            c.set_terminated(run_id, status)
            c.delete_run(run_id)
        except Exception:  # noqa: BLE001 - the server is away, or the run went another way: try later
            return
        _ORPHANS.remove(orphan)


UNREACHABLE = ("Max retries exceeded", "Connection refused", "ConnectionError", "Read timed out",
               "too many 5", "Connection aborted", "RemoteDisconnected")


def unreachable(e: BaseException) -> bool:
    """Whether ``e`` says the tracking server did not answer (refused, timed out, 5xx), as
    opposed to answering no."""
    return isinstance(e, (ConnectionError, TimeoutError)) or (
        isinstance(e, MlflowException) and any(s in str(e) for s in UNREACHABLE))


def with_retries(fn: Callable[[], object], minutes: float, what: str):
    """``fn()``, tried again with back-off (2, 4, ... 30 s) for up to ``minutes`` while the
    tracking server does not answer; then ``TrackingUnavailable`` in one line."""
    deadline, delay = time.monotonic() + minutes * 60, 2.0
    while True:
        try:
            return fn()
        except Exception as e:
            if not unreachable(e):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrackingUnavailable(f"MLFLOW_TRACKING_URI {tracking_uri()}: the tracking server did not answer "
                                          f"for {minutes:g} min ({what}): {str(e)[:160]}") from None
            run_logger().warning("%s: the tracking server does not answer; trying again in %.0f s (for %.0f s more)",
                                 what, min(delay, left), left)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 30.0)


def finish_registration(model_name: str, version: str, challenger: float, champion: ChampionScore,
                        metric: str, tags: dict[str, str], rescore: Callable[[], ChampionScore] | None = None,
                        shared_lock: SharedLock | None = None) -> Registration:
    """Tag the version, apply the champion gate, and record the decision on the run. Two runs may finish
    at once: under ``champion_lock``, a champion that changed since ``champion`` was scored is scored
    again with ``rescore``, so the alias ends on the better model."""
    c = client()
    for k, v in tags.items():
        c.set_model_version_tag(model_name, version, k, v)
    with champion_lock(model_name, shared_lock):
        current = champion_version(model_name)
        if rescore is not None and (str(current.version) if current else None) != champion.version:
            champion = rescore()
        promoted, reason = promotion_decision(challenger, champion, metric)
        if promoted:
            set_champion(model_name, version, f"training run: {reason}")
    mlflow.set_tags({"promoted": str(promoted).lower(), "promotion_reason": reason, "model_version": version})
    c.set_model_version_tag(model_name, version, "promotion_reason", reason)
    info = mlflow.active_run().info
    return Registration(info.run_id, version, f"models:/{model_name}/{version}", promoted, reason,
                        run_url(info.experiment_id, info.run_id))


# A lock that every machine sharing a tracking server takes at the champion gate, by model name:
# the flows pass one (a Prefect global concurrency limit on the Prefect server they share), since
# this layer does not import Prefect.
SharedLock = Callable[[str], contextlib.AbstractContextManager]


@contextlib.contextmanager
def champion_lock(name: str, shared: SharedLock | None = None):
    """Serialise champion moves for ``name``: among the processes of this machine with a file
    lock (beside a SQLite store, or in the temp dir for a tracking server), and for a tracking
    server also among machines, with the ``shared`` lock when one is given."""
    uri = tracking_uri()
    store = sqlite_folder(uri)
    folder = (store / ".locks" if store else
              Path(tempfile.gettempdir()) / "rnnflow-locks" / hashlib.sha256(uri.encode()).hexdigest()[:16])
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            with shared(name) if shared and not uri.startswith("sqlite:") else contextlib.nullcontext():
                yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- versions and the champion's history


class RegistryError(LookupError):
    """An unknown model name or version, or a move the registry cannot make."""


def get_version(name: str, ref: str):
    """A ModelVersion by number (``3``) or alias (``champion``, ``@champion``)."""
    c = client()
    try:
        c.get_registered_model(name)
    except MlflowException as e:
        if e.error_code in REFUSED.values():  # not "no such model": the caller's refusals_in_one_line says which
            raise
        names = sorted(m.name for m in c.search_registered_models())
        raise RegistryError(f"no registered model {name!r}; there are {names or 'none'}") from None
    ref = str(ref).lstrip("@")
    try:
        return c.get_model_version_by_alias(name, ref) if not ref.isdigit() else c.get_model_version(name, ref)
    except MlflowException as e:
        if e.error_code in REFUSED.values():
            raise
        versions = sorted(int(v.version) for v in c.search_model_versions(f"name='{name}'"))
        raise RegistryError(f"{name} has no version or alias {ref!r}; versions are {versions}") from None


def champion_history(name: str) -> list[dict]:
    return json.loads(client().get_registered_model(name).tags.get("champion_history", "[]"))


def set_champion(name: str, version: str, why: str) -> str | None:
    """Move ``champion`` to ``version``, remembering the move in the model's history and the
    previous champion on the new one (what ``rollback`` returns to). Returns the previous one."""
    c = client()
    current = champion_version(name)
    previous = str(current.version) if current is not None else None
    if previous == str(version):
        return previous
    c.set_model_version_tag(name, str(version), "previous_champion", previous or "")
    c.set_registered_model_alias(name, CHAMPION, str(version))
    _record_move(name, previous, str(version), why)
    return previous


def rollback_champion(name: str) -> tuple[str, str]:
    """Move ``champion`` back to the version it replaced; returns (from, to)."""
    current = champion_version(name)
    if current is None:
        get_version(name, "1")  # an unknown name gets its own clear error
        raise RegistryError(f"{name} has no {CHAMPION} to roll back")
    previous = current.tags.get("previous_champion", "")
    if not previous:
        raise RegistryError(f"{name} v{current.version} has no previous champion to roll back to")
    c = client()
    c.set_registered_model_alias(name, CHAMPION, previous)
    c.set_model_version_tag(name, str(current.version), "rolled_back", "true")
    _record_move(name, str(current.version), previous, "rollback")
    return str(current.version), previous


def _record_move(name: str, old: str | None, new: str, why: str) -> None:
    history = champion_history(name) + [{"from": old, "to": new, "why": why, "at": int(time.time())}]
    client().set_registered_model_tag(name, "champion_history", json.dumps(history[-30:]))  # tag values are bounded

"""``make deploy POOL=NAME``: the deployments registered to a Prefect process work pool instead
of served by this process, for ``make worker POOL=NAME`` (``prefect worker start``) to run on
any machine that has the project installed and ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI``
pointing at the shared servers.

A deployment names its flow by module path (``flows.timeseries.timeseries_flow``), with no
storage, no pull step and no working folder: a worker imports the flow from its own checkout
(the editable install of rnnflow in its venv), and nothing of the deploying machine's disk is
stored in the deployment."""

from __future__ import annotations

import contextlib


def ensure_process_pool(name: str) -> None:
    """Create the work pool ``name`` (type process) unless the Prefect server has it."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # created by another deploy a moment ago
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return
    if pool.type != "process":
        raise SystemExit(f"error: work pool {name!r} is of type {pool.type!r}; rnnflow's workers need a process pool")


def register(deployments: list, pool: str) -> list[str]:
    """Register ``deployments`` (built with module-path entrypoints) to ``pool``, with their schedules
    and triggers; returns their names."""
    ensure_process_pool(pool)
    for d in deployments:
        d.apply(work_pool_name=pool)
    return [f"{d.flow_name}/{d.name}" for d in deployments]

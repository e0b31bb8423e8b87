"""Imported by each Dask worker as it starts (distributed's ``preload``), so the first trial a
worker runs does not pay for importing torch, MLflow and Prefect, and each worker trains on
one core. Local clusters get it from ``flows.sweep``; for a cluster of your own, start the
workers with ``dask worker tcp://SCHEDULER:8786 --nthreads 1 --preload tasks.dask_worker``."""

import torch

import tasks.sweep  # noqa: F401  (the trial task and everything it imports)


def dask_setup(worker) -> None:
    torch.set_num_threads(1)  # trials in parallel beat threads fighting over the same cores

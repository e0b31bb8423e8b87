"""Imported by each Dask worker as it starts (distributed's ``preload``): the one-time costs a
worker would otherwise pay inside its first trial (imports, the tracking store's first
connection, torch's first recurrent pass, loading the grouped operation; docs/BENCHMARKS.md,
"Sweep scaling on a local Dask cluster") are paid while the cluster starts, and each worker
trains on one core. Local clusters get it from
``flows.sweep``; for a cluster of your own, start the workers with
``dask worker tcp://SCHEDULER:8786 --nthreads 1 --preload tasks.dask_worker``."""

import logging

import torch

from rnn_models.grouped import available as grouped_available
from tasks.config import TimeSeriesConfig
from tasks.data import generate_series
from tasks.registry import client
from tasks.selection import train_models
from tasks.sweep import run_trials  # noqa: F401  (the trials' task and everything it imports)

# as in the sweep's own process (flows.sweep.task_runner): the worker's INFO chatter, and a
# connection closed as the cluster stops logged at INFO with a traceback, stay out of the sweep's
# output; warnings and errors still show
logging.getLogger("distributed").setLevel(logging.WARNING)


def dask_setup(worker) -> None:
    torch.set_num_threads(1)  # trials in parallel beat threads fighting over the same cores
    # one tiny training through the trial's own code: lazy imports, torch's first passes
    cfg = TimeSeriesConfig(length=120, lookback=8, hidden_size=4, epochs=1, auto=False, ensemble=1,
                           device="cpu")
    train_models({"warm-up": (generate_series(cfg), cfg)})
    grouped_available()  # loads the grouped operation (built by `make install`)
    try:
        client().search_experiments(max_results=1)  # opens (and for SQLite, migrates) the store
    except Exception as e:  # an unreachable store is reported by the flow, not here
        logging.getLogger("rnnflow").warning("worker warm-up could not reach the tracking store: %s", e)

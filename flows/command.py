"""``rnnflow``: one command for every command line of the project, installed with the package.

Each subcommand is a module's own ``main(argv)`` with that module's options (``rnnflow forecast``
is ``python -m flows.timeseries``), imported only when it runs: ``rnnflow --help`` and ``rnnflow
--version`` load nothing of torch, Prefect or MLflow. Runs keep their tracking store and
checkpoints in the current folder (``mlruns/``, ``checkpoints/``), wherever the package lives.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import typing
from importlib import metadata
from pathlib import Path

from flows import exit_process
from flows.parsing import COMMANDS as INVOKED_AS
from flows.parsing import Parser

# command -> (module, its function that takes argv and returns the exit status, one line for --help)
COMMANDS = {
    "forecast": ("flows.timeseries", "main", "train a recurrent forecaster on a series and register it"),
    "charlm": ("flows.charlm", "main", "train a character language model on a text and register it"),
    "sweep": ("flows.sweep", "main", "sweep the forecaster's options on threads or a Dask cluster"),
    "models": ("flows.models", "main", "list, show, compare, promote, roll back or register models"),
    "serve": ("flows.serve", "main", "serve a registered model over REST (MLflow's scoring protocol)"),
    "deploy": ("flows.deploy", "main", "serve the scheduled retraining deployments on a Prefect server"),
    "monitor": ("flows.monitor", "main", "score each champion on the data that came after it; degraded ones retrain"),
    "server": ("flows.server", "main", "the local Prefect server that runs share: start, stop, status"),
    "worker": ("flows.command", "worker", "run the flow runs of `rnnflow deploy --pool NAME` from this folder"),
    "ui": ("flows.command", "ui", "the MLflow UI on this folder's store (or $MLFLOW_TRACKING_URI)"),
    "tracking-server": ("flows.command", "tracking_server",
                        "a shared MLflow tracking server on a throwaway PostgreSQL"),
}
TRACKING_SERVER = Path(__file__).resolve().parent / "tracking-server.sh"


def version() -> str:
    try:
        return metadata.version("rnnflow")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def parser() -> Parser:
    width = max(map(len, COMMANDS))
    listing = "".join(f"  {name:<{width}}  {about}\n" for name, (_, _, about) in COMMANDS.items())
    p = Parser(prog="rnnflow", formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Train recurrent networks as Prefect flows and deliver every model to an MLflow registry.",
               epilog=f"commands:\n{listing}\n`rnnflow COMMAND --help` lists a command's options.")
    p.add_argument("--version", action="version", version=f"rnnflow {version()}")
    p.add_argument("command", metavar="COMMAND", nargs="?", choices=COMMANDS, help="what to run (below)")
    p.add_argument("args", metavar="...", nargs=argparse.REMAINDER, help="the command's own options")
    return p


def main(argv: list[str] | None = None) -> typing.NoReturn:
    """The console script: parse the command, run it, end the process with its exit status."""
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help(sys.stderr)
        exit_process(2)
    INVOKED_AS.update({module: f"rnnflow {name}" for name, (module, fn, _) in COMMANDS.items() if fn == "main"})
    module, function, _ = COMMANDS[args.command]
    exit_process(getattr(importlib.import_module(module), function)(args.args))


def ui(argv: list[str]) -> int:
    """``mlflow server`` on the store the runs of this folder use, lean: one worker, no job runners."""
    p = Parser(prog="rnnflow ui", description=COMMANDS["ui"][2])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    args = p.parse_args(argv)
    from tasks.tracking import sqlite_folder, tracking_uri

    uri = tracking_uri()
    if (folder := sqlite_folder(uri)) is None:
        print(f"error: MLFLOW_TRACKING_URI {uri} is a tracking server: open it in a browser, it is its own UI",
              file=sys.stderr)
        return 1
    folder.mkdir(parents=True, exist_ok=True)
    os.execve(sys.executable, [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--default-artifact-root", str(folder / "artifacts"), "--host", args.host,
                               "--port", str(args.port), "--workers", "1"],
              {**with_our_bin(), "MLFLOW_TRACKING_URI": uri, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


def tracking_server(argv: list[str]) -> int:
    """Run ``tracking-server.sh`` with ``argv`` passed through. The script takes its Python from
    ``ROOT/.venv`` beside its own folder, as in a clone; an installed package has no such folder, so
    it runs from a temporary ROOT whose ``.venv`` is this interpreter's environment."""
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: rnnflow tracking-server [ARGS...]\n\n{COMMANDS['tracking-server'][2]}: runs {TRACKING_SERVER} "
              f"with ARGS; Ctrl-C stops both and removes the data.")
        return 0
    with tempfile.TemporaryDirectory(prefix="rnnflow-tracking-server-") as root:
        (Path(root) / ".venv").symlink_to(sys.prefix, target_is_directory=True)
        (Path(root) / "bin").mkdir()
        (Path(root) / "bin" / TRACKING_SERVER.name).symlink_to(TRACKING_SERVER)
        proc = subprocess.Popen(["bash", str(Path(root) / "bin" / TRACKING_SERVER.name), *argv], env=with_our_bin())
        signal.signal(signal.SIGTERM, lambda signum, frame: proc.terminate())  # it cleans up on TERM
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # the script got the terminal's SIGINT too: wait for its clean-up
                continue


def worker(argv: list[str]) -> int:
    """``prefect worker start`` on a process work pool: this machine runs the pool's flow runs from
    the current folder (a checkout of the project), against $PREFECT_API_URL and $MLFLOW_TRACKING_URI."""
    p = Parser(prog="rnnflow worker", description=COMMANDS["worker"][2])
    p.add_argument("--pool", required=True, help="the work pool `rnnflow deploy --pool` registered to")
    args = p.parse_args(argv)
    env = {**with_our_bin(), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY",
                                                                               "30")}
    os.execve(sys.executable, [sys.executable, "-m", "prefect", "worker", "start", "--pool", args.pool, "--type",
                               "process"], env)


def with_our_bin() -> dict[str, str]:
    """The environment with this interpreter's ``bin`` first on PATH: mlflow execs uvicorn by name."""
    return {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


if __name__ == "__main__":
    main()

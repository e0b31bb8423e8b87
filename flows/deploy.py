"""Deployments for scheduled and event-triggered retraining, served by this process:

    timeseries-forecasting/nightly-retrain   cron "0 3 * * *"  (daily 03:00), and on each
                                             rnnflow.model.degraded event (--retrain-on)
    charlm-training/weekly-retrain           cron "0 4 * * 0"  (Sunday 04:00)
    monitor/hourly-check                     cron "0 * * * *"  (every hour: flows.monitor)

Start a Prefect server first (``make server``), then ``make deploy`` (this module). Runs are
triggered by their schedule or by hand, one config field at a time:

    prefect deployment run 'timeseries-forecasting/nightly-retrain' --param epochs=5 --watch

SIGTERM or Ctrl-C stops it within seconds, whether or not its Prefect server still answers: it
pauses the deployments if it can, stops the flow runs it executes (they end Crashed and resume
from their checkpoint next time) and exits with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from uuid import UUID

import psutil  # (with prefect-dask: distributed requires it)
from prefect.runner import Runner

from flows import exit_process
from flows.charlm import charlm_flow
from flows.monitor import monitor_flow, retrain_trigger
from flows.parsing import Parser
from flows.pools import register
from flows.server import HEARTBEAT_ENV, HEARTBEAT_SECONDS
from flows.timeseries import timeseries_flow

FLOWS = {"timeseries": (timeseries_flow, "nightly-retrain", "0 3 * * *"),
         "charlm": (charlm_flow, "weekly-retrain", "0 4 * * 0"),
         "monitor": (monitor_flow, "hourly-check", "0 * * * *")}


def deployments(args: argparse.Namespace, module_path: bool = False) -> list:
    """RunnerDeployments for the flows ``--only`` names (all by default), each with its ``--KEY-params``:
    on its ``--KEY-cron``, or every ``--interval`` seconds. The time-series one also runs on each
    degradation event (``--retrain-on drift|both``, at most once per model every ``--cooldown-hours``),
    and without its cron with ``--retrain-on drift``. ``module_path``: each flow named by its module
    path, run in the worker's own folder (``working_dir`` "."), for a work pool's workers: nothing of this
    machine's disk is stored."""
    from prefect.deployments.runner import EntrypointType

    entrypoint = EntrypointType.MODULE_PATH if module_path else EntrypointType.FILE_PATH
    pool_folder = {"working_dir": "."} if module_path else {}
    out = []
    for key in args.only or sorted(FLOWS, reverse=True):
        flow, name, _ = FLOWS[key]
        schedule = {"interval": args.interval} if args.interval else {"cron": getattr(args, f"{key}_cron")}
        triggers = []
        if key == "timeseries":
            triggers = [retrain_trigger(args.cooldown_hours)] if args.retrain_on != "schedule" else []
            schedule = schedule if args.retrain_on != "drift" else {}
        out.append(flow.to_deployment(name=name, parameters=getattr(args, f"{key}_params"), triggers=triggers,
                                      tags=["rnnflow", "retrain"], description=flow.description,
                                      entrypoint_type=entrypoint, job_variables=pool_folder, **schedule))
    return out


ZOMBIES = "rnnflow: crash flow runs that stopped beating"


def ensure_zombie_automation(silence_seconds: float | None = None) -> None:
    """Have the Prefect server mark ``Crashed`` a flow run silent for ``silence_seconds`` (default three
    heartbeats, or $RNNFLOW_ZOMBIE_SECONDS), once per server: one whose process died with this serving
    process can report nothing and would show ``Running`` for ever (Prefect's recipe for zombie flow runs)."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    silence_seconds = silence_seconds or float(os.environ.get("RNNFLOW_ZOMBIE_SECONDS", 3 * HEARTBEAT_SECONDS))
    with contextlib.suppress(ValueError):  # none of that name yet
        Automation.read(name=ZOMBIES)
        return
    Automation(name=ZOMBIES, trigger=EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
        within=timedelta(seconds=silence_seconds)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {silence_seconds:.0f} s: its process died")]).create()


# Stopping: systemd, Docker and Kubernetes send SIGTERM and kill 10-30 s later.
STOP_SECONDS = 7.0  # the process has exited by then, whatever the server does
GRACE_SECONDS = 5.0  # a flow run's process may end by itself (reporting Crashed) until then, then it is killed
API_SECONDS = 2.0  # each request to the Prefect server on the way out (a busy one is asked again until then)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Shutdown:
    """SIGTERM and Ctrl-C for the serving process, done within ``STOP_SECONDS`` even with the Prefect
    server gone (Prefect's own handler retries it for a minute or more, while a flow run's process
    trains on unreported). The signal freezes the runner's event loop (no new flow run starts); a thread
    pauses the deployments, stops the flow runs' processes, marks ``Crashed`` a killed run the server can
    still be told of (else ``ensure_zombie_automation`` does once it is back), prints one line, exits 0."""

    def __init__(self) -> None:
        self.runner: Runner | None = None
        self.deployments: list[str] = []  # "flow/deployment" names: a signal may come before their ids
        self._once = threading.Lock()
        self._processes_done = threading.Event()
        self._api_done = threading.Event()
        self._api_error: str | None = None
        self._paused = 0
        self._api_failed_at = float("inf")

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)  # asyncio.run leaves a handler that is not the default one

    def handle(self, signum: int, frame=None) -> None:
        if not self._once.acquire(blocking=False):
            return  # a second Ctrl-C: already stopping, within STOP_SECONDS
        threading.Thread(target=self._stop, args=(signum,), name="rnnflow-stop", daemon=True).start()
        threading.Event().wait()  # the thread ends the process

    def _flow_runs(self) -> dict[psutil.Process, UUID | None]:
        """The processes of the flow runs this runner executes, each with its flow run's id."""
        manager = getattr(self.runner, "_process_manager", None)
        found: dict[psutil.Process, UUID | None] = {}
        for run_id in manager.flow_run_ids() if manager is not None else ():
            if (handle := manager.get(run_id)) is not None and handle.pid:
                with contextlib.suppress(psutil.Error):
                    found[psutil.Process(handle.pid)] = run_id
        return found

    def _stop(self, signum: int) -> None:
        t0 = time.monotonic()
        status = "failed"
        try:
            runs = self._flow_runs()
            killed: list[UUID | None] = []
            threading.Thread(target=self._tell_server, args=(killed, t0 + STOP_SECONDS - 0.5),
                             name="rnnflow-stop-api", daemon=True).start()
            self._end_processes(runs, killed, signum, t0)
            self._processes_done.set()
            self._api_done.wait(timeout=max(0.0, t0 + STOP_SECONDS - 0.5 - time.monotonic()))
            status = self._summary(signal.Signals(signum).name, len(runs))
            with contextlib.suppress(Exception):
                shutil.rmtree(self.runner._tmp_dir, ignore_errors=True)  # what the Runner would remove
        finally:
            _flush_briefly()
            with contextlib.suppress(Exception):
                os.write(2, f"stopped: {status}\n".encode())
            os._exit(0)

    def _end_processes(self, runs: dict[psutil.Process, UUID | None], killed: list, signum: int, t0: float) -> None:
        """SIGTERM each flow run's process (on Ctrl-C after 1.5 s, for the terminal's SIGINT to do it),
        whose Prefect engine then reports the run ``Crashed``; kill, with its children, what still runs
        after ``GRACE_SECONDS`` (or 1.5 s after the server proved unreachable: the run can report nothing)."""
        if signum == signal.SIGINT:
            self._wait(runs, t0 + 1.5)
        for p in runs:
            if _alive(p):
                with contextlib.suppress(Exception):
                    p.terminate()
        self._wait(runs, t0 + GRACE_SECONDS)
        for p, run_id in runs.items():
            if _alive(p):
                with contextlib.suppress(Exception):
                    for q in [*p.children(recursive=True), p]:
                        with contextlib.suppress(Exception):
                            q.kill()
                killed.append(run_id)
        self._wait(runs, t0 + STOP_SECONDS - 1.0)  # (polled, not waited for: whoever started them reaps them)

    def _wait(self, processes, until: float) -> None:
        while any(_alive(p) for p in processes) and time.monotonic() < until:
            if self._api_error is not None:  # the server is gone: nothing to wait for
                until = min(until, self._api_failed_at + 1.5)
            time.sleep(0.05)

    def _tell_server(self, killed: list[UUID | None], deadline: float) -> None:
        """Pause the deployments; once the flow runs' processes are gone, mark ``Crashed`` any killed
        run still unfinished. A busy server (a 503, a timeout) is asked again until ``deadline``; a
        refused connection means no server: give up at once."""
        import httpx
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound
        from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_CLIENT_MAX_RETRIES, temporary_settings
        from prefect.states import Crashed

        def ask(call, *args, **kwargs):
            while True:
                try:
                    return call(*args, **kwargs)
                except (ObjectNotFound, httpx.ConnectError):
                    raise
                except Exception:
                    if time.monotonic() + API_SECONDS + 0.25 > deadline:
                        raise
                    time.sleep(0.25)

        try:
            quick = {PREFECT_CLIENT_MAX_RETRIES: 0, PREFECT_API_REQUEST_TIMEOUT: API_SECONDS}
            with temporary_settings(updates=quick), get_client(sync_client=True) as client:
                for name in self.deployments:
                    try:
                        ask(client.pause_deployment, ask(client.read_deployment_by_name, name).id)
                    except ObjectNotFound:  # a signal while it starts: not registered yet
                        continue
                    self._paused += 1
                self._processes_done.wait()
                for run_id in killed:
                    if run_id is not None and not ask(client.read_flow_run, run_id).state.is_final():
                        ask(client.set_flow_run_state, run_id, Crashed(
                            message="its process was killed when the deployments' process stopped"), force=True)
        except Exception as e:  # the server is gone (or broken): the heartbeat automation will do it
            self._api_failed_at = time.monotonic()
            self._api_error = _describe(e)
        finally:
            self._api_done.set()

    def _summary(self, name: str, n_runs: int) -> str:
        runs = f"{n_runs} flow run{'s' * (n_runs != 1)}"
        if self._api_done.is_set() and self._api_error is None:
            told = f"{self._paused} deployment{'s' * (self._paused != 1)} paused" + (
                f"; {runs} stopped (Crashed)" if n_runs else "")
        elif self._api_error is not None:
            told = (f"the Prefect server did not answer ({self._api_error}), so the deployments stay unpaused"
                    + (f"; {runs} stopped: the server's heartbeat automation marks "
                       f"{'them' if n_runs > 1 else 'it'} Crashed once it is back" if n_runs else ""))
        else:
            told = (f"the Prefect server did not answer within {STOP_SECONDS:.0f} s"
                    + (f"; {runs} stopped" if n_runs else ""))
        return f"{name}; {told}" + ("; each resumes from its checkpoint next time" if n_runs else "")


def _describe(e: Exception) -> str:
    """A short reason for a failed request: "connection refused", "HTTP 503", "ReadTimeout"."""
    import httpx

    response = getattr(e, "response", None)
    if isinstance(response, httpx.Response):
        return f"HTTP {response.status_code}"
    if isinstance(e, httpx.ConnectError):
        return "connection refused" if "refused" in str(e).lower() else "cannot connect"
    return type(e).__name__


def _flush_briefly() -> None:
    """Flush stdout/stderr, unless the frozen main thread holds their lock (then give up)."""
    def flush():
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    t = threading.Thread(target=flush, daemon=True)
    t.start()
    t.join(0.5)


class StoppableRunner(Runner):
    """Prefect's Runner whose SIGTERM handler (set by ``start``) is ``Shutdown``'s."""

    def __init__(self, shutdown: Shutdown, **kwargs) -> None:
        super().__init__(**kwargs)
        self._shutdown = shutdown
        shutdown.runner = self

    def handle_sigterm(self, signum: int = signal.SIGTERM, frame=None) -> None:
        self._shutdown.handle(signum, frame)


def serve(deployments: list, limit: int | None, shutdown: Shutdown) -> None:
    """``prefect.serve`` with ``Shutdown``'s handling of SIGTERM and Ctrl-C."""
    import asyncio

    from prefect.flows import _display_serve_start_message

    runner = StoppableRunner(shutdown, pause_on_shutdown=False, limit=limit)
    shutdown.deployments = [f"{d.flow_name}/{d.name}" for d in deployments]
    for deployment in deployments:
        runner.add_deployment(deployment)
    _display_serve_start_message(*deployments)
    asyncio.run(runner.start())


def _non_negative(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m flows.deploy", description=__doc__.split("\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--only", choices=sorted(FLOWS), action="append", help="serve only this flow (repeatable)")
    ap.add_argument("--timeseries-cron", default=FLOWS["timeseries"][2])
    ap.add_argument("--charlm-cron", default=FLOWS["charlm"][2])
    ap.add_argument("--monitor-cron", default=FLOWS["monitor"][2])
    ap.add_argument("--retrain-on", choices=("drift", "schedule", "both"), default="both",
                    help="retrain forecasters on the monitor's degradation events, on the cron, or both")
    ap.add_argument("--cooldown-hours", type=_non_negative, default=6.0,
                    help="at most one event-triggered retrain per model every H hours")
    ap.add_argument("--interval", type=float, default=None,
                    help="run every N seconds instead of the crons (for trying it out)")
    ap.add_argument("--limit", type=int, default=None, help="at most N flow runs at once (default: no limit)")
    ap.add_argument("--timeseries-params", type=json.loads, default={},
                    help="JSON defaults for the forecaster's config")
    ap.add_argument("--charlm-params", type=json.loads, default={}, help="JSON defaults for the char LM's config")
    ap.add_argument("--monitor-params", type=json.loads, default={},
                    help='JSON defaults for the monitor, e.g. {"degrade_ratio": 1.5}')
    ap.add_argument("--pool", default="", help="register the deployments to this Prefect process work pool (created "
                    "if missing) for `make worker POOL=NAME` to run, instead of serving them here")
    args = ap.parse_args(argv)
    if args.pool:
        ensure_zombie_automation()
        for name in register(deployments(args, module_path=True), args.pool):
            print(f"registered {name} to work pool {args.pool!r}")
        return 0
    os.environ.setdefault(HEARTBEAT_ENV, str(HEARTBEAT_SECONDS))  # the flow runs inherit it
    shutdown = Shutdown()
    shutdown.install()
    ensure_zombie_automation()
    serve(deployments(args), args.limit, shutdown)
    return 0


if __name__ == "__main__":
    exit_process(main())

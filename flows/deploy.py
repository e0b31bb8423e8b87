"""Deployments for scheduled retraining, served by this process:

    timeseries-forecasting/nightly-retrain   cron "0 3 * * *"  (daily 03:00)
    charlm-training/weekly-retrain           cron "0 4 * * 0"  (Sunday 04:00)

Start a Prefect server first (``make server``), then ``make deploy`` (this module). Runs are
triggered by their schedule or by hand, one config field at a time:

    prefect deployment run 'timeseries-forecasting/nightly-retrain' --param epochs=5 --watch
"""

from __future__ import annotations

import argparse
import json
import os

from prefect import serve

from flows import exit_process
from flows.charlm import charlm_flow
from flows.server import HEARTBEAT_ENV, HEARTBEAT_SECONDS
from flows.timeseries import timeseries_flow

FLOWS = {"timeseries": (timeseries_flow, "nightly-retrain", "0 3 * * *"),
         "charlm": (charlm_flow, "weekly-retrain", "0 4 * * 0")}


def deployments(which: list[str], interval: float | None = None, crons: dict[str, str] | None = None,
                parameters: dict[str, dict] | None = None):
    """RunnerDeployments for ``which`` flows: each on its cron, or every ``interval`` seconds."""
    out = []
    for key in which:
        flow, name, cron = FLOWS[key]
        schedule = {"interval": interval} if interval else {"cron": (crons or {}).get(key, cron)}
        out.append(flow.to_deployment(name=name, parameters=(parameters or {}).get(key, {}),
                                      tags=["rnnflow", "retrain"], description=flow.description, **schedule))
    return out


ZOMBIES = "rnnflow: crash flow runs that stopped beating"


def ensure_zombie_automation(silence_seconds: float | None = None) -> None:
    """A flow run whose process died with this serving process (``make deploy`` killed, a
    reboot) can report nothing: without this automation it shows ``Running`` for ever. Its
    heartbeats stop, and after ``silence_seconds`` the Prefect server marks it ``Crashed``
    (Prefect's recipe for zombie flow runs; default three heartbeats, or
    $RNNFLOW_ZOMBIE_SECONDS). Created once per server; the next run of the deployment then
    resumes from the checkpoint the dead one left."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    silence_seconds = silence_seconds or float(os.environ.get("RNNFLOW_ZOMBIE_SECONDS", 3 * HEARTBEAT_SECONDS))
    try:
        Automation.read(name=ZOMBIES)
        return
    except ValueError:  # none of that name yet
        pass
    Automation(name=ZOMBIES, trigger=EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
        within=timedelta(seconds=silence_seconds)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {silence_seconds:.0f} s: its process died")]).create()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--only", choices=sorted(FLOWS), action="append", help="serve only this flow (repeatable)")
    ap.add_argument("--timeseries-cron", default=FLOWS["timeseries"][2])
    ap.add_argument("--charlm-cron", default=FLOWS["charlm"][2])
    ap.add_argument("--interval", type=float, default=None,
                    help="run every N seconds instead of the crons (for trying it out)")
    ap.add_argument("--limit", type=int, default=None, help="at most N flow runs at once (default: no limit)")
    ap.add_argument("--timeseries-params", type=json.loads, default={},
                    help="JSON defaults for the forecaster's config")
    ap.add_argument("--charlm-params", type=json.loads, default={}, help="JSON defaults for the char LM's config")
    args = ap.parse_args(argv)
    os.environ.setdefault(HEARTBEAT_ENV, str(HEARTBEAT_SECONDS))  # the flow runs inherit it
    ensure_zombie_automation()
    serve(*deployments(args.only or sorted(FLOWS, reverse=True), args.interval,
                       {"timeseries": args.timeseries_cron, "charlm": args.charlm_cron},
                       {"timeseries": args.timeseries_params, "charlm": args.charlm_params}), limit=args.limit)
    return 0


if __name__ == "__main__":
    exit_process(main())

"""The monitoring flow: each champion scored on the data that arrived after it was trained, each
check logged to MLflow and left as a Prefect artifact, and a degraded champion announced as the
Prefect event ``rnnflow.model.degraded``, which the time-series deployment's trigger answers
with a retrain on that champion's own run params (``retrain_trigger``, served by flows.deploy).

    python -m flows.monitor [--model-name NAME] [--degrade-ratio 1.3] [--min-new-points N]
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import fields
from datetime import timedelta

from flows import exit_process
from flows.cli import USER_ERRORS, config_flow, parse_config
from flows.server import prefect_api
from tasks.config import TimeSeriesConfig, safe_name
from tasks.monitoring import MonitorConfig
from tasks.tracking import check_tracking_server

DESCRIPTION = ("Score each champion forecaster on the data that arrived after it was trained; emit "
               "rnnflow.model.degraded where its error grew or its data drifted.")
DEGRADED = "rnnflow.model.degraded"


def resource(name: str) -> dict[str, str]:
    """The event's resource: the registered model (one cooldown bucket per model)."""
    return {"prefect.resource.id": f"rnnflow.model.{name}", "prefect.resource.name": name}


@config_flow(MonitorConfig, name="monitor", description=DESCRIPTION)
def monitor_flow(cfg: MonitorConfig) -> list[dict]:
    """Check each model (``--model-name``, or every forecaster with a champion) in its own task;
    log, report and announce what was checked. A source that could not be read fails the run
    (after the other models were checked) and emits nothing."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.events import emit_event
    from prefect.states import Failed

    from flows import steps
    from tasks import monitoring

    check_tracking_server()
    checks = []
    for name in monitoring.champions(cfg.model_name):
        check = steps.check_model(name, cfg)
        print(check.line())
        if check.status in ("ok", "degraded"):
            history = steps.log_check(check, cfg.experiment)
            create_markdown_artifact(monitoring.report(check, history, cfg.degrade_ratio),
                                     key=f"{safe_name(name)}-live-error", description=check.line())
        if check.status == "degraded":
            emit_event(DEGRADED, resource={**resource(name), "rnnflow.model.version": check.version},
                       payload=check.payload())
        checks.append(check)
    if not checks:
        print("nothing to check: no registered forecaster has a champion")
    result = [{"line": c.line(), "status": c.status, **c.payload()} for c in checks]
    failed = [c.line() for c in checks if c.status == "failed"]
    return Failed(message="; ".join(failed), data=result) if failed else result


def retrain_trigger(cooldown_hours: float):
    """The time-series deployment's trigger: a run per ``rnnflow.model.degraded`` event, its parameters
    the degraded champion's own run params from the event's payload, at most one per model every
    ``cooldown_hours`` (a reactive trigger fires on the first event of a model and then ignores
    that model's events until its window has passed)."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="retrain a degraded champion", expect={DEGRADED}, match={"prefect.resource.id": "rnnflow.model.*"},
        for_each={"prefect.resource.id"}, posture="Reactive", threshold=1,
        within=timedelta(hours=cooldown_hours),
        parameters={f.name: "{{ event.payload.parameters.%s }}" % f.name for f in fields(TimeSeriesConfig)})


def main(argv: list[str] | None = None) -> int:
    """One line per model; exit 0 whether it is ok or degraded, 1 when a source could not be read."""
    cfg = parse_config(MonitorConfig, argv, "python -m flows.monitor", DESCRIPTION)
    try:
        check_tracking_server()
        with prefect_api(meanwhile=lambda: importlib.import_module("flows.steps")):
            state = monitor_flow(**cfg.to_params(), return_state=True)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        print(f"error: {result}", file=sys.stderr)
        return 1
    print()
    for check in result:
        print(check["line"])
    if not result:
        print("nothing to check: no registered forecaster has a champion")
    return 1 if state.is_failed() else 0


if __name__ == "__main__":
    exit_process(main())

"""One config dataclass -> a Prefect flow's flat parameters and a command line, in one place;
and how a user's mistake reads: one line, no traceback, in the terminal and in a flow run's log."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import json
import logging
import os
import shutil
import signal
import sys
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path

from prefect import flow
from prefect.exceptions import TerminationSignal
from prefect.states import Failed

from flows.parsing import Parser, command_line
from flows.server import PrefectUnavailable, prefect_api
from rnn_models import NonFiniteLossError
from tasks.config import CharLMFlowConfig, ConfigError, TimeSeriesConfig, flag, parse_value, safe_name
from tasks.data import DataError
from tasks.tracking import TrackingRefused, TrackingUnavailable

# A user's mistake (a bad file, column, value, URL, checksum, corpus or parameter, training that
# diverged, an unreachable tracking server or one that refuses the login or a permission): reported
# as one line naming it, never a traceback.
USER_ERRORS = (ConfigError, DataError, NonFiniteLossError, TrackingUnavailable, TrackingRefused, PrefectUnavailable)


class UserErrorsInOneLine(logging.Filter):
    """On Prefect's flow- and task-run loggers: a record of a user error (a failed try of a download,
    say) loses its traceback, in the terminal and in the UI; a bug keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], USER_ERRORS):
            record.exc_info = record.exc_text = None
        return True


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_name).addFilter(UserErrorsInOneLine())


def config_flow(cls, name: str, description: str):
    """Decorate ``body(cfg: cls)`` into a Prefect flow whose parameters are ``cls``'s fields (``--param
    epochs=5`` sets one). The config is built inside the run, so a bad value fails it before any task;
    a user error fails it with ``error: <what is wrong>`` as its message and no traceback."""
    hints = typing.get_type_hints(cls)
    # ``prefect deployment run --param intervals=0.8`` sends the JSON number 0.8: a text option
    # accepts a number in the flow's schema and reads it back as the text the user typed
    schema = {name: str | int | float if kind is str else kind for name, kind in hints.items()}

    def decorate(body: Callable):
        def run(**params):
            params = {k: v if hints[k] is not str or isinstance(v, str) else str(v) for k, v in params.items()}
            try:
                return body(cls(**params))
            except USER_ERRORS as e:  # a caller of the flow still gets ``e`` raised from the state
                return Failed(message=f"error: {e}", data=e)

        run.__signature__ = inspect.Signature([
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=schema[f.name])
            for f in fields(cls)
        ])
        run.__annotations__ = {f.name: schema[f.name] for f in fields(cls)}
        run.__name__ = run.__qualname__ = body.__name__
        run.__module__ = body.__module__
        # Prefect reads parameter descriptions for its UI from a Google-style docstring
        run.__doc__ = description + "\n\nArgs:\n" + "".join(
            f"    {f.name}: {f.metadata.get('help', '')}\n" for f in fields(cls))
        return flow(name=name, description=description, log_prints=True)(run)

    return decorate


def parser_for(cls, prog: str, description: str) -> Parser:
    """An argparse parser with one ``--option`` per field of ``cls``, with its help and choices."""
    p = Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints, titles, groups = typing.get_type_hints(cls), _piece_titles(cls), {}
    for f in fields(cls):
        title = titles.get(f.name) or "options"
        group = groups.get(title) or groups.setdefault(title, p.add_argument_group(title))
        kind, default = hints[f.name], f.default if f.default is not MISSING else None
        helptext, choices = f.metadata.get("help", "") or " ", f.metadata.get("choices")
        if kind in (bool, bool | None):
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=helptext)
        else:
            group.add_argument(flag(f.name), type=_converter(kind, f.name), default=default, choices=choices,
                               metavar=None if choices else f.name.upper(), help=helptext)
    return p


def _piece_titles(cls) -> dict[str, str]:
    """Each field's group in --help: the ``title`` of the config piece that first declares it."""
    titles: dict[str, str] = {}
    for piece in reversed(cls.__mro__):
        for name in inspect.get_annotations(piece):
            titles.setdefault(name, getattr(piece, "title", None))
    return titles


def _converter(kind: type, name: str):
    def convert(raw: str):
        try:
            return parse_value(kind, raw, name)
        except ConfigError as e:  # argparse prints this message as it is
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{flag(name)}: ")) from None

    convert.__name__ = kind.__name__
    return convert


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a flow run (inside one, Prefect raises TerminationSignal): unwinds like Ctrl-C."""


def terminate(signum, frame):
    raise Terminated


def run_from_command_line(cls, flow_fn, argv: list[str] | None, prog: str, description: str,
                          check: Callable) -> int:
    """A flow's command line: ``argv`` parsed into ``cls``, then ``run_config``."""
    return run_config(parse_config(cls, argv, prog, description), flow_fn, check)


def parse_config(cls, argv: list[str] | None, prog: str, description: str):
    """``argv`` parsed into ``cls``; a bad value exits with status 2 and one line naming it, as
    argparse's own errors do."""
    args = vars(parser_for(cls, prog, description).parse_args(argv))
    try:
        return cls(**args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run_config(cfg, flow_fn, check: Callable) -> int:
    """Check the input with ``check(cfg)`` (what needs no training, before Prefect starts; it returns
    the run's checkpoint folder), run the flow, print its report and where the model went. Bad input
    ends with one line naming the culprit and status 1; Ctrl-C and SIGTERM with one line saying
    where the checkpoint is kept, and 130 or 143."""
    signal.signal(signal.SIGTERM, terminate)
    checkpoints = None
    try:
        checkpoints = check(cfg)
        with prefect_api(meanwhile=lambda: importlib.import_module("flows.steps")):  # what every flow imports first
            result = flow_fn(**cfg.to_params())
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, TerminationSignal) as e:
        kept = (f"the training checkpoint is kept in {checkpoints}: run the same command to resume"
                if checkpoints is not None and any(checkpoints.rglob("*.safetensors"))
                else "no training checkpoint had been written")
        print(f"interrupted: nothing registered; {kept}", file=sys.stderr)
        return 130 if type(e) is KeyboardInterrupt else 143
    print()
    print(result["report"])
    print(f"\nregistered {result['model_uri']} (trained on {result['device']} in {result['train_seconds']:.1f} s)")
    print(f"champion: {result['champion_uri']}")
    return 0


RUN_FILE = "run.json"  # in a checkpoint folder: its flow, config and data's sha256


@contextlib.contextmanager
def checkpointed(checkpoints: Path, flow: str, cfg, data_sha256: str):
    """Around a flow's training and registration, the run's checkpoint folder, with what it trains in
    ``RUN_FILE``. Removed once the model is registered or the input proved bad; kept after an
    interrupt, a crash or a bug, for the same command to resume, and when the tracking server stays
    away or refuses the registration, the error then saying how to register it later."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    tmp = checkpoints / f".{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"flow": flow, "params": cfg.to_params(), "data_sha256": data_sha256}, indent=2))
    os.replace(tmp, checkpoints / RUN_FILE)
    try:
        yield
    except (TrackingUnavailable, TrackingRefused) as e:
        when = "the server answers" if isinstance(e, TrackingUnavailable) else "you have the permission"
        raise type(e)(f"{e}; the trained model is kept in {checkpoints}: once {when}, "
                      f"`{command_line('flows.models')} register {checkpoints}` registers it") from None
    except USER_ERRORS:
        shutil.rmtree(checkpoints, ignore_errors=True)
        raise
    shutil.rmtree(checkpoints, ignore_errors=True)


def load_run(directory: Path) -> tuple[str, dict, str]:
    """(flow, params, data sha256) of a checkpoint folder; ``ConfigError`` if it is not one."""
    try:
        run = json.loads((directory / RUN_FILE).read_text())
        return run["flow"], run["params"], run["data_sha256"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{directory}: not a checkpoint folder of rnnflow (no readable {RUN_FILE}: {e})") from None


def registration_note(name: str, reg) -> str:
    """The report's closing lines: the champion decision and how to load the model."""
    return (f"**{'Promoted to' if reg.promoted else 'Not promoted to'} `champion`**: {reg.reason}.\n\n"
            f"Load it: `mlflow.pyfunc.load_model(\"models:/{name}@champion\")`; "
            f"MLflow run [{reg.run_id}]({reg.run_url}).")


# how a run goes, where its model is registered and what is computed after training, not what it trains
NOT_IN_KEY = ("resume", "checkpoint_minutes", "registry_retry_minutes", "model_name", "experiment", "intervals")
# raised when a default that shapes training changes under an unchanged command (2: a global model's lookback of 10
# seasons), so that a checkpoint of the command's earlier meaning is not resumed as this one's
KEY_REVISION = 2


def checkpoint_dir(cfg: TimeSeriesConfig | CharLMFlowConfig, data_sha256: str) -> Path:
    """A run's checkpoint folder under ./checkpoints (or $RNNFLOW_CHECKPOINTS), keyed by what decides
    what is trained (the config; the data's sha256, '' for generated data): the same command resumes."""
    params = {k: v for k, v in cfg.to_params().items() if k not in NOT_IN_KEY}
    key = hashlib.sha256(json.dumps([params, data_sha256, KEY_REVISION], sort_keys=True).encode()).hexdigest()[:12]
    root = Path(os.environ.get("RNNFLOW_CHECKPOINTS") or "checkpoints").resolve()
    return root / f"{safe_name(cfg.registered_name)}-{key}"

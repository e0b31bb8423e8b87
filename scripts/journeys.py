"""The README is a test: run every command in README.md's ```bash and ```python blocks, in order,
each in a fresh process, as a user types it, and check what it answers.

    .venv/bin/python scripts/journeys.py            # make journeys
    .venv/bin/python scripts/journeys.py --check    # only: is every README command in the table?
    .venv/bin/python scripts/journeys.py --only 'flows.models|serve-model' --keep

How it reads README: every line of a ```bash block is a command (``\\`` continuations joined,
a trailing ``# comment`` dropped); lines that start with ``#`` (comments, shown output) and
blank lines are not. A ```python block is one command, compared with its comments dropped.
Every command must be in STEPS below, word for word, or the run fails at once naming it: a
command added to README without a journey here fails CI. README's ``make test`` is not run
(CI runs it just before).

Where it runs: a private working copy, made fresh in a temporary folder: the repository's files
as they are on disk (``git ls-files -co --exclude-standard``, so uncommitted edits are tried
too), ``.venv`` a symlink to the repository's, and ``../shared`` a symlink to the repository's
sibling ``shared/`` (README's ``../shared/data/...`` paths). So ``mlruns/``, ``checkpoints/`` and
``data/downloads/`` start empty, version numbers come out as a new user's do
(``flows.models show sine-forecaster 3``), and nothing is left in the repository. PREFECT_HOME
is a folder of that temporary tree: the Prefect servers the journey starts have their own
database. The folder is removed at the end (``--keep`` keeps it, ``--workdir DIR`` reuses one).

As a user types it: every command runs with ``bash -c`` in the copy's root, with ``.venv/bin``
first on PATH (as after ``source .venv/bin/activate``: README's ``python -m flows.models`` and
``prefect deployment run`` need it) and without MLFLOW_TRACKING_URI / PREFECT_API_URL from the
caller; an ``export`` line sets the variable for the commands after it, as the user's shell
would. Python snippets run in a fresh ``.venv/bin/python`` that executes them as the
interactive interpreter does (each top-level expression's value printed and kept as ``_``).
Servers (``make server``, ``make deploy``, ``make serve-model``, ``make tracking-server``,
the Dask stand-in cluster) start in the background, are waited for by a health check and are
stopped at the end with SIGTERM to their process group.

What is not run as written is printed as a substitution (original -> what ran, and why):
placeholders (``https://example.org/...`` and ``<hex>``: a local HTTP server on 127.0.0.1
serving a generated file, with its real sha256), the user's own infrastructure (a Dask
scheduler at ``tcp://scheduler:8786``: a local ``dask scheduler`` + ``dask worker``; their
``sales.csv``: a generated one; a literal ``...``: options filled in), and commands that take
longer than a few minutes as written (a shorter time budget). A default port already taken on
this machine is replaced by a free one, also printed.

Every command must exit with its expected status and its output must show what README
promises (``registered models:/...``, a JSON ``predictions`` answer, a completed deployment
run, ...). All commands run; failures are listed at the end with the command, its exit code and
the tail of its output, and the exit status is 1. Per-command seconds and the total are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import hashlib
import http.server
import io
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TAIL_LINES = 25


# ----------------------------------------------------------------------------- README parsing

def strip_comment(line: str) -> str:
    """The shell line without a trailing ``# comment`` (a # outside quotes, at the start or
    after a blank)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def python_code(src: str) -> str:
    """A Python snippet without its comments and blank lines: what is compared with the table."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type != tokenize.COMMENT]
    code = tokenize.untokenize(tokens)
    return "\n".join(line.rstrip() for line in code.splitlines() if line.strip())


def readme_commands(text: str) -> list[tuple[int, str, str]]:
    """(line number, 'bash' | 'python', command) for every command in README's code blocks."""
    out: list[tuple[int, str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1), i + 1
        j = start
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            j += 1
        body = lines[start:j]
        if lang == "python":
            out.append((start + 1, "python", python_code("\n".join(body) + "\n")))
        elif lang in ("bash", "sh", "shell", "console"):
            k = 0
            while k < len(body):
                lineno, line = start + k + 1, body[k]
                while line.rstrip().endswith("\\") and k + 1 < len(body):
                    k += 1
                    line = line.rstrip()[:-1].rstrip() + " " + body[k].strip()
                k += 1
                if not line.strip() or line.lstrip().startswith("#"):
                    continue  # blank, a comment, or output shown as a comment
                out.append((lineno, "bash", strip_comment(line).strip()))
        i = j + 1
    return out


# ----------------------------------------------------------------------------- checks

Check = Callable[[str, "Journey"], "str | None"]


def has(*patterns: str) -> Check:
    """The output matches every regular expression."""
    def check(out: str, j: Journey) -> str | None:
        missing = [p for p in patterns if not re.search(j.fill(p), out)]
        return f"output lacks {missing}" if missing else None
    return check


def json_predictions(*keys: str) -> Check:
    """curl's answer is JSON {"predictions": [rows...]} whose rows have these keys."""
    def check(out: str, j: Journey) -> str | None:
        try:
            rows = json.loads(out.strip().splitlines()[-1])["predictions"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return f"not a JSON predictions answer ({type(e).__name__}: {e})"
        if not rows or any(k not in rows[0] for k in keys):
            return f"predictions lack {keys}: {str(rows)[:200]}"
        return None
    return check


def refused_or_promoted(out: str, j: Journey) -> str | None:
    """``promote`` answers one of the two things README says: promoted, or refused as worse."""
    if re.search(r"@champion -> v3|already champion|refusing: v3", out):
        return None
    return "neither promoted nor refused"


# ----------------------------------------------------------------------------- the table

@dataclasses.dataclass
class Step:
    readme: str  # the command as README has it ('' for a step README implies but does not show)
    run: str | None = None  # what runs instead (placeholders @@name@@ filled in), printed as a substitution
    why: str = ""  # why it is substituted, skipped or added
    kind: str = "cmd"  # cmd | bg (a server, left running) | python | export | skip
    rc: tuple[int, ...] = (0,)
    checks: tuple[Check, ...] = ()
    timeout: float = 300.0
    health: Callable[[Journey, Path], bool] | None = None  # bg: ready when true (given its log)
    before: tuple[Step, ...] = ()  # steps README implies before this one
    after: tuple[Step, ...] = ()
    needs: Callable[[Journey], str] | None = None  # a reason to skip, or ''
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # extra environment (stand-ins only)

    def label(self) -> str:
        text = self.readme or self.run or ""
        first = text.splitlines()[0] if text else ""
        return ("python: " + first + (" ..." if "\n" in text else "")) if self.kind == "python" else first


def http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def prefect_deployments_ready(j: Journey, log: Path) -> bool:
    api = f"http://127.0.0.1:{j.ports[4200]}/api"
    return (all(http_ok(f"{api}/deployments/name/{d}") for d in
                ("timeseries-forecasting/nightly-retrain", "charlm-training/weekly-retrain"))
            and "being served" in log.read_text(errors="replace"))


def dask_workers_ready(n: int) -> Callable[[Journey, Path], bool]:
    return lambda j, log: log.read_text(errors="replace").count("Registered to:") >= n


def tcp_open(port_key: int) -> Callable[[Journey, Path], bool]:
    def ready(j: Journey, log: Path) -> bool:
        with contextlib.closing(socket.socket()) as s:
            s.settimeout(1.0)
            return s.connect_ex(("127.0.0.1", j.ports[port_key])) == 0
    return ready


def tracking_server_needs(j: Journey) -> str:
    if os.geteuid() != 0:
        return "not root: flows/tracking-server.sh runs initdb as the postgres user through runuser"
    missing = [t for t in ("initdb", "pg_ctl", "psql", "runuser") if shutil.which(t) is None]
    return f"PostgreSQL's {', '.join(missing)} not installed" if missing else ""


BRIEF_EPOCHS = 5


def briefly(readme: str, run: str | None = None, why: str = "", **step) -> Step:
    """A training step run with every flag as README has it and `--epochs 5` added: what it checks
    (the model trains, registers, answers) does not need a full training, and the full trainings of
    README's dozen examples took most of CI's time on 2 cores (`make run` as written, the first
    step, and the examples whose checks read forecasts train in full)."""
    command = run or readme
    short = (re.sub(r'ARGS="([^"]*)"', rf'ARGS="\1 --epochs {BRIEF_EPOCHS}"', command) if 'ARGS="' in command
             else f"{command} --epochs {BRIEF_EPOCHS}")
    why = "; ".join(filter(None, (why, f"--epochs {BRIEF_EPOCHS} added: a brief training")))
    return Step(readme, run=short, why=why, **step)


def registered(name: str) -> Check:
    return has(rf"registered models:/{re.escape(name)}/\d+")


SINE_CURL = ("""curl -s localhost:5001/invocations -H 'Content-Type: application/json' """
             """-d '{"dataframe_split": {"columns": ["value"], "data": ["""
             """[0.0],[0.16],[0.31],[0.45],[0.59],[0.71],[0.81],[0.89],[0.95],[0.99],[1.0],[0.99],"""
             """[0.95],[0.89],[0.81],[0.71],[0.59],[0.45],[0.31],[0.16],[0.0],[-0.16],[-0.31],[-0.45],"""
             """[-0.59],[-0.71],[-0.81],[-0.89],[-0.95],[-0.99],[-1.0],[-0.99],[-0.95],[-0.89],[-0.81],[-0.71],"""
             """[-0.59],[-0.45],[-0.31],[-0.16],[0.0],[0.16],[0.31],[0.45],[0.59],[0.71],[0.81],[0.89]]}}'""")
CHARLM_CURL = ("""curl -s localhost:5002/invocations -H 'Content-Type: application/json' -d '{"dataframe_split": """
               """{"columns": ["prefix"], "data": [["time traveller"]]}, "params": {"max_new_chars": 80, """
               """"temperature": 0.7}}'""")
SWEEP = ".venv/bin/python -m flows.sweep"
ADMIN = """curl -s -u "admin:$RNNFLOW_ADMIN_PASSWORD" http://127.0.0.1:5050/api/"""
JSON = """ -H 'Content-Type: application/json' -d """
CREATE_ALICE = ADMIN + "2.0/mlflow/users/create" + JSON + """'{"username": "alice", "password": "alice-password-1"}'"""
CREATE_BOB = ADMIN + "2.0/mlflow/users/create" + JSON + """'{"username": "bob", "password": "bob-password-12"}'"""
GRANT_BOB = (ADMIN + "3.0/mlflow/users/permissions/grant" + JSON + """'{"username": "bob", "resource_type": """
             """"registered_model", "resource_id": "team-forecaster", "permission": "READ"}'""")
TOKEN_CURL = """curl -s localhost:5003/invocations -H "Authorization: Bearer $SERVE_TOKEN\"""" + SINE_CURL.split(
    "/invocations")[1]
# the server without logins (README's "A shared registry") still holds 5050 when the one with logins starts
AUTH_PORT = "the server without logins started above still holds port 5050: this one is on another"


def on_auth_port(command: str) -> str:
    return command.replace("5050", "@@port:5055@@")


def lacks(*patterns: str) -> Check:
    """The output matches none of these regular expressions (curl -s exits 0 on an HTTP error)."""
    def check(out: str, j: Journey) -> str | None:
        found = [p for p in patterns if re.search(p, out)]
        return f"output has {found}" if found else None
    return check

STEPS: list[Step] = [
    # -- Set-up
    Step("make run", checks=(registered("sine-forecaster"), has(r"champion: models:/sine-forecaster@champion"))),
    Step("make test", kind="skip", why="the test suite: CI runs it just before (`make test` in .ci/run)"),
    Step('import mlflow, numpy as np, pandas as pd\nmlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")\n'
         'model = mlflow.pyfunc.load_model("models:/sine-forecaster@champion")\n'
         'history = pd.DataFrame({"value": np.sin(2 * np.pi * np.arange(100) / 40)})\nmodel.predict(history)',
         kind="python", checks=(has(r"CHECK OK: list\(_.columns\) == \['step', 'forecast'\]"),),
         env={"CHECK": "list(_.columns) == ['step', 'forecast'] and len(_) == 1"}),
    # -- Install as a command
    Step("pipx install .", kind="skip",
         why="installs for the user, outside this working copy: the journey test "
             "tests/test_console.py::test_the_wheel_installs_in_a_fresh_venv_and_its_command_trains_lists_and_serves "
             "installs the wheel in a fresh venv and runs forecast, models list and serve from an empty folder"),
    Step("pip wheel . --no-deps -w dist", checks=(has(r"rnnflow-0\.1\.0-py3-none-any\.whl"),), timeout=300),
    Step("pip install dist/rnnflow-*.whl", kind="skip",
         why="here it would replace the working copy's editable install in the shared .venv; the journey test "
             "above installs that wheel in a fresh venv"),
    Step("rnnflow --help", checks=(has(r"\n  forecast ", r"\n  tracking-server "),)),
    Step("rnnflow forecast --help", checks=(has(r"usage: rnnflow forecast", r"--hidden-size"),)),
    Step("rnnflow --version", checks=(has(r"^rnnflow 0\.1\.0$"),)),
    # -- The time-series flow
    briefly('make run ARGS="--cell gru --horizon 6 --lookback 48 --model-name sine-gru"',
         checks=(registered("sine-gru"),)),
    briefly('make run ARGS="--source sin-cos"', checks=(registered("sin-cos-forecaster"),)),
    briefly('make run ARGS="--source arithmetic --lookback 3"', checks=(registered("arithmetic-forecaster"),)),
    briefly('make run ARGS="--source file --data ../shared/data/airline-passengers.csv --horizon 12 --lookback 36"',
         checks=(registered("airline-passengers-forecaster"),)),
    briefly('make run ARGS="--source trend-season --horizon 12 --lookback 48 --quantiles 0.1,0.9 --ensemble 5"',
         checks=(registered("trend-season-forecaster"), has(r"quantile interval covers"))),
    briefly('make run ARGS="--source trend-season --lookback 48 --no-auto --transform log --baseline seasonal-naive '
         '--ensemble-cells lstm,gru"', checks=(registered("trend-season-forecaster"),)),
    briefly('make run ARGS="--source file --data https://example.org/energy.csv --sha256 <hex> --time-column date '
         '--value-column appliances --covariate-columns household_size"',
         run='make run ARGS="--source file --data @@url:energy.csv@@ --sha256 @@sha:energy.csv@@ --time-column date '
             '--value-column appliances --covariate-columns household_size"',
         why="placeholders: a generated energy.csv (date, appliances, household_size) served on 127.0.0.1, its sha256",
         checks=(registered("energy-forecaster"),)),
    Step('make run ARGS="--source file --data data/promotions.csv --future-covariate-columns promo,price --no-calendar '
         '--horizon 7 --lookback 28 --intervals 0.8"', checks=(registered("promotions-forecaster"),)),
    Step('import mlflow, numpy as np, pandas as pd\nmlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")\n'
         'model = mlflow.pyfunc.load_model("models:/promotions-forecaster@champion")\n'
         'history = pd.read_csv("data/promotions.csv")[["sales", "promo", "price"]]\n'
         'week = pd.DataFrame({"promo": [0, 0, 1, 0, 0, 0, 0], "price": [9.99, 9.99, 7.99, 9.99, 9.99, 9.99, 9.99]})\n'
         'model.predict(pd.concat([history, week.assign(sales=np.nan)], ignore_index=True))',
         kind="python", checks=(has(r"CHECK OK"),),
         env={"CHECK": "list(_.columns) == ['step', 'forecast', 'lo0.8', 'hi0.8'] and len(_) == 7 "
                       "and _.forecast[2] > _.forecast[1] + 20"}),
    Step('make run ARGS="--source file --data data/holiday_sales.csv --holidays US --horizon 7 --lookback 28"',
         checks=(registered("holiday_sales-forecaster"),)),
    Step('import mlflow, pandas as pd\nmlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")\n'
         'model = mlflow.pyfunc.load_model("models:/holiday_sales-forecaster@champion")\n'
         'model.predict(pd.read_csv("data/holiday_sales.csv").iloc[:182])  # to 30 June 2024: step 4 is 4 July, a '
         'holiday', kind="python", checks=(has(r"CHECK OK"),),
         env={"CHECK": "len(_) == 7 and _.forecast[3] < _.forecast[2] - 20"}),
    # -- Many series
    briefly(".venv/bin/python -m flows.timeseries --source file --data data/meters.csv --id-column id --horizon 24",
         checks=(registered("meters-forecaster"),)),
    Step('import mlflow, pandas as pd\nmlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")\n'
         'model = mlflow.pyfunc.load_model("models:/meters-forecaster@champion")\n'
         'history = pd.read_csv("data/meters.csv")\nmodel.predict(history[history["id"].isin(["s0", "s7"])])',
         kind="python", checks=(has(r"CHECK OK"),),
         env={"CHECK": "list(_.columns) == ['id', 'step', 'forecast'] and len(_) == 48 "
                       "and list(_['id'].unique()) == ['s0', 's7']"}),
    briefly('make run ARGS="--source file --data data/stores.csv --id-column store --value-column sales '
            '--future-covariate-columns promo,price --static-columns store_type,size --holidays US --horizon 7"',
            checks=(registered("stores-forecaster"),)),
    Step('import mlflow, numpy as np, pandas as pd\nmlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")\n'
         'model = mlflow.pyfunc.load_model("models:/stores-forecaster@champion")\n'
         'stores = pd.read_csv("data/stores.csv")\n'
         'request = pd.concat([stores[stores["store"] == s].tail(77) for s in ("store00", "store03")])\n'
         'request.loc[request.groupby("store").cumcount() >= 70, "sales"] = np.nan  # 70 days of history, then 7 '
         'ahead\nmodel.predict(request)  # columns store, step, forecast: 7 rows for store00, then 7 for store03',
         kind="python", checks=(has(r"CHECK OK"),),
         env={"CHECK": "list(_.columns) == ['store', 'step', 'forecast'] and len(_) == 14 "
                       "and list(_['store'].unique()) == ['store00', 'store03']"}),
    # -- The character language model
    Step("make charlm", run='make charlm ARGS="--epochs 2"',
         why="10 epochs of a 2x512 LSTM take ~10 minutes on 2 cores without bf16 (CI's): 2 epochs",
         checks=(registered("timemachine-charlm"),), timeout=420),
    Step('make charlm ARGS="--data ../shared/data/tinyshakespeare.txt --no-lower --minutes 15"',
         run='make charlm ARGS="--data ../shared/data/tinyshakespeare.txt --no-lower --minutes 1"',
         why="a 15-minute budget as written: 1 minute", checks=(registered("tinyshakespeare-charlm"),), timeout=360),
    Step('make charlm ARGS="--data https://example.org/lyrics.txt --sha256 <hex> --prefixes 天青色"',
         run='make charlm ARGS="--data @@url:lyrics.txt@@ --sha256 @@sha:lyrics.txt@@ --prefixes 天青色"',
         why="placeholders: a generated Chinese lyrics.txt served on 127.0.0.1, its sha256",
         checks=(registered("lyrics-charlm"), has("天青色")), timeout=360),
    Step('import mlflow, pandas as pd\nmlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")\n'
         'lm = mlflow.pyfunc.load_model("models:/timemachine-charlm@champion")\n'
         'lm.predict(pd.DataFrame({"prefix": ["time traveller"]}),\n'
         '           params={"max_new_chars": 200, "temperature": 0.8, "top_k": 0, "seed": 1})',
         kind="python", checks=(has(r"CHECK OK"),),
         env={"CHECK": "list(_.columns) == ['text'] and len(_['text'][0]) > 0"}),
    # -- Scheduled retraining
    Step("make server-stop", checks=(has("stopped|no local server"),)),
    Step("make server", kind="bg", health=lambda j, log: http_ok(f"http://127.0.0.1:{j.ports[4200]}/api/health"),
         timeout=120),
    Step("make deploy", kind="bg", health=prefect_deployments_ready, timeout=180),
    Step("export PREFECT_API_URL=http://127.0.0.1:4200/api", kind="export"),
    Step("prefect deployment run 'timeseries-forecasting/nightly-retrain' --param epochs=5 --watch",
         checks=(has(r"Flow run finished successfully in 'Completed'"),), timeout=420),
    Step("prefect deployment run 'charlm-training/weekly-retrain' --param hidden_size=128 --param epochs=3 --watch",
         checks=(has(r"Flow run finished successfully in 'Completed'"),), timeout=420),
    # -- The monitor: the journey's data did not grow, so each champion has nothing to check yet; the
    # energy model's local HTTP stand-in may be gone by now (one line, exit 1, as README says)
    Step("python -m flows.monitor", rc=(0, 1), checks=(has(r"sine-forecaster v\d+: nothing to check"),),
         timeout=300),
    Step("python -m flows.monitor --model-name airline-passengers-forecaster",
         checks=(has(r"airline-passengers-forecaster v\d+: nothing to check \(no new data since"),), timeout=300),
    Step('make deploy ARGS="--retrain-on drift --cooldown-hours 12"', kind="skip",
         why="a second serving process beside `make deploy` above; tests/test_monitor.py serves --retrain-on drift "
             "against a real Prefect server and checks the retrain the trigger starts"),
    # -- Sweeps
    briefly(f"{SWEEP} --cell lstm,gru --hidden-size 32,64 --lookback 24,48",
         checks=(has(r"best trial, sine-forecaster v\d+"),), timeout=600),
    briefly(f"{SWEEP} --cell lstm,gru --hidden-size 16,32,64 --samples 4 --task-runner dask --workers 2",
         checks=(has(r"best trial, sine-forecaster v\d+"),), timeout=480),
    briefly(f"{SWEEP} ... --task-runner dask --dask-address tcp://scheduler:8786",
         run=f"{SWEEP} --hidden-size 16,32 --task-runner dask --dask-address tcp://127.0.0.1:@@port:8786@@",
         why="`...`: two trials (--hidden-size 16,32); tcp://scheduler:8786: a local `dask scheduler` and "
             "two `dask worker`s (.venv/bin/dask) started for it",
         checks=(has(r"best trial, sine-forecaster v\d+"),), timeout=480,
         before=(Step("", run=".venv/bin/dask scheduler --host 127.0.0.1 --port @@port:8786@@ "
                             "--dashboard-address 127.0.0.1:0 --no-show",
                      kind="bg", why="stand-in for the user's scheduler", health=tcp_open(8786), timeout=90),
                 Step("", run=".venv/bin/dask worker tcp://127.0.0.1:@@port:8786@@ --nworkers 2 --nthreads 1 "
                             "--no-dashboard",
                      kind="bg", why="stand-in for the user's workers (they import the copy's tasks/: PYTHONPATH)",
                      health=dask_workers_ready(2), timeout=120, env={"PYTHONPATH": "@@workdir@@"}))),
    briefly(f"{SWEEP} --source file --data sales.csv --id-column store --time-column date --value-column sales "
         "--model-name sales",
         why="sales.csv: a generated long-format file (store, date, sales), 3 stores x 1 year daily",
         checks=(has(r"sales-north", r"sales-south", r"sales-east"),), timeout=480,
         after=(Step("", run="make tracking-server", kind="bg", needs=tracking_server_needs,
                     why="README's prose after the sweeps: \"A shared registry: `make tracking-server` starts ...\"",
                     health=lambda j, log: http_ok(f"http://127.0.0.1:{j.ports[5050]}/health"), timeout=120),)),
    # -- Use a trained model
    Step('from tasks.registry import load_champion\nmodel = load_champion("sine-forecaster")', kind="python",
         checks=(has(r"CHECK OK"),), env={"CHECK": "callable(getattr(model, 'predict', None))"}),
    Step("make serve-model NAME=sine-forecaster PORT=5001 WORKERS=2", kind="bg", timeout=150,
         health=lambda j, log: http_ok(f"http://127.0.0.1:{j.ports[5001]}/ping")),
    Step(SINE_CURL, checks=(json_predictions("step", "forecast"),), timeout=60),
    Step("make serve-model NAME=timemachine-charlm PORT=5002", kind="bg", timeout=150,
         health=lambda j, log: http_ok(f"http://127.0.0.1:{j.ports[5002]}/ping")),
    Step(CHARLM_CURL, checks=(json_predictions("text"),), timeout=60),
    # -- Manage versions
    Step(".venv/bin/python -m flows.models list", checks=(has(r"sine-forecaster\s+3\b", r"timemachine-charlm"),)),
    Step(".venv/bin/python -m flows.models show sine-forecaster 3", checks=(has(r"sine-forecaster v3", r"metrics:"),)),
    Step(".venv/bin/python -m flows.models compare sine-forecaster 2 3", checks=(has(r"\bv2\b", r"\bv3\b"),)),
    Step(".venv/bin/python -m flows.models promote sine-forecaster 3", rc=(0, 1), checks=(refused_or_promoted,)),
    Step(".venv/bin/python -m flows.models promote sine-forecaster 3 --force",
         checks=(has(r"sine-forecaster@champion -> v3|already champion"),)),
    Step(".venv/bin/python -m flows.models rollback sine-forecaster", checks=(has(r"rolled back from v3"),)),
    # -- Shared server with logins
    Step("export RNNFLOW_ADMIN_PASSWORD=choose-a-long-admin-password", kind="export"),
    Step("make tracking-server AUTH=1", run="make tracking-server AUTH=1 SQLITE=1 MLFLOW_PORT=@@port:5055@@",
         why=AUTH_PORT + "; and its store in SQLite, so no second PostgreSQL", kind="bg", timeout=180,
         health=lambda j, log: http_ok(f"http://127.0.0.1:{j.ports[5055]}/health")),
    Step(CREATE_ALICE, run=on_auth_port(CREATE_ALICE), why=AUTH_PORT, checks=(has(r'"username": ?"alice"'),)),
    Step(CREATE_BOB, run=on_auth_port(CREATE_BOB), why=AUTH_PORT, checks=(has(r'"username": ?"bob"'),)),
    Step("export MLFLOW_TRACKING_URI=http://127.0.0.1:5050", run="export MLFLOW_TRACKING_URI=http://127.0.0.1:@@port:5055@@",
         why=AUTH_PORT, kind="export"),
    Step("export MLFLOW_TRACKING_USERNAME=alice", kind="export"),
    Step("export MLFLOW_TRACKING_PASSWORD=alice-password-1", kind="export"),
    briefly('make run ARGS="--model-name team-forecaster"', checks=(registered("team-forecaster"),), timeout=600),
    Step(GRANT_BOB, run=on_auth_port(GRANT_BOB), why=AUTH_PORT,
         checks=(lacks(r"error_code", r"Permission denied", r"not authenticated"),)),
    Step("export SERVE_TOKEN=a-long-random-token", kind="export"),
    Step("make serve-model NAME=team-forecaster PORT=5003 TOKEN_ENV=SERVE_TOKEN", kind="bg", timeout=150,
         health=lambda j, log: http_ok(f"http://127.0.0.1:{j.ports[5003]}/ping")),
    Step(TOKEN_CURL, checks=(json_predictions("step", "forecast"),), timeout=60,
         after=(Step("", run=SINE_CURL.replace("5001", "@@port:5003@@"), checks=(has(r'"UNAUTHENTICATED"'),),
                     why="README's comment: without the header, 401"),)),
]


# ----------------------------------------------------------------------------- stand-in data

def energy_csv() -> str:
    """Daily household energy use: date, appliances (Wh) and a covariate, household_size."""
    rng = random.Random(7)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["date", "appliances", "household_size"])
    size, day0 = 3, date(2023, 1, 1)
    weekly = [1.0, 0.95, 0.97, 1.0, 1.05, 1.3, 1.35]
    for t in range(730):
        if rng.random() < 0.01:
            size = min(6, max(1, size + rng.choice((-1, 1))))
        d = day0 + timedelta(days=t)
        value = (120 * size + 60) * weekly[d.weekday()] * (1 + 0.15 * math.cos(2 * math.pi * t / 365.25)) \
            + rng.gauss(0, 25)
        w.writerow([d.isoformat(), f"{max(value, 10):.1f}", size])
    return out.getvalue()


LYRIC_LINES = ["天青色的天空下着小雨", "我在河边等你回来", "月光照在古老的城墙", "风吹过青石板的小路",
               "花开花落又是一年", "远方的山还是那么蓝", "窗前的灯亮到天明", "我把你的名字写在纸上",
               "茶已经凉了你还没有来", "燕子飞过屋檐", "天青色的瓷瓶里开着白花", "雨停了街上的人都走了",
               "你的笑容像春天的阳光", "我唱着那首老歌", "夜里的星星一颗一颗亮起来", "船在江上慢慢地走"]


def lyrics_txt() -> str:
    """A small UTF-8 Chinese corpus (about 9,000 characters) in which 天青色 is common."""
    rng = random.Random(3)
    lines = []
    for _ in range(450):
        a, b = rng.sample(LYRIC_LINES, 2)
        lines.append(f"{a}，{b}。")
    return "\n".join(lines) + "\n"


def sales_csv() -> str:
    """Long format, one row per store and day: store, date, sales."""
    rng = random.Random(11)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["store", "date", "sales"])
    weekly = [0.9, 0.85, 0.9, 1.0, 1.15, 1.45, 1.25]
    for store, level in (("north", 200), ("south", 520), ("east", 90)):
        for t in range(365):
            d = date(2024, 1, 1) + timedelta(days=t)
            w.writerow([store, d.isoformat(), round(level * weekly[d.weekday()] * (1 + t / 1500)
                                                     + rng.gauss(0, level * 0.05))])
    return out.getvalue()


# ----------------------------------------------------------------------------- running

def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(port: int) -> bool:
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


MAKE_VARIABLES = ("ARGS", "NAME", "PORT", "UI_PORT", "WORKERS", "PYTEST_ARGS", "REPORT", "STORE", "PY", "STAMP")


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # noqa: D102
        pass


@dataclasses.dataclass
class Result:
    step: Step
    ran: str
    seconds: float
    status: str  # ok | FAIL | skip
    rc: int | None = None
    detail: str = ""
    log: Path | None = None


class Journey:
    def __init__(self, workdir: Path, keep: bool):
        self.workdir, self.keep = workdir, keep
        self.root = workdir.parent
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.www = self.root / "www"
        self.www.mkdir(exist_ok=True)
        self.background: list[tuple[str, subprocess.Popen]] = []
        self.results: list[Result] = []
        self.log_files: dict[str, Path] = {}
        self.ports = {p: p for p in (4200, 5001, 5002, 5003, 5050, 5055, 8786, 55432)}
        self.files: dict[str, str] = {}
        self.httpd: http.server.ThreadingHTTPServer | None = None
        self.env = self._environment()

    # -- set-up
    def _environment(self) -> dict[str, str]:
        # a fresh user shell: nothing of the caller's MLflow/Prefect settings, nor of `make journeys ARGS=...`
        # (make exports its command line's variables to the recipe, and `make run` would read them)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLFLOW_", "PREFECT_", "RNNFLOW_", "VIRTUAL_ENV", "MAKE", "MFLAGS"))
               and k not in MAKE_VARIABLES}
        env.update(PATH=f"{self.workdir / '.venv' / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                   VIRTUAL_ENV=str(self.workdir / ".venv"), PREFECT_HOME=str(self.root / "prefect-home"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_ENABLE_TELEMETRY="false", DO_NOT_TRACK="true",
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
        return env

    def prepare(self) -> None:
        for port in self.ports:
            if port_taken(port):
                self.ports[port] = free_port()
                print(f"port {port} is taken on this machine: the journey uses {self.ports[port]} instead "
                      f"(commands naming {port} are substituted)")
        if self.ports[4200] != 4200:
            self.env.update(PREFECT_PORT=str(self.ports[4200]), PREFECT_SERVER_API_PORT=str(self.ports[4200]))
        self.env.update(MLFLOW_PORT=str(self.ports[5050]), PG_PORT=str(self.ports[55432]))
        for name, make in (("energy.csv", energy_csv), ("lyrics.txt", lyrics_txt)):
            data = make().encode("utf-8")
            (self.www / name).write_bytes(data)
            self.files[name] = hashlib.sha256(data).hexdigest()
        (self.workdir / "sales.csv").write_text(sales_csv())
        handler = functools.partial(Quiet, directory=str(self.www))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        print(f"stand-in data: {self.www}/energy.csv, lyrics.txt served at "
              f"http://127.0.0.1:{self.httpd.server_address[1]}/; {self.workdir}/sales.csv")

    def fill(self, text: str) -> str:
        def one(m: re.Match) -> str:
            kind, _, arg = m.group(1).partition(":")
            if kind == "url":
                return f"http://127.0.0.1:{self.httpd.server_address[1]}/{arg}"
            if kind == "sha":
                return self.files[arg]
            if kind == "port":
                return str(self.ports[int(arg)])
            if kind == "workdir":
                return str(self.workdir)
            raise KeyError(m.group(0))
        text = re.sub(r"@@([^@]+)@@", one, text)
        for port, alt in self.ports.items():
            if alt != port:
                text = re.sub(rf"(?<![0-9]){port}(?![0-9])", str(alt), text)
        return text

    # -- one step
    def _log_path(self, step: Step) -> Path:
        n = len(self.log_files) + 1
        slug = re.sub(r"[^A-Za-z0-9]+", "-", step.label())[:60].strip("-") or "step"
        return self.logs / f"{n:02d}-{slug}.log"

    def execute(self, step: Step, index: str) -> None:
        ran = self.fill(step.run) if step.run else step.readme
        head = f"[{index}] {'+ ' if not step.readme else ''}{step.label() if step.kind == 'python' else ran}"
        print("\n" + head, flush=True)
        if step.kind == "skip":
            print(f"    skipped: {step.why}")
            self.results.append(Result(step, ran, 0.0, "skip", detail=step.why))
            return
        if step.readme and ran != step.readme and step.kind != "python":
            print(f"    substituted: {step.readme}\n             -> {ran}\n             ({step.why})")
        elif not step.readme:
            print(f"    added (not a README line): {step.why}")
        elif step.why:
            print(f"    note: {step.why}")
        reason = step.needs(self) if step.needs else ""
        if reason:
            print(f"    skipped: {reason}")
            self.results.append(Result(step, ran, 0.0, "skip", detail=reason))
            return
        if step.kind == "export":
            name, _, value = ran.removeprefix("export ").partition("=")
            self.env[name] = self.fill(value)
            if self.env[name] != value:
                print(f"    substituted: {ran}\n             -> export {name}={self.env[name]}  (a port is taken)")
            print(f"    set {name}={self.env[name]} for the commands after it (the user's shell)")
            self.results.append(Result(step, ran, 0.0, "ok"))
            return
        log = self._log_path(step)
        self.log_files[ran] = log
        env = {**self.env, **{k: self.fill(v) for k, v in step.env.items()}}
        argv = ["bash", "-c", ran]
        if step.kind == "python":
            snippet = self.logs / (log.stem + ".py")
            snippet.write_text(step.readme + "\n")
            argv = [str(self.workdir / ".venv" / "bin" / "python"), "-c", REPL, str(snippet)]
        t0 = time.monotonic()
        out = open(log, "wb")
        proc = subprocess.Popen(argv, cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        if step.kind == "bg":
            self.background.append((ran, proc))
            deadline = t0 + step.timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                if step.health(self, log):
                    break
                time.sleep(0.5)
            seconds = time.monotonic() - t0
            if proc.poll() is not None:
                self._fail(step, ran, seconds, proc.returncode, "the server exited", log)
            elif not step.health(self, log):
                self._fail(step, ran, seconds, None, f"not ready (health check) after {step.timeout:.0f} s", log)
            else:
                print(f"    ok, ready in {seconds:.1f} s (running in the background; log {log})")
                self.results.append(Result(step, ran, seconds, "ok", log=log))
            return
        try:
            rc = proc.wait(timeout=step.timeout)
        except KeyboardInterrupt:
            stop_group(proc, grace=10.0)  # the runner stopped: so does the command under way
            raise
        except subprocess.TimeoutExpired:
            stop_group(proc)
            self._fail(step, ran, time.monotonic() - t0, None, f"timed out after {step.timeout:.0f} s", log)
            return
        seconds = time.monotonic() - t0
        text = log.read_text(errors="replace")
        problems = [] if rc in step.rc else [f"exit status {rc}, expected {' or '.join(map(str, step.rc))}"]
        problems += [p for p in (c(text, self) for c in step.checks) if p]
        if problems:
            self._fail(step, ran, seconds, rc, "; ".join(problems), log)
        else:
            print(f"    ok in {seconds:.1f} s (exit {rc})")
            self.results.append(Result(step, ran, seconds, "ok", rc, log=log))

    def _fail(self, step: Step, ran: str, seconds: float, rc: int | None, detail: str, log: Path) -> None:
        print(f"    FAILED in {seconds:.1f} s: {detail}")
        print(tail(log, "      | "))
        self.results.append(Result(step, ran, seconds, "FAIL", rc, detail, log))

    def stop_servers(self) -> None:
        for ran, proc in reversed(self.background):
            if proc.poll() is None:
                print(f"stopping (SIGTERM to its process group): {ran}")
                stop_group(proc)
        self.background.clear()
        # the shared local server a command line starts (flows/server.py) is not in any group of ours
        subprocess.run([str(self.workdir / ".venv" / "bin" / "python"), "-m", "flows.server", "stop"],
                       cwd=self.workdir, env={k: v for k, v in self.env.items() if k != "PREFECT_API_URL"},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False)
        if self.httpd:
            self.httpd.shutdown()


def stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # whatever of the group is left
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def error_line(log: Path | None) -> str:
    """The output's last line that reads like an error (else its last line)."""
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()] if log and log.exists() \
        else []
    errors = [x for x in lines if re.search(r"\b(\w*Error|\w*Exception|error:|FAILED|Traceback)\b", x)
              and not x.startswith("Traceback")]
    line = (errors or lines or ["(no output)"])[-1]
    with contextlib.suppress(ValueError, TypeError, KeyError, IndexError):  # a JSON error answer: its message
        line = json.loads(line)["message"].strip().splitlines()[-1]
    return line[:300]


def tail(log: Path, prefix: str, n: int = TAIL_LINES) -> str:
    lines = log.read_text(errors="replace").rstrip().splitlines()[-n:] if log.exists() else ["(no output)"]
    return "\n".join(prefix + line[:300] for line in lines)


# Runs a README snippet as the interactive interpreter does: each top-level expression's value
# printed (repr) and kept as `_`; then $CHECK, an expression about the result, must be true.
REPL = r"""
import ast, os, sys
sys.path.insert(0, "")
src = open(sys.argv[1], encoding="utf-8").read()
ns = {"__name__": "__main__", "__builtins__": __builtins__}
for node in ast.parse(src).body:
    if isinstance(node, ast.Expr):
        value = eval(compile(ast.Expression(node.value), "<readme>", "eval"), ns)
        if value is not None:
            print(repr(value))
            ns["_"] = value
    else:
        exec(compile(ast.Module([node], []), "<readme>", "exec"), ns)
check = os.environ.get("CHECK")
if check:
    if not eval(check, ns):
        sys.exit(f"CHECK FAILED: {check}")
    print(f"CHECK OK: {check}")
"""


# ----------------------------------------------------------------------------- main

def match(commands: list[tuple[int, str, str]]) -> tuple[list[tuple[int, Step]], list[tuple[int, str]]]:
    table = {(python_code(s.readme + "\n") if s.kind == "python" else s.readme): s for s in STEPS if s.readme}
    known, unknown = [], []
    for lineno, _lang, cmd in commands:
        step = table.get(cmd)
        if step is None:
            unknown.append((lineno, cmd))
        else:
            known.append((lineno, step))
    return known, unknown


def make_workdir(keep: bool) -> Path:
    root = Path(tempfile.mkdtemp(prefix="rnnflow-journeys-"))
    work = root / "main"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file() or src.is_symlink():
            dst = work / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst, follow_symlinks=False)  # mtimes kept: make sees the venv up to date
    (work / ".venv").symlink_to(REPO / ".venv")
    for sub in ("mlruns", "checkpoints"):
        (work / sub).mkdir(exist_ok=True)
    shared = REPO.parent / "shared"
    if shared.exists():
        (root / "shared").symlink_to(shared)
    print(f"working copy: {work} (the repository's files as on disk; .venv and ../shared linked)"
          + ("; kept at the end" if keep else "; removed at the end"))
    return work


def interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that every README command is in the table")
    ap.add_argument("--only", default="", help="run only the README commands matching this regular expression "
                                               "(development: later ones may need earlier ones' models)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary working copy and logs")
    ap.add_argument("--workdir", type=Path, default=None, help="reuse this working copy (implies --keep)")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)

    commands = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))
    known, unknown = match(commands)
    if unknown:
        for lineno, cmd in unknown:
            print(f"README.md:{lineno}: a command the journey runner does not know: {cmd!r}")
        print("error: add it (or its substitution) to STEPS in scripts/journeys.py")
        return 1
    stale = [s.label() for s in STEPS if s.readme and s not in [k for _, k in known]]
    for label in stale:
        print(f"note: no longer in README, not run: {label}")
    print(f"README.md: {len(commands)} commands in its code blocks, every one in the table")
    if args.check:
        return 0
    if not (REPO / ".venv" / ".installed-stamp").exists():
        print("error: .venv is not installed: run `make install` first")
        return 1

    keep = args.keep or args.workdir is not None
    if args.workdir:
        workdir = args.workdir.resolve()
        print(f"working copy: {workdir} (reused)")
    else:
        workdir = make_workdir(keep)
    journey = Journey(workdir, keep)
    signal.signal(signal.SIGTERM, interrupted)
    print(f"environment: .venv/bin first on PATH (as if activated), PREFECT_HOME={journey.env['PREFECT_HOME']}, "
          "no MLFLOW_*/PREFECT_* from the caller")
    t0 = time.monotonic()
    try:
        journey.prepare()
        selected = [(n, s) for n, s in known if not args.only or re.search(args.only, s.readme)]
        for i, (lineno, step) in enumerate(selected, 1):
            for k, extra in enumerate(step.before, 1):
                journey.execute(extra, f"{i}.{'abcdefgh'[k - 1]}")
            journey.execute(step, f"{i}/{len(selected)} README.md:{lineno}")
            for k, extra in enumerate(step.after, 1):
                journey.execute(extra, f"{i}.{'stuvwxyz'[k - 1]}")
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the servers")
        return 130
    finally:
        journey.stop_servers()
    total = time.monotonic() - t0
    failures = [r for r in journey.results if r.status == "FAIL"]
    print("\n" + "=" * 100 + "\nseconds  result  command")
    for r in journey.results:
        print(f"{r.seconds:7.1f}  {r.status:6}  {(r.step.label() if r.step.kind == 'python' else r.ran)[:150]}")
    print(f"{total:7.1f}  total ({total / 60:.1f} min): {len(journey.results) - len(failures)} ok or skipped, "
          f"{len(failures)} failed")
    for r in failures:
        print(f"\nFAILED: {r.step.label() if r.step.kind == 'python' else r.ran}\n  exit status: {r.rc}\n"
              f"  {r.detail}\n  error: {error_line(r.log)}\n  log: {r.log}")
    if not keep:
        shutil.rmtree(workdir.parent, ignore_errors=True)
    else:
        print(f"\nkept: {workdir.parent} (logs in {journey.logs})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

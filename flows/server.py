"""The Prefect API that command-line runs talk to.

With ``PREFECT_API_URL`` set, that server (it must answer). Without it, one local server shared
by every run on this machine: the first run starts ``prefect server start`` in the background
(as ``make server``, UI included, on ``PREFECT_SERVER_API_HOST``/``_PORT``, default
127.0.0.1:4200) under a file lock, and later runs reuse it. Prefect's own default, a temporary
server per process, costs each run seconds and fails under load past its start-up limit
(docs/BENCHMARKS.md, "Everyday runs"); the shared one survives Ctrl-C of the run that started it.

    python -m flows.server status|start|stop
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    get_current_settings,
    temporary_settings,
)

from flows.parsing import Parser, command_line

START_SECONDS = float(os.environ.get("RNNFLOW_PREFECT_START_SECONDS", "180"))
# How often a flow run tells the server it is alive (Prefect's minimum; its default is 180 s), from
# the command line too: `flows.deploy`'s zombie automation crashes a flow run silent for three beats.
HEARTBEAT_SECONDS = 30
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


class PrefectUnavailable(ConnectionError):
    """No Prefect API can be reached or started: a user's setting or machine, not a bug."""


def local_url() -> str:
    api = get_current_settings().server.api
    return f"http://{api.host}:{api.port}/api"


def _home() -> Path:
    home = Path(get_current_settings().home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def answers(url: str, timeout: float = 5.0) -> bool:
    try:
        return httpx.get(url.rstrip("/") + "/health", timeout=timeout, follow_redirects=True).status_code == 200
    except httpx.HTTPError:
        return False


def ensure_server(meanwhile: Callable[[], object] | None = None) -> tuple[str, bool]:
    """The API URL to use, and whether this call started the server (running ``meanwhile``
    while it boots). Raises ``PrefectUnavailable`` with what to do when none answers."""
    url = PREFECT_API_URL.value()
    if url:
        if not answers(url):
            raise PrefectUnavailable(f"PREFECT_API_URL {url}: the Prefect server does not answer; start it "
                                     f"(make server) or unset PREFECT_API_URL to use a local one")
        return url, False
    url = local_url()
    if answers(url):
        return url, False
    home = _home()
    with open(home / "rnnflow-server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one run starts it; the others wait here, then find it up
        if answers(url):
            return url, False
        _start(url, home, meanwhile)
    return url, True


def _start(url: str, home: Path, meanwhile: Callable[[], object] | None) -> None:
    api = get_current_settings().server.api
    log = home / "rnnflow-server.log"
    with open(log, "ab") as out:
        # a session of its own: Ctrl-C in the terminal of the run that started it does not stop it
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", str(api.host),
                                 "--port", str(api.port)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    (home / "rnnflow-server.pid").write_text(str(proc.pid))
    if meanwhile is not None:
        meanwhile()  # the server takes seconds to answer: the run's own start-up goes on beside it
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if answers(url, timeout=2.0):
            return
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise PrefectUnavailable(f"the local Prefect server at {url} did not start (exit {proc.returncode}: "
                                     f"{tail[0][:200]}); see {log}, or set PREFECT_API_URL to a running server")
        time.sleep(0.25)
    raise PrefectUnavailable(f"the local Prefect server at {url} did not answer within {START_SECONDS:.0f} s; see "
                             f"{log}, raise RNNFLOW_PREFECT_START_SECONDS, or set PREFECT_API_URL")


@contextlib.contextmanager
def prefect_api(meanwhile: Callable[[], object] | None = None) -> Iterator[str]:
    """Run the body against the shared (or configured) server, its flow runs beating every
    ``HEARTBEAT_SECONDS`` unless $PREFECT_FLOWS_HEARTBEAT_FREQUENCY says otherwise; the environment
    carries both to child processes. ``meanwhile`` runs while a server this call starts boots."""
    url, started = ensure_server(meanwhile)
    if started:
        print(f"started a local Prefect server at {url.removesuffix('/api')} (its UI); it stays up for later "
              f"runs: `{command_line('flows.server')} stop` stops it", file=sys.stderr)
    env, updates = {"PREFECT_API_URL": url}, {PREFECT_API_URL: url}
    if HEARTBEAT_ENV not in os.environ:
        env[HEARTBEAT_ENV], updates[PREFECT_FLOWS_HEARTBEAT_FREQUENCY] = str(HEARTBEAT_SECONDS), HEARTBEAT_SECONDS
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with temporary_settings(updates=updates):
            yield url
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stop() -> bool:
    """Stop the local server this module started; False if none was running."""
    pid_file = _home() / "rnnflow-server.pid"
    try:
        pid = int(pid_file.read_text())
        if b"prefect" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            raise ProcessLookupError(pid)  # gone, and its pid taken by another process
        os.killpg(pid, signal.SIGTERM)  # the server and the services it spawned
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return False
    with contextlib.suppress(psutil.Error):  # gone, or still going after 10 s
        psutil.Process(pid).wait(timeout=10)
    pid_file.unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m flows.server", description=__doc__.split("\n")[0])
    ap.add_argument("command", nargs="?", default="status", choices=("status", "start", "stop"),
                    help="status: whether it answers (exit 1 if not); start: start it in the background unless "
                         "up; stop: stop the one rnnflow started (default: status)")
    cmd = ap.parse_args(argv).command
    if cmd == "start":
        try:
            url, started = ensure_server()
        except PrefectUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{'started' if started else 'already up'}: {url}")
    elif cmd == "stop":
        print("stopped" if stop() else "no local server started by rnnflow is running")
    else:
        url = PREFECT_API_URL.value() or local_url()
        up = answers(url)
        print(f"{url}: {'up' if up else 'down'}")
        return 0 if up else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

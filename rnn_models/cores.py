"""Trainings in several processes on one machine share its cores instead of fighting for them.

PyTorch gives every process as many threads as the machine has cores, and its OpenMP threads
wait for work by spinning: two runs at once on two cores run four busy threads, each slowing
the other's parallel regions, many times over (docs/BENCHMARKS.md, "Runs at once"). While it
trains, a process holds a claim: a file named after its pid in a folder every process of this
user shares. Every quarter second of training it counts the claims of live processes and uses
its fair share of the cores it may run on, never more threads than it had when it began (a
sweep trial's one thread stays one): alone, every core; two at once, half each; when the other
finishes, every core again. ``RNNFLOW_SHARE_CORES=0`` turns it off (PyTorch's own threads, as
before).
"""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import torch

CHECK_SECONDS = 0.25


def claims_folder() -> Path:
    return Path(os.environ.get("RNNFLOW_CORES_DIR") or Path(tempfile.gettempdir()) / f"rnnflow-cores-{os.getuid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def live_claims(folder: Path) -> int:
    """Processes training now (their claim files), removing the claims of processes that died."""
    n = 0
    for f in folder.glob("*.pid"):
        pid = int(f.stem) if f.stem.isdigit() else -1
        if pid == os.getpid() or (pid > 0 and _alive(pid)):
            n += 1
        else:
            with contextlib.suppress(OSError):
                f.unlink()
    return n


def cpu_flags() -> str:
    """This CPU's instruction-set flags as /proc/cpuinfo lists them (x86 ``flags``, Arm
    ``Features``), or its processor name where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), platform.machine())


def cores_here() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class CoreShare:
    """This process's claim while it trains (from any number of its threads at once)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.users = 0
        self.file: Path | None = None

    @contextlib.contextmanager
    def claim(self):
        """While training in this thread: the process holds a claim and the thread uses its share."""
        asked = torch.get_num_threads()
        with self.lock:
            if self.users == 0:
                self.file = self._write_claim()
            self.users += 1
        local.asked, local.next_check = asked, 0.0
        try:
            self.rebalance()
            yield
        finally:
            torch.set_num_threads(asked)
            local.asked = None
            with self.lock:
                self.users -= 1
                if self.users == 0 and self.file is not None:
                    with contextlib.suppress(OSError):
                        self.file.unlink()
                    self.file = None

    def _write_claim(self) -> Path | None:
        if os.environ.get("RNNFLOW_SHARE_CORES", "1").strip() == "0":  # every core, whatever else runs
            return None
        try:
            folder = claims_folder()
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{os.getpid()}.pid"
            path.touch()
            return path
        except OSError:  # no shared folder to write to: train as before, on every core
            return None

    def rebalance(self) -> None:
        """Between two steps: every ``CHECK_SECONDS``, this thread's threads set to its share."""
        asked = getattr(local, "asked", None)
        now = time.monotonic()
        if asked is None or self.file is None or now < local.next_check:
            return
        local.next_check = now + CHECK_SECONDS
        share = max(1, min(asked, cores_here() // max(1, live_claims(self.file.parent))))
        if share != torch.get_num_threads():
            torch.set_num_threads(share)


local = threading.local()  # per training thread: its threads when it began, when it looks again
SHARE = CoreShare()

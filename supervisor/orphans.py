"""Nothing left behind: the run record, the state-dir lock, subreaping and ending leftovers.

psutil is imported where it is used: an arbiter spawns its workers before it needs it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psutil

log = logging.getLogger("fleetd.orphans")

PR_SET_CHILD_SUBREAPER = 36
LEFTOVER_GRACE = 5.0  # seconds between TERM and KILL for processes of a previous run


class AlreadyRunning(Exception):
    """Another arbiter holds the state dir."""


def become_subreaper() -> None:
    """Orphaned descendants (a task's subprocess, a killed worker's children) come to us."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("could not become a child subreaper (errno %d)", ctypes.get_errno())


def lock_state_dir(state_dir: str) -> int:
    """Hold `{state_dir}/fleetd.lock` for the arbiter's lifetime; AlreadyRunning if taken."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, "fleetd.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(
            f"another fleetd (pid {holder}) already runs on state_dir {state_dir}"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def process_record(pid: int) -> dict[str, Any] | None:
    """`{"pid", "create_time"}`: enough to recognise this very process later."""
    import psutil

    try:
        return {"pid": pid, "create_time": psutil.Process(pid).create_time()}
    except psutil.Error:
        return None


class RunRecord:
    """`{state_dir}/run.json`: every process this run started, written whenever that changes."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "run.json")
        self.last: str = ""

    def write(self, record: dict[str, Any]) -> None:
        text = json.dumps(record, sort_keys=True)
        if text == self.last:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)
        self.last = text

    def read(self) -> dict[str, Any]:
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}


def _matches(proc: psutil.Process, record: dict[str, Any]) -> bool:
    import psutil

    with contextlib.suppress(psutil.Error, KeyError, TypeError):
        return abs(proc.create_time() - float(record["create_time"])) < 0.05
    return False


def find_leftovers(previous: dict[str, Any]) -> list[psutil.Process]:
    """Processes of a previous run still alive: recorded ones, and members of recorded
    children's process groups (a task's subprocesses), never a process that merely reused a pid."""
    import psutil

    recorded = [r for r in previous.get("processes", []) if isinstance(r, dict)]
    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    for record in recorded:
        with contextlib.suppress(psutil.Error, KeyError, TypeError, ValueError):
            proc = psutil.Process(int(record["pid"]))
            if proc.pid != me and _matches(proc, record):
                found[proc.pid] = proc
    groups = {int(r["pid"]): float(r["create_time"]) for r in recorded if r.get("group")}
    if groups:
        for proc in psutil.process_iter(["pid", "create_time"]):
            with contextlib.suppress(psutil.Error, OSError):
                pgid = os.getpgid(proc.pid)
                born = groups.get(pgid)
                if born is not None and proc.pid != me and proc.info["create_time"] >= born - 0.05:
                    found[proc.pid] = proc
    return list(found.values())


def kill_groups(leaders: list[dict[str, Any]]) -> int:
    """SIGKILL whatever lives on in the process groups these records led (a killed worker's
    children, and the subprocesses their tasks started); returns how many. A group whose
    pid now belongs to another process is left alone."""
    import psutil

    groups: dict[int, float] = {}
    for record in leaders:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            groups[int(record["pid"])] = float(record["create_time"])
    for pgid, born in list(groups.items()):
        with contextlib.suppress(psutil.Error):
            if not _matches(psutil.Process(pgid), {"create_time": born}):
                del groups[pgid]  # the pid was reused: no longer our group
    killed = 0
    for proc in psutil.process_iter(["create_time"]) if groups else ():
        with contextlib.suppress(psutil.Error, OSError):
            leader_born = groups.get(os.getpgid(proc.pid))
            if leader_born is not None and proc.info["create_time"] >= leader_born - 0.05:
                proc.kill()
                killed += 1
    return killed


def end_leftovers(previous: dict[str, Any], grace: float = LEFTOVER_GRACE) -> int:
    """TERM what a previous run left alive, KILL it after `grace`; returns how many there were."""
    import psutil

    leftovers = find_leftovers(previous)
    if not leftovers:
        return 0
    log.warning(
        "ending %d processes left by a previous run: %s",
        len(leftovers),
        ", ".join(str(p.pid) for p in leftovers),
    )
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(leftovers, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=2)
    return len(leftovers)


def reap_all() -> list[tuple[int, int]]:
    """Collect every ended child (ours or re-parented to us): [(pid, wait status)]."""
    ended: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return ended
        if pid == 0:
            return ended
        ended.append((pid, status))

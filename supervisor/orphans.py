"""Nothing left behind: the run record, the state-dir lock, subreaping and ending leftovers.

Processes are recognised by pid and start time, read from /proc as psutil reads them (the
same seconds since the epoch as `psutil.Process.create_time()`), so the arbiter never
carries psutil's memory for this bookkeeping.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import time
from typing import Any

from worker import tree
from worker.files import create_new, file_identity, read_regular
from worker.tree import all_pids, boot_time, create_time, end_adopted, proc_stat, started_at
from worker.tree import children as children  # the arbiter reads its workers' pools with it

log = logging.getLogger("fleetd.orphans")

LEFTOVER_GRACE = 5.0  # seconds between TERM and KILL for processes of a previous run
SAME_START = 0.05  # seconds: two start times this close are the same process
MAX_RUN_RECORD = 16 << 20  # bytes of run.json read at most: a record of every process is far less
STRAYS_WAIT = 2.0  # seconds an exiting arbiter waits for the processes it KILLed to be reaped
# In the environment of every process a run starts, inherited by whatever its tasks start:
# the next start ends the processes that carry the mark of the run before it.
RUN_MARK = "FLEETD_RUN"


class AlreadyRunning(Exception):
    """Another arbiter holds the state dir."""


def become_subreaper() -> None:
    """Orphaned descendants (a task's subprocess, a killed worker's children) come to us."""
    if not tree.become_subreaper():
        log.warning("could not become a child subreaper: orphans of the fleet go to init")


def lock_state_dir(state_dir: str) -> int:
    """Hold `{state_dir}/fleetd.lock` for the arbiter's lifetime; AlreadyRunning if taken."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, "fleetd.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(
            f"another fleetd (pid {holder}) already runs on state_dir {state_dir}"
        ) from None
    with contextlib.suppress(OSError):  # a full disk: the lock holds without the pid in it
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    return fd


def lock_is_held(fd: int, state_dir: str) -> bool:
    """Whether `{state_dir}/fleetd.lock` is still the file that `fd` (lock_state_dir's)
    locks: a /tmp cleaner or an rm -rf may have removed it, or the whole folder."""
    try:
        found = file_identity(os.path.join(state_dir, "fleetd.lock"))
    except OSError:
        return False
    return found is not None and found == file_identity(fd)


def someone_holds_lock(state_dir: str) -> bool:
    """Whether an arbiter runs on `state_dir` now: its `fleetd.lock` is locked. (A pidfile
    alone may name the pid of another fleet's arbiter, which reused a dead one's.)"""
    try:
        fd = os.open(
            os.path.join(state_dir, "fleetd.lock"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # and with it the shared lock, if we took it
    return False


def keep_lock(fd: int, state_dir: str) -> int:
    """The descriptor that locks `{state_dir}/fleetd.lock` now: `fd`, or a new lock if the
    file (or the folder) was removed from under us, without which a second `fleetd start`
    would run a second fleet on the folder. AlreadyRunning if another took it meanwhile."""
    if lock_is_held(fd, state_dir):
        return fd
    new = lock_state_dir(state_dir)
    os.close(fd)
    log.warning("%s was removed: locked again", os.path.join(state_dir, "fleetd.lock"))
    return new


def alive(pid: int, born: float) -> bool:
    """Whether the process that started at `born` still runs as `pid` (not a zombie)."""
    started = create_time(pid)
    return started is not None and abs(started - born) < SAME_START


def process_record(pid: int) -> dict[str, Any] | None:
    """`{"pid", "create_time"}`: enough to recognise this very process later."""
    started = create_time(pid)
    return None if started is None else {"pid": pid, "create_time": started}


class StateFile:
    """One of the arbiter's own files, replaced whole by each write. A write that fails (a full
    disk, an I/O error) is logged once and never raised: the arbiter serves on, and its next
    write, a second later at the most, tries again."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.failing = False

    def write(self, text: str) -> bool:
        """Whether `text` is in the file now."""
        tmp = self.path + ".tmp"
        try:
            with open(create_new(tmp), "w") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(tmp)  # what it holds goes back to a full disk
            if self.failing:
                log.debug("still cannot write %s: %s", self.path, exc.strerror or exc)
            else:
                log.warning(
                    "cannot write %s: %s; it is out of date until a try succeeds (every second)",
                    self.path,
                    exc.strerror or exc,
                )
            self.failing = True
            return False
        if self.failing:
            log.info("%s written again", self.path)
            self.failing = False
        return True


class RunRecord:
    """`{state_dir}/run.json`: every process this run started, written whenever that changes."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "run.json")
        self.file = StateFile(self.path)
        self.last: str = ""

    def write(self, record: dict[str, Any]) -> None:
        """Write `record` if it changed or its file was removed; a failed write is tried
        again by the next call."""
        text = json.dumps(record, sort_keys=True)
        if (text != self.last or not os.path.lexists(self.path)) and self.file.write(text):
            self.last = text

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(read_regular(self.path, MAX_RUN_RECORD))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError, RecursionError):  # a torn or foreign file: none
            return {}


def find_leftovers(previous: dict[str, Any]) -> list[tuple[int, float]]:
    """Processes of a previous run still alive, as (pid, start time): recorded ones, members
    of recorded children's process groups (a task's subprocesses), every process that
    carries the run's mark (what a task started in another session), and what those started
    below them; never a process that merely reused a pid."""
    processes = previous.get("processes")
    recorded = [r for r in processes if isinstance(r, dict)] if isinstance(processes, list) else []
    run = previous.get("run")
    if not recorded and not (isinstance(run, str) and run):
        return []  # no previous run: no look at /proc
    me = os.getpid()
    found: dict[int, float] = {}
    groups: dict[int, float] = {}
    for record in recorded:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            pid, born = int(record["pid"]), float(record["create_time"])
            if born < boot_time() - SAME_START:
                continue  # of a boot before this one: gone, and its group id anybody's now
            started = create_time(pid)
            # A group whose pid another process leads now (pid reuse, after a reboot say)
            # is no longer ours: its members are that process's, never to be ended.
            if record.get("group") and (started is None or abs(started - born) < SAME_START):
                groups[pid] = born
            if pid != me and alive(pid, born):
                found[pid] = born
    live = _live_processes()
    found.update(_group_members(groups, live))
    if isinstance(run, str) and run:
        found.update(_marked(run, live))
    found.update(_descendants(found, live))
    return list(found.items())


def _live_processes() -> dict[int, list[bytes]]:
    """{pid: the fields of its /proc stat} of every live process but ours: one look at /proc
    for all that find_leftovers asks of it."""
    me = os.getpid()
    return {pid: fields for pid in all_pids() if pid != me and (fields := proc_stat(pid))}


def _descendants(roots: dict[int, float], live: dict[int, list[bytes]]) -> dict[int, float]:
    """{pid: start time} of every live process below these, by parent pid, each started no
    earlier than its parent: what a task started in a session and an environment of its
    own (no mark) while the child that started it lives on, to be ended with that child
    rather than orphaned by its end."""
    below: dict[int, list[tuple[int, float]]] = {}
    for pid, fields in live.items():
        below.setdefault(int(fields[1]), []).append((pid, started_at(fields)))
    found: dict[int, float] = {}
    todo = list(roots.items())
    while todo:
        parent, born = todo.pop()
        for pid, started in below.get(parent, ()):
            if pid not in roots and pid not in found and started >= born - SAME_START:
                found[pid] = started
                todo.append((pid, started))
    return found


def _marked(run: str, live: dict[int, list[bytes]]) -> dict[int, float]:
    """{pid: start time} of every live process whose environment carries `run`'s mark (those
    of another user are not readable, and not ours)."""
    mark = f"{RUN_MARK}={run}".encode()
    found: dict[int, float] = {}
    for pid, fields in live.items():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark in f.read().split(b"\0"):
                    found[pid] = started_at(fields)
        except OSError:
            continue
    return found


def _group_members(groups: dict[int, float], live: dict[int, list[bytes]]) -> dict[int, float]:
    """{pid: start time} of every process in these groups {pgid: leader's start time} that
    started after its leader did (an older one is in a reused group id, not ours)."""
    members: dict[int, float] = {}
    for pid, fields in live.items() if groups else ():
        leader_born = groups.get(int(fields[2]))
        started = started_at(fields)
        if leader_born is not None and started >= leader_born - SAME_START:
            members[pid] = started
    return members


def kill_groups(leaders: list[dict[str, Any]]) -> int:
    """SIGKILL whatever lives on in the process groups these records led (a killed worker's
    children, and the subprocesses their tasks started); returns how many. A group whose
    pid now belongs to another process is left alone."""
    groups: dict[int, float] = {}
    for record in leaders:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            pgid, born = int(record["pid"]), float(record["create_time"])
            started = create_time(pgid)
            if started is None or abs(started - born) < SAME_START:
                groups[pgid] = born  # else the pid was reused: no longer our group
    killed = 0
    for pid in _group_members(groups, _live_processes() if groups else {}):
        # PermissionError: another user's now (run under sudo, or the pid reused meanwhile)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def end_leftovers(previous: dict[str, Any], grace: float = LEFTOVER_GRACE) -> int:
    """TERM what a previous run left alive, KILL it after `grace`; returns how many there were."""
    leftovers = find_leftovers(previous)
    found = len(leftovers)
    if not found:
        return 0
    log.warning(
        "ending %d processes left by a previous run: %s",
        found,
        ", ".join(str(pid) for pid, _ in leftovers),
    )
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        for pid, born in leftovers[:]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
            except PermissionError:  # another user's now (run under sudo, or the pid reused)
                log.warning("cannot end process %d left by a previous run: not permitted", pid)
                leftovers.remove((pid, born))
        deadline = time.monotonic() + wait
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.01)
            leftovers = [(pid, born) for pid, born in leftovers if alive(pid, born)]
    return found


def end_strays(workers: set[int]) -> None:
    """End every process that came to us as their subreaper and is not one of `workers`: a
    dead worker's children and whatever their tasks started, in any group or session."""
    ended = end_adopted(workers)
    if ended:
        log.info("ended %d processes that a dead worker left behind", ended)


def end_strays_and_wait(workers: set[int]) -> None:
    """At exit: end whatever came to us and is not one of `workers` (none are left after a
    stop), and reap it, so that nothing the fleet started outlives us; STRAYS_WAIT at most."""
    deadline = time.monotonic() + STRAYS_WAIT
    while True:
        reap_all()
        end_adopted(workers)
        if set(children(os.getpid())) <= workers or time.monotonic() >= deadline:
            return
        time.sleep(0.01)


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

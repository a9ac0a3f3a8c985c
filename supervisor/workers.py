"""What the arbiter knows of one worker process: its record, the outbox of its channel,
its children, and how it ended."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from worker.imports import SAFE_PATH
from worker.protocol import FrameReader
from worker.tree import BOOT_BLOCKED

from . import orphans
from .config import WorkerSpec
from .states import STARTING, STOPPED, State

CAP_SYS_NICE = 23  # capabilities(7)
UNCATCHABLE = (signal.SIGKILL, signal.SIGSTOP)
# Bytes of frames a worker may leave unread behind the one it is taking: past that it does not
# read (hung, stopped), and commands for it are answered with an error instead of queued.
OUTBOX_LIMIT = 512 * 1024


class Outbox:
    """The frames on their way to one worker, written as fast as its socket takes them: a
    worker that stops reading never blocks the arbiter (DESIGN section 8)."""

    def __init__(self) -> None:
        self.frames: deque[memoryview] = deque()
        self.behind = 0  # bytes of the frames after the first

    def __bool__(self) -> bool:
        return bool(self.frames)

    def full(self) -> bool:
        return self.behind > OUTBOX_LIMIT

    def push(self, frame: bytes) -> None:
        if self.frames:
            self.behind += len(frame)
        self.frames.append(memoryview(frame))

    def flush(self, sock: socket.socket) -> None:
        """Write what the socket takes now; OSError if the channel broke."""
        while self.frames:
            try:
                sent = sock.send(self.frames[0], socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except BlockingIOError:
                return
            if sent < len(self.frames[0]):
                self.frames[0] = self.frames[0][sent:]
                return
            self.frames.popleft()
            if self.frames:
                self.behind -= len(self.frames[0])


@dataclass
class WorkerProc:
    """One supervised worker process (one generation of one `[[worker]]`)."""

    spec: WorkerSpec
    generation: int
    pid: int = 0
    sock: socket.socket | None = None
    reader: FrameReader = field(default_factory=FrameReader)
    outbox: Outbox = field(default_factory=Outbox)
    state: State = STOPPED  # changed by Arbiter.change_state only
    owner: str = ""
    started_at: float = 0.0  # monotonic
    ready_at: float | None = None  # monotonic: when it said "ready" (None: not since its spawn)
    exit_cause: str = ""  # why it is ending, when known before its exit: its report, our kill
    fast_deaths: int = 0  # failed starts in a row (states.failed_start)
    failure: str = ""  # why it last ended without being asked to: shown while it is down
    backoff_until: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    retire_when_ready: list[WorkerProc] = field(default_factory=list)  # old generation to stop
    record: dict[str, Any] | None = None  # pid and start time, taken at spawn
    children: dict[int, dict[str, Any]] = field(default_factory=dict)  # its pool, as it reports it
    # Dead consumers whose tasks it was told to give back and has not said it gave back: if
    # it dies (or is killed, stopped) first, another worker is told, not the lease left to.
    recovering: list[str] = field(default_factory=list)
    ended: set[int] = field(default_factory=set)  # children seen gone at the last refresh
    commands: frozenset[str] = frozenset()  # the control commands it runs, custom ones included
    heard_at: float = 0.0  # monotonic: the last time it wrote to us (stats come every second)

    @property
    def node(self) -> str:
        return self.spec.node


def refresh_children(w: WorkerProc) -> None:
    """Once a second, against the worker's reports: add the children /proc shows (a report
    still on its way), drop those gone since the last refresh or before (their worker has
    ended their groups by then; until it does, a kill of the worker still ends them)."""
    if not w.pid or orphans.create_time(w.pid) is None:  # a zombie: its children left it
        return
    for pid in orphans.children(w.pid):
        if pid not in w.children and (record := orphans.process_record(pid)) is not None:
            w.children[pid] = {**record, "group": True}
    gone = {pid for pid, r in w.children.items() if not orphans.alive(pid, r["create_time"])}
    for pid in gone & w.ended:
        del w.children[pid]
    w.ended = gone - w.ended


def may_leave_idle_priority() -> bool:
    """Whether a process we spawn (it has our credentials and limits), once put at idle CPU
    priority, may return to ours: that takes CAP_SYS_NICE, or an RLIMIT_NICE that reaches
    our nice value (systemd: LimitNICE=), as lowering a nice value does (sched(7))."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    if soft == resource.RLIM_INFINITY or soft >= 20 - os.getpriority(os.PRIO_PROCESS, 0):
        return True
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status") as f:
        effective = next(line for line in f if line.startswith("CapEff:")).split()[1]
        return bool(int(effective, 16) >> CAP_SYS_NICE & 1)
    return False


def cpu_wait(pid: int) -> float:
    """Seconds a process has spent runnable but waiting for a CPU (/proc/PID/schedstat);
    0 if the kernel does not say."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def exit_reason(w: WorkerProc, code: int) -> str:
    """Why a worker that was not asked to leave ended, in words: what it said or what we did
    to it, else how it exited."""
    how = describe_exit(code)
    if w.exit_cause:
        return f"{w.exit_cause} ({how})"
    if code == -signal.SIGKILL:
        how += ", not by fleetd: out of memory?"
    return f"exited before it was ready ({how})" if w.state == STARTING else f"died ({how})"


def launch(spec: WorkerSpec, env: dict[str, str], polite: int | None) -> tuple[int, socket.socket]:
    """Start `python -m worker` for `spec`, with `env` over ours and one end of a new
    socketpair; its pid and our end. `polite`: it boots at idle CPU priority and returns
    to this scheduling policy once booted. OSError (EMFILE, EAGAIN, ENOMEM), nothing left
    open, if it cannot start."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.set_inheritable(True)
    full = {**os.environ, **env, "FLEETD_WORKER_FD": str(theirs.fileno())}
    full.pop("NOTIFY_SOCKET", None)  # only the arbiter speaks to systemd
    full.pop("FLEETD_SCHED_POLICY", None)
    if polite is not None:
        full["FLEETD_SCHED_POLICY"] = str(polite)
    try:
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, *SAFE_PATH, "-m", "worker", spec.node],
            full,
            setsigdef=[
                s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)
            ],
            setsigmask=set(BOOT_BLOCKED),  # until its handlers are in place
        )
    except OSError:
        ours.close()
        raise
    finally:
        theirs.close()
    if polite is not None:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    return pid, ours


def end_spawned(workers: list[WorkerProc], grace: float) -> None:
    """The control plane could not start: stop the workers spawned meanwhile (TERM), KILLing
    those still there after `grace` seconds, before the error ends the arbiter."""
    spawned = [w.pid for w in workers if w.pid]  # 0: its spawn failed (and kill(0) is our group)
    for pid in spawned:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for pid in spawned:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)


def hung(w: WorkerProc, now: float) -> str | None:
    """Why `w` is to be killed as hung, if it is: silent for its worker_timeout (it reports
    every second: it is stopped, deadlocked, or stuck in a call), or booting that long."""
    timeout = w.spec.worker_timeout
    if not w.pid or not timeout or w.exit_cause:
        return None
    booting = w.state == STARTING
    silent = now - (w.started_at if booting else w.heard_at)
    if booting and silent >= timeout:
        # A boot that waited for a CPU is slow, not hung: a reload's boots run at idle
        # priority, behind every task that keeps the CPUs busy.
        silent -= cpu_wait(w.pid)
    if silent < timeout:
        return None
    if booting:
        return f"did not boot within worker_timeout ({timeout:g}s)"
    return f"silent for {silent:.1f}s, past worker_timeout ({timeout:g}s)"


def by_node(workers: list[WorkerProc]) -> dict[str, list[WorkerProc]]:
    """The workers of each node: one, or two generations during a reload (or after a failed
    one), oldest first."""
    nodes: dict[str, list[WorkerProc]] = {}
    for w in workers:
        nodes.setdefault(w.node, []).append(w)
    return nodes

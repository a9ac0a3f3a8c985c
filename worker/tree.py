"""Ending every process a task started: a process's whole tree, wherever its groups went.

Process groups alone miss what left them (`Popen(start_new_session=True)`, `setsid`, a
daemon's double fork). Children and workers are child subreapers, so such a process stays
a descendant of the child that started it, or comes to the worker (or the arbiter) when
that child dies; these functions walk the tree in /proc and end it. They cost a /proc walk,
so they run only when something is killed or leaves, never per task.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import struct
from _signal import getsignal as raw_getsignal  # signal's, without the enum it wraps around
from _signal import signal as raw_signal
from functools import cache
from typing import Any

PR_SET_PDEATHSIG = 1  # prctl(2)
PR_SET_CHILD_SUBREAPER = 36

# Looked up once, in the worker: every forked child then shares it instead of building
# its own ctypes library object.
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
SIGINFO_SIZE = 128  # struct signalfd_siginfo: ssi_signo, ssi_errno, ssi_code, ssi_pid, ...


def set_parent_death_signal(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent exits (Linux)."""
    _prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def open_signal_fd(signums: tuple[int, ...]) -> int:
    """Block `signums` and return a descriptor that reads them with who sent each
    (signalfd(2), Linux): what a handler never learns. Non-blocking, closed on exec."""
    mask = (ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong))))()  # a sigset_t
    bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    for sig in signums:
        mask[(sig - 1) // bits] |= 1 << ((sig - 1) % bits)
    fd = _libc.signalfd(-1, mask, os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"signalfd: {os.strerror(errno)}")
    signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    return int(fd)


def read_signal_fd(fd: int) -> list[tuple[int, int]]:
    """The signals waiting on a descriptor of open_signal_fd: (signal, sender pid) each; the
    pid is 0 for one the kernel sent (a terminal's Ctrl-\\)."""
    received: list[tuple[int, int]] = []
    while True:
        try:
            data = os.read(fd, SIGINFO_SIZE * 16)
        except (BlockingIOError, InterruptedError):
            return received
        if not data:  # not what a signalfd does; but never a loop on it
            return received
        for at in range(0, len(data) - SIGINFO_SIZE + 1, SIGINFO_SIZE):
            signo, _errno, _code, pid = struct.unpack_from("=IiiI", data, at)
            received.append((signo, pid))


# Signals the arbiter and a worker read with their sender (SenderChecked), not through a
# handler: a QUIT that a task's own process sends is ignored. Taken for a cold stop, it gave
# the task back without a delivery strike, and the restarted worker (or fleet) ran it again,
# stopped again, ... until the arbiter left the worker down (FATAL).
SENDER_CHECKED = (signal.SIGQUIT,)


class SenderChecked:
    """The SENDER_CHECKED signals of this process, read with who sent each (open_signal_fd):
    `read` sets apart those sent from below `ancestor` (a task's process). `fd` is -1, and
    `problem` says why, where signalfd is refused (a seccomp filter, a libc without it): the
    signals then stay with their handlers, as before."""

    def __init__(self, ancestor: int) -> None:
        self.ancestor = ancestor
        self.problem: str | None = None
        try:
            self.fd = open_signal_fd(SENDER_CHECKED)
        except (OSError, AttributeError) as exc:
            self.fd, self.problem = -1, str(exc)

    def read(self) -> tuple[list[int], list[tuple[int, int]]]:
        """The signals to act on, and the (signal, sender pid) of those a task sent."""
        act: list[int] = []
        from_below: list[tuple[int, int]] = []
        for signum, sender in read_signal_fd(self.fd):
            if sender and descends_from(sender, self.ancestor):
                from_below.append((signum, sender))
            else:
                act.append(signum)
        return act, from_below


MAX_DEPTH = 64  # of a chain of parents that descends_from follows


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether process `pid` runs below `ancestor`: its chain of parents in /proc reaches it.
    False for a process already gone."""
    for _ in range(MAX_DEPTH):
        parent = _parent(pid) if pid > 1 else None
        if parent is None:
            return False
        if parent == ancestor:
            return True
        pid = parent
    return False


def set_dispositions(wanted: dict[int, Any]) -> list[int]:
    """Give each signal of `wanted` its disposition there again where code not ours (a
    task, a task module, a custom command) changed it; the signals it had changed. Compared
    with `!=`, not `is`: getsignal gives SIG_IGN and SIG_DFL back as ints, not the enums set.
    A pool child calls it after every task: when nothing changed it costs no syscall. Set
    through _signal, which takes SIG_IGN and SIG_DFL as plain ints only: signal.signal wraps
    the handler it replaces in an enum, a raised and caught ValueError for each Python
    handler: 180 us of a freshly forked child's first call, 50 through _signal."""
    changed = [sig for sig, handler in wanted.items() if raw_getsignal(sig) != handler]
    for sig in changed:
        handler = wanted[sig]
        raw_signal(sig, handler if callable(handler) else int(handler))
    return changed


# Signals that mean nothing to the arbiter or a worker but whose default action ends the
# process: a stray `kill -USR2` (gunicorn's upgrade, supervisord's log reopening), a timer,
# a file-size limit. Both log them and go on; a child keeps the defaults, as a task's own
# code (`signal.alarm`) expects.
STRAY_SIGNALS = (
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGIO,
    signal.SIGPWR,
    signal.SIGXFSZ,
)


# Signals the arbiter relays to its workers (and stray ones): a worker starts with them
# blocked, so that one sent while it boots waits for its handlers (worker/process.py
# unblocks them) instead of ending it (USR1) or stopping it (TTIN, TTOU). And SIGPIPE,
# which its interpreter ignores once it runs, but which would end it before that.
BOOT_BLOCKED = (
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGPIPE,
    *STRAY_SIGNALS,
)


def become_subreaper() -> bool:
    """Have orphaned descendants (a daemon's double fork, a dead child's subprocesses) become
    this process's children, not init's (Linux); False if the kernel refused."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


# Walks of a tree that is being stopped: each one stops every process it finds, so only
# what forked in between is new to the next walk; a tree still growing after this many
# walks (a fork bomb faster than we are) is killed as found.
MAX_WALKS = 50


@cache
def _has_children_files() -> bool:
    """Whether this kernel lists children in /proc/PID/task/TID/children."""
    return os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rfind(b")") + 2 :].split()[1])


def children(pid: int) -> list[int]:
    """The pids of `pid`'s children, those of every one of its threads (an orphan comes to
    whichever thread of its subreaper is alive); [] if `pid` is gone."""
    if not _has_children_files():
        return [other for other in all_pids() if _parent(other) == pid]
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in threads:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
            found += [int(child) for child in f.read().split()]
    return found


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before their children."""
    found: list[int] = []
    below = children(pid)
    while below:
        found += below
        below = [grandchild for child in below for grandchild in children(child)]
    return found


def end_tree(root: int) -> int:
    """SIGKILL `root`, every process below it and the process groups of all of them (a group
    may hold processes that left the tree earlier); returns how many processes were in the
    tree. Each is stopped (SIGSTOP) as it is found, so none forks or moves away between the
    walk and the kill, and the walk is repeated until it finds nothing new."""
    stopped: set[int] = set()
    for _ in range(MAX_WALKS):
        new = [pid for pid in [root, *descendants(root)] if pid not in stopped]
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        stopped.update(new)
    ours = os.getpgrp()
    for pid in stopped:
        try:
            group = os.getpgid(pid)
        except OSError:
            group = ours
        _signal(pid, signal.SIGKILL)
        if group not in (ours, 0, 1):  # never our own group: the worker or arbiter is in it
            with contextlib.suppress(OSError):
                os.killpg(group, signal.SIGKILL)
    return len(stopped)


def end_adopted(keep: set[int]) -> int:
    """End the tree of every child of ours that is not in `keep` (for a worker: its pool
    children; for the arbiter: its workers), i.e. what a dead descendant left to us as its
    subreaper; returns how many processes that ended."""
    return sum(end_tree(pid) for pid in children(os.getpid()) if pid not in keep)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


# --- when a process started (its identity, with its pid) ---------------------------------------
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@cache
def boot_time() -> float:
    """When this host booted, in seconds since the epoch (/proc/stat's btime)."""
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime"):
                return float(line.split()[1])
    raise RuntimeError("no btime line in /proc/stat")


def proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/{pid}/stat after the command name (state, ppid, pgrp, ...); None if
    there is no such process or it is a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    return None if not fields or fields[0] == b"Z" else fields


def is_stopped(pid: int) -> bool:
    """Whether `pid` is stopped (SIGSTOP, SIGTSTP) or held by a tracer (a debugger)."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] in (b"T", b"t")


def started_at(fields: list[bytes]) -> float:
    return int(fields[19]) / CLOCK_TICKS + boot_time()


def create_time(pid: int) -> float | None:
    """When `pid` started, in seconds since the epoch; None if it is gone."""
    fields = proc_stat(pid)
    return None if fields is None else started_at(fields)

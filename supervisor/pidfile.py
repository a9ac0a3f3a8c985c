"""The arbiter's pidfile: written atomically, trusted only for a live fleetd, and `fleetd stop`."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from worker.files import create_new, read_regular

if TYPE_CHECKING:
    import psutil  # imported where used: a first start (no pidfile yet) never needs it

log = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]


class PidfileError(Exception):
    """A pidfile that cannot be written or does not point at a running fleetd (one-line message)."""


class PidfileWriteError(PidfileError):
    """The pidfile is ours to take but could not be written (a full disk, say)."""


def write_pidfile(path: StrPath) -> None:
    """Record our pid in `path`, unless a live fleetd other than us already holds it."""
    path = os.fspath(path)
    try:
        pid = read_live_pid(path)
    except PidfileError:
        pass  # missing, garbage or stale: ours to take
    else:
        if pid != os.getpid():
            raise PidfileError(
                f"fleetd is already running with pid {pid} (pidfile {path}); "
                "stop it first or pass another --pidfile"
            )
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(create_new(tmp), "w") as f:
            f.write(f"{os.getpid()}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise PidfileWriteError(f"cannot write pidfile {path}: {exc.strerror}") from exc


def remove_pidfile(path: StrPath) -> None:
    """Remove `path` if it still holds our pid (a successor may have taken it over)."""
    try:
        if _parse_pid(_read(path)) == os.getpid():
            os.remove(path)
    except (OSError, ValueError) as exc:
        log.debug("pidfile %s left alone: %s", path, exc)


def read_live_pid(path: StrPath) -> int:
    """The pid of the running fleetd arbiter named by `path`; raise PidfileError otherwise."""
    try:
        text = _read(path)
    except FileNotFoundError:
        raise PidfileError(f"no pidfile at {path}: is fleetd running, with this pidfile?") from None
    except OSError as exc:
        raise PidfileError(f"cannot read pidfile {path}: {exc.strerror}") from exc
    try:
        pid = _parse_pid(text)
    except ValueError:
        raise PidfileError(f"pidfile {path} holds {text[:40]!r}, not a pid") from None
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            raise psutil.NoSuchProcess(pid)
        cmdline = proc.cmdline()
    except psutil.NoSuchProcess:
        raise PidfileError(f"stale pidfile {path}: pid {pid} is not running") from None
    except psutil.AccessDenied:
        raise PidfileError(f"pidfile {path}: cannot check pid {pid} (permission denied)") from None
    if not (any("fleetd" in arg for arg in cmdline) and "start" in cmdline):
        raise PidfileError(f"stale pidfile {path}: pid {pid} is {proc.name()}, not fleetd")
    return pid


def stop(pid: int, timeout: float | None = None, quit_after: float = 10.0) -> bool:
    """TERM `pid` (warm shutdown) and wait up to `timeout` seconds (None: as long as it takes);
    then QUIT it (cold shutdown) and wait `quit_after` seconds more (0: send no QUIT).
    Return whether it exited."""
    import psutil

    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)  # a stopped arbiter (Ctrl-Z) takes it, as systemd does
        if _exited(proc, timeout):
            return True
        if not quit_after:
            return False
        log.warning("pid %d still running %ss after TERM, sending QUIT", pid, timeout)
        proc.send_signal(signal.SIGQUIT)
        proc.send_signal(signal.SIGCONT)
        return _exited(proc, quit_after)
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        raise PidfileError(f"cannot signal pid {pid}: permission denied") from None


def _exited(proc: psutil.Process, timeout: float | None) -> bool:
    """Wait for `proc` to end; a zombie has ended (its parent, not us, reaps it)."""
    import psutil

    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
            proc.wait(0.05)
            return True
        except psutil.TimeoutExpired:
            continue
        except psutil.NoSuchProcess:
            return True
    return False


def _parse_pid(text: str) -> int:
    pid = int(text.strip())
    if pid <= 0:
        raise ValueError(f"not a pid: {pid}")
    return pid


def _read(path: StrPath) -> str:
    # os, not pathlib: pathlib brings urllib.parse and fnmatch into the arbiter, about 0.5 MiB
    # of memory for good and 2 ms of its start, for three calls.
    # Bytes that are no text (another program's file) read as a pid that is not one; and no
    # more than a pid could take.
    return read_regular(path, 4096).decode("utf-8", errors="replace")

"""How consumers of the SQLite broker wait for work without polling: each has a FIFO in
the queue file's `-wake` folder, and every writer pokes the FIFOs of the queues it wrote."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
import uuid

from .base import Wakeup

READY_POKE = b"!"  # a write added only tasks ready now; SCHEDULED_POKE: one for later
SCHEDULED_POKE = b"e"
REVOKE_POKE = b"r"  # ids were revoked: the consumers read the revoked set again
CHECK_EVERY = 1.0  # seconds between two looks at whether our pipe is still in the folder

log = logging.getLogger("fleetd.broker")


class FifoWakeup(Wakeup):
    """A named pipe in the wake folder; producers write a byte to every pipe there."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.failing = False  # the pipe could not be made: said once, tried every second
        try:
            self._read_fd, self._keep_fd = self._make()
        # No room for it (a full disk, no inode left), or a file where the folder goes (the
        # operator's to move: a worker that failed its boot on it would go FATAL, its queues
        # with no consumer).
        except OSError as exc:
            # A pipe of our own, which no producer knows: the worker looks at its queues
            # every DRY_RECHECK meanwhile, and `arm` puts the named one in its place.
            self._read_fd, self._keep_fd = os.pipe()
            os.set_blocking(self._read_fd, False)
            self.fail(exc)
        self._check_at = time.monotonic() + CHECK_EVERY
        self._revoked = False  # what the last clear() found

    def fail(self, exc: OSError) -> None:
        if not self.failing:
            self.failing = True
            log.warning(
                "cannot make the wake-up pipe %s (%s): tasks wait up to a second to be seen"
                " until it can be made",
                self.path,
                exc,
            )

    def _make(self) -> tuple[int, int]:
        """Make our pipe; its read end and our own write end, which keeps the pipe from
        reporting hang-up when a producer closes it."""
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
        except FileExistsError:
            raise FileExistsError(
                f"{self.folder} is no folder: the queue's wake-up pipes go there; move it away"
            ) from None
        os.mkfifo(self.path, 0o600)
        fds: list[int] = []
        try:
            fds.append(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))
            fds.append(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # out of descriptors: no pipe of ours there, for `arm` to make again
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise
        return fds[0], fds[1]

    def fileno(self) -> int:
        return self._read_fd

    def arm(self) -> None:
        """Once a second, put our pipe back if it was removed (an rm -rf of the folder, a
        /tmp cleaner): producers poke only the pipes they find there, and without ours every
        task would wait for the worker's next look at the queue (DRY_RECHECK, a second)."""
        now = time.monotonic()
        if now < self._check_at:
            return
        self._check_at = now + CHECK_EVERY
        if os.path.lexists(self.path):
            return
        try:
            read_fd, keep_fd = self._make()
        except OSError as exc:
            self.fail(exc)
            return
        # The same descriptor numbers, which the caller's poll watches, on the new pipe.
        os.dup2(read_fd, self._read_fd, inheritable=False)
        os.dup2(keep_fd, self._keep_fd, inheritable=False)
        os.close(read_fd)
        os.close(keep_fd)
        os.write(self._keep_fd, SCHEDULED_POKE)  # what was queued meanwhile: look (ETAs too)
        if self.failing:
            self.failing = False
            log.info("the wake-up pipe %s is made", self.path)
        else:
            log.warning("the wake-up pipe %s was removed: made again", self.path)

    def clear(self) -> bool:
        pokes = b""
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self._read_fd, 4096):
                pokes += data
        self._revoked = REVOKE_POKE in pokes
        # Any other byte: a task was scheduled.
        return pokes.replace(REVOKE_POKE, b"").strip(READY_POKE) != b""

    def revoked(self) -> bool:
        return self._revoked

    def close(self) -> None:
        for fd in (self._read_fd, self._keep_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class Poker:
    """Wakes every consumer sleeping on a pipe in the wake folder by writing a byte to it.

    The pipes stay open between pokes, and the folder is listed again only when its
    mtime says a consumer came or went: a poke is then one stat and one write per
    consumer. An mtime younger than FRESH_MTIME_NS is not trusted (the file system's
    clock is coarse: a pipe made in the same tick would leave it unchanged)."""

    FRESH_MTIME_NS = 50_000_000

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.listed_mtime: int | None = None  # the folder's mtime when it was last listed
        self.pipes: dict[str, int] = {}  # path -> our write end
        self._lock = threading.Lock()

    def poke(self, scheduled: bool = False, revoked: bool = False) -> None:
        """Never raises: it runs after a commit, whose caller must learn that it committed
        (a submit that raised would be sent again). A consumer it cannot reach looks at
        its queues within DRY_RECHECK anyway, and reads the revoked set at its next lease
        renewal."""
        byte = REVOKE_POKE if revoked else SCHEDULED_POKE if scheduled else READY_POKE
        with self._lock:
            try:
                mtime = os.stat(self.folder).st_mtime_ns
            except OSError:  # none yet, or no folder we may read (a file in the way, say)
                mtime = None
            if mtime is None or mtime != self.listed_mtime:
                self._list(mtime)
            for path, fd in list(self.pipes.items()):
                try:
                    os.write(fd, byte)
                except BlockingIOError:
                    pass  # the pipe is full: that consumer is awake already
                except OSError:  # EPIPE: its consumer is gone
                    self._drop(path, unlink=True)

    def _list(self, mtime: int | None) -> None:
        trusted = mtime is not None and time.time_ns() - mtime > self.FRESH_MTIME_NS
        self.listed_mtime = mtime if trusted else None
        try:
            paths = {os.path.join(self.folder, name) for name in os.listdir(self.folder)}
        except OSError:  # no folder yet, a file in its place, no permission: nobody to poke
            paths = set()
        for path in set(self.pipes) - paths:
            self._drop(path, unlink=False)
        for path in paths - set(self.pipes):
            try:  # a link is never followed: a poke must not write where it points
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:  # ENXIO: no reader left (a dead consumer), or already removed
                with contextlib.suppress(OSError):
                    if stat.S_ISFIFO(os.lstat(path).st_mode):
                        os.unlink(path)
                continue
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                self.pipes[path] = fd
            else:  # a file that is no consumer's (someone's, left there): not ours to touch
                os.close(fd)

    def _drop(self, path: str, unlink: bool) -> None:
        with contextlib.suppress(OSError):
            os.close(self.pipes.pop(path))
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def close(self) -> None:
        with self._lock:
            for path in list(self.pipes):
                self._drop(path, unlink=False)

"""Files that anybody may have put where fleetd keeps its own (a config, a pidfile, a run
record, saved limits): read without ever blocking and never past a bound, written without
following a link someone left there."""

from __future__ import annotations

import contextlib
import errno
import os
import stat


class NotRegularFile(OSError):
    """A FIFO, a device or a folder where a file was expected."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(errno.EINVAL, "not a regular file (a FIFO, a device, a folder)", path)


def read_regular(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most `limit` bytes of the regular file at `path`. Opened without blocking: a FIFO
    put there would hold the reader (the arbiter's reload, `fleetd start` or `stop`, a
    worker's boot) until someone wrote into it, and a device (/dev/zero) has no end: each
    is a NotRegularFile."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(path)
        return os.read(fd, limit)
    finally:
        os.close(fd)


def create_new(path: str | os.PathLike[str]) -> int:
    """A new file at `path` (its fd, write-only), made by us: never a link someone left
    there to a file of theirs, which the write would overwrite."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags, 0o600)


def file_identity(where: str | int) -> tuple[int, int] | None:
    """(device, inode) of the file at a path, or open on a descriptor: what tells whether
    it is still the same file. None where there is none (no such path, a closed fd)."""
    try:
        info = os.stat(where)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.EBADF:
            return None
        raise
    return info.st_dev, info.st_ino

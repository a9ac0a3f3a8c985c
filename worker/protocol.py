"""Length-prefixed JSON frames on the arbiter-worker socketpair and the worker-child pipes.

A frame is a 4-byte big-endian body length followed by the body: compact JSON in
UTF-8 (ASCII, in fact: non-ASCII characters are escaped, so any str encodes).
A ProtocolError means the byte stream can no longer be trusted: close it.
"""

from __future__ import annotations

import json
import os
import struct
from collections import deque
from typing import Any

MAX_FRAME_SIZE = 64 * 1024 * 1024
# The largest task body (its JSON text, in UTF-8). It is a frame to a child, but the bound is
# the broker's cost: the worker's broker calls run in its loop and take time in proportion to
# the bodies they move (SQLite rewrites a task's whole row at each change of state or lease,
# ~7 ms a MiB), so a 16 MiB task holds the loop at most ~0.1 s a call.
MAX_TASK_SIZE = 16 * 1024 * 1024
# Bytes asked of one read: a pipe's whole capacity (64 KiB unless resized, which fleetd never
# does). More would buy nothing from a pipe and cost three syscalls a read: glibc serves a
# buffer over 128 KiB with mmap, and Python's shrinking of it to what came with mremap, then
# munmap (10% of a SQLite worker's CPU per task, measured).
READ_SIZE = 64 * 1024
JOIN_LIMIT = 64 * 1024  # bytes of small frames an Outbox joins into one write: a pipe's room
# Lines on a child's revoke pipe besides revoked ids: the soft time limit of an async task,
# and the cancel of one (its hard limit, or a revoke with terminate), each with its id.
SOFT_MARK = b"\x1fsoft "
CANCEL_MARK = b"\x1fcancel "

_HEADER = struct.Struct(">I")
_encode_json = json.JSONEncoder(separators=(",", ":")).encode
_encode_strict = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_decode_json = json.JSONDecoder().decode


class ProtocolError(Exception):
    """A frame is too large or not JSON: the stream that carried it is broken."""


def id_line(task_id: str, mark: bytes = b"") -> bytes:
    """A task id as one line of a child's revoke pipe, after `mark`: as JSON text, so that
    an id holding a newline (or a mark's \\x1f: anybody may choose an id) is one line, and
    no other line's start."""
    return mark + _encode_json(task_id).encode() + b"\n"


def line_id(line: bytes) -> str:
    """The task id of a revoke pipe's line past its mark ("" if it holds none)."""
    try:
        task_id = _decode_json(line.decode())
    except ValueError:
        return ""
    return task_id if isinstance(task_id, str) else ""


def encode(obj: Any, strict: bool = False) -> bytes:
    """Return `obj` as one frame; raises TypeError/ValueError for what JSON cannot hold (and
    `strict`: NaN and infinity, which fleetctl's JSON output and other readers refuse)."""
    body = (_encode_strict if strict else _encode_json)(obj).encode()
    if len(body) > MAX_FRAME_SIZE:
        raise ProtocolError(f"frame of {len(body)} bytes is over the {MAX_FRAME_SIZE} limit")
    return _HEADER.pack(len(body)) + body


class Undecodable:
    """A frame that is not JSON, from a tolerant FrameReader: its length was sound, so the
    frames after it are too."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class FrameReader:
    """Reassembles frames from the chunks a stream delivers, whatever their boundaries.

    `tolerant`: a frame that is not JSON comes out as an Undecodable instead of raising."""

    __slots__ = ("_pending", "_tolerant")

    def __init__(self, tolerant: bool = False) -> None:
        self._pending = bytearray()
        self._tolerant = tolerant

    def feed(self, data: bytes) -> list[Any]:
        """Take the next chunk of the stream; return the frames it completed, in order."""
        pending = self._pending
        buffer: bytes | bytearray = data
        if pending:
            pending += data
            buffer = pending
        frames: list[Any] = []
        size = len(buffer)
        pos = 0
        with memoryview(buffer) as view:
            while size - pos >= 4:
                (length,) = _HEADER.unpack_from(view, pos)
                if length > MAX_FRAME_SIZE:
                    raise ProtocolError(
                        f"frame of {length} bytes is over the {MAX_FRAME_SIZE} limit"
                    )
                end = pos + 4 + length
                if end > size:
                    break
                try:
                    frames.append(_decode_json(str(view[pos + 4 : end], "utf-8")))
                except (ValueError, RecursionError) as exc:
                    if not self._tolerant:
                        raise ProtocolError(f"frame is not JSON: {exc}") from None
                    frames.append(Undecodable(f"frame is not JSON: {exc}"))
                pos = end
            if buffer is data and pos < size:
                self._pending = bytearray(view[pos:])
        if buffer is pending:
            del pending[:pos]
        return frames

    @property
    def holding(self) -> bool:
        """Whether part of a frame waits for the rest of it."""
        return bool(self._pending)

    def read_frames(self, fd: int) -> list[Any] | None:
        """Read once from `fd`: the frames completed, [] if nothing was ready, None on EOF."""
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return []
        if not data:
            return None
        return self.feed(data)


def oversize(body: str) -> str | None:
    """Why a task body is too large to run (one line), or None if it fits MAX_TASK_SIZE."""
    if len(body) * 4 <= MAX_TASK_SIZE:  # UTF-8 spends at most 4 bytes on a character
        return None
    size = len(body.encode(errors="surrogatepass"))
    if size <= MAX_TASK_SIZE:
        return None
    return f"the task is {size} bytes of JSON, over the {MAX_TASK_SIZE}-byte limit"


def write_frame(fd: int, obj: Any) -> None:
    """Write `obj` as one frame to a blocking `fd`, looping over partial writes."""
    write_all(fd, encode(obj))


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to a blocking `fd`: a signal may cut a write short."""
    written = os.write(fd, data)
    if written == len(data):
        return
    with memoryview(data) as view:
        while written < len(data):
            written += os.write(fd, view[written:])


class Outbox:
    """Frames on their way out through a non-blocking fd, in order, never waited for.

    `send` writes a frame at once when none waits before it (one write: the common case)
    and keeps what the fd did not take; `add` keeps a frame for the next `flush`, which
    writes what waits (frames added in a row in one write) once poll says the fd is
    writable, or when the caller has added all it had. Only a full fd is handled here: any
    other OSError (EPIPE: the reader is gone) is the caller's, who then drops the outbox.
    """

    __slots__ = ("_waiting", "fd", "size")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0  # bytes waiting
        self._waiting: deque[memoryview] = deque()

    def __bool__(self) -> bool:
        return self.size > 0

    def send(self, frame: bytes) -> None:
        written = 0
        if not self.size:
            try:
                written = os.write(self.fd, frame)
            except BlockingIOError:
                pass
            if written == len(frame):
                return
        rest = memoryview(frame)[written:]
        self._waiting.append(rest)
        self.size += len(rest)

    def add(self, frame: bytes) -> None:
        self._waiting.append(memoryview(frame))
        self.size += len(frame)

    def flush(self) -> None:
        while self._waiting:
            if len(self._waiting) > 1 and len(self._waiting[0]) < JOIN_LIMIT:
                self._join()
            view = self._waiting[0]
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                return
            self.size -= written
            if written < len(view):
                self._waiting[0] = view[written:]
                return
            self._waiting.popleft()

    def _join(self) -> None:
        """Make the frames at the head one, up to JOIN_LIMIT bytes: one write, not many."""
        parts, size = [], 0
        while self._waiting and size + len(self._waiting[0]) <= JOIN_LIMIT:
            size += len(self._waiting[0])
            parts.append(self._waiting.popleft())
        if parts:
            self._waiting.appendleft(memoryview(b"".join(parts)))

    def clear(self) -> None:
        self._waiting.clear()
        self.size = 0


def encode_task(deliveries: int, body: str) -> bytes:
    """The frame a child reads: `[deliveries, body]` around the broker's body as it is (JSON
    already, checked by `task.body_problem`), so that no body is decoded and encoded again."""
    head, data = b"[%d," % deliveries, body.encode()
    return b"".join(((len(head) + len(data) + 1).to_bytes(4, "big"), head, data, b"]"))

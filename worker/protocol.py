"""Length-prefixed JSON frames on the arbiter-worker socketpair and the worker-child pipes.

A frame is a 4-byte big-endian body length followed by the body: compact JSON in
UTF-8 (ASCII, in fact: non-ASCII characters are escaped, so any str encodes).
A ProtocolError means the byte stream can no longer be trusted: close it.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

MAX_FRAME_SIZE = 64 * 1024 * 1024
READ_SIZE = 256 * 1024

_HEADER = struct.Struct(">I")
_encode_json = json.JSONEncoder(separators=(",", ":")).encode
_decode_json = json.JSONDecoder().decode


class ProtocolError(Exception):
    """A frame is too large or not JSON: the stream that carried it is broken."""


def encode(obj: Any) -> bytes:
    """Return `obj` as one frame; raises TypeError/ValueError for what JSON cannot hold."""
    body = _encode_json(obj).encode()
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

    def read_frames(self, fd: int) -> list[Any] | None:
        """Read once from `fd`: the frames completed, [] if nothing was ready, None on EOF."""
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return []
        if not data:
            return None
        return self.feed(data)


def write_frame(fd: int, obj: Any) -> None:
    """Write `obj` as one frame to a blocking `fd`, looping over partial writes."""
    data = encode(obj)
    written = os.write(fd, data)
    if written == len(data):
        return
    with memoryview(data) as view:
        while written < len(data):
            written += os.write(fd, view[written:])

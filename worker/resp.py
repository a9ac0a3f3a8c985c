"""Redis's wire protocol (RESP), the little of it fleetd writes and reads itself: commands
(the broker's links, the start-up probe, which must not import redis-py) and the arrays a
subscribed connection receives. Light on purpose: the arbiter imports it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def pack(args: Sequence[Any]) -> bytes:
    """A command: an array of bulk strings. Text as redis-py encodes it (UTF-8, with
    surrogateescape), bytes as they are, anything else as its repr."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode("utf-8", "surrogateescape")
        elif not isinstance(arg, bytes):
            arg = repr(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


def resp_array(buffer: bytes, at: int) -> tuple[int, list[bytes]] | None:
    """The RESP array of bulk strings and integers at `at` (what a subscribed connection
    gets): where it ends and its items, or None if the buffer ends first."""
    line = buffer.find(b"\r\n", at)
    if line < 0:
        return None
    if buffer[at : at + 1] != b"*":
        raise ValueError(f"not an array: {buffer[at : at + 20]!r}")
    count, at = int(buffer[at + 1 : line]), line + 2
    items = []
    for _ in range(count):
        line = buffer.find(b"\r\n", at)
        if line < 0:
            return None
        kind, header = buffer[at : at + 1], buffer[at + 1 : line]
        if kind == b":":
            items.append(header)
            at = line + 2
        elif kind == b"$":
            start = line + 2
            at = start + int(header) + 2
            if at > len(buffer):
                return None
            items.append(buffer[start : at - 2])
        else:
            raise ValueError(f"not a bulk string or integer: {buffer[at : at + 20]!r}")
    return at, items

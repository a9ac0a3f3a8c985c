"""Redis's wire protocol (RESP), the little of it fleetd writes and reads itself: commands
(the broker's links, the start-up probe, which must not import redis-py), the replies a
link reads (RESP2: redis-py's reader costs a caller more than a small reply's own parse)
and the arrays a subscribed connection receives. Light on purpose: the arbiter imports it."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

# Bytes asked of the socket at a time; a large bulk string's rest up to READ_LIMIT at once.
READ_SIZE, READ_LIMIT = 65536, 1 << 20


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


class ErrorReply(str):
    """The text of an error reply (`-NOSCRIPT No matching script...`): the reader returns
    it, and the caller raises it as its own exception."""


class Incomplete(Exception):
    """The buffer ends inside the reply; `need`: the buffer's length that would hold at
    least the rest of the part being read (0: unknown, a line's end)."""

    def __init__(self, need: int = 0) -> None:
        self.need = need


def _string(raw: bytes | bytearray, text: bool) -> str | bytes:
    # Text as redis-py's decoder gives it, set as the links set it.
    return raw.decode("utf-8", "surrogateescape") if text else bytes(raw)


def parse_reply(buffer: bytes | bytearray, at: int, text: bool = True) -> tuple[Any, int]:
    """The RESP2 reply at `at` and where it ends: a bulk or simple string (text, UTF-8 with
    surrogateescape; bytes if not `text`), int, None for a nil, a list for an array,
    ErrorReply for an error. Incomplete if the buffer ends first; ValueError for what is
    not RESP2."""
    line = buffer.find(b"\r\n", at)
    if line < 0:
        raise Incomplete()
    kind = buffer[at : at + 1]
    if kind == b"$":
        size = int(buffer[at + 1 : line])
        if size < 0:
            return None, line + 2
        end = line + 2 + size
        if len(buffer) < end + 2:
            raise Incomplete(end + 2)
        if buffer[end : end + 2] != b"\r\n":
            raise ValueError(f"a bulk string of {size} bytes does not end there")
        return _string(buffer[line + 2 : end], text), end + 2
    if kind == b":":
        return int(buffer[at + 1 : line]), line + 2
    if kind == b"+":
        return _string(buffer[at + 1 : line], text), line + 2
    if kind == b"-":
        return ErrorReply(_string(buffer[at + 1 : line], True)), line + 2
    if kind == b"*":
        count = int(buffer[at + 1 : line])
        if count < 0:
            return None, line + 2
        items, at = [], line + 2
        for _ in range(count):
            item, at = parse_reply(buffer, at, text)
            items.append(item)
        return items, at
    raise ValueError(f"not a RESP2 reply: {bytes(buffer[at : at + 20])!r}")


def read_reply(sock: socket.socket, unread: bytearray) -> Any:
    """The next reply on `sock` (parse_reply's values), read after the bytes of `unread`,
    which keeps what was read past it: replies to commands sent at once may come in one
    read. EOFError if the socket closes first; the socket's own errors (OSError, its
    timeout) as they are; ValueError for what is not RESP2."""
    while True:
        try:
            reply, end = parse_reply(unread, 0)
        except Incomplete as short:
            data = sock.recv(max(READ_SIZE, min(short.need - len(unread), READ_LIMIT)))
            if not data:
                raise EOFError("the server closed the connection") from None
            unread += data
            continue
        del unread[:end]
        return reply


def resp_array(buffer: bytes, at: int) -> tuple[int, list[bytes | int]] | None:
    """The RESP array of bulk strings and integers at `at` (what a subscribed connection
    gets), its strings as bytes: where it ends and its items, or None if the buffer ends
    first. ValueError for any other reply."""
    try:
        items, end = parse_reply(buffer, at, text=False)
    except Incomplete:
        return None
    if not isinstance(items, list) or not all(isinstance(i, (bytes, int)) for i in items):
        raise ValueError(f"not an array of bulk strings and integers: {buffer[at : at + 20]!r}")
    return end, items

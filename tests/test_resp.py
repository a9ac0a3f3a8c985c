"""The RESP2 replies that worker/resp.py reads for the Redis broker's links: parsed from
bytes, and read off a real socket that delivers them in pieces."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from worker.resp import ErrorReply, pack, parse_reply, read_reply

pytestmark = pytest.mark.timeout(30)

REPLIES = [
    (b"+OK\r\n", "OK"),
    (b":42\r\n", 42),
    (b":-7\r\n", -7),
    (b"$5\r\nhello\r\n", "hello"),
    (b"$0\r\n\r\n", ""),
    (b"$-1\r\n", None),
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"$4\r\na\r\nb\r\n", "a\r\nb"),  # a bulk string holds any bytes, CRLF too
    ("$3\r\n\u00e9t\r\n".encode(), "\u00e9t"),
    (b"$2\r\n\xff\xfe\r\n", "\udcff\udcfe"),  # no UTF-8: surrogateescape, as the links decode
    (b"*3\r\n$1\r\na\r\n:1\r\n*2\r\n$-1\r\n+x\r\n", ["a", 1, [None, "x"]]),
]


@pytest.mark.parametrize(("raw", "value"), REPLIES)
def test_each_kind_of_reply_parses_to_its_value_and_ends_where_it_ends(
    raw: bytes, value: object
) -> None:
    assert parse_reply(raw + b"+next\r\n", 0) == (value, len(raw))


def test_an_error_reply_comes_back_as_its_text_for_the_caller_to_raise() -> None:
    reply, end = parse_reply(b"-NOSCRIPT No matching script\r\n", 0)

    assert isinstance(reply, ErrorReply)
    assert (reply, end) == ("NOSCRIPT No matching script", 30)


@pytest.mark.parametrize(
    "raw", [b"?what\r\n", b"$3\r\nabcde\r\n", b":x\r\n", b"*2\r\n!1\r\n", b"$z\r\n"]
)
def test_what_is_no_resp2_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_reply(raw, 0)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    yield ours, theirs
    ours.close()
    theirs.close()


def send_in_pieces(sock: socket.socket, data: bytes, size: int) -> threading.Thread:
    def send() -> None:
        for at in range(0, len(data), size):
            sock.sendall(data[at : at + size])

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_a_reply_sent_a_byte_at_a_time_is_read_whole(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    raw = b"".join(raw for raw, _ in REPLIES)
    sender = send_in_pieces(theirs, raw, 1)
    unread = bytearray()

    values = [read_reply(ours, unread) for _ in REPLIES]

    sender.join(10)
    assert values == [value for _, value in REPLIES]
    assert unread == b""


def test_replies_that_came_in_one_read_are_each_read_in_turn(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.sendall(b":1\r\n$3\r\ntwo\r\n*1\r\n:3\r\n")
    unread = bytearray()

    assert read_reply(ours, unread) == 1
    assert unread == b"$3\r\ntwo\r\n*1\r\n:3\r\n"  # kept for the next reads, not lost
    assert read_reply(ours, unread) == "two"
    assert read_reply(ours, unread) == [3]
    assert unread == b""


def test_a_bulk_string_far_larger_than_a_read_is_read_whole(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    body = bytes(range(256)) * 16384  # 4 MiB
    sender = send_in_pieces(theirs, b"$%d\r\n%b\r\n" % (len(body), body), 100_000)

    reply = read_reply(ours, bytearray())

    sender.join(10)
    assert reply.encode("utf-8", "surrogateescape") == body


def test_a_connection_closed_inside_a_reply_is_an_eof_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.sendall(b"$10\r\nhalf")
    theirs.shutdown(socket.SHUT_WR)

    with pytest.raises(EOFError):
        read_reply(ours, bytearray())


def test_a_reply_that_does_not_come_is_the_sockets_timeout(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    ours.settimeout(0.05)

    with pytest.raises(TimeoutError):
        read_reply(ours, bytearray(b"*2\r\n:1\r\n"))


def test_pack_and_parse_agree_on_an_array_of_bulk_strings() -> None:
    args = ["EVALSHA", "a" * 40, 0, "caf\u00e9", b"\x00\xff", 1.5]
    packed = pack(args)

    expected = ["EVALSHA", "a" * 40, "0", "caf\u00e9", "\x00\udcff", "1.5"]
    assert parse_reply(packed, 0) == (expected, len(packed))

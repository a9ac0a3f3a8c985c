"""`fleetd start`'s question before it starts anything: does the broker answer?

Asked the cheap way first: for a plain `redis://` or `unix://` URL, one socket sends AUTH
(if the URL has a password), SELECT and PING, and reads the three replies: about a
millisecond. Anything else, or any answer but OK and PONG, is asked again by a forked
child through the broker's own client, whose error is the line the user sees. The child
keeps the broker's client library (redis-py takes ~70 ms to import) out of the arbiter.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from worker.resp import pack

FAST_TIMEOUT = 1.0  # seconds the socket probe waits for the connection and each reply


URL_WRONG = 2  # the client probe's exit code for a URL it cannot take


def broker_problem(url: str) -> str | None:
    """Why the broker cannot be reached, if it cannot."""
    return start_probe(url)()


def start_probe(url: str) -> Callable[[], str | None]:
    """Start asking whether the broker can be reached; what it returns gives the answer
    (why not, or None), waiting for the client probe if one runs. `fleetd start` imports
    the arbiter meanwhile: a SQLite broker's probe (~15 ms) then costs its start nothing."""
    if answers_ping(url):
        return lambda: None
    pid, answer_fd = start_client_probe(url)
    return lambda: client_answer(pid, answer_fd)


def answers_ping(url: str) -> bool:
    """Whether a Redis at a plain URL answers PING on the URL's database as its user: False
    for every other URL, and for every doubt (the client probe then says why)."""
    if not url.startswith(("redis://", "unix://")):
        return False
    import urllib.parse  # here: an arbiter on SQLite never needs it

    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    query.pop("prefix", None)  # fleetd's own: the keys' prefix, nothing the server sees
    if parts.scheme not in ("redis", "unix") or query or parts.fragment:
        return False
    try:
        db = int(parts.path.strip("/") or 0) if parts.scheme == "redis" else 0
        if parts.scheme == "unix":
            address: str | tuple[str, int] = parts.path
            family = socket.AF_UNIX
        else:
            address = (parts.hostname or "localhost", parts.port or 6379)
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    except ValueError:
        return False
    words: list[list[str]] = []
    if parts.password is not None:
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password)
        words.append(["AUTH", user, password] if user else ["AUTH", password])
    words += [["SELECT", str(db)], ["PING"]]
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(FAST_TIMEOUT)
            sock.connect(address)
            sock.sendall(b"".join(pack(w) for w in words))
            replies = read_lines(sock, len(words))
    except (OSError, UnicodeError):
        return False
    return replies == [b"+OK"] * (len(words) - 1) + [b"+PONG"]


def read_lines(sock: socket.socket, count: int) -> list[bytes]:
    """The first `count` reply lines; every reply to AUTH, SELECT and PING is one line."""
    data = b""
    while data.count(b"\r\n") < count:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n")[:count]


def start_client_probe(url: str) -> tuple[int, int]:
    """Fork a child that asks the broker's own client; its pid and the pipe its answer
    comes on (client_answer reads it)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its message is the parent's to show
        os.close(read_fd)
        code = 0
        try:
            if url.startswith(("redis://", "rediss://", "unix://")):
                from worker.brokers import url_problem
                from worker.brokers.redis import url_options_problem

                wrong = url_problem(url) or url_options_problem(url)
                if wrong:  # the URL itself, as `fleetd check` says it
                    code = URL_WRONG
                    raise ValueError(wrong)
            from worker.client import Client

            Client(url, fail_fast=True).ping()
        except BaseException as exc:  # noqa: BLE001 - whatever it is, it is the answer
            os.write(write_fd, str(exc).encode() or type(exc).__name__.encode())
        os._exit(code)
    os.close(write_fd)
    return pid, read_fd


class Problem(str):
    """Why the broker cannot be reached; `url`: its URL is what is wrong (a usage error)."""

    url = False


def client_answer(pid: int, read_fd: int) -> str | None:
    """What the client probe `pid` found wrong, if anything: it waits for the child."""
    with os.fdopen(read_fd, "rb") as answer:
        text = answer.read().decode(errors="replace")
    status = os.waitpid(pid, 0)[1]
    if not text:
        return None
    problem = Problem(text)
    problem.url = os.WIFEXITED(status) and os.WEXITSTATUS(status) == URL_WRONG
    return problem

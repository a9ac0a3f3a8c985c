"""Logging for every fleetd process: text for people, one JSON object per line for machines.

Every line carries `node` and `pid` (workers share the arbiter's stderr), then the
structured fields passed as `extra=` (`task=`, `worker=`, ...), which win over those two.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TextIO

LEVEL_ENV = "FLEETD_LOG_LEVEL"
FORMAT_ENV = "FLEETD_LOG_FORMAT"
LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

LOG_BUFFER_MAX = 65536  # bytes of log lines a process keeps while its log takes none

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def fill_standard_fds() -> None:
    """Started with stdin, stdout or stderr closed (`fleetd start >&- 2>&-`, a careless
    daemonizer): /dev/null takes its number before any file, socket or queue database does
    (which would then get what is written to "stderr"), and Python's sys.std* are files
    again (None there took a command down on its first print or log line)."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
            closed = False
        except OSError:
            closed = True
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            os.set_inheritable(fd, True)  # as a standard stream is: the workers' too
        if getattr(sys, name) is None:
            # Our /dev/null; or, where the number is another file's by now, one of its own.
            stream = open(fd, mode, closefd=False) if closed else open(os.devnull, mode)  # noqa: SIM115
            setattr(sys, name, stream)


def setup_logging(level: str, fmt: str, node: str) -> None:
    """Send this process's logs (root logger) to stderr, as `fmt` "text" or "json"."""
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}: use one of {', '.join(LEVELS)}")
    handler: logging.Handler
    if fmt == "json":
        handler = LogHandler(LogOutput(sys.stderr))
        handler.setFormatter(JsonFormatter(node))
    elif fmt == "text" and sys.stderr.isatty():
        from rich.console import Console  # only on a terminal: it costs start-up time
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False)
        handler.setFormatter(TextFormatter(node, "%(name)s: %(message)s"))
    elif fmt == "text":
        handler = LogHandler(LogOutput(sys.stderr))
        handler.setFormatter(TextFormatter(node, TEXT_FORMAT))
    else:
        raise ValueError(f"unknown log format {fmt!r}: use one of {', '.join(FORMATS)}")
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class LogOutput:
    """stderr as the log writes it, never blocking where it is a pipe or a socket: a reader
    that stops reading (journald stuck on a full disk, a log shipper that hangs, a pipe
    nobody reads) would otherwise stop the fleet, its arbiter answering nothing and its
    workers running no task. What the log does not take at once waits, up to
    LOG_BUFFER_MAX bytes; lines past that are dropped and counted (`dropped`). A regular
    file or a terminal is written as before.

    A socket is written with MSG_DONTWAIT; a pipe through a descriptor of our own, opened
    non-blocking: the one we share (with the shell, the other processes of the fleet) keeps
    its flags. A pool child, forked with its worker's, writes to its own stderr: the pipe
    its worker reads and relays, as what it prints."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.pending = b""  # the rest of what the log took part of, and what came after it
        self.dropped = 0  # lines
        self.send: Callable[[bytes], int] | None = None
        try:
            fd = stream.fileno()
            mode = os.fstat(fd).st_mode
            if stat.S_ISSOCK(mode):
                sock = socket.socket(fileno=os.dup(fd))
                self.send = lambda data: sock.send(data, socket.MSG_DONTWAIT)
            elif stat.S_ISFIFO(mode):
                own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self.send = lambda data: os.write(own, data)
        except (OSError, ValueError, AttributeError):  # no descriptor, or none we can reopen
            self.send = None
        if self.send is not None:
            os.register_at_fork(after_in_child=self.write_to_stream)

    def write_to_stream(self) -> None:
        """Write through the stream itself from now on (in a forked pool child)."""
        self.send, self.pending, self.dropped = None, b"", 0

    def write(self, text: str) -> None:
        if self.send is None:
            self.stream.write(text)
            return
        self.write_bytes(text.encode("utf-8", "backslashreplace"))

    def write_bytes(self, data: bytes) -> None:
        """`write` for what is bytes already (`send` is set)."""
        self.flush()
        if len(self.pending) + len(data) > LOG_BUFFER_MAX:
            self.dropped += max(1, data.count(b"\n"))
            return
        self.pending += data
        self.flush()

    def flush(self) -> None:
        if self.send is None:
            self.stream.flush()
            return
        while self.pending:
            try:
                written = self.send(self.pending)
            except BlockingIOError:
                return
            except OSError:  # the reader is gone (EPIPE): nothing will take them
                self.dropped += self.pending.count(b"\n")
                self.pending = b""
                return
            self.pending = self.pending[written:]


class StandardStream(LogOutput):
    """sys.stdout or sys.stderr of a fleetd process (the arbiter, a worker) written as its log
    is (LogOutput): what a task module prints at its import or a warning never blocks the
    process on a reader that stopped reading. On a file or a terminal each write goes out at
    once: a pool child must not inherit, and print again, what the worker had buffered. A
    forked child gets the stream itself back: its output is its worker's to read.
    Every other attribute is the stream's."""

    def __init__(self, stream: TextIO, name: str) -> None:
        super().__init__(stream)
        self.name = name
        os.register_at_fork(after_in_child=self.step_aside)

    def step_aside(self) -> None:
        if getattr(sys, self.name) is self:
            setattr(sys, self.name, self.stream)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def write(self, text: str) -> int:  # type: ignore[override]
        super().write(text)
        if self.send is None:
            with contextlib.suppress(OSError, ValueError):  # a full disk, a closed stream
                self.stream.flush()
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    @property
    def buffer(self) -> Any:
        """The binary side (`sys.stdout.buffer.write(b"...")`), written the same way."""
        return StandardBuffer(self)


class StandardBuffer:
    """A StandardStream's `buffer`: bytes go the stream's non-blocking way."""

    def __init__(self, text: StandardStream) -> None:
        self.text = text

    def write(self, data: Any) -> int:
        data = bytes(data)
        if self.text.send is None:  # a file, a terminal: at once, as the text side
            raw = self.text.stream.buffer
            raw.write(data)
            with contextlib.suppress(OSError, ValueError):
                raw.flush()
        else:
            self.text.write_bytes(data)
        return len(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.text.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.text.stream.buffer, name)


def shield_standard_streams() -> None:
    """Put sys.stdout and sys.stderr behind a StandardStream each (fleetd's own processes
    only: fleetctl's output to a pipe must wait for its reader, as any command's does)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, LogOutput):
            setattr(sys, name, StandardStream(stream, name))


class LogHandler(logging.StreamHandler):
    """A StreamHandler on a LogOutput that says how many lines it dropped, once the log
    takes lines again."""

    stream: LogOutput

    def emit(self, record: logging.LogRecord) -> None:
        out = self.stream
        if out.dropped:
            out.flush()
            if not out.pending:
                dropped, out.dropped = out.dropped, 0
                note = logging.makeLogRecord(
                    {
                        "name": "fleetd.log",
                        "levelno": logging.WARNING,
                        "levelname": "WARNING",
                        "msg": "%d log lines dropped: the log took none for a while",
                        "args": (dropped,),
                    }
                )
                super().emit(note)
        super().emit(record)


def setup_logging_from_env(node: str) -> None:
    """`setup_logging` for a worker, with the level and format its arbiter passed in the env."""
    setup_logging(os.environ.get(LEVEL_ENV, "info"), os.environ.get(FORMAT_ENV, "text"), node)


def log_env(level: str, fmt: str) -> dict[str, str]:
    """The environment that makes `setup_logging_from_env` log like the arbiter."""
    return {LEVEL_ENV: level, FORMAT_ENV: fmt}


def _record_fields(record: logging.LogRecord, node: str) -> dict[str, Any]:
    """The structured fields of a record: node, pid, then its `extra=` fields."""
    extra = {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}
    return {"node": node, "pid": record.process, **extra}


class TextFormatter(logging.Formatter):
    """`fmt`, then the structured fields as `key=value`."""

    def __init__(self, node: str, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)
        self.node = node

    def formatMessage(self, record: logging.LogRecord) -> str:
        pairs = " ".join(f"{k}={_logfmt(v)}" for k, v in _record_fields(record, self.node).items())
        return one_line(f"{super().formatMessage(record)} {pairs}", keep="\t")


def one_line(text: str, keep: str = "") -> str:
    """`text` on one line with nothing a terminal acts on: a newline, a carriage return or
    an escape sequence in it (a task id, a task's output, a name: anybody's text) shown as
    its escape, so that no text forges a line of its own; the characters of `keep` stay."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() or c in keep else c.encode("unicode_escape").decode() for c in text
    )


def shortened(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, the last three "..." where it was cut: a
    value quoted in an error line (a 5,000-digit port) keeps the line short."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, node, pid, extras, traceback."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_record_fields(record, self.node),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _logfmt(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n'):
        return text
    return json.dumps(text)

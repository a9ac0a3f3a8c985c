"""Log lines as a process writes them to stderr: a pipe, a terminal, text or JSON."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone

import pytest

from tests.fleet import Fleet, wait_for
from worker.logs import FORMAT_ENV, LEVEL_ENV, JsonFormatter, log_env, setup_logging

# A process entry point that logs a debug, an info with fields, and an exception.
PROGRAM = """
import logging, sys
from worker.logs import setup_logging, setup_logging_from_env
if len(sys.argv) > 1:
    setup_logging(sys.argv[1], sys.argv[2], "images@host1")
else:
    setup_logging_from_env("images@host1")
log = logging.getLogger("demo")
log.debug("hidden")
log.info("hello", extra={"task": "t1", "worker": "email@host1"})
try:
    1 / 0
except ZeroDivisionError:
    log.exception("failed\\non two lines", extra={"task": "t 2"})
"""


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROGRAM, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        check=True,
    )


def test_json_format_writes_one_object_per_line_with_node_pid_and_fields() -> None:
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    result = run("info", "json")
    lines = result.stderr.splitlines()
    assert len(lines) == 2
    info, error = (json.loads(line) for line in lines)
    assert set(info) == {"time", "level", "logger", "message", "node", "pid", "task", "worker"}
    assert info["level"] == "INFO" and info["logger"] == "demo" and info["message"] == "hello"
    assert info["node"] == "images@host1" and info["task"] == "t1"
    assert info["worker"] == "email@host1"
    assert info["pid"] == error["pid"] != os.getpid()
    assert info["time"].endswith("Z")
    logged_at = datetime.fromisoformat(info["time"].replace("Z", "+00:00"))
    assert before <= logged_at <= datetime.now(timezone.utc)
    assert error["level"] == "ERROR" and error["message"] == "failed\non two lines"
    assert error["traceback"].startswith("Traceback (most recent call last):")
    assert error["traceback"].endswith("ZeroDivisionError: division by zero")


def test_text_format_on_a_pipe_is_plain_lines_with_key_value_fields() -> None:
    lines = run("info", "text").stderr.splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO demo: hello "
        r"node=images@host1 pid=\d+ task=t1 worker=email@host1",
        lines[0],
    )
    # A message is one line whatever it holds (a newline in it would forge a line of its
    # own); the traceback after it keeps its lines.
    assert re.fullmatch(
        r'.* ERROR demo: failed\\non two lines node=images@host1 pid=\d+ task="t 2"', lines[1]
    )
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "ZeroDivisionError: division by zero"


def test_level_and_format_come_from_the_environment_for_workers() -> None:
    result = run(env=log_env("error", "json"))
    [line] = result.stderr.splitlines()
    assert json.loads(line)["message"] == "failed\non two lines"


def test_debug_level_shows_debug_lines() -> None:
    result = run(env={LEVEL_ENV: "debug", FORMAT_ENV: "json"})
    messages = [json.loads(line)["message"] for line in result.stderr.splitlines()]
    assert messages == ["hidden", "hello", "failed\non two lines"]


def test_text_format_on_a_terminal_uses_rich() -> None:
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", PROGRAM, "info", "text"],
            stderr=terminal,
            env={**os.environ, "COLUMNS": "200", "TERM": "xterm-256color"},
        )
        os.close(terminal)
        output = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            readable, _, _ = select.select([controller], [], [], deadline - time.monotonic())
            try:
                chunk = os.read(controller, 65536) if readable else b""
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(timeout=10) == 0
    finally:
        os.close(controller)
    text = output.decode()
    assert "\x1b[" in text  # colours: rich is drawing, not the plain formatter
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert re.search(r"INFO\s+demo: hello node=images@host1 pid=\d+ task=t1", plain)
    assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO", plain)


def test_json_formatter_lets_extra_node_and_pid_name_another_process() -> None:
    record = logging.makeLogRecord({"msg": "worker exited", "node": "email@host1", "pid": 42})
    entry = json.loads(JsonFormatter("host1").format(record))
    assert (entry["node"], entry["pid"]) == ("email@host1", 42)


def test_json_formatter_turns_unserialisable_fields_into_text() -> None:
    record = logging.makeLogRecord({"msg": "m", "when": timedelta(days=1)})
    assert json.loads(JsonFormatter("host1").format(record))["when"] == "1 day, 0:00:00"


@pytest.mark.parametrize(("level", "fmt"), [("loud", "text"), ("info", "xml")])
def test_setup_logging_rejects_an_unknown_level_or_format(level: str, fmt: str) -> None:
    handlers = logging.getLogger().handlers[:]
    with pytest.raises(ValueError, match="unknown log"):
        setup_logging(level, fmt, "host1")
    assert logging.getLogger().handlers == handlers


def read_all(fd: int) -> bytes:
    """What waits in a pipe or socket, without waiting for more."""
    data = b""
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data


@contextlib.contextmanager
def started_on_a_log_nobody_reads(fleet: Fleet, kind: str) -> Iterator[int]:
    """Start `fleet` with its log into a pipe, or a socket as journald's, that nobody reads
    while the block runs; the reading end, which the block may read to catch up."""
    if kind == "pipe":
        reader, writer = os.pipe()
    else:
        reader, writer = (end.detach() for end in socket.socketpair())
    try:
        fleet.start(output=writer)
        os.close(writer)
        writer = -1
        yield reader
    finally:
        os.close(reader)
        if writer >= 0:
            os.close(writer)


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_a_log_that_nobody_reads_never_stops_the_fleet_and_says_what_it_dropped(
    make_fleet: Callable[..., Fleet], kind: str
) -> None:
    """fleetd's stderr is a pipe, or a socket as journald's is, that nobody reads (a stuck
    log shipper, journald on a full disk). Tasks that print hundreds of lines (which the
    worker logs) run; the fleet answers ping and stops on TERM. Once the log is read again,
    the next lines start with one that says how many were dropped."""
    fleet = make_fleet()
    with started_on_a_log_nobody_reads(fleet, kind) as reader:
        texts = [f"line {i} " + "x" * 1000 for i in range(300)]  # a pipe holds 64 KiB
        handles = fleet.client.submit_many([("tasks.say", (text,), {}) for text in texts])
        assert [h.get(timeout=20) for h in handles] == texts
        out = fleet.ctl("--json", "--timeout", "5", "ping")
        assert [r.get("ok") for r in json.loads(out.stdout)["replies"].values()] == ["pong"]
        read_all(reader)  # the log is read again: what waited comes, then the count
        seen = b""

        def said() -> bool:
            nonlocal seen
            fleet.client.submit("tasks.say", "after").get(timeout=10)
            seen += read_all(reader)
            return re.search(rb"WARNING fleetd.log: \d+ log lines dropped", seen) is not None

        wait_for(said, 10, message="the count of dropped lines")
        # What a task logs goes the way of what it prints: through its worker, line by line.
        fleet.client.submit("tasks.log_warning", "logged by a task").get(timeout=10)

        def logged() -> bool:
            nonlocal seen
            seen += read_all(reader)
            return b"logged by a task" in seen

        wait_for(logged, 10, message="the task's log line")
        assert re.search(rb"INFO fleetd.child: \S+ \S+ WARNING a_task: logged by a task", seen)
        fleet.signal(signal.SIGTERM)
        assert fleet.wait_exit(20) == 0


def test_a_task_module_that_prints_at_its_import_into_a_log_nobody_reads_stops_nothing(
    make_fleet: Callable[..., Fleet],
) -> None:
    """What a task module printed (and warned) at its import went to the worker's own
    stdout and stderr, the arbiter's pipe: with nobody reading it, a worker's boot blocked
    there until worker_timeout killed it, again and again (FATAL); a warm stop waited for
    ever on a worker blocked in its last flush."""
    fleet = make_fleet(fleet={"imports": ["tasks", "loud"]}, defaults={"worker_timeout": 5})
    (fleet.folder / "loud.py").write_text(
        "import sys, warnings\n"
        "for i in range(200):\n"
        "    print('loud at import', i, 'x' * 1000)\n"
        "    sys.stdout.buffer.write(b'bytes at import ' + b'x' * 1000 + b'\\n')\n"
        "    sys.stderr.writelines(['lines at import ', 'x' * 1000, '\\n'])\n"
        "warnings.warn('a warning at import')\n"
    )
    with started_on_a_log_nobody_reads(fleet, "pipe"):
        assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == 3
        [worker] = fleet.worker_pids()
        os.kill(worker, signal.SIGKILL)  # its replacement imports, and prints, again
        wait_for(lambda: fleet.worker_pids() not in ([], [worker]), 10, message="a new worker")
        assert fleet.client.submit("tasks.add", 2, 3).get(timeout=20) == 5
        fleet.signal(signal.SIGTERM)
        assert fleet.wait_exit(20) == 0


def test_what_a_task_module_prints_at_its_import_is_logged_once_not_by_each_child(
    make_fleet: Callable[..., Fleet],
) -> None:
    """The worker's stdout buffered it (a file is no terminal), and each child forked after
    the import inherited that buffer and printed it again at its first task's flush."""
    fleet = make_fleet(fleet={"imports": ["tasks", "loud"]}, defaults={"max_tasks_per_child": 1})
    (fleet.folder / "loud.py").write_text(
        "import sys\nprint('loaded once')\nsys.stdout.buffer.write(b'written once\\n')\n"
    )
    fleet.start(env={"PYTHONUNBUFFERED": ""})  # as a service runs it: stdout buffered
    handles = fleet.client.submit_many([("tasks.say", ("said",), {})] * 4)
    assert [h.get(timeout=10) for h in handles] == ["said"] * 4
    wait_for(lambda: fleet.log().count("said") >= 4, 10, message="the tasks' prints")
    assert fleet.log().count("loaded once") == 1, fleet.log()
    assert fleet.log().count("written once") == 1, fleet.log()


def test_what_a_task_prints_or_an_id_holds_forges_no_line_of_the_fleets_log(
    make_fleet: Callable[..., Fleet],
) -> None:
    """The fleet's log is text the operator's terminal and log shipper read: a task that
    prints an escape sequence or a carriage return, an id with a newline (anybody's text)
    land in it as escapes, on their own record's line."""
    fleet = make_fleet(defaults={"time_limit": 1}).start()
    printed = "\x1b]0;title\x07\x1b[31mred\rover"
    assert fleet.client.submit("tasks.say", printed).get(timeout=10) == printed
    forged = "t1\n2026-01-01 00:00:00,000 ERROR fleetd.arbiter: forged"
    handle = fleet.client.submit("tasks.sleep", 30, task_id=forged)
    wait_for(lambda: handle.state == "FAILURE", 20, message="the hard time limit")
    wait_for(lambda: "hard time limit" in fleet.log(), 10, message="the kill's log line")
    log = fleet.log()
    assert "\x1b" not in log and "\r" not in log
    assert "\\x1b[31mred\\rover" in log
    assert "t1\\n2026-01-01 00:00:00,000 ERROR fleetd.arbiter: forged" in log
    assert not any(line.startswith("2026-01-01") for line in log.splitlines())

"""fleetctl answers what is true: a task waiting in a child's pipe has not started, times are
times, an id nobody submitted is unknown, a silent fleet is named, and `q` leaves `top`."""

from __future__ import annotations

import datetime
import json
import os
import pty
import re
import select
import subprocess
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fleet import FLEETCTL, Fleet, wait_for
from worker import TaskRevoked
from worker.link import STARTED_FLUSH_DELAY

ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d")
# Long enough for a worker to have written a STARTED mark many times over, had it made one.
MARKS_WRITTEN = 25 * STARTED_FLUSH_DELAY


def only_reply(fleet: Fleet, *argv: str) -> Any:
    [reply] = json.loads(fleet.ctl("--json", *argv).stdout)["replies"].values()
    return reply


def test_a_task_waiting_in_a_childs_pipe_is_pending_and_counted_reserved(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    fleet = make_fleet(defaults={"concurrency": 1, "prefetch": 1}).start()
    marker = tmp_path / "started"
    running = fleet.client.submit("tasks.sleep", 60, str(marker))
    wait_for(marker.exists, 10, message="the first task to start")
    waiting = fleet.client.submit("tasks.add", 1, 2)
    wait_for(
        lambda: any(
            r["id"] == waiting.id and r["child"] for r in only_reply(fleet, "inspect", "reserved")
        ),
        10,
        message="the second task to wait in the child's pipe",
    )
    time.sleep(MARKS_WRITTEN)

    assert running.state == "STARTED"
    assert waiting.state == "PENDING"
    stats = only_reply(fleet, "inspect", "stats")
    assert (stats["active"], stats["reserved"]) == (1, 1)

    fleet.ctl("revoke", running.id, "--terminate")
    assert waiting.get(timeout=10) == 3


def test_inspect_scheduled_shows_iso_times_and_json_keeps_the_number_beside_one(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet().start()
    due = fleet.client.submit("tasks.add", 1, 2, countdown=600)
    eta = time.time() + 600

    table = fleet.ctl("inspect", "scheduled").stdout
    reply = only_reply(fleet, "inspect", "scheduled")

    [shown] = ISO_TIME.findall(table)
    assert datetime.datetime.fromisoformat(shown).timestamp() == abs_approx(eta)
    assert not re.search(r"\d{10}\.\d", table), "an epoch number in the table"
    assert reply["next_due"] == abs_approx(eta)
    assert datetime.datetime.fromisoformat(reply["next_due_iso"]).timestamp() == abs_approx(eta)
    assert due.state == "PENDING"


def abs_approx(value: float) -> Any:
    return pytest.approx(value, abs=5)


def test_result_of_an_id_the_broker_never_saw_says_so_and_exits_1(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet()

    for argv in (["result", "no-such-id"], ["--json", "result", "no-such-id"]):
        out = fleet.ctl(*argv, check=False)
        assert (out.returncode, out.stdout) == (1, "")
        assert out.stderr.splitlines() == [
            "fleetctl: no task no-such-id: the broker never saw it (or its record expired)"
        ]


def test_revoke_of_an_unknown_id_says_it_is_revoked_ahead_and_revokes_it(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet().start()
    known = fleet.client.submit("tasks.add", 1, 2, countdown=600)

    out = fleet.ctl("revoke", known.id, "ahead-1")
    data = json.loads(fleet.ctl("--json", "revoke", "ahead-2").stdout)

    assert [line for line in out.stdout.splitlines() if "ahead" in line] == [
        "ahead-1: no such task yet: revoked ahead, it will never start"
    ]
    assert data["revoked_ahead"] == ["ahead-2"]
    assert {"ahead-1", "ahead-2", known.id} <= fleet.client.broker.revoked()
    with pytest.raises(TaskRevoked):  # it never starts
        fleet.client.submit("tasks.add", 1, 2, task_id="ahead-1").get(timeout=10)


def test_events_tail_with_no_fleet_answering_says_so_after_the_timeout(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet()  # not started

    started = time.monotonic()
    out = fleet.ctl("--timeout", "0.5", "events", "tail", check=False, timeout=10)

    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr.splitlines() == [
        "fleetctl: no node answered within 0.5s (h1): no events to tail"
    ]
    assert time.monotonic() - started < 5


def test_top_leaves_on_q_and_gives_the_terminal_back(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet().start()
    controller, terminal = pty.openpty()
    top = subprocess.Popen(
        [FLEETCTL, "-c", str(fleet.config), "top"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        cwd=fleet.folder,
    )
    try:
        screen = read_until(controller, top, lambda text: "w@h1" in text, 15)
        assert "w@h1" in screen, screen
        os.write(controller, b"q")
        read_until(controller, top, lambda text: False, 5)
        assert top.wait(1) == 0
        assert termios.tcgetattr(terminal)[3] & termios.ECHO, "the terminal is left without echo"
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()
        os.close(controller)
        os.close(terminal)


def read_until(
    fd: int, proc: subprocess.Popen[bytes], done: Callable[[str], bool], timeout: float
) -> str:
    """What the process writes to the terminal, until `done(text)`, its exit, or `timeout`."""
    text, deadline = "", time.monotonic() + timeout
    while not done(text) and proc.poll() is None and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.05)[0]:
            text += os.read(fd, 65536).decode(errors="replace")
    return text

"""An operator's cold stop is not a death: it gives a running task back without a strike.

`max_deliveries` counts the deaths a task caused (a crash, an OOM kill, a SIGKILL of its
child or worker). A cold stop the operator asked for (QUIT, `fleetd stop --timeout`, a
`shutdown_timeout` that ran out) kills the child too, but the task goes back to the broker
as if it had never been delivered, however often that happens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fleet import FLEETD, Fleet, wait_for
from worker.client import Handle

HOLD_LIMIT = 30  # seconds: a long task, stopped each time long before it could finish


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def start_held(fleet: Fleet, handle: Handle | None, tmp_path: Path) -> Handle:
    """Start the fleet and wait for the long task (submitted now if `handle` is None) to run
    once more."""
    marker = tmp_path / "started.txt"
    runs = len(lines(marker))
    fleet.start()
    if handle is None:
        handle = fleet.client.submit("tasks.hold", str(tmp_path / "gate"), str(marker), HOLD_LIMIT)
    wait_started(handle, marker, runs + 1)
    return handle


def wait_started(handle: Handle, marker: Path, runs: int) -> None:
    """Wait until the task started `runs` times in all, failing at once if it ended FAILURE."""
    wait_for(
        lambda: len(lines(marker)) >= runs or handle.state == "FAILURE",
        15,
        message=f"start {runs} of the task",
    )
    assert handle.state != "FAILURE", f"failed after {runs - 1} starts: {handle.info()}"


def let_it_finish(fleet: Fleet, handle: Handle, tmp_path: Path) -> None:
    (tmp_path / "gate").touch()
    fleet.start()
    wait_for(lambda: handle.state in ("SUCCESS", "FAILURE"), 15, message="the task to end")
    info = handle.info()
    assert (info["state"], info["exc_type"]) == ("SUCCESS", None)
    assert info["deliveries"] == 1, "a cold stop was counted as a delivery"
    assert fleet.client.broker.dead_letters() == []


def test_a_long_task_cold_stopped_four_times_with_quit_then_let_run_succeeds(
    make_fleet: Callable[..., Fleet], broker_url: str, tmp_path: Path
) -> None:
    fleet = make_fleet(fleet={"broker": broker_url}, defaults={"max_deliveries": 3})
    handle = None
    for _ in range(4):
        handle = start_held(fleet, handle, tmp_path)
        fleet.signal(signal.SIGQUIT)
        assert fleet.wait_exit(20) == 0
    assert handle is not None
    let_it_finish(fleet, handle, tmp_path)
    fleet.signal(signal.SIGTERM)
    assert fleet.wait_exit(20) == 0


@pytest.mark.parametrize("pad", [0, 200_000], ids=["small-reply", "reply-over-a-pipe"])
def test_a_cold_stop_takes_in_the_outcome_a_child_wrote_before_it_and_runs_it_no_more(
    make_fleet: Callable[..., Fleet], broker_url: str, tmp_path: Path, pad: int
) -> None:
    """The task ended and its child wrote the outcome, which the worker had not read yet (it
    was stopped, or busy) when a QUIT came: the cold stop gave the task back, and it ran a
    second time (as it did when shutdown_timeout ran out). A reply larger than the pipe is
    read to its end as the child writes the rest."""
    fleet = make_fleet(fleet={"broker": broker_url}, defaults={"concurrency": 1}).start()
    journal = tmp_path / "journal"
    handle = fleet.client.submit("tasks.journal_reply", str(journal), 0.5, pad)
    wait_for(lambda: "S " in "".join(lines(journal)), 10, message="the task to start")
    [worker] = fleet.worker_pids()
    os.kill(worker, signal.SIGSTOP)  # it cannot read its child's pipe now
    try:
        wait_for(lambda: "E " in "".join(lines(journal)), 10, message="the task to end")
        time.sleep(0.2)  # the child writes its outcome, then waits for the next task
        os.kill(worker, signal.SIGQUIT)
    finally:
        os.kill(worker, signal.SIGCONT)
    assert handle.get(timeout=20) == "x" * pad
    wait_for(lambda: fleet.worker_pids() and fleet.worker_pids() != [worker], 20)
    assert fleet.client.submit("tasks.add", 1, 1).get(timeout=10) == 2  # the new one runs
    assert [line.split()[0] for line in lines(journal)] == ["S", "E"]  # once
    assert handle.info()["deliveries"] == 1


@pytest.mark.parametrize("how", ["fleetd stop --timeout", "shutdown_timeout"])
def test_a_stop_that_ends_cold_after_a_timeout_is_no_strike(
    make_fleet: Callable[..., Fleet], tmp_path: Path, how: str
) -> None:
    """With max_deliveries = 1 a single strike would dead-letter the task."""
    defaults = {"max_deliveries": 1}
    if how == "shutdown_timeout":
        defaults["shutdown_timeout"] = 0.5
    fleet = make_fleet(defaults=defaults)
    handle = None
    for _ in range(2):
        handle = start_held(fleet, handle, tmp_path)
        if how == "shutdown_timeout":
            fleet.signal(signal.SIGTERM)
        else:
            subprocess.run(
                [FLEETD, "stop", "-c", str(fleet.config), "--timeout", "0.5"],
                check=True,
                timeout=30,
                cwd=fleet.folder,
            )
        assert fleet.wait_exit(20) == 0
    assert handle is not None
    let_it_finish(fleet, handle, tmp_path)
    fleet.signal(signal.SIGTERM)
    assert fleet.wait_exit(20) == 0


def test_a_task_whose_child_is_killed_max_deliveries_times_is_still_dead_lettered(
    make_fleet: Callable[..., Fleet], broker_url: str, tmp_path: Path
) -> None:
    """Cold stops in between change nothing: the third death of its child ends it."""
    fleet = make_fleet(fleet={"broker": broker_url}, defaults={"max_deliveries": 3})
    marker = tmp_path / "started.txt"
    handle = start_held(fleet, None, tmp_path)
    fleet.signal(signal.SIGQUIT)
    assert fleet.wait_exit(20) == 0
    handle = start_held(fleet, handle, tmp_path)
    for deaths in range(1, 3):
        os.kill(int(lines(marker)[-1].split()[1]), signal.SIGKILL)
        wait_started(handle, marker, 2 + deaths)
    os.kill(int(lines(marker)[-1].split()[1]), signal.SIGKILL)
    wait_for(lambda: handle.state == "FAILURE", 15, message="the task to be dead-lettered")
    info = handle.info()
    assert (info["exc_type"], info["deliveries"]) == ("WorkerLost", 3)
    assert [(d.id, d.reason) for d in fleet.client.broker.dead_letters()] == [
        (handle.id, "WorkerLost")
    ]
    fleet.signal(signal.SIGTERM)
    assert fleet.wait_exit(20) == 0


def test_a_task_that_only_waited_behind_one_whose_worker_was_killed_takes_no_strike(
    make_fleet: Callable[..., Fleet], broker_url: str, tmp_path: Path
) -> None:
    """Its worker SIGKILLed three times while a long task ran and a short one, reserved,
    waited behind it: both were dead-lettered WorkerLost, the short one though it never
    ran. A gone worker's task that had started there keeps its strike."""
    fleet = make_fleet(fleet={"broker": broker_url}, defaults={"concurrency": 1}).start()
    marker = tmp_path / "started.txt"
    long = fleet.client.submit("tasks.sleep", 30, str(marker))
    short = fleet.client.submit("tasks.add", 1, 2)
    for kill in range(3):
        wait_for(lambda k=kill: len(lines(marker)) == k + 1, 20, message="the long task's start")
        [worker] = fleet.worker_pids()
        wait_for(lambda: short.id in reserved(fleet), 10, message="the short task reserved")
        os.kill(worker, signal.SIGKILL)
    wait_for(lambda: long.state == "FAILURE", 30, message="the long task's last death")
    assert long.info()["exc_type"] == "WorkerLost"
    assert short.get(timeout=20) == 3 and short.info()["deliveries"] == 1


def reserved(fleet: Fleet) -> list[str]:
    """The ids the fleet's one worker holds without having started them."""
    out = fleet.ctl("--json", "inspect", "reserved", check=False)
    replies = json.loads(out.stdout).get("replies", {}) if out.stdout else {}
    return [t.get("id") for held in replies.values() if isinstance(held, list) for t in held]

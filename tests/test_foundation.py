"""End to end on the SQLite broker: tasks run once, results come back, TERM loses nothing."""

from __future__ import annotations

import collections
import signal
from pathlib import Path

import psutil
import pytest

from tests.fleet import wait_for
from worker import TaskFailed


def test_tasks_run_exactly_once_and_results_come_back(make_fleet, tmp_path: Path) -> None:
    fleet = make_fleet().start()
    log = tmp_path / "ran.txt"
    handles = fleet.client.submit_many([("tasks.record", (str(log), i), {}) for i in range(200)])
    assert [h.get(timeout=30) for h in handles] == list(range(200))
    counts = collections.Counter(log.read_text().split())
    assert len(counts) == 200 and set(counts.values()) == {1}
    assert fleet.client.submit("tasks.add", 2, 3).get(timeout=10) == 5


def test_failure_comes_back_with_its_type(make_fleet) -> None:
    fleet = make_fleet().start()
    with pytest.raises(TaskFailed) as err:
        fleet.client.submit("tasks.fail", "nope").get(timeout=10)
    assert err.value.exc_type == "ValueError" and "nope" in str(err.value)
    info = fleet.client.handle(err.value.task_id).info()
    assert info["state"] == "FAILURE" and "Traceback" in info["traceback"]


def test_unknown_task_is_dead_lettered_not_dropped(make_fleet) -> None:
    fleet = make_fleet().start()
    with pytest.raises(TaskFailed) as err:
        fleet.client.submit("tasks.nonexistent").get(timeout=10)
    assert err.value.exc_type == "NotRegistered"
    assert [d.name for d in fleet.client.broker.dead_letters()] == ["tasks.nonexistent"]
    assert fleet.client.submit("tasks.add", 1, 1).get(timeout=10) == 2


def test_term_finishes_running_returns_reserved_and_exits_clean(make_fleet, tmp_path: Path) -> None:
    fleet = make_fleet(defaults={"concurrency": 2, "prefetch": 2}).start()
    marker = tmp_path / "started.txt"
    handles = fleet.client.submit_many([("tasks.sleep", (1.0, str(marker)), {}) for _ in range(8)])
    wait_for(
        lambda: marker.exists() and len(marker.read_text().splitlines()) == 2,
        10,
        message="2 tasks started",
    )
    fleet.signal(signal.SIGTERM)
    assert fleet.wait_exit(30) == 0
    assert fleet.leftovers() == []
    states = collections.Counter(fleet.client.handle(h.id).state for h in handles)
    assert states == {"SUCCESS": 2, "PENDING": 6}, states
    # A new fleet finishes the returned ones, each exactly once.
    fleet.start()
    for h in handles:
        h.get(timeout=30)
    assert len(marker.read_text().splitlines()) == 8
    assert all(fleet.client.handle(h.id).info()["deliveries"] == 1 for h in handles)


def test_worker_killed_is_restarted_and_its_tasks_come_back(make_fleet, tmp_path: Path) -> None:
    fleet = make_fleet().start()
    marker = tmp_path / "started.txt"
    slow = fleet.client.submit("tasks.sleep", 5, str(marker))
    wait_for(marker.exists, 10, message="the slow task to start")
    # STARTED in the broker: the death is one it may have caused (a strike)
    wait_for(lambda: slow.state == "STARTED", 10, message="its start in the broker")
    [worker_pid] = fleet.worker_pids()
    children = fleet.child_pids(worker_pid)
    fleet.remember_pids()
    psutil.Process(worker_pid).kill()
    wait_for(
        lambda: fleet.worker_pids() and fleet.worker_pids() != [worker_pid],
        10,
        message="a new worker",
    )
    wait_for(
        lambda: (
            not any(
                psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in children
            )
        ),
        10,
        message="the dead worker's children to go",
    )
    # The slow task was held by the dead worker: it is given back at once, not after the lease.
    wait_for(
        lambda: len(marker.read_text().splitlines()) == 2, 10, message="the task to be redelivered"
    )
    assert fleet.client.handle(slow.id).info()["deliveries"] == 2
    assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == 3


def test_task_submitted_before_the_fleet_starts_runs_once_it_is_up(make_fleet) -> None:
    # How fast that is (cold start) is a figure of `make bench`, not an assertion here.
    fleet = make_fleet()
    handle = fleet.client.submit("tasks.add", 1, 1)
    fleet.start(wait=False)
    assert handle.get(timeout=15) == 2
    assert handle.info()["deliveries"] == 1

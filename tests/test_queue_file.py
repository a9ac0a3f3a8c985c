"""The SQLite queue file deleted or replaced under a running fleet: workers follow it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

from fleetd import Client
from tests.fleet import Fleet, wait_for


def remove_queue_files(fleet: Fleet) -> None:
    for suffix in ("", "-wal", "-shm"):
        path = fleet.folder / f"queue.db{suffix}"
        if path.exists():
            path.unlink()


def test_a_deleted_queue_file_is_reopened_and_new_tasks_run(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet().start()
    assert fleet.client.submit("tasks.add", 1, 1).get(timeout=10) == 2
    workers = fleet.worker_pids()
    remove_queue_files(fleet)
    fresh = Client.from_config(str(fleet.config))  # makes a new, empty file
    try:
        assert fresh.submit("tasks.add", 2, 2).get(timeout=10) == 4
    finally:
        fresh.close()
    assert "queue file" in fleet.log() and "opening it anew" in fleet.log()
    assert fleet.worker_pids() == workers  # followed, not restarted


def test_a_queue_file_replaced_by_another_is_followed(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet().start()
    assert fleet.client.submit("tasks.add", 1, 1).get(timeout=10) == 2
    spare = fleet.folder / "spare"
    spare.mkdir()
    other = Client(f"sqlite:///{spare / 'queue.db'}")  # a restored backup, say
    waiting = other.submit("tasks.add", 3, 3)
    other.close()
    remove_queue_files(fleet)
    shutil.move(str(spare / "queue.db"), str(fleet.folder / "queue.db"))
    fresh = Client.from_config(str(fleet.config))
    try:
        assert fresh.handle(waiting.id).get(timeout=10) == 6
    finally:
        fresh.close()
    wait_for(lambda: "opening it anew" in fleet.log(), 5, message="the log line")
    assert os.path.exists(fleet.folder / "queue.db")

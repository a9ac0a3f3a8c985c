"""The SQLite queue file deleted or replaced under a running fleet: workers follow it."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sqlite3
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleetd import BrokerUnavailable, Client
from tests.conftest import fill, tmpfs
from tests.fleet import Fleet, executions, wait_for


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


def test_a_removed_wake_up_folder_is_made_again_and_tasks_start_at_once_again(
    make_fleet: Callable[..., Fleet],
) -> None:
    """Producers wake a worker through its pipe in `queue.db-wake/`. With the folder removed
    (an rm -rf, a /tmp cleaner) every task waited for the worker's next look at the queue,
    a second later, for good. The worker makes its pipe again within a second (and looks at
    the queue then): tasks start at once again."""
    fleet = make_fleet(workers=[{"name": "w", "queues": ["default"], "concurrency": 1}])
    fleet.start()
    assert fleet.client.submit("tasks.add", 1, 1).get(timeout=10) == 2
    folder = fleet.folder / "queue.db-wake"
    shutil.rmtree(folder)
    wait_for(lambda: folder.exists() and os.listdir(folder), 5, message="the pipe made again")
    # Said just after the pipe is made: the line may reach the log a moment after the pipe.
    wait_for(lambda: "was removed: made again" in fleet.log(), 5, message="the warning")
    waits = []
    for i in range(7):
        started = time.monotonic()
        assert fleet.client.submit("tasks.add", i, i).get(timeout=10) == 2 * i
        waits.append(time.monotonic() - started)
    # Each waited DRY_RECHECK (1 s) without its pipe: half a second is far from both.
    assert statistics.median(waits) < 0.5, waits


def test_a_producer_that_was_open_before_the_file_was_deleted_writes_into_the_new_one(
    make_fleet: Callable[..., Fleet],
) -> None:
    """A long-lived client (a web app's, .delay()'s) kept committing into the deleted file:
    submit returned an id, and the task was lost with the file."""
    fleet = make_fleet().start()
    producer = fleet.client
    assert producer.submit("tasks.add", 1, 1).get(timeout=10) == 2
    remove_queue_files(fleet)
    handle = producer.submit("tasks.add", 2, 2)  # at once: no second's grace
    assert handle.get(timeout=10) == 4
    fresh = Client.from_config(str(fleet.config))
    try:
        info = fresh.find(handle.id)
        assert info is not None and info["result"] == 4
    finally:
        fresh.close()


@pytest.fixture
def few_inodes(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 64 inodes at `tmp_path/host/q`, for the queue file: a disk a test can run
    out of inodes. Ask for it before make_fleet, so that the fleet stops before the unmount."""
    with tmpfs(tmp_path / "host" / "q", "size=8m,nr_inodes=64,mode=0700") as mount:
        yield mount


def test_a_worker_that_cannot_make_its_wake_up_pipe_runs_its_tasks_all_the_same(
    few_inodes: Path, make_fleet: Callable[..., Fleet]
) -> None:
    """No inode left where the queue's wake-up pipes go: the worker's boot failed on its
    pipe, with a traceback, again and again until the node was FATAL, and stayed so once
    room was made. It looks at its queues every second instead, until it can make it."""
    fleet = make_fleet(fleet={"broker": "sqlite:///q/queue.db"}).start()
    assert fleet.client.submit("tasks.add", 1, 1).get(timeout=10) == 2
    fillers = []
    with contextlib.suppress(OSError):
        while True:
            fillers.append(few_inodes / f"filler-{len(fillers)}")
            fillers[-1].touch()
    with pytest.raises(OSError) as full:
        os.mkfifo(few_inodes / "one-more")
    assert full.value.errno == errno.ENOSPC
    [worker] = fleet.worker_pids()
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: "cannot make the wake-up pipe" in fleet.log(), 15, message="the warning")
    assert fleet.client.submit("tasks.add", 2, 2).get(timeout=10) == 4
    for filler in fillers:
        with contextlib.suppress(FileNotFoundError):
            filler.unlink()
    wait_for(lambda: "is made" in fleet.log(), 10, message="the pipe made once there is room")
    assert fleet.client.submit("tasks.add", 3, 3).get(timeout=10) == 6
    assert "Traceback" not in fleet.log() and "FATAL" not in fleet.log()


def test_a_file_where_the_wake_up_folder_goes_is_ridden_out_by_a_new_worker(
    make_fleet: Callable[..., Fleet],
) -> None:
    """A running worker rode it out; one that booted on it (a restart, a reload) failed its
    boot in a traceback, again and again until the node was FATAL, its queue without one."""
    fleet = make_fleet().start()
    assert fleet.client.submit("tasks.add", 1, 1).get(timeout=10) == 2
    wake = fleet.folder / "queue.db-wake"
    shutil.rmtree(wake)
    wake.write_text("someone's file\n")
    [worker] = fleet.worker_pids()
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: fleet.worker_pids() and fleet.worker_pids() != [worker], 15)
    assert fleet.client.submit("tasks.add", 2, 2).get(timeout=10) == 4
    wait_for(lambda: "is no folder" in fleet.log(), 10, message="the warning naming it")
    wake.unlink()
    wait_for(lambda: "is made" in fleet.log(), 10, message="the pipe made once it can be")
    assert "Traceback" not in fleet.log() and "FATAL" not in fleet.log()


def test_a_damaged_queue_file_is_waited_out_in_one_line_not_died_on(
    make_fleet: Callable[..., Fleet],
) -> None:
    """The workers died on sqlite3.DatabaseError ("database disk image is malformed", "file
    is not a database") in a traceback, again and again until FATAL, and a client's submit
    raised it raw. Both say it in one line now, and the workers run once it is put right."""
    fleet = make_fleet(defaults={"worker_timeout": 0}).start()
    assert fleet.client.submit("tasks.add", 1, 1).get(timeout=10) == 2
    fleet.stop()
    db = fleet.folder / "queue.db"
    good = db.read_bytes()
    page = 4096  # the first page (the header, the schema) kept: the file opens, its tables not
    db.write_bytes(good[:page] + b"\xff" * (len(good) - page))
    fleet.start(wait=False)
    wait_for(lambda: "broker unreachable" in fleet.log(), 20, message="the one line")
    with pytest.raises(BrokerUnavailable):
        Client.from_config(str(fleet.config)).submit("tasks.add", 1, 2)
    db.write_bytes(good)  # put right
    client = Client.from_config(str(fleet.config))
    try:
        assert client.submit("tasks.add", 2, 2).get(timeout=20) == 4
    finally:
        client.close()
    assert "Traceback" not in fleet.log() and "FATAL" not in fleet.log()


def test_a_warm_stop_waiting_on_a_write_lock_is_no_hung_worker(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """TERM while another process held the queue file's write lock: the worker waited to ack
    its finished tasks, silent, and worker_timeout took it for hung and killed it; its acks
    lost, the tasks that had ended ran again at the next start."""
    fleet = make_fleet(defaults={"worker_timeout": 4, "concurrency": 2}).start()
    journal = tmp_path / "journal"
    handles = fleet.client.submit_many([("tasks.journal", (str(journal), 1.5), {})] * 2)
    wait_for(lambda: journal.exists() and journal.read_text().count("S ") == 2, 10)
    holder = sqlite3.connect(fleet.folder / "queue.db", timeout=10)
    holder.execute("BEGIN IMMEDIATE")  # as a sqlite3 shell in a transaction does
    try:
        fleet.signal(signal.SIGTERM)
        time.sleep(6)  # the tasks end meanwhile; their acks wait for the lock
    finally:
        holder.rollback()
        holder.close()
    assert fleet.wait_exit(20) == 0
    assert "silent for" not in fleet.log(), fleet.log()
    assert [i["state"] for i in fleet.infos([h.id for h in handles])] == ["SUCCESS"] * 2


@pytest.fixture
def queue_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs at `tmp_path/host/q`, for the queue file: a disk a test can fill. Ask
    for it before make_fleet, so that the fleet stops before the unmount."""
    with tmpfs(tmp_path / "host" / "q", "size=8m,mode=0700") as mount:
        yield mount


def test_a_queue_file_on_a_disk_that_fills_mid_drain_loses_no_task_and_runs_none_twice(
    queue_disk: Path, make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """The disk under the queue file fills while a backlog drains: every write (hand-outs,
    acks, results) fails with "database or disk is full" until room is made. The worker
    waits it out keeping what its children ended, backing off as from a broker that is
    down, and then every task has its result and ran once: a failed turn is rolled back
    whole, none of its writes half kept. (The reads and empty writes that went on took the
    broker for back each time: a retry, and two lines logged, every 0.2 s.)"""
    fleet = make_fleet(
        fleet={"broker": "sqlite:///q/queue.db"}, defaults={"concurrency": 2, "prefetch": 3}
    ).start()
    journal = tmp_path / "journal"
    handles = fleet.client.submit_many([("tasks.journal", (str(journal), 0.004), {})] * 400)
    [worker] = fleet.worker_pids()
    wait_for(lambda: sum(executions(journal).values()) >= 40, 20, message="the drain")
    filler = fill(queue_disk)
    wait_for(lambda: "disk is full" in fleet.log(), 20, message="the turns that fail")
    started = sum(executions(journal).values())
    wait_for(lambda: "trying again in 1.6s" in fleet.log(), 20, message="a longer backoff")
    assert sum(executions(journal).values()) <= started + 8  # the most it may hold
    lines = fleet.log().splitlines()
    assert len([line for line in lines if "WARNING" in line and "unreachable" in line]) == 1
    assert "reachable again" not in fleet.log()
    filler.unlink()
    for handle in handles:
        assert handle.get(timeout=60) > 0
    assert executions(journal) == {handle.id: 1 for handle in handles}  # each ran, once
    assert fleet.log().count("broker reachable again") == 1
    assert fleet.worker_pids() == [worker]
    assert "Traceback" not in fleet.log() and "FATAL" not in fleet.log()

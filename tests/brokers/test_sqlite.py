"""SQLite broker only: ended tasks' records are deleted `result_ttl` seconds after they end.

Age is made by moving `finished` back in the database file itself, never by sleeping.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fleet import Fleet, fleetctl_on, wait_for
from worker.brokers import open_broker
from worker.brokers.base import FAILURE, SUCCESS, BrokerUnavailable, Outcome, QueueDepth, Turn
from worker.brokers.sqlite import EXPIRE_BATCH, PAGE_CACHE_KIB, FifoWakeup, Poker, SQLiteBroker

from .test_contract import envelope

TTL = 60


@pytest.fixture
def sqlite_broker(tmp_path: Path) -> Iterator[SQLiteBroker]:
    opened = open_broker(f"sqlite:///{tmp_path / 'queue.db'}", result_ttl=TTL)
    assert isinstance(opened, SQLiteBroker)
    try:
        yield opened
    finally:
        opened.close()


def finished(broker: SQLiteBroker, count: int = 1) -> list[str]:
    """Ids of `count` tasks run to SUCCESS just now."""
    tasks = [envelope() for _ in range(count)]
    broker.enqueue(tasks)
    broker.reserve(["q1"], count, "w1", 30)
    broker.turn(Turn(outcomes=[Outcome(t.id, SUCCESS, result=1) for t in tasks]))
    return [t.id for t in tasks]


def age(db_path: str, ids: list[str], seconds: float) -> None:
    """Date these tasks' creation and end `seconds` back."""
    then = time.time() - seconds
    with contextlib.closing(sqlite3.connect(db_path)) as db, db:
        db.executemany(
            "UPDATE tasks SET created = ?, finished = ? WHERE id = ?",
            [(then, then, i) for i in ids],
        )


def test_record_older_than_result_ttl_is_deleted_and_a_fresher_one_kept(
    sqlite_broker: SQLiteBroker,
) -> None:
    old, fresh = finished(sqlite_broker, 2)
    age(sqlite_broker.path, [old], TTL + 1)
    age(sqlite_broker.path, [fresh], TTL - 5)

    assert sqlite_broker.expire() == 1

    assert sqlite_broker.get_result(old) is None
    info = sqlite_broker.get_result(fresh)
    assert info is not None and info["state"] == SUCCESS


def test_queued_and_held_tasks_are_kept_whatever_their_age(sqlite_broker: SQLiteBroker) -> None:
    held, queued = envelope(), envelope()
    sqlite_broker.enqueue([held])
    assert [d.id for d in sqlite_broker.reserve(["q1"], 1, "w1", 30)] == [held.id]
    sqlite_broker.enqueue([queued])
    # Even with an old `finished` (which they never have), only ended tasks expire.
    age(sqlite_broker.path, [held.id, queued.id], 10 * TTL)

    assert sqlite_broker.expire() == 0

    assert sqlite_broker.depths() == [QueueDepth("q1", ready=1, reserved=1)]
    sqlite_broker.turn(Turn(outcomes=[Outcome(held.id, SUCCESS)]))
    assert [d.id for d in sqlite_broker.reserve(["q1"], 1, "w1", 30)] == [queued.id]


def test_dead_letters_and_revokes_outlive_the_task_records(sqlite_broker: SQLiteBroker) -> None:
    dead, revoked = envelope(), envelope()
    sqlite_broker.enqueue([dead])
    sqlite_broker.reserve(["q1"], 1, "w1", 30)
    sqlite_broker.enqueue([revoked])
    lost = Outcome(dead.id, "FAILURE", exc_type="WorkerLost", dead_letter=True)
    sqlite_broker.turn(Turn(outcomes=[lost]))
    sqlite_broker.revoke([revoked.id])
    age(sqlite_broker.path, [dead.id, revoked.id], TTL + 1)

    assert sqlite_broker.expire() == 2

    assert [sqlite_broker.get_result(i) for i in (dead.id, revoked.id)] == [None, None]
    assert [d.id for d in sqlite_broker.dead_letters()] == [dead.id]
    assert sqlite_broker.revoked() == {revoked.id}


def test_a_backlog_goes_one_batch_per_call_then_expiry_rests(sqlite_broker: SQLiteBroker) -> None:
    backlog = finished(sqlite_broker, 2 * EXPIRE_BATCH + 1)
    age(sqlite_broker.path, backlog, TTL + 1)

    assert [sqlite_broker.expire() for _ in range(3)] == [EXPIRE_BATCH, EXPIRE_BATCH, 1]
    assert all(sqlite_broker.get_result(i) is None for i in backlog)

    # Caught up: the next look is EXPIRE_EVERY seconds away, so nothing goes meanwhile.
    (late,) = finished(sqlite_broker)
    age(sqlite_broker.path, [late], TTL + 1)
    assert sqlite_broker.expire() == 0
    assert sqlite_broker.get_result(late) is not None


def test_maintain_expires_results_when_a_worker_is_idle(sqlite_broker: SQLiteBroker) -> None:
    (old,) = finished(sqlite_broker)
    age(sqlite_broker.path, [old], TTL + 1)

    sqlite_broker.maintain()

    assert sqlite_broker.get_result(old) is None


def test_fleet_under_constant_load_still_expires_results_after_result_ttl(
    make_fleet: Callable[..., Fleet],
) -> None:
    """The worker holds a 30 s task from its first turn on, so it is never idle: the
    record goes through the busy path, with `result_ttl` from the config."""
    fleet = make_fleet(fleet={"result_ttl": TTL}, defaults={"concurrency": 1, "prefetch": 0})
    client = fleet.client
    busy = client.submit("tasks.sleep", 30)
    old, fresh = "old-record", "fresh-record"
    client.broker.turn(
        Turn(outcomes=[Outcome(old, SUCCESS, name="tasks.add"), Outcome(fresh, SUCCESS)])
    )
    age(str(fleet.folder / "queue.db"), [old], 10 * TTL)

    fleet.start()
    wait_for(lambda: busy.state == "STARTED", 10, message="the 30 s task to start")
    wait_for(lambda: client.broker.get_result(old) is None, 10, message="the old record to go")

    assert busy.state == "STARTED"  # still running: the worker was never idle
    assert client.broker.get_result(fresh) is not None
    fleet.signal(signal.SIGQUIT)  # a cold shutdown: no waiting out the 30 s task
    assert fleet.wait_exit(15) == 0


# --- wake-ups: producers poke the consumers' pipes ---------------------------------------
def readable(wakeup: FifoWakeup) -> bool:
    return bool(select.select([wakeup.fileno()], [], [], 0)[0])


def test_a_consumer_that_comes_right_after_a_poke_is_woken_by_the_next(tmp_path: Path) -> None:
    poker = Poker(str(tmp_path / "wake"))
    first = FifoWakeup(str(tmp_path / "wake"))
    poker.poke()
    assert readable(first)
    # made right after the listing (on a coarse file-system clock: within the same tick)
    second = FifoWakeup(str(tmp_path / "wake"))
    poker.poke()
    assert readable(second)
    for wakeup in (first, second):
        wakeup.close()
    poker.close()


def test_a_poke_says_what_it_announces_a_ready_task_an_eta_or_a_revoke(
    tmp_path: Path,
) -> None:
    poker, consumer = Poker(str(tmp_path / "wake")), FifoWakeup(str(tmp_path / "wake"))
    seen = []
    for pokes in ([{}], [{"scheduled": True}], [{"revoked": True}], [{}, {"revoked": True}]):
        for poke in pokes:
            poker.poke(**poke)
        seen.append((consumer.clear(), consumer.revoked()))
    assert seen == [(False, False), (True, False), (False, True), (False, True)]
    assert (consumer.clear(), consumer.revoked()) == (False, False)  # nothing since
    consumer.close()
    poker.close()


def test_a_dead_consumers_pipe_is_dropped_and_removed(tmp_path: Path) -> None:
    poker = Poker(str(tmp_path / "wake"))
    live, dead = FifoWakeup(str(tmp_path / "wake")), FifoWakeup(str(tmp_path / "wake"))
    poker.poke()
    assert dead.path in poker.pipes
    os.close(dead.fileno())  # a killed consumer: its pipe stays, nobody reads it
    os.close(dead._keep_fd)
    poker.poke()
    assert dead.path not in poker.pipes and not os.path.exists(dead.path)
    assert readable(live) and live.path in poker.pipes
    live.close()
    poker.close()


def test_a_poke_writes_to_consumers_pipes_only(tmp_path: Path) -> None:
    """Whatever else lies in the wake folder (a file left there, a link to a file of the
    user's) is neither written nor followed: a poke wrote a byte into each, every submit."""
    folder = tmp_path / "wake"
    consumer = FifoWakeup(str(folder))
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    (folder / "left-here.txt").write_text("a note\n")
    (folder / "link").symlink_to(target)
    (folder / "dir").mkdir()
    poker = Poker(str(folder))
    for _ in range(3):
        poker.poke()
    assert readable(consumer) and list(poker.pipes) == [consumer.path]
    assert target.read_text() == "keep me\n"
    assert (folder / "left-here.txt").read_text() == "a note\n"
    assert (folder / "link").is_symlink() and (folder / "dir").is_dir()
    consumer.close()
    poker.close()


def test_a_file_where_the_wake_folder_goes_never_fails_a_write_that_committed(
    tmp_path: Path,
) -> None:
    """The poke comes after the commit: a submit that raised there (NotADirectoryError)
    had queued its task all the same, and a caller that sent it again ran it twice."""
    broker = SQLiteBroker(f"sqlite:///{tmp_path}/queue.db")
    try:
        Path(broker.wake_folder).write_text("in the way\n")
        task = envelope()
        broker.enqueue([task])
        [delivery] = broker.reserve(["q1"], 5, "w1", 30)
        assert delivery.id == task.id
        broker.turn(Turn(outcomes=[Outcome(task.id, SUCCESS, result=1)]))
        assert broker.get_result(task.id)["state"] == SUCCESS
    finally:
        broker.close()


def test_the_page_cache_is_kept_small_on_the_first_file_and_on_one_that_replaced_it(
    sqlite_broker: SQLiteBroker, tmp_path: Path
) -> None:
    """SQLite's default cache (2 MiB) stays in an idle worker as memory of its own."""

    def cache_kib() -> int:
        return -int(sqlite_broker.db.execute("PRAGMA cache_size").fetchone()[0])

    assert cache_kib() == PAGE_CACHE_KIB < 2000
    first = sqlite_broker.db
    os.replace(tmp_path / "queue.db", tmp_path / "moved.db")  # the file moved away: reopened
    sqlite_broker.follow_file(always=True)
    assert sqlite_broker.db is not first
    assert cache_kib() == PAGE_CACHE_KIB


def test_a_queue_file_that_is_no_database_is_named_and_left_as_it_is(tmp_path: Path) -> None:
    """fleetctl submit ended in a sqlite3.DatabaseError traceback, and `fleetd start` said
    only "file is not a database"; each names the broker now, and the file is not touched."""
    path = tmp_path / "queue.db"
    text = b"notes that were never a queue\n" * 200
    path.write_bytes(text)
    url = f"sqlite:///{path}"
    with pytest.raises(BrokerUnavailable) as error:
        open_broker(url)
    assert str(error.value) == f"broker {url}: file is not a database"
    assert path.read_bytes() == text
    done = fleetctl_on(url, "submit", "tasks.add", "1", "2")
    assert (done.returncode, done.stderr) == (
        1,
        f"fleetctl: broker {url}: file is not a database\n",
    )
    assert path.read_bytes() == text


def insert_queued(broker: SQLiteBroker, task_id: str, eta: str) -> None:
    """A queued row of other hands' writing in q1, its ETA an SQL value."""
    with contextlib.closing(sqlite3.connect(broker.path)) as db, db:
        db.execute(
            "INSERT INTO tasks (id, queue, name, body, status, state, eta, created)"
            f" VALUES (?, 'q1', 'tasks.add', '{{}}', 0, 'PENDING', {eta}, 0)",
            (task_id,),
        )


def test_a_row_whose_eta_is_not_a_number_ends_bad_message_once_the_queue_is_dry(
    sqlite_broker: SQLiteBroker,
) -> None:
    ready = envelope()
    sqlite_broker.enqueue([ready, envelope(eta=time.time() + 60)])
    insert_queued(sqlite_broker, "soon", eta="'soon'")

    assert sqlite_broker.next_due(["q1"]) == pytest.approx(time.time() + 60, abs=5)
    assert [d.id for d in sqlite_broker.reserve(["q1"], 5, "w1", 30)] == [ready.id]
    [letter] = sqlite_broker.dead_letters()
    assert (letter.id, letter.reason) == ("soon", "BadMessage")


@pytest.mark.parametrize("eta", ["9e999", "1e300", "253402300800"])
def test_a_row_whose_eta_is_past_the_calendar_ends_bad_message_and_is_never_next_due(
    sqlite_broker: SQLiteBroker, eta: str
) -> None:
    """An ETA of infinity or past the year 9999 (the client refuses one) was never due: the
    task neither ran nor failed, and `fleetctl inspect scheduled` failed on its next_due
    (infinity or 1e300 is no JSON a reply can carry)."""
    ready = envelope()
    sqlite_broker.enqueue([ready])
    insert_queued(sqlite_broker, "far", eta=eta)

    assert sqlite_broker.next_due(["q1"]) is None
    assert [d.id for d in sqlite_broker.reserve(["q1"], 5, "w1", 30)] == [ready.id]
    [letter] = sqlite_broker.dead_letters()
    assert (letter.id, letter.reason) == ("far", "BadMessage")
    info = sqlite_broker.get_result("far")
    assert info is not None and (info["state"], info["exc_type"]) == (FAILURE, "BadMessage")
    assert sqlite_broker.reserve(["q1"], 5, "w1", 30) == []


def test_rows_whose_count_or_creation_time_is_no_number_are_handed_out(
    sqlite_broker: SQLiteBroker,
) -> None:
    """Each ended the reserve in a TypeError or OverflowError: the worker died at every turn
    until the arbiter gave up on it, and the queue stopped."""
    rows = [
        ("c-text", "'abc'", 0),
        ("c-blob", "x'ff'", 0),
        ("n-inf", 0, "9e999"),
        ("n-x", 0, "'x'"),
    ]
    with contextlib.closing(sqlite3.connect(sqlite_broker.path)) as db, db:
        for task_id, created, deliveries in rows:
            db.execute(
                "INSERT INTO tasks (id, queue, name, body, status, state, eta, created, deliveries)"
                f" VALUES ('{task_id}', 'q1', 'tasks.add', '{{}}', 0, 'PENDING', 0, {created},"
                f" {deliveries})"
            )

    held = sqlite_broker.reserve(["q1"], 10, "w1", 30)
    assert sorted((d.id, d.deliveries, d.ready_at) for d in held) == sorted(
        (task_id, 1, 0.0) for task_id, _, _ in rows
    )
    sqlite_broker.release([d.id for d in held], died=True)  # counted from 1 on: 2 now
    assert {d.deliveries for d in sqlite_broker.reserve(["q1"], 10, "w1", 30)} == {2}


def test_dead_letters_written_by_others_read_as_what_they_hold(
    sqlite_broker: SQLiteBroker,
) -> None:
    with contextlib.closing(sqlite3.connect(sqlite_broker.path)) as db, db:
        db.execute(
            "INSERT INTO dead_letters (id, queue, name, body, reason, at, extra)"
            " VALUES ('d-1', 'q1', 'tasks.add', CAST(? AS BLOB), 'BadMessage', 'then', '{bad')",
            (b"\xff\xfe",),
        )

    [letter] = sqlite_broker.dead_letters()
    assert (letter.id, letter.body.encode("utf-8", "surrogateescape"), letter.at) == (
        "d-1",
        b"\xff\xfe",
        0.0,
    )
    assert letter.extra == {"raw": "{bad"}


def test_a_sqlite_url_names_a_file_never_a_database_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite reads ':memory:' and 'file:...?mode=memory' itself: a submit went into a
    database of its own process, returned an id, and the task was gone with the process."""
    done = fleetctl_on("sqlite:///:memory:", "submit", "tasks.add", "1", "2")
    assert done.returncode == 2 and "a database in memory is one process's alone" in done.stderr
    monkeypatch.chdir(tmp_path)
    one = SQLiteBroker("sqlite:///file:q.db?mode=memory")
    try:
        one.enqueue([envelope()])
        assert (tmp_path / "file:q.db?mode=memory").is_file()
        two = SQLiteBroker("sqlite:///file:q.db?mode=memory")
        assert len(two.reserve(["q1"], 5, "w1", 30)) == 1
        two.close()
    finally:
        one.close()


def test_an_owner_that_is_no_utf8_names_no_process_that_runs(sqlite_broker: SQLiteBroker) -> None:
    """Someone else's row, its owner bytes that are no UTF-8 but read as a live worker of
    this host: bound back into the recovery's query, it failed every worker's boot (a lone
    surrogate SQLite cannot take) until the node was FATAL."""
    task = envelope()
    sqlite_broker.enqueue([task])
    assert len(sqlite_broker.reserve(["q1"], 1, "w1", 0.05)) == 1
    owner = b"\xff@h1:%d:%d" % (os.getpid(), int(time.time() * 1000))
    with contextlib.closing(sqlite3.connect(sqlite_broker.path)) as db, db:
        db.execute("UPDATE tasks SET owner = CAST(? AS TEXT)", (owner,))
    time.sleep(0.2)

    assert sqlite_broker.recover_expired(["q1"], "h1") == 1


@pytest.mark.parametrize("lease", [None, "soon"])
def test_a_held_task_whose_lease_is_no_number_has_run_out(
    sqlite_broker: SQLiteBroker, lease: str | None
) -> None:
    """Other hands' writing: `lease_until < now` is never true of it, and the task was held
    for good."""
    task = envelope()
    sqlite_broker.enqueue([task])
    assert len(sqlite_broker.reserve(["q1"], 1, "w1", 30)) == 1
    with contextlib.closing(sqlite3.connect(sqlite_broker.path)) as db, db:
        db.execute("UPDATE tasks SET lease_until = ?", (lease,))

    assert sqlite_broker.recover_expired(["q1"]) == 1
    assert [d.id for d in sqlite_broker.reserve(["q1"], 1, "w2", 30)] == [task.id]


def test_a_lease_that_ran_out_is_taken_back_only_from_an_owner_that_is_gone(
    sqlite_broker: SQLiteBroker,
) -> None:
    """An owner that still runs but could not renew (another process held the write lock
    past the lease) kept running its task while another worker started it again."""
    alive = f"w@h1:{os.getpid()}:{int(time.time() * 1000)}"
    gone = f"w@h1:{os.getpid()}:{int(time.time() * 1000) - 3_600_000}"  # a pid taken over since
    first, second = envelope(), envelope()
    sqlite_broker.enqueue([first, second])
    assert [d.id for d in sqlite_broker.reserve(["q1"], 1, alive, 0.05)] == [first.id]
    assert [d.id for d in sqlite_broker.reserve(["q1"], 1, gone, 0.05)] == [second.id]
    time.sleep(0.2)

    assert sqlite_broker.recover_expired(["q1"], "h1") == 1
    assert [d.id for d in sqlite_broker.reserve(["q1"], 5, "w2", 30)] == [second.id]
    # Its own that ran out: what it never learned it reserved. And with no host (no
    # worker_timeout to end a hung worker), the lease alone decides.
    assert sqlite_broker.recover_expired(["q1"], "h1", me=alive) == 1
    assert [d.id for d in sqlite_broker.reserve(["q1"], 5, alive, 0.05)] == [first.id]
    time.sleep(0.2)
    assert sqlite_broker.recover_expired(["q1"]) == 1


SHARED_CLIENT = """
import os, sys, threading, time
from worker import Client
path = sys.argv[1]
client = Client("sqlite:///" + path)
client.submit("tasks.add", 1, 1)
stop = threading.Event()
def read():
    handle = client.handle("some-id")
    while not stop.is_set():
        handle.info()
        client.depths()
        client.dead_letters()
readers = [threading.Thread(target=read) for _ in range(4)]
for reader in readers:
    reader.start()
for _ in range(int(sys.argv[2])):
    time.sleep(0.02)
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass
    client.submit("tasks.add", 1, 1)  # a write looks at the file at once: a reopen
stop.set()
for reader in readers:
    reader.join()
client.close()
print("ok")
"""


def test_a_client_shared_by_threads_survives_its_file_replaced_under_their_reads(
    tmp_path: Path,
) -> None:
    """Reads used the connection without the lock that a reopen (the queue file deleted or
    replaced) takes to close it: a read on the closed connection crashed the process
    (SIGSEGV in CPython's sqlite3)."""
    out = subprocess.run(
        [sys.executable, "-c", SHARED_CLIENT, str(tmp_path / "queue.db"), "100"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (out.returncode, out.stdout) == (0, "ok\n"), out.stderr[-2000:]

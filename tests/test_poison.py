"""Poison, end to end on both brokers: a record no one can read, or a task's absurd values,
costs that one task (FAILURE, dead-lettered where the message itself is bad) and nothing more:
the worker keeps its pid, and every innocent task around it runs once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import os
import signal
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.brokers.conftest import REDIS_URL, delete_prefix, require_redis
from tests.fleet import Fleet, executions, wait_for
from tests.poison import (
    RawTask,
    add_entry,
    body,
    open_stream,
    poison_bodies,
    stream,
    write_redis,
    write_sqlite,
)
from worker import Client, TaskFailed
from worker.brokers.base import DeadLetter, Delivery, Outcome, Retry
from worker.child import outcome_of

VALUE_TASKS = """
import datetime, os, signal, time
from worker import task

class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")

class NotAString(Exception):
    def __str__(self):
        return 42

@task
def returns(kind):
    if kind == "object":
        return object()
    if kind == "set":
        return {1, 2}
    if kind == "nan":
        return float("nan")
    if kind == "inf":
        return [float("inf")]
    if kind == "deep":
        value = []
        for _ in range(100_000):
            value = [value]
        return value
    if kind == "huge":
        return "x" * (65 << 20)
    if kind == "surrogate":
        return "caf\\udce9"
    raise AssertionError(kind)

@task
def raises(kind):
    if kind == "unprintable":
        raise Unprintable()
    if kind == "not-a-string":
        raise NotAString()
    if kind == "weird-name":
        raise type("Bad\\udcff\\n" + "N" * 100_000, (Exception,), {})("weird")
    if kind == "huge":
        raise ValueError("m" * (10 << 20))
    if kind == "surrogate":
        raise ValueError("caf\\udce9 \\ud800")
    if kind == "exit":
        raise SystemExit(3)
    raise AssertionError(kind)

@task(bind=True)
def retries_with(self, kind):
    if self.request.retries:
        return f"retried {self.request.retries}"
    if kind == "string":
        raise self.retry(countdown="soon")
    if kind == "nan":
        raise self.retry(countdown=float("nan"))
    if kind == "inf":
        raise self.retry(countdown=float("inf"))
    if kind == "negative":
        raise self.retry(countdown=-5)
    if kind == "past-calendar":
        raise self.retry(countdown=1e300)
    if kind == "past-eta":
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
        raise self.retry(eta=past)
    if kind == "not-an-exception":
        raise self.retry(countdown=0, exc="boom")
    if kind == "max-retries-string":
        raise self.retry(countdown=0, max_retries="many")
    raise AssertionError(kind)

@task(bind=True)
def deliveries(self, path):
    with open(path, "a") as f:
        f.write(f"{self.request.deliveries}\\n")
    if self.request.deliveries == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return self.request.deliveries
"""


def fleet_on(make_fleet: Callable[..., Fleet], url: str) -> Fleet:
    fleet = make_fleet(fleet={"broker": url, "imports": ["tasks", "valuetasks"]})
    (fleet.folder / "valuetasks.py").write_text(VALUE_TASKS)
    return fleet


def raw(text: str) -> bytes:
    """What a broker read back as text was stored as (undecodable bytes come back as lone
    surrogates)."""
    return text.encode("utf-8", "surrogateescape")


def interleave(client: Client, journal: Path, poisons: list[Callable[[], None]]) -> list[str]:
    """Submit an innocent task before and after each poison; their ids."""
    ids = []
    for write in [*poisons, lambda: None]:
        ids += [h.id for h in client.submit_many([("tasks.journal", (str(journal),), {})] * 2)]
        write()
    return ids


def assert_innocents_ran_once(fleet: Fleet, ids: list[str], journal: Path) -> None:
    infos = fleet.wait_all_final(ids, timeout=90)
    assert [(i["state"], i["deliveries"]) for i in infos] == [("SUCCESS", 1)] * len(ids)
    assert executions(journal) == collections.Counter(ids)


Poison = tuple[list[RawTask], list[bytes], list[Callable[[], None]]]


def sqlite_poison(path: str) -> Poison:
    """(records whose result can be read by their id, what the dead letters of the others hold,
    a write for each)."""
    poisons = [RawTask(i.encode(), b) for i, b in poison_bodies("p").items()]
    poisons.append(RawTask(b"p-blob-body", b'{"id": "p-blob-body", "x": "\xff"}', blobs=("body",)))
    unaddressable = [
        RawTask(b"p-id-\xff", body("p-id-x")),
        RawTask(b"p-blob-id", body("p-blob-id"), blobs=("id", "body")),
    ]
    writes = [lambda t=t: write_sqlite(path, [t]) for t in poisons + unaddressable]
    return poisons, [t.body for t in unaddressable], writes


def redis_poison(client: redis.Redis, prefix: str) -> Poison:
    """As sqlite_poison, and stream entries of other producers' making."""
    poisons = [RawTask(i.encode(), b) for i, b in poison_bodies("p").items()]
    no_body = RawTask(b"p-no-body", body("p-no-body"))
    unaddressable = RawTask(b"p-id-\xff", body("p-id-x"))
    writes = [lambda t=t: write_redis(client, prefix, [t]) for t in [*poisons, unaddressable]]
    writes += [
        lambda: write_redis(client, prefix, [no_body], fields=(b"body",)),
        lambda: add_entry(client, prefix, {b"id": b"p-orphan-\xfe"}),
        lambda: add_entry(client, prefix, {b"body": b"p-no-id-\xfe"}),
    ]
    poisons.append(RawTask(no_body.id, b""))
    return poisons, [unaddressable.body, b"p-orphan-\xfe", b"p-no-id-\xfe"], writes


def test_poison_records_are_dead_lettered_and_the_queue_goes_on(
    make_fleet: Callable[..., Fleet], broker_url: str, tmp_path: Path
) -> None:
    fleet = fleet_on(make_fleet, broker_url)
    client = fleet.client
    client.broker.depths()  # creates the SQLite schema, for the raw rows to go into
    journal = tmp_path / "journal"
    with contextlib.closing(redis.Redis.from_url(REDIS_URL)) as direct:
        if broker_url.startswith("sqlite"):
            poisons, entries, writes = sqlite_poison(str(fleet.folder / "queue.db"))
        else:
            poisons, entries, writes = redis_poison(direct, broker_url.rsplit("=", 1)[1])
        ids = interleave(client, journal, writes)
    fleet.start()
    (worker,) = fleet.worker_pids()

    assert_innocents_ran_once(fleet, ids, journal)
    infos = fleet.wait_all_final([t.id.decode() for t in poisons], timeout=30)
    too_large = {"p-huge"}  # over the task size limit: named for what it is
    assert {i["id"]: (i["state"], i["exc_type"]) for i in infos} == {
        t.id.decode(): ("FAILURE", "TaskTooLarge" if t.id.decode() in too_large else "BadMessage")
        for t in poisons
    }
    letters: list[DeadLetter] = wait_for(
        lambda: (d := client.broker.dead_letters(1000)) and len(d) >= len(poisons + entries) and d,
        30,
        message="every poison in the dead-letter list",
    )
    assert len(letters) == len(poisons) + len(entries)
    assert {d.reason for d in letters} == {"BadMessage", "TaskTooLarge"}
    kept = {raw(d.id): raw(d.body) for d in letters}
    assert {t.id: kept.get(t.id) for t in poisons} == {t.id: t.body for t in poisons}
    others = [b for i, b in kept.items() if i not in {t.id for t in poisons}]
    assert all(any(e in b for b in others) for e in entries), (entries, others)
    assert client.submit("tasks.add", 2, 3).get(timeout=10) == 5
    assert fleet.worker_pids() == [worker], "the worker died"


def test_a_backlog_of_tasks_no_worker_knows_is_dead_lettered_at_full_speed(
    make_fleet: Callable[..., Fleet], broker_url: str
) -> None:
    """A deploy that renamed a task leaves a backlog under the old name. Each reserve of it
    is dead-lettered at once and takes none of the pool's room: the next reserve must not
    wait for a wake-up or the next second (with 2 children that drained 4 a second, and the
    task queued behind 400 of them waited 100 s)."""
    fleet = fleet_on(make_fleet, broker_url)
    fleet.client.submit_many([("tasks.renamed_away", (), {})] * 400)
    behind = fleet.client.submit("tasks.add", 2, 3)
    fleet.start()
    assert behind.get(timeout=20) == 5
    letters = fleet.client.broker.dead_letters(1000)
    assert len(letters) == 400
    assert {d.reason for d in letters} == {"NotRegistered"}


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared Redis."""
    require_redis(REDIS_URL)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    try:
        yield prefix
    finally:
        delete_prefix(REDIS_URL, prefix)


def test_a_redis_record_of_another_type_costs_its_task_alone_and_is_kept_aside(
    make_fleet: Callable[..., Fleet], redis_prefix: str, tmp_path: Path
) -> None:
    """Someone else's key where a task's record belongs (`{p}:r:{id}`): a string behind a queued
    stream entry, a list in place of a running task's record, a set in place of one that a
    worker then killed held, a string in place of one waiting for its ETA. Each read of such
    a key failed the script, and with it the worker, at every restart: the queue stood still
    for good. Now the key is moved aside as it was (`{p}:alien:{id}`), costing its task
    alone, and every other task runs once. Records written without their queue (the ack went
    to no stream: the worker died) or their entry (taken for a stale one: the entry dropped,
    the task PENDING for good) now run as any task."""
    p = redis_prefix
    fleet = make_fleet(fleet={"broker": f"{REDIS_URL}?prefix={p}"}).start()
    client, journal = fleet.client, tmp_path / "journal"
    (worker,) = fleet.worker_pids()
    innocents: list[str] = []

    def innocent() -> None:
        innocents.extend(
            h.id for h in client.submit_many([("tasks.journal", (str(journal),), {})] * 2)
        )

    with contextlib.closing(redis.Redis.from_url(REDIS_URL)) as direct:
        # Queued: an entry whose record is a string.
        innocent()
        open_stream(direct, p)
        direct.set(f"{p}:r:queued-alien", "not a record")
        direct.xadd(stream(p), {"id": "queued-alien"})
        innocent()
        # Written without its queue, or without its entry: runs as any task.
        write_redis(direct, p, [RawTask(b"no-queue", body("no-queue"))], fields=(b"queue",))
        innocent()
        direct.hset(
            f"{p}:r:no-entry",
            mapping={
                "id": "no-entry",
                "queue": "default",
                "name": "tasks.add",
                "body": body("no-entry"),
                "status": "queued",
                "state": "PENDING",
            },
        )
        direct.xadd(stream(p), {"id": "no-entry"})
        innocent()
        # Running: its record replaced by a list; it ends and its outcome is stored.
        gate = tmp_path / "gate"
        running = client.submit("tasks.hold", str(gate))
        wait_for(lambda: running.state == "STARTED", 10, message="the task to start")
        direct.delete(f"{p}:r:{running.id}")
        direct.rpush(f"{p}:r:{running.id}", "not", "a", "record")
        gate.touch()
        assert running.get(timeout=10) > 0
        # Waiting for its ETA: its record replaced by a string.
        later = client.submit("tasks.add", 1, 2, countdown=1)
        direct.delete(f"{p}:r:{later.id}")
        direct.set(f"{p}:r:{later.id}", "not a record")
        with pytest.raises(TaskFailed, match="BadMessage"):
            later.get(timeout=10)
        innocent()
        assert fleet.worker_pids() == [worker], "the worker died"
        # Held by a worker that is then killed: its replacement gives back what it held.
        held = client.submit("tasks.hold", str(tmp_path / "never"))
        wait_for(lambda: held.state == "STARTED", 10, message="the task to start")
        direct.delete(f"{p}:r:{held.id}")
        direct.sadd(f"{p}:r:{held.id}", "not a record")
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: fleet.worker_pids() not in ([], [worker]), 10, message="a new worker")
        innocent()

        infos = fleet.wait_all_final(innocents, timeout=30)
        assert [(i["state"], i["deliveries"]) for i in infos] == [("SUCCESS", 1)] * len(innocents)
        assert executions(journal) == collections.Counter(innocents)
        assert client.handle("no-queue").get(timeout=10) == 3
        assert client.handle("no-entry").get(timeout=10) == 3
        assert (
            client.handle("queued-alien").state,
            client.handle("queued-alien").info()["exc_type"],
        ) == ("FAILURE", "BadMessage")
        (letter,) = client.broker.dead_letters(10, ids=["queued-alien"])
        assert f"moved to {p}:alien:queued-alien" in letter.extra["message"]
        assert direct.get(f"{p}:alien:queued-alien") == b"not a record"
        assert direct.lrange(f"{p}:alien:{running.id}", 0, -1) == [b"not", b"a", b"record"]
        assert direct.get(f"{p}:alien:{later.id}") == b"not a record"
        assert direct.smembers(f"{p}:alien:{held.id}") == {b"not a record"}
        assert fleet.worker_pids() != [], "the new worker died"
        assert "FATAL" not in fleet.log() and "exit code 1" not in fleet.log(), fleet.log()


def test_redis_keys_of_another_kind_where_a_fleets_belong_are_moved_aside_and_nothing_stops(
    make_fleet: Callable[..., Fleet], redis_prefix: str, tmp_path: Path
) -> None:
    """Someone else's values where the fleet keeps its queue's stream, ETA set and set of
    waiting workers, its entry counter, its set of queues, its dead letters, revokes and
    routes, a waiting client's wake-up list. Each failed every script or call that touched
    it: the worker died at every start (FATAL), every submit raised. Now each is moved aside
    as it was (`{p}:alien:{key}`) and every task runs once; dead letters that are no letters
    of ours stay where they are when others are retried."""
    p = redis_prefix
    journal = tmp_path / "journal"
    squatters = {
        "queues": ("hash", {"not": "a set"}),
        "q:default": ("string", "not a stream"),
        "eta:default": ("list", ["not", "a", "zset"]),
        "idle:default": ("string", "not a zset"),
        "seq": ("string", "not a number"),
        "dead": ("set", {"not a list"}),
        "revoked": ("string", "not a set"),
        "routes": ("list", ["not a hash"]),
    }
    with contextlib.closing(redis.Redis.from_url(REDIS_URL, decode_responses=True)) as direct:

        def squat(name: str, kind: str, value: Any) -> None:
            key = f"{p}:{name}"
            direct.delete(key)
            if kind == "string":
                direct.set(key, value)
            elif kind == "list":
                direct.rpush(key, *value)
            elif kind == "set":
                direct.sadd(key, *value)
            else:
                direct.hset(key, mapping=value)

        for name, (kind, value) in squatters.items():
            squat(name, kind, value)
        fleet = make_fleet(fleet={"broker": f"{REDIS_URL}?prefix={p}"}).start()
        (worker,) = fleet.worker_pids()
        client = fleet.client
        handles = client.submit_many([("tasks.journal", (str(journal),), {})] * 5)
        handles.append(client.submit("tasks.journal", str(journal), countdown=0.3))
        unknown = client.submit("tasks.no_such_task")
        # A client waits; its wake-up list is replaced by a string before the task ends.
        gate = tmp_path / "gate"
        held = client.submit("tasks.hold", str(gate))
        wait_for(lambda: held.state == "STARTED", 10, message="the held task to start")
        waiter = concurrent.futures.ThreadPoolExecutor(1)
        got = waiter.submit(held.get, timeout=20)
        wait_for(lambda: direct.exists(f"{p}:w:{held.id}"), 10, message="the client to wait")
        squat(f"n:{held.id}", "string", "not a list")
        gate.touch()
        assert got.result(timeout=20) > 0
        waiter.shutdown()
        # The idle fleet's stream replaced again: the next tasks run all the same.
        fleet.wait_all_final([h.id for h in handles], timeout=30)
        squat("q:default", "string", "again")
        handles += client.submit_many([("tasks.journal", (str(journal),), {})] * 3)

        infos = fleet.wait_all_final([h.id for h in handles], timeout=30)
        assert [(i["state"], i["deliveries"]) for i in infos] == [("SUCCESS", 1)] * len(handles)
        assert executions(journal) == collections.Counter(h.id for h in handles)
        with pytest.raises(TaskFailed, match="NotRegistered"):
            unknown.get(timeout=10)
        # A dead letter of someone else's writing stays when ours is retried.
        direct.rpush(f"{p}:dead", "not json", json.dumps({"id": unknown.id}))
        assert client.broker.retry_dead([unknown.id]) == [unknown.id]
        # (LPUSHed: the retried task's own letter, when it dies again, comes before these.)
        assert direct.lrange(f"{p}:dead", -2, -1) == ["not json", json.dumps({"id": unknown.id})]

        for name, (kind, _value) in squatters.items():
            alien = f"{p}:alien:{name}"
            assert direct.type(alien) == kind, alien
        assert direct.get(f"{p}:alien:q:default") == "not a stream"
        assert direct.get(f"{p}:alien:q:default:2") == "again"
        assert direct.get(f"{p}:alien:seq") == "not a number"
        assert direct.smembers(f"{p}:alien:dead") == {"not a list"}
        assert direct.get(f"{p}:alien:n:{held.id}") == "not a list"
    assert fleet.worker_pids() == [worker], "the worker died"
    assert "FATAL" not in fleet.log() and "exit code 1" not in fleet.log(), fleet.log()
    assert f"moved {p}:q:default -> {p}:alien:q:default" in fleet.log()


def test_a_tasks_bad_values_fail_that_task_and_nothing_else(
    make_fleet: Callable[..., Fleet], broker_url: str, tmp_path: Path
) -> None:
    fleet = fleet_on(make_fleet, broker_url).start()
    (worker,) = fleet.worker_pids()
    client = fleet.client
    journal = tmp_path / "journal"
    calls = {
        f"{verb} {kind}": (f"valuetasks.{task}", kind)
        for verb, task, kinds in (
            ("returns", "returns", "object set nan inf deep huge surrogate"),
            ("raises", "raises", "unprintable not-a-string weird-name huge surrogate exit"),
            (
                "retry",
                "retries_with",
                "string nan inf not-an-exception max-retries-string past-calendar",
            ),
            ("retry", "retries_with", "negative past-eta"),
        )
        for kind in kinds.split()
    }
    handles = {}
    innocents: list[str] = []
    for what, (name, kind) in calls.items():
        handles[what] = client.submit(name, kind)
        innocents += [
            h.id for h in client.submit_many([("tasks.journal", (str(journal),), {})] * 2)
        ]

    assert_innocents_ran_once(fleet, innocents, journal)
    finals = fleet.wait_all_final([h.id for h in handles.values()])
    infos = dict(zip(handles, finals, strict=True))
    failed = {
        what: (i["exc_type"], i["exc_message"])
        for what, i in infos.items()
        if i["state"] == "FAILURE"
    }
    assert infos["retry negative"]["result"] == "retried 1"
    assert infos["retry past-eta"]["result"] == "retried 1"
    assert infos["returns surrogate"]["result"] == "caf\udce9"
    expected_failures = set(calls) - {"retry negative", "retry past-eta", "returns surrogate"}
    assert set(failed) == expected_failures, infos
    for what, (exc_type, message) in failed.items():
        assert exc_type and message, (what, exc_type, message)
        assert len(exc_type) <= 200 and len(message) <= 2000, what
        assert (exc_type + message).encode(), what  # UTF-8 text, not a lone surrogate in it
        if what.startswith("returns"):
            assert exc_type == "EncodeError", (what, message)
    assert "not JSON" in failed["returns object"][1]
    assert "limit" in failed["returns huge"][1]
    assert failed["retry string"][0] == "TypeError" and "'soon'" in failed["retry string"][1]
    assert failed["retry nan"][0] == "ValueError" and "nan" in failed["retry nan"][1]
    assert failed["retry not-an-exception"][0] == "TypeError"
    assert failed["retry past-calendar"] == (
        "ValueError",
        "retry countdown reaches past the year 9999",
    )
    assert failed["raises unprintable"][0] == "Unprintable"
    assert failed["raises exit"][0] == "SystemExit"
    assert fleet.worker_pids() == [worker], "the worker died"
    assert "died running task" not in fleet.log()


def test_request_deliveries_says_which_delivery_this_is(
    make_fleet: Callable[..., Fleet], broker_url: str, tmp_path: Path
) -> None:
    fleet = fleet_on(make_fleet, broker_url).start()
    marker = tmp_path / "deliveries"
    handle = fleet.client.submit("valuetasks.deliveries", str(marker))
    assert handle.get(timeout=20) == 2
    assert marker.read_text().split() == ["1", "2"]


def test_a_stored_result_that_is_not_json_fails_get_with_bad_result(tmp_path: Path) -> None:
    client = Client(f"sqlite:///{tmp_path / 'queue.db'}")
    handle = client.submit("tasks.add", 1, 2)
    with contextlib.closing(sqlite3.connect(tmp_path / "queue.db")) as db, db:
        db.execute(
            "UPDATE tasks SET status = 2, state = 'SUCCESS', result = CAST(? AS TEXT) WHERE id = ?",
            (b"[\xff", handle.id),
        )
    with pytest.raises(TaskFailed) as failed:
        handle.get(timeout=1)
    assert failed.value.exc_type == "BadResult"
    client.close()


@pytest.mark.parametrize(
    "reply",
    [
        {},
        {"s": 5},
        {"s": "SUCCESS"},
        {"s": "SUCCESS", "r": {"not": "text"}},
        {"s": "SUCCESS", "r": '"\udcff"'},  # JSON, but not text UTF-8 can hold
        {"s": "RETRY"},
        {"s": "RETRY", "c": "soon"},
        {"s": "RETRY", "c": float("nan")},
        {"s": "RETRY", "c": -1},
        {"s": "RETRY", "c": True},
        {"s": "FAILURE", "t": {"x": [1]}, "m": ["\udcff"], "tb": 5, "rt": "x"},
        {"s": "FAILURE", "t": "T" * 1_000_000, "m": "\ud800" * 10_000, "rt": float("inf")},
    ],
)
def test_a_childs_reply_that_makes_no_sense_fails_its_task_and_raises_nothing(
    reply: dict[str, Any],
) -> None:
    delivery = Delivery("t-1", "default", "tasks.add", body("t-1").decode(), 1)

    ended = outcome_of(delivery, reply, "w@h1")

    assert isinstance(ended, Outcome) and ended.state == "FAILURE"
    texts = (ended.exc_type, ended.exc_message, ended.traceback)
    assert all(t is None or (isinstance(t, str) and len(t) <= 8000) for t in texts)
    "".join(t or "" for t in texts).encode()  # UTF-8: no lone surrogate left in them
    assert ended.runtime is None


def test_a_retry_of_a_body_whose_count_python_cannot_convert_fails_its_task() -> None:
    """A retry count of 4,300 digits and more (a hand-written body, a task whose max_retries
    is as large) raised ValueError in the worker, which died of it, with its children."""
    text = '{"id": "t-1", "name": "tasks.add", "args": [], "kwargs": {}, "retries": %s}'
    delivery = Delivery("t-1", "default", "tasks.add", text % ("9" * 4300), 1)

    ended = outcome_of(delivery, {"s": "RETRY", "c": 0}, "w@h1")

    assert isinstance(ended, Outcome)
    assert (ended.state, ended.exc_type) == ("FAILURE", "BadMessage")
    assert "4300" in str(ended.exc_message)


def test_a_childs_retry_goes_back_with_a_sane_eta_and_body() -> None:
    delivery = Delivery("t-1", "default", "tasks.add", body("t-1", retries=2).decode(), 1)

    ended = outcome_of(delivery, {"s": "RETRY", "c": 1e300, "t": 5, "m": "\udcff"}, "w@h1")

    assert isinstance(ended, Retry)
    assert json.loads(ended.body)["retries"] == 3 and ended.eta == 1e300
    assert (ended.exc_type, ended.exc_message) == ("5", "\\udcff")

"""What only the Redis broker promises: surviving Redis restarts, retried calls, key expiry,
one call to Redis per worker turn."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.poison import RawTask, write_redis
from tests.redisserver import BUSY_SCRIPT, RedisServer, start_redis
from worker.brokers import redis as redis_broker
from worker.brokers.base import (
    FAILURE,
    PENDING,
    RETRY,
    STARTED,
    SUCCESS,
    BrokerUnavailable,
    Envelope,
    Outcome,
    QueueDepth,
    Retry,
    Turn,
)
from worker.brokers.redis import WAIT_SCRIPT, Link, RedisBroker, wake_frames
from worker.client import CALL_GRACE, Client, TaskRevoked
from worker.task import LAST_ETA

from .conftest import REDIS_URL
from .test_contract import envelope, ids, readable, sleep_until, wait_for


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server with the AOF on (fsync always)."""
    private = start_redis(tmp_path, appendonly=True)
    try:
        yield private
    finally:
        private.stop()


def start_later(server: RedisServer, delay: float) -> threading.Thread:
    def start() -> None:
        time.sleep(delay)
        server.start()

    thread = threading.Thread(target=start)
    thread.start()
    return thread


def test_nothing_is_lost_when_redis_restarts_and_the_broker_reconnects(server: RedisServer) -> None:
    broker = RedisBroker(server.url)
    try:
        ready = [envelope() for _ in range(3)]
        scheduled = envelope(eta=time.time() + 2.0)
        broker.enqueue([*ready, scheduled])

        server.kill()  # between enqueue and reserve, and with no chance to save anything
        server.start()
        held = broker.reserve(["q1"], 10, "w1", 30)
        assert ids(held) == ids(ready)

        server.stop()  # between reserve and ack; it comes back while the ack is retrying
        restarting = start_later(server, 0.5)
        broker.turn(Turn(outcomes=[Outcome(d.id, SUCCESS, result=d.id) for d in held]))
        restarting.join()

        for delivery in held:
            info = broker.get_result(delivery.id)
            assert info is not None and (info["state"], info["result"]) == (SUCCESS, delivery.id)
        [depth] = broker.depths()
        assert (depth.ready + depth.scheduled, depth.reserved) == (1, 0)
        sleep_until(scheduled.eta or 0)
        [due] = broker.reserve(["q1"], 10, "w1", 30)
        assert (due.id, due.deliveries) == (scheduled.id, 1)
    finally:
        broker.close()


def test_a_wakeup_that_redis_py_reads_takes_a_payload_of_no_utf8_as_news(
    redis_broker: RedisBroker,
) -> None:
    """Over TLS, redis-py reads the subscribed connection (its decoder keeps bytes that
    are no UTF-8 as lone surrogates): somebody's PUBLISH of such bytes on a wake channel
    is a wake-up not ours, news, and never an exception out of the worker's loop."""
    wake = redis_broker.wakeup(["q1"])
    try:
        wake._raw = False  # as on a TLS connection, whose socket redis-py reads
        redis_broker.redis.publish(redis_broker._key("wake", "q1"), b"\xff\xfe")
        assert readable(wake, 5)

        assert wake.clear() is True and wake.news()
    finally:
        wake.close()


def test_a_wakeup_for_a_task_the_last_short_reserve_took_is_no_news(server: RedisServer) -> None:
    """A worker reserves a task, then reads the wake-up its submit published: no reserve
    for it (in a fleet that keeps up, a quarter of all reserves came back empty so). A task
    that came after is news, also once a Redis that lost its data counts entries anew."""
    broker, producer = RedisBroker(server.url), RedisBroker(server.url)
    wake = broker.wakeup(["q1"])
    try:
        assert broker.reserve(["q1"], 5, "w1", 30) == []  # short: w1 waits to be woken
        wake.clear()
        wake.arm()
        producer.enqueue([envelope()])
        assert len(broker.reserve(["q1"], 5, "w1", 30)) == 1  # read every entry there was
        assert readable(wake, 5)
        assert wake.clear() is False and not wake.news()

        wake.arm()
        producer.enqueue([envelope()])
        assert readable(wake, 5)
        assert wake.clear() is False and wake.news()

        redis.Redis.from_url(server.url).flushall()  # a Redis that lost its data: the
        server.kill()  # entry counter starts over
        server.start()

        def woke_after_arm() -> bool:
            wake.arm()
            return readable(wake, 0.1)

        wait_for(woke_after_arm)  # resubscribed: news, whatever was queued meanwhile
        wake.clear()
        assert wake.news()
        assert broker.reserve(["q1"], 5, "w1", 30) == []
        assert wake.seen == 0  # what a wake-up is weighed against now
        wake.arm()
        producer.enqueue([envelope()])  # entry 0-1 of the new counter
        assert readable(wake, 5)
        wake.clear()
        assert wake.news()
    finally:
        wake.close()
        broker.close()
        producer.close()


def test_a_producer_registers_a_queue_now_and_then_and_loses_no_task_when_redis_lost_it(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Submits within KNOWN_FRESH of the one that registered their queue leave it as it is
    (no SADD, no stream check). If Redis lost its data meanwhile, such a submit makes a
    stream without the workers' group: past KNOWN_FRESH the producer registers the queue
    again and makes the group, and a worker's read makes it too. No task is lost."""
    monkeypatch.setattr(redis_broker, "KNOWN_FRESH", 0.5)
    producer, worker = RedisBroker(server.url), RedisBroker(server.url)
    raw = redis.Redis.from_url(server.url)
    try:
        producer.enqueue([envelope()])
        raw.config_resetstat()
        producer.enqueue([envelope()])
        producer.enqueue([envelope(), envelope()])
        assert "cmdstat_sadd" not in raw.info("commandstats")
        raw.flushall()
        after = [envelope()]
        producer.enqueue(after)
        stream = f"{worker.prefix}:q:q1"
        assert not raw.exists(f"{worker.prefix}:queues") and raw.xinfo_groups(stream) == []
        time.sleep(0.5)  # KNOWN_FRESH
        after.append(envelope())
        producer.enqueue(after[1:])
        assert raw.smembers(f"{worker.prefix}:queues") == {b"q1"}
        assert [g["name"] for g in raw.xinfo_groups(stream)] == [b"workers"]
        assert ids(worker.reserve(["q1"], 5, "w1", 30)) == ids(after)
        raw.flushall()  # and a worker's read makes the group of such a stream
        producer.enqueue(after[:1])
        assert ids(worker.reserve(["q1"], 5, "w1", 30)) == ids(after[:1])
    finally:
        producer.close()
        worker.close()
        raw.close()


def test_a_worker_is_woken_only_while_its_last_reserve_came_back_short(
    server: RedisServer,
) -> None:
    """A short reserve puts its owner in the queue's set of waiting workers and a full one
    takes it out, so a submit publishes a wake-up only while someone waits; a busy worker's
    reserves cost that set nothing, and a worker gone for a minute without a reserve is
    dropped from it by the next that waits."""
    broker, producer = RedisBroker(server.url), RedisBroker(server.url)
    admin = redis.Redis.from_url(server.url, decode_responses=True)
    idle, p = "fleetd:idle:q1", "fleetd"
    wake = broker.wakeup(["q1"])
    try:
        admin.zadd(idle, {"ghost": (time.time() - 120) * 1000})  # a minute and more ago
        assert broker.reserve(["q1"], 2, "w1", 30) == []
        assert admin.zrange(idle, 0, -1) == ["w1"]  # the ghost dropped
        wake.clear()
        wake.arm()
        producer.enqueue([envelope("q1") for _ in range(5)])
        assert readable(wake, 5)

        assert len(broker.reserve(["q1"], 2, "w1", 30)) == 2  # full: busy
        assert admin.exists(idle) == 0
        wake.clear()
        admin.config_resetstat()
        wake.arm()
        producer.enqueue([envelope("q1")])
        assert not readable(wake, 0.2)  # no one waits: no wake-up
        assert len(broker.reserve(["q1"], 2, "w1", 30)) == 2  # busy still: nothing to undo
        stats = admin.info("commandstats")
        assert "cmdstat_publish" not in stats and "cmdstat_zrem" not in stats

        assert len(broker.reserve(["q1"], 5, "w1", 30)) == 2  # short again: it waits
        assert admin.zrange(idle, 0, -1) == ["w1"]
        wake.clear()
        wake.arm()
        producer.enqueue([envelope("q1")])
        assert readable(wake, 5)
        assert admin.keys(f"{p}:alien:*") == []
    finally:
        wake.close()
        broker.close()
        producer.close()
        admin.close()


def test_wakeup_resubscribes_after_redis_restarts(server: RedisServer) -> None:
    broker = RedisBroker(server.url)
    wake = broker.wakeup(["q1"])
    registered = wake.fileno()
    try:
        wake.arm()
        server.kill()
        assert readable(wake, 5)  # the connection dropped
        wake.clear()
        wake.arm()  # Redis is down: stays quiet instead of spinning
        assert not readable(wake, 0.2)

        server.start()

        def woke_after_arm() -> bool:
            wake.arm()
            return readable(wake, 0.1)

        wait_for(woke_after_arm)  # a wake-up of its own: look for what came meanwhile
        wake.clear()
        assert broker.reserve(["q1"], 1, "w1", 30) == []  # the reserve it makes: short
        wake.arm()
        assert not readable(wake, 0.2)
        broker.enqueue([envelope()])
        assert readable(wake, 5)
        assert wake.fileno() == registered  # still the descriptor the worker polls
    finally:
        wake.close()
        broker.close()


@pytest.mark.parametrize("fail_fast", [False, True])
def test_a_call_to_a_hung_redis_gives_up_after_two_timeouts_at_most(
    server: RedisServer, fail_fast: bool
) -> None:
    """Redis stopped (SIGSTOP: the connection open, nothing answered). A timed-out write is
    sent again once (Redis may only have been slow: the same token finds its reply), not
    CALL_RETRIES times, which held a producer some two minutes with the default socket
    timeout."""
    assert server.process is not None
    broker = RedisBroker(server.url + "?socket_timeout=1", fail_fast=fail_fast)
    try:
        broker.enqueue([envelope()])  # connected
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(broker.unavailable):
                broker.enqueue([envelope()])
            spent = time.monotonic() - started
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert 2 <= spent < 4  # two tries, each cut off after 1 s
    finally:
        broker.close()


@pytest.mark.parametrize("timeout", [0, 1.0])
def test_a_get_on_a_hung_redis_ends_at_its_timeout(server: RedisServer, timeout: float) -> None:
    """Handle.get(timeout=T) took some 20 s (two 10 s socket timeouts) while Redis was
    stopped, then raised BrokerUnavailable: it is a TimeoutError within CALL_GRACE of T,
    and the link's own timeouts are back for the calls after it."""
    assert server.process is not None
    client = Client(server.url)
    try:
        handle = client.submit("tasks.add", 1, 1)
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError, match="not done after"):
                handle.get(timeout=timeout)
            spent = time.monotonic() - started
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert spent < timeout + CALL_GRACE + 0.5, spent
        assert handle.state == "PENDING"
        links = client.broker._idle  # type: ignore[attr-defined]
        assert all(link.connection.socket_timeout == link.waits[0] for link in links)
    finally:
        client.close()


def test_a_password_the_server_refuses_is_said_at_once_not_retried(server: RedisServer) -> None:
    """A wrong password is a ConnectionError to redis-py, and was tried again as a lost
    connection would be: 11 s before the client said so."""
    url = server.url.replace("redis://", "redis://:not-the-password@")
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        Client(url).submit("tasks.add", 1, 1)
    assert time.monotonic() - started < 2


def test_a_call_to_a_hung_redis_gives_up_at_the_callers_deadline_whatever_its_timeouts(
    server: RedisServer,
) -> None:
    """A stopping worker's calls give up at its deadline (give_up_at): not after two 3 s
    timeouts, nor after a connect and its handshake; and none is sent once it has passed."""
    assert server.process is not None
    broker = RedisBroker(server.url, fail_fast=True)
    try:
        broker.enqueue([envelope()])  # connected
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            spent = []
            for connected in (True, False):
                if not connected:
                    for link in broker._idle:
                        link.connection.disconnect()
                started = time.monotonic()
                broker.give_up_at(started + 1.0)
                with pytest.raises(broker.unavailable):
                    broker.release([str(uuid.uuid4())], died=False, owner="w1")
                spent.append(time.monotonic() - started)
            started = time.monotonic()
            with pytest.raises(broker.unavailable):  # past it: at once
                broker.extend([str(uuid.uuid4())], "w1", 30)
            spent.append(time.monotonic() - started)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert all(0.9 < s < 1.8 for s in spent[:2]) and spent[2] < 0.1, spent
    finally:
        broker.close()


class Interrupted(Exception):
    """What a signal handler of the caller's raises (a request timeout, say)."""


def test_a_call_cut_short_between_its_request_and_its_reply_leaves_no_reply_behind(
    server: RedisServer,
) -> None:
    """An exception raised in the caller after a call was sent and before its reply was read
    (a signal handler's): the link it went out on must not hand that reply to the next
    call, which would then answer for another (an enqueue told it stored a task by a
    reply that was not its own, a result read for the wrong task)."""
    broker = RedisBroker(server.url)
    try:

        def cut_short(link: Link) -> Any:
            link.send("ECHO", "the reply of a call that was cut short")
            raise Interrupted

        with pytest.raises(Interrupted):
            broker._call(cut_short)
        assert broker._call(lambda link: link.execute("ECHO", "mine")) == "mine"
        task = envelope()
        broker.enqueue([task])
        info = broker.get_result(task.id)
        assert info is not None and info["name"] == task.name
    finally:
        broker.close()


def test_a_write_that_redis_was_slow_to_answer_is_found_by_its_second_try(
    server: RedisServer,
) -> None:
    """Redis busy for 1.5 s (another client's slow script) while a reservation is sent with
    a 1 s socket timeout: the second try, with the same token, gets the reply the first
    attempt's run kept, so the task is handed over now, once, not after its lease."""
    broker = RedisBroker(server.url + "?socket_timeout=1", fail_fast=True)
    other = redis.Redis.from_url(server.url)
    try:
        task = envelope()
        broker.enqueue([task])
        busy = threading.Thread(target=other.eval, args=(BUSY_SCRIPT, 0, 1.5))
        busy.start()
        time.sleep(0.2)  # the script runs
        try:
            started = time.monotonic()
            [held] = broker.reserve(["q1"], 1, "w1", 30)
            assert time.monotonic() - started > 1  # the first try was cut off
        finally:
            busy.join()
        assert (held.id, held.deliveries) == (task.id, 1)
        assert broker.reserve(["q1"], 1, "w2", 30) == []
        info = broker.get_result(task.id)
        assert info is not None and info["deliveries"] == 1
    finally:
        other.close()
        broker.close()


def lose_next_reply(broker: RedisBroker, meanwhile: Callable[[], None] = lambda: None) -> None:
    """The broker's next call runs in Redis but its reply is lost with the connection (after
    `meanwhile` ran), so that redis-py's retry sends the call again."""
    [link] = broker._idle
    read = link.read

    def read_then_drop() -> Any:
        read()  # raises for a script Redis does not have yet: not this reply
        del link.read  # the next read is a normal one again
        meanwhile()
        link.connection.disconnect()
        raise redis.ConnectionError("connection lost before the reply was read (test)")

    link.read = read_then_drop  # type: ignore[method-assign]


def test_a_reserve_whose_reply_was_lost_hands_out_the_same_tasks_once(
    redis_broker: RedisBroker,
) -> None:
    first, second = envelope(), envelope()
    redis_broker.enqueue([first, second])
    lose_next_reply(redis_broker)

    [held] = redis_broker.reserve(["q1"], 1, "w1", 30)

    assert (held.id, held.deliveries) == (first.id, 1)
    assert redis_broker.depths() == [QueueDepth("q1", ready=1, scheduled=0, reserved=1)]


def test_an_enqueue_retried_after_its_task_ended_does_not_start_it_again(
    redis_broker: RedisBroker,
) -> None:
    task = envelope()
    worker = RedisBroker(redis_broker.url, prefix=redis_broker.prefix)

    def run_it_meanwhile() -> None:
        [delivery] = worker.reserve(["q1"], 1, "w1", 30)
        worker.turn(Turn(outcomes=[Outcome(delivery.id, SUCCESS, result=1)]))

    redis_broker.depths()  # opens the connection whose reply gets lost
    lose_next_reply(redis_broker, meanwhile=run_it_meanwhile)
    redis_broker.enqueue([task])

    assert worker.reserve(["q1"], 1, "w1", 30) == []
    info = redis_broker.get_result(task.id)
    assert info is not None and (info["state"], info["result"]) == (SUCCESS, 1)
    worker.close()


def test_a_worker_turn_is_one_call_to_redis(
    redis_broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    done, retried, running, *fresh = tasks = [envelope() for _ in range(5)]
    redis_broker.enqueue(tasks)
    redis_broker.reserve(["q1"], 3, "w1", 30)
    commands: list[str] = []
    execute = Link.execute

    def execute_and_note(link: Link, *args: Any) -> Any:
        commands.append(args[0])
        return execute(link, *args)

    monkeypatch.setattr(Link, "execute", execute_and_note)

    new = redis_broker.turn(
        Turn(
            node="w1@host",
            started=[done.id, running.id],
            outcomes=[Outcome(done.id, SUCCESS, result=2, node="w1@host")],
            retries=[Retry(retried.id, '{"retries": 1}', time.time() + 60, "IOError", "flaky")],
            queues=["q1"],
            n=10,
            owner="w1",
            lease=30,
        )
    )

    assert commands == ["EVALSHA"]
    assert ids(new) == ids(fresh)
    monkeypatch.undo()
    states = [(redis_broker.get_result(t.id) or {}).get("state") for t in (done, retried, running)]
    assert states == [SUCCESS, RETRY, STARTED]
    assert redis_broker.depths() == [QueueDepth("q1", ready=0, scheduled=1, reserved=3)]


def test_a_links_replies_are_what_redis_py_would_return_or_raise(
    redis_broker: RedisBroker,
) -> None:
    """A link reads its replies itself (resp.read_reply): an error reply is raised as
    redis-py's class for it, the link goes on after one, and a reply far larger than a
    read (a big result) comes back whole."""
    link = redis_broker._take_link()
    text, big = redis_broker._key("test", "text"), "\u00e9t\udcff" * 1_000_000
    try:
        with pytest.raises(redis.exceptions.NoScriptError):
            link.execute("EVALSHA", "0" * 40, 0)
        link.execute("SET", text, "x")
        with pytest.raises(redis.ResponseError, match="^WRONGTYPE"):
            link.execute("HGET", text, "field")

        assert link.execute("PING") == "PONG"
        assert link.execute("HMGET", redis_broker._key("test", "none"), "a", "b") == [None, None]
        assert link.execute("SET", text, big) == "OK"
        assert link.execute("GET", text) == big
        assert link.execute("INCR", redis_broker._key("test", "n")) == 1
        assert link.unread == b""
    finally:
        link.execute("DEL", text, redis_broker._key("test", "n"))
        redis_broker._idle.append(link)


def test_scripts_are_sent_again_when_redis_has_forgotten_them(server: RedisServer) -> None:
    broker = RedisBroker(server.url)
    try:
        broker.enqueue([envelope()])
        broker.redis.script_flush()

        broker.enqueue([envelope()])

        assert len(broker.reserve(["q1"], 10, "w1", 30)) == 2
    finally:
        broker.close()


def test_a_broker_used_on_both_sides_of_a_fork_keeps_their_calls_apart(
    redis_broker: RedisBroker,
) -> None:
    mine, childs = envelope(), Envelope(str(uuid.uuid4()), "q1", "tasks.other", "{}")
    redis_broker.enqueue([mine, childs])  # the parent's connection is open when it forks

    def read_many() -> None:
        for _ in range(300):
            info = redis_broker.get_result(childs.id)
            assert info is not None and info["name"] == "tasks.other"

    child = multiprocessing.get_context("fork").Process(target=read_many)
    child.start()
    for _ in range(300):
        info = redis_broker.get_result(mine.id)
        assert info is not None and info["name"] == "tasks.add"
    child.join(30)
    assert child.exitcode == 0


def test_enqueueing_an_id_that_is_already_queued_is_ignored(redis_broker: RedisBroker) -> None:
    task = envelope()
    redis_broker.enqueue([task])
    redis_broker.enqueue([task])

    assert ids(redis_broker.reserve(["q1"], 10, "w1", 30)) == [task.id]
    assert redis_broker.reserve(["q1"], 10, "w1", 30) == []


def test_results_expire_after_result_ttl(redis_broker: RedisBroker) -> None:
    short = RedisBroker(redis_broker.url, prefix=redis_broker.prefix, result_ttl=60)
    task = envelope()
    short.enqueue([task])
    short.reserve(["q1"], 1, "w1", 30)
    key = f"{short.prefix}:r:{task.id}"
    assert short.redis.ttl(key) == -1  # never while the task is not done

    short.turn(Turn(outcomes=[Outcome(task.id, SUCCESS)]))

    assert 0 < short.redis.ttl(key) <= 60
    info = short.get_result(task.id)
    assert info is not None and info["state"] != PENDING
    short.close()


def test_recover_expired_forgets_the_consumers_it_left_holding_nothing(
    redis_broker: RedisBroker,
) -> None:
    redis_broker.enqueue([envelope()])
    redis_broker.reserve(["q1"], 1, "w1", 0.1)
    time.sleep(0.3)

    assert redis_broker.recover_expired(["q1"]) == 1

    assert redis_broker.redis.xinfo_consumers(f"{redis_broker.prefix}:q:q1", "workers") == []


# --- what other producers write -----------------------------------------------------
@pytest.fixture
def direct(redis_broker: RedisBroker) -> Iterator[redis.Redis]:
    """A plain client of the broker's Redis, bytes in and out."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        client.close()


def test_entries_another_producer_added_are_dead_lettered_and_ours_still_go_in(
    redis_broker: RedisBroker, direct: redis.Redis
) -> None:
    first = envelope()
    redis_broker.enqueue([first])
    stream = f"{redis_broker.prefix}:q:q1"
    direct.xadd(stream, {b"id": b"orphan-\xff"})  # an id Redis picks, above all of ours
    direct.xadd(stream, {b"body": b"no id \xfe"})
    last = envelope()
    redis_broker.enqueue([last])

    assert ids(redis_broker.reserve(["q1"], 10, "w1", 30)) == [first.id, last.id]
    letters = {d.id.encode("utf-8", "surrogateescape"): d for d in redis_broker.dead_letters()}
    assert len(letters) == 2 and {d.reason for d in letters.values()} == {"BadMessage"}
    info = redis_broker.get_result(letters[b"orphan-\xff"].id)
    assert info is not None and (info["state"], info["exc_type"]) == ("FAILURE", "BadMessage")
    (no_id,) = (d for i, d in letters.items() if i != b"orphan-\xff")
    assert b"no id \xfe" in no_id.body.encode("utf-8", "surrogateescape")
    assert redis_broker.depths() == [QueueDepth("q1", ready=0, scheduled=0, reserved=2)]


def test_ids_and_names_are_checked_for_utf8_short_and_long(
    redis_broker: RedisBroker, direct: redis.Redis
) -> None:
    """The turn looks at a short id or name (up to 64 bytes) all at once and a longer one
    with a pattern: either way UTF-8 text is handed out, and anything else is dead-lettered
    as BadMessage, whatever its length."""
    good = [
        RawTask("t-\u00e9t\u00e9-court".encode(), b"{}", name="t\u00e2che".encode()),
        RawTask(("t-" + "\u00e9" * 40).encode(), b"{}", name=("n" + "\u4e2d" * 30).encode()),
        RawTask(b"t-" + b"a" * 100, b"{}"),
    ]
    bad = [
        RawTask(b"b-id-\xc3", b"{}"),  # a sequence cut short
        RawTask(b"b-" + b"a" * 70 + b"\xff", b"{}"),
        RawTask(b"b-name-short", b"{}", name=b"tasks.\xe2\x82"),
        RawTask(b"b-name-long", b"{}", name=b"tasks." + b"x" * 70 + b"\xed\xa0\x80"),  # a surrogate
    ]
    for t in [*good, *bad]:
        write_redis(direct, redis_broker.prefix, [RawTask(t.id, t.body, t.name, b"q1")])

    got = redis_broker.reserve(["q1"], 20, "w1", 30)
    assert [(d.id.encode(), d.name.encode()) for d in got] == [(t.id, t.name) for t in good]
    letters = {d.id.encode("utf-8", "surrogateescape"): d for d in redis_broker.dead_letters()}
    assert set(letters) == {t.id for t in bad}
    assert {d.reason for d in letters.values()} == {"BadMessage"}


def test_a_stream_made_without_our_group_is_read_all_the_same(
    redis_broker: RedisBroker, direct: redis.Redis
) -> None:
    write_redis(direct, redis_broker.prefix, [RawTask(b"t-1", b"{}", queue=b"q1")], group=False)

    assert ids(redis_broker.reserve(["q1", "q2"], 10, "w1", 30)) == ["t-1"]


def test_a_record_without_its_body_is_handed_out_with_an_empty_one(
    redis_broker: RedisBroker, direct: redis.Redis
) -> None:
    write_redis(
        direct, redis_broker.prefix, [RawTask(b"t-1", b"{}", queue=b"q1")], fields=(b"body",)
    )

    [delivery] = redis_broker.reserve(["q1"], 1, "w1", 30)
    assert (delivery.id, delivery.body, delivery.deliveries) == ("t-1", "", 1)


def test_dead_letters_written_by_others_read_as_what_they_hold(
    redis_broker: RedisBroker, direct: redis.Redis
) -> None:
    direct.lpush(f"{redis_broker.prefix}:dead", b'{"id": "d-1", "at": "then", "extra": 5}')
    direct.lpush(f"{redis_broker.prefix}:dead", b"not json \xff")
    huge_letter = b'{"id": "d-2", "at": 1e400, "extra": {"m": -1e999}}'
    direct.lpush(f"{redis_broker.prefix}:dead", huge_letter)

    huge, garbage, odd = redis_broker.dead_letters()
    assert (garbage.id, garbage.body.encode("utf-8", "surrogateescape")) == ("", b"not json \xff")
    assert (odd.id, odd.at, odd.extra) == ("d-1", 0.0, {"raw": 5})
    # Past a float's range: the text it was (it read as infinity, no JSON for fleetctl --json)
    assert (huge.id, huge.at, huge.extra) == ("d-2", 0.0, {"m": "-1e999"})


def test_a_delivery_count_that_is_not_a_whole_number_starts_over(
    redis_broker: RedisBroker, direct: redis.Redis
) -> None:
    write_redis(direct, redis_broker.prefix, [RawTask(b"t-1", b"{}", queue=b"q1")])
    direct.hset(f"{redis_broker.prefix}:r:t-1", "deliveries", "1.5e400")

    [delivery] = redis_broker.reserve(["q1"], 1, "w1", 30)
    assert delivery.deliveries == 1
    redis_broker.release(["t-1"], died=False)
    assert [d.deliveries for d in redis_broker.reserve(["q1"], 1, "w1", 30)] == [1]
    # Rewritten while held: the release (not counted as a delivery) starts it over too.
    direct.hset(f"{redis_broker.prefix}:r:t-1", "deliveries", "many")
    redis_broker.release(["t-1"], died=False)
    assert [d.deliveries for d in redis_broker.reserve(["q1"], 1, "w1", 30)] == [1]


def test_a_counter_or_call_key_of_another_kind_is_moved_aside_and_the_order_kept(
    redis_broker: RedisBroker, direct: redis.Redis
) -> None:
    """Someone else's value where the entry counter is: the counter starts again after the
    newest entry of our queues (not from 1: entries would then sort after all of ours). One
    where a link keeps its last reply: moved aside by the next write over it."""
    p = redis_broker.prefix
    first = [envelope() for _ in range(3)]
    redis_broker.enqueue(first)
    direct.set(f"{p}:seq", "junk")
    later = [envelope() for _ in range(2)]
    redis_broker.enqueue(later)
    assert direct.get(f"{p}:alien:seq") == b"junk"
    entries = [entry for entry, _ in direct.xrange(f"{p}:q:q1")]
    assert entries == [f"0-{n}".encode() for n in range(1, 6)]
    held = redis_broker.reserve(["q1"], 10, "w1", 30)
    assert ids(held) == ids(first + later)

    (link,) = redis_broker._idle
    direct.delete(f"{p}:call:{link.name}")
    direct.rpush(f"{p}:call:{link.name}", "not a reply")
    redis_broker.turn(Turn(outcomes=[Outcome(d.id, SUCCESS, result=1) for d in held]))
    assert direct.lrange(f"{p}:alien:call:{link.name}", 0, -1) == [b"not a reply"]
    assert [redis_broker.get_result(d.id)["state"] for d in held] == [SUCCESS] * 5  # type: ignore[index]


def ended_in(seconds: float, wait: Callable[[], None]) -> None:
    """Run `wait` in a thread, failing if it outlasts `seconds`."""
    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"


def test_a_wait_for_a_task_ends_when_the_task_does_not_when_the_wait_runs_out(
    redis_broker: RedisBroker,
) -> None:
    task = envelope()
    redis_broker.enqueue([task])
    worker = RedisBroker(redis_broker.url, prefix=redis_broker.prefix)
    [delivery] = worker.reserve(["q1"], 1, "w1", 30)
    seen: list[dict[str, Any] | None] = []
    waiter = threading.Thread(
        target=lambda: seen.append(redis_broker.wait_for_end(task.id, 60)), daemon=True
    )
    waiter.start()
    wait_for(lambda: redis_broker.redis.exists(f"{redis_broker.prefix}:w:{task.id}") == 1)

    worker.turn(Turn(outcomes=[Outcome(delivery.id, SUCCESS, result=1)]))

    waiter.join(10)
    assert not waiter.is_alive(), "the end of the task did not wake its waiter"
    # The wait reads the record once woken, in the same round trip: what get_result says.
    [ended] = seen
    assert ended is not None and ended == redis_broker.get_result(task.id)
    assert ended["state"] == SUCCESS and ended["result"] == 1
    # Already ended: the wait returns at once, and no flag is left behind.
    ended_in(10, lambda: seen.append(redis_broker.wait_for_end(task.id, 60)))
    assert seen[-1] == ended
    assert redis_broker.redis.exists(f"{redis_broker.prefix}:w:{task.id}") == 0
    # A wait that runs out reads what there is: a task that is not there, none.
    assert redis_broker.wait_for_end("no-such-task", 0.01) is None
    worker.close()


def test_a_turn_that_ends_many_tasks_wakes_the_waiters_of_those_waited_for_alone(
    redis_broker: RedisBroker,
) -> None:
    """The ends of a call are announced at its end, after one EXISTS over all their flags:
    each waiter is woken by its own task's end, and no wake-up list is made for a task that
    no one waits for."""
    tasks = [envelope() for _ in range(5)]
    redis_broker.enqueue(tasks)
    worker = RedisBroker(redis_broker.url, prefix=redis_broker.prefix)
    held = worker.reserve(["q1"], 5, "w1", 30)
    assert ids(held) == [t.id for t in tasks]
    waited = [tasks[1].id, tasks[4].id]
    seen: dict[str, dict[str, Any] | None] = {}
    waiters = [
        threading.Thread(
            target=lambda task_id=task_id: seen.update(
                {task_id: redis_broker.wait_for_end(task_id, 60)}
            ),
            daemon=True,
        )
        for task_id in waited
    ]
    for waiter in waiters:
        waiter.start()
    p = redis_broker.prefix
    wait_for(lambda: redis_broker.redis.exists(*(f"{p}:w:{i}" for i in waited)) == 2)

    worker.turn(Turn(outcomes=[Outcome(d.id, SUCCESS, result=n) for n, d in enumerate(held)]))

    for waiter in waiters:
        waiter.join(10)
        assert not waiter.is_alive(), "a task's end did not wake its waiter"
    assert {i: r and r["result"] for i, r in seen.items()} == {tasks[1].id: 1, tasks[4].id: 4}
    assert redis_broker.redis.exists(*(f"{p}:w:{t.id}" for t in tasks)) == 0
    unwaited = [t.id for t in tasks if t.id not in waited]
    assert redis_broker.redis.exists(*(f"{p}:n:{i}" for i in unwaited)) == 0
    worker.close()


def test_a_wait_whose_wake_up_list_turns_foreign_before_its_pop_mends_it(
    redis_broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait's script moves a foreign key off the wake-up list's name, but the pop is sent
    after it: someone else's string written there in between made the pop, and with it
    Handle.get, fail with WRONGTYPE. The key is moved aside as any foreign key of ours and
    the wait goes on. (The script is made to write that string once, right after its own
    work, where another connection's write would land.)"""
    task = envelope()
    redis_broker.enqueue([task])
    woken = f"{redis_broker.prefix}:n:{task.id}"
    once = woken.replace(":n:", ":once:")
    squat = (
        f"if redis.call('SET', '{once}', '1', 'NX') then"
        f" redis.call('SET', ARGV[3], 'not a list') end\nreturn 0"
    )
    patched = WAIT_SCRIPT.replace("return 0", squat)
    assert patched != WAIT_SCRIPT
    monkeypatch.setattr("worker.brokers.redis.WAIT_SCRIPT", patched)

    ended = redis_broker.wait_for_end(task.id, 0.2)

    assert ended is not None and ended["state"] == PENDING
    alien = f"{redis_broker.prefix}:alien:n:{task.id}"
    assert redis_broker.redis.get(alien) == "not a list"
    redis_broker.redis.delete(once)


def test_get_sees_an_end_no_script_announced_and_a_revoke(redis_broker: RedisBroker) -> None:
    """An end written by someone else's hand wakes nobody: Handle.get looks again after
    END_WAIT. A revoke ends a queued task as a worker's turn does, waking its waiter."""
    client = Client(f"{REDIS_URL}?prefix={redis_broker.prefix}")
    by_hand, revoked = (client.submit("tasks.add", queue="q1") for _ in range(2))

    def once_waited_for(task_id: str, end: Callable[[], Any]) -> threading.Thread:
        flag = f"{redis_broker.prefix}:w:{task_id}"

        def run() -> None:
            wait_for(lambda: redis_broker.redis.exists(flag) == 1)
            end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    record = f"{redis_broker.prefix}:r:{by_hand.id}"
    once_waited_for(
        by_hand.id,
        lambda: redis_broker.redis.hset(
            record, mapping={"status": "done", "state": SUCCESS, "result": "5"}
        ),
    )
    assert by_hand.get(timeout=10) == 5

    once_waited_for(revoked.id, lambda: client.revoke([revoked.id]))
    ended_in(10, lambda: redis_broker.wait_for_end(revoked.id, 60))
    with pytest.raises(TaskRevoked):
        revoked.get(timeout=10)
    client.close()


def message(channel: bytes, payload: bytes) -> bytes:
    return b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel),
        channel,
        len(payload),
        payload,
    )


def test_wake_frames_split_complete_frames_and_say_whether_one_may_announce_an_eta() -> None:
    ready, eta = message(b"p:wake:q", b"n7"), message(b"p:wake:\r\n$1\r\n1", b"eta")
    pong = b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
    assert wake_frames(ready * 3, -1) == (b"", False, True, False)
    # a channel name holding a frame's bytes
    assert wake_frames(ready + eta, 9) == (b"", True, True, False)
    assert wake_frames(pong, 9) == (b"", True, True, True)  # a resubscribe: anything
    for cut in range(1, len(eta)):  # a frame cut anywhere waits for its rest
        rest, scheduled, news, revoked = wake_frames(ready + eta[:cut], 9)
        assert (rest, scheduled, news, revoked) == (eta[:cut], False, False, False)
        assert wake_frames(rest + eta[cut:], 9) == (b"", True, True, False)
    for bad in (b"+OK\r\n", b"*1\r\n-ERR no\r\n", b"*x\r\n"):
        with pytest.raises(ValueError):
            wake_frames(bad, -1)


def test_a_revoke_wakeup_announces_no_task_and_is_told_apart() -> None:
    revoke, ready = message(b"p:wake:q", b"revoke"), message(b"p:wake:q", b"n8")
    assert wake_frames(revoke, 7) == (b"", False, False, True)
    assert wake_frames(revoke + ready, 7) == (b"", False, True, True)


def test_a_wakeup_for_entries_a_short_reserve_read_is_no_news() -> None:
    """The newest entry a wake-up announces against the entry counter as the last reserve
    that read every entry found it: up to it, that reserve (or another consumer) took them."""
    assert wake_frames(message(b"p:wake:q", b"n7"), 7) == (b"", False, False, False)
    assert wake_frames(message(b"p:wake:q", b"n8"), 7) == (b"", False, True, False)
    assert wake_frames(message(b"p:wake:q", b"n7") * 2 + message(b"p:wake:q", b"n8"), 7)[2]
    assert wake_frames(message(b"p:wake:q", b"1"), 7) == (b"", False, True, False)  # older
    for odd in (b"n", b"n-1", b"nx", b"", b"2"):  # not ours: may be anything
        assert wake_frames(message(b"p:wake:q", odd), 7) == (b"", True, True, False)


def test_get_on_a_redis_out_of_memory_waits_out_its_timeout_and_raises_nothing_else(
    server: RedisServer,
) -> None:
    """A full Redis refuses the wait flag (a write): get then waits as a poll would, and
    raises TimeoutError, not Redis's OOM error; the result is read once memory is back."""
    client = Client(server.url)
    handle = client.submit("tasks.add", queue="q1")
    admin = redis.Redis.from_url(server.url)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    try:
        with pytest.raises(redis.ResponseError):
            admin.set("probe", "x")  # Redis is full indeed
        with pytest.raises(TimeoutError):
            handle.get(timeout=1.5)
    finally:
        admin.config_set("maxmemory", 0)
    worker = RedisBroker(server.url)
    [held] = worker.reserve(["q1"], 1, "w1", 30)
    worker.turn(Turn(outcomes=[Outcome(held.id, SUCCESS, result=3)]))
    assert handle.get(timeout=10) == 3
    worker.close()
    client.close()
    admin.close()


def test_schedule_keys_of_another_kind_are_moved_aside(
    redis_broker: RedisBroker, direct: redis.Redis
) -> None:
    """A schedule's state, the set of schedules or the leader's lease written by someone else
    as another kind: the scheduler's calls go on, the keys kept aside as they were."""
    p = redis_broker.prefix
    direct.rpush(f"{p}:lead:scheduler", "not a lease")
    direct.set(f"{p}:schedule:nightly", "not a hash")
    direct.set(f"{p}:schedules", "not a set")

    assert redis_broker.claim_lead("scheduler", "me", 5) == ("me", 5.0)
    assert redis_broker.lead_holder("scheduler") == "me"
    task = envelope()
    assert redis_broker.fire_schedule("nightly", time.time(), task)
    assert redis_broker.schedule_states()["nightly"]["last_id"] == task.id
    redis_broker.pause_schedule("nightly", True)
    assert redis_broker.schedule_states()["nightly"]["paused"]

    assert direct.lrange(f"{p}:alien:lead:scheduler", 0, -1) == [b"not a lease"]
    assert direct.get(f"{p}:alien:schedule:nightly") == b"not a hash"
    assert direct.get(f"{p}:alien:schedules") == b"not a set"


def test_a_stream_without_our_group_is_no_error_for_recovery_nor_depths(
    redis_broker: RedisBroker, direct: redis.Redis
) -> None:
    """Someone else's XADD made the queue's stream (or a submit did, after Redis lost its
    data): recovery and depths failed on NOGROUP, which ended every worker's boot."""
    p = redis_broker.prefix
    direct.sadd(f"{p}:queues", "q1")
    direct.xadd(f"{p}:q:q1", {"id": "x1"})

    assert redis_broker.recover_expired(["q1"]) == 0
    assert redis_broker.recover("w-gone") == 0
    assert redis_broker.depths() == [QueueDepth("q1", ready=1, scheduled=0, reserved=0)]


def test_a_dead_letter_retried_by_a_call_that_fails_halfway_is_queued_by_the_next_try(
    redis_broker: RedisBroker, direct: redis.Redis
) -> None:
    """The entry counter holds someone else's value: the retry fails at its submit, the key
    is mended and the call sent again. The letters used to be off the list by then, and the
    task's record deleted: the task was lost."""
    task = envelope()
    redis_broker.enqueue([task])
    redis_broker.reserve(["q1"], 1, "w1", 30)
    redis_broker.turn(
        Turn(outcomes=[Outcome(task.id, FAILURE, exc_type="X", exc_message="m", dead_letter=True)])
    )
    direct.set(f"{redis_broker.prefix}:seq", "not a number")

    assert redis_broker.retry_dead([task.id]) == [task.id]
    assert redis_broker.dead_letters() == []
    assert ids(redis_broker.reserve(["q1"], 10, "w1", 30)) == [task.id]


def test_a_tick_fired_by_a_call_that_fails_halfway_is_fired_by_the_next_try(
    redis_broker: RedisBroker, direct: redis.Redis
) -> None:
    direct.set(f"{redis_broker.prefix}:seq", "x")
    task = envelope()

    assert redis_broker.fire_schedule("nightly", 1000.0, task) is True
    assert redis_broker.schedule_states()["nightly"]["last_tick"] == 1000.0
    assert ids(redis_broker.reserve(["q1"], 10, "w1", 30)) == [task.id]
    assert redis_broker.fire_schedule("nightly", 1000.0, envelope()) is False


def test_an_eta_entry_naming_a_task_not_scheduled_is_dropped(
    redis_broker: RedisBroker, direct: redis.Redis
) -> None:
    """Someone else's ZADD of a held or ended task's id: queued again, it ran twice, or its
    stored result was overwritten."""
    held, ended = envelope(), envelope()
    redis_broker.enqueue([held, ended])
    redis_broker.reserve(["q1"], 2, "w1", 30)
    redis_broker.turn(Turn(outcomes=[Outcome(ended.id, SUCCESS, result=3)]))
    direct.zadd(f"{redis_broker.prefix}:eta:q1", {held.id: 0, ended.id: 0})

    assert redis_broker.reserve(["q1"], 10, "w2", 30) == []
    assert direct.zcard(f"{redis_broker.prefix}:eta:q1") == 0
    info = redis_broker.get_result(ended.id)
    assert info is not None and (info["state"], info["result"]) == (SUCCESS, 3)


@pytest.mark.parametrize("score", [float("inf"), 1e300, LAST_ETA + 1])
def test_a_task_whose_eta_is_past_the_calendar_ends_bad_message_and_is_never_next_due(
    redis_broker: RedisBroker, direct: redis.Redis, score: float
) -> None:
    """An ETA score of +inf or past the year 9999 (someone else's ZADD; the client refuses
    one) was never due: the task neither ran nor failed, and `fleetctl inspect scheduled`
    failed on its next_due (infinity or 1e300 is no JSON a reply can carry). The expired
    leases' recovery, which a worker runs at its boot and at each renewal, ends it."""
    ready, far, stale = envelope(), envelope(eta=time.time() + 60), envelope()
    redis_broker.enqueue([ready, far, stale])
    redis_broker.reserve(["q1"], 2, "w1", 30)  # ready and stale, held
    held = redis_broker.reserve(["q1"], 1, "w1", 30)
    assert held == []
    direct.zadd(f"{redis_broker.prefix}:eta:q1", {far.id: score, stale.id: score})

    assert redis_broker.next_due(["q1"]) is None
    assert redis_broker.reserve(["q1"], 5, "w2", 30) == []
    assert direct.zcard(f"{redis_broker.prefix}:eta:q1") == 2
    redis_broker.recover_expired(["q1"])
    assert direct.zcard(f"{redis_broker.prefix}:eta:q1") == 0
    [letter] = redis_broker.dead_letters()
    assert (letter.id, letter.reason) == (far.id, "BadMessage")
    info = redis_broker.get_result(far.id)
    assert info is not None and (info["state"], info["exc_type"]) == (FAILURE, "BadMessage")
    stale_info = redis_broker.get_result(stale.id)  # held: a stale member, dropped
    assert stale_info is not None and stale_info["state"] == PENDING


def test_the_recovery_scripts_last_eta_is_the_clients() -> None:
    assert f"local LAST_ETA = {LAST_ETA:.0f}\n" in redis_broker.lua("recover_expired")


def test_a_lease_that_ran_out_is_taken_back_from_a_worker_of_this_host_only_once_it_is_gone(
    redis_broker: RedisBroker,
) -> None:
    """A worker stopped past its lease (an operator's SIGSTOP, a swapping host) while its
    children ran the tasks in their pipes: another worker of the host took them back, and
    they ran twice. Of another host, the lease alone can tell."""
    now_ms = int(time.time() * 1000)
    alive = f"w@h1:{os.getpid()}:{now_ms}"
    gone = f"w@h1:{os.getpid()}:{now_ms - 3_600_000}"  # a pid taken over since
    elsewhere = f"w@h2:{os.getpid()}:{now_ms}"
    tasks = [envelope() for _ in range(3)]
    redis_broker.enqueue(tasks)
    for owner in (alive, gone, elsewhere):
        assert len(redis_broker.reserve(["q1"], 1, owner, 0.05)) == 1
    time.sleep(0.2)

    assert redis_broker.recover_expired(["q1"], "h1") == 2  # gone's, and elsewhere's
    assert ids(redis_broker.reserve(["q1"], 5, "w2", 30)) == [tasks[1].id, tasks[2].id]
    # Its own that ran out: what it never learned it reserved (a reply lost), held for good.
    assert redis_broker.recover_expired(["q1"], "h1", me=alive) == 1
    assert len(redis_broker.reserve(["q1"], 1, alive, 0.05)) == 1
    time.sleep(0.2)
    assert redis_broker.recover_expired(["q1"]) == 1  # no host named: the lease decides


def test_a_consumer_whose_name_is_no_utf8_is_no_worker_of_this_host(
    redis_broker: RedisBroker, direct: redis.Redis
) -> None:
    """Someone else's consumer, named in bytes that are no UTF-8 but read as a live worker
    of this host: its name went into the recovery script's arguments, which Redis's JSON
    could not read, so that every worker's boot failed until the node was FATAL."""
    task = envelope()
    redis_broker.enqueue([task])
    name = b"\xff@h1:%d:%d" % (os.getpid(), int(time.time() * 1000))
    direct.xgroup_createconsumer(f"{redis_broker.prefix}:q:q1", "workers", name)
    assert len(redis_broker.reserve(["q1"], 1, "w1", 0.05)) == 1
    time.sleep(0.2)

    assert redis_broker.recover_expired(["q1"], "h1") == 1


def test_a_record_whose_status_is_none_we_write_is_handed_out_not_stranded(
    redis_broker: RedisBroker, direct: redis.Redis
) -> None:
    """Other hands set a queued task's status, and a scheduled one's, to a word fleetd never
    writes: the reserve dropped their entries as stale and both waited, PENDING, for ever."""
    queued, scheduled = envelope(), envelope(eta=time.time() + 0.2)
    redis_broker.enqueue([queued, scheduled])
    for task in (queued, scheduled):
        direct.hset(f"{redis_broker.prefix}:r:{task.id}", "status", "bogus")

    assert ids(redis_broker.reserve(["q1"], 5, "w1", 30)) == [queued.id]
    time.sleep(0.3)
    assert ids(redis_broker.reserve(["q1"], 5, "w1", 30)) == [scheduled.id]

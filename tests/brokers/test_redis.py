"""What only the Redis broker promises: surviving Redis restarts, retried calls, key expiry."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redisserver import RedisServer, start_redis
from worker.brokers.base import PENDING, SUCCESS, Outcome, QueueDepth
from worker.brokers.redis import RedisBroker

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

        server.stop()  # between reserve and finish; it comes back while finish is retrying
        restarting = start_later(server, 0.5)
        broker.finish([Outcome(d.id, SUCCESS, result=d.id) for d in held])
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
        wake.arm()
        assert not readable(wake, 0.2)
        broker.enqueue([envelope()])
        assert readable(wake, 5)
        assert wake.fileno() == registered  # still the descriptor the worker polls
    finally:
        wake.close()
        broker.close()


def test_a_retried_write_runs_only_once(redis_broker: RedisBroker) -> None:
    redis_broker.enqueue([envelope(), envelope()])
    args = {"queues": ["q1"], "n": 1, "owner": "w1", "lease_ms": 30000}

    first = redis_broker._run("reserve", args, token="one-call")
    again = redis_broker._run("reserve", args, token="one-call")  # as redis-py resends it

    assert again == first and first[0][4] == 1
    assert redis_broker.depths() == [QueueDepth("q1", ready=1, scheduled=0, reserved=1)]


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

    short.finish([Outcome(task.id, SUCCESS)])

    assert 0 < short.redis.ttl(key) <= 60
    info = short.get_result(task.id)
    assert info is not None and info["state"] != PENDING
    short.close()

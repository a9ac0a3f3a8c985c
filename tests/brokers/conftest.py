"""Fixtures that run each broker test against SQLite and against Redis."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from worker.brokers.base import Broker
from worker.brokers.redis import RedisBroker
from worker.brokers.sqlite import SQLiteBroker

# The shared test server; each test keeps to its own key prefix and deletes it afterwards.
REDIS_URL = os.environ.get("FLEETD_TEST_REDIS", "redis://127.0.0.1:6379/0")


def require_redis(url: str) -> None:
    """Fail under CI (CI=true) when Redis does not answer, skip elsewhere."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as e:
        message = f"no Redis at {url} ({e}): start redis-server or set FLEETD_TEST_REDIS"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    finally:
        client.close()


def delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


class BrokerFactory:
    """Opens connections to one broker (the same database or key prefix each time)."""

    def __init__(self, kind: str, open_one: Callable[[], Broker]) -> None:
        self.kind = kind
        self._open_one = open_one
        self.opened: list[Broker] = []

    def __call__(self) -> Broker:
        broker = self._open_one()
        self.opened.append(broker)
        return broker

    def close_all(self) -> None:
        for broker in self.opened:
            broker.close()


@pytest.fixture(params=["sqlite", "redis"])
def connect(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerFactory]:
    """Call it for a new connection to this test's broker (one per process, per DESIGN)."""
    prefix = f"fleetd-test-{uuid.uuid4().hex[:12]}"
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'queue.db'}"
        factory = BrokerFactory("sqlite", lambda: SQLiteBroker(url))
    else:
        require_redis(REDIS_URL)
        factory = BrokerFactory("redis", lambda: RedisBroker(REDIS_URL, prefix=prefix))
    try:
        yield factory
    finally:
        factory.close_all()
        if factory.kind == "redis":
            delete_prefix(REDIS_URL, prefix)


@pytest.fixture
def broker(connect: BrokerFactory) -> Broker:
    return connect()


@pytest.fixture
def redis_broker() -> Iterator[RedisBroker]:
    """A Redis broker on the shared test server, under a key prefix of its own."""
    require_redis(REDIS_URL)
    prefix = f"fleetd-test-{uuid.uuid4().hex[:12]}"
    broker = RedisBroker(REDIS_URL, prefix=prefix)
    try:
        yield broker
    finally:
        broker.close()
        delete_prefix(REDIS_URL, prefix)

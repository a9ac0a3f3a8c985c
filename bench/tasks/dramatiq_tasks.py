"""Dramatiq's copy of the benchmark task: the shared body on Redis, with Results."""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from bench.tasks import body

_URL = os.environ["BENCH_REDIS_URL"]

broker = RedisBroker(url=_URL)
broker.add_middleware(Results(backend=RedisBackend(url=_URL)))
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="stamp", queue_name="default", store_results=True)
def stamp(key: str) -> float:
    return body.stamp(key)

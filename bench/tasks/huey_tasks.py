"""Huey's copy of the benchmark task: the shared body on a RedisHuey that notifies results.

`notify_result=True` is Huey's own option for waiting on a result with BLPOP instead of
sleeping between polls; without it no client sees a result sooner than its poll interval.
"""

from __future__ import annotations

import os

from huey import RedisHuey

from bench.tasks import body

huey = RedisHuey("bench", url=os.environ["BENCH_REDIS_URL"], notify_result=True)


@huey.task()
def stamp(key: str) -> float:
    return body.stamp(key)

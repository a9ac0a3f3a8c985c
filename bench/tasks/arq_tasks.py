"""arq's copy of the I/O-bound async benchmark task, and the settings `arq` starts a worker with.

`BENCH_ASYNC_CONCURRENCY` is the number of jobs one worker process runs at once (arq's
`max_jobs`), the same figure every system gets; arq's other settings are its defaults
(it polls its queue every `poll_delay` = 0.5 s when it has room).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from arq.connections import RedisSettings

from bench.tasks import body


async def astamp(ctx: Any, key: str) -> float:
    await asyncio.sleep(body.ASYNC_IO_SECONDS)
    return body.stamp(key)


class WorkerSettings:
    functions = [astamp]
    redis_settings = RedisSettings.from_dsn(os.environ["BENCH_REDIS_URL"])
    max_jobs = int(os.environ.get("BENCH_ASYNC_CONCURRENCY", "10"))

"""SAQ's copy of the I/O-bound async benchmark task, and the settings `saq` starts its workers with.

`BENCH_ASYNC_CONCURRENCY` is the number of jobs one worker process runs at once (SAQ's
`concurrency`), the same figure every system gets.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from saq import Queue

from bench.tasks import body

queue = Queue.from_url(os.environ["BENCH_REDIS_URL"])


async def astamp(ctx: Any, *, stamp_key: str) -> float:
    await asyncio.sleep(body.ASYNC_IO_SECONDS)
    return body.stamp(stamp_key)


settings = {
    "queue": queue,
    "functions": [astamp],
    "concurrency": int(os.environ.get("BENCH_ASYNC_CONCURRENCY", "10")),
}

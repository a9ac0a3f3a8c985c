"""fleetd's copy of the benchmark tasks: the shared body as a fleetd task (queue "default"), and
the I/O-bound async task (`await asyncio.sleep`, then the body)."""

from __future__ import annotations

import asyncio

from bench.tasks import body
from fleetd import task


@task
def stamp(key: str) -> float:
    return body.stamp(key)


@task
async def astamp(key: str) -> float:
    await asyncio.sleep(body.ASYNC_IO_SECONDS)
    return body.stamp(key)

"""fleetd's I/O-bound async benchmark task (`await asyncio.sleep`, then the body), in a module
of its own: a worker that imports an `async def` task loads the children's event loop before
it forks, which the sync figures' fleet must not pay for."""

from __future__ import annotations

import asyncio

from bench.tasks import body
from fleetd import task


@task
async def astamp(key: str) -> float:
    await asyncio.sleep(body.ASYNC_IO_SECONDS)
    return body.stamp(key)

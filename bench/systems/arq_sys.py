"""arq: N `arq WorkerSettings` processes, an async-first queue on Redis, measured on async tasks
only (arq runs one worker per process: a shell starts N of them in one session)."""

from __future__ import annotations

import asyncio
import shlex
from typing import Any

from bench.systems.base import AsyncFirstProducer, AsyncFirstSystem, Site

SETTINGS = "bench.tasks.arq_tasks.WorkerSettings"


class ArqProducer(AsyncFirstProducer):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        import os

        from arq import create_pool
        from arq.connections import RedisSettings

        self.loop = asyncio.new_event_loop()
        settings = RedisSettings.from_dsn(os.environ["BENCH_REDIS_URL"])
        self.pool = self.loop.run_until_complete(create_pool(settings))

    def submit_async(self, key: str, n: int) -> None:
        async def enqueue() -> None:
            for _ in range(n):
                await self.pool.enqueue_job("astamp", key)

        self.loop.run_until_complete(enqueue())

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.aclose())
        self.loop.close()


class ArqSystem(AsyncFirstSystem):
    name = "arq"
    label = "arq"
    distributions = ("arq",)
    settings = "N `arq WorkerSettings` processes, `max_jobs` as fleetd's `async_concurrency`"
    producer = ArqProducer

    def configure_async(self, site: Site, processes: int) -> list[str]:
        one = shlex.join([str(self.bin / "arq"), SETTINGS])
        return ["sh", "-c", " & ".join([one] * processes) + " & wait"]

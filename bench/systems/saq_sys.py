"""SAQ: `saq SETTINGS --workers N`, an async-first queue on Redis, measured on async tasks only."""

from __future__ import annotations

import asyncio
from typing import Any

from bench.systems.base import AsyncFirstProducer, AsyncFirstSystem, Site

SETTINGS = "bench.tasks.saq_tasks.settings"


class SAQProducer(AsyncFirstProducer):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        from bench.tasks import saq_tasks

        self.queue = saq_tasks.queue
        self.loop = asyncio.new_event_loop()

    def submit_async(self, key: str, n: int) -> None:
        async def enqueue() -> None:
            for _ in range(n):
                await self.queue.enqueue("astamp", stamp_key=key)  # `key` is a job field in SAQ

        self.loop.run_until_complete(enqueue())

    def close(self) -> None:
        self.loop.run_until_complete(self.queue.disconnect())
        self.loop.close()


class SAQSystem(AsyncFirstSystem):
    name = "saq"
    label = "SAQ"
    distributions = ("saq",)
    settings = "`saq SETTINGS --workers N`, `concurrency` as fleetd's `async_concurrency`"
    producer = SAQProducer

    def configure_async(self, site: Site, processes: int) -> list[str]:
        return [str(self.bin / "saq"), SETTINGS, "--workers", str(processes), "--quiet"]

"""Dramatiq: N processes of one thread each on the Redis broker, Results middleware in Redis."""

from __future__ import annotations

from typing import Any

from bench.systems.base import Producer, Site, System

MODULE = "bench.tasks.dramatiq_tasks"


class DramatiqProducer(Producer):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        from bench.tasks import dramatiq_tasks

        self.stamp = dramatiq_tasks.stamp

    def submit(self, key: str) -> Any:
        return self.stamp.send(key)

    def submit_batch(self, key: str, n: int) -> None:
        import dramatiq

        dramatiq.group(self.stamp.message(key) for _ in range(n)).run()

    def wait(self, handle: Any, timeout: float) -> None:
        handle.get_result(block=True, timeout=max(1000, int(timeout * 1000)))


class DramatiqSystem(System):
    name = "dramatiq"
    label = "Dramatiq"
    distributions = ("dramatiq",)
    settings = "`dramatiq --processes N --threads 1`, default prefetch and idle back-off"
    batch_api = "`group(...).run()`"
    producer = DramatiqProducer

    def configure(self, site: Site, processes: int, max_tasks_per_child: int) -> list[str]:
        return [str(self.bin / "dramatiq"), MODULE, "--processes", str(processes), "--threads", "1"]

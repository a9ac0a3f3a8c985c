"""Huey: `huey_consumer -k process -w N` on RedisHuey (blocking dequeue, results notified)."""

from __future__ import annotations

from typing import Any

from bench.systems.base import Producer, Site, System

INSTANCE = "bench.tasks.huey_tasks.huey"


class HueyProducer(Producer):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        from bench.tasks import huey_tasks

        self.stamp = huey_tasks.stamp

    def submit(self, key: str) -> Any:
        return self.stamp(key)

    def wait(self, handle: Any, timeout: float) -> None:
        handle.get(blocking=True, timeout=timeout)


class HueySystem(System):
    name = "huey"
    label = "Huey"
    distributions = ("huey",)
    settings = (
        "`huey_consumer -k process -w N` on RedisHuey (blocking dequeue, `notify_result=True`)"
    )
    recycle_option = "`huey_consumer -M`"
    producer = HueyProducer

    def configure(self, site: Site, processes: int, max_tasks_per_child: int) -> list[str]:
        command = [str(self.bin / "huey_consumer"), INSTANCE, "-k", "process", "-w", str(processes)]
        if max_tasks_per_child:
            command += ["-M", str(max_tasks_per_child)]
        return command + ["-q"]

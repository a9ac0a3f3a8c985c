"""Celery: a prefork pool of N processes on the Redis broker, results in Redis."""

from __future__ import annotations

import time
from typing import Any

from bench.systems.base import NotAvailable, Producer, Site, System

APP = "bench.tasks.celery_tasks"


class CeleryProducer(Producer):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        from bench.tasks import celery_tasks

        self.tasks = celery_tasks

    def submit(self, key: str) -> Any:
        return self.tasks.stamp.delay(key)

    def submit_batch(self, key: str, n: int) -> None:
        from celery import group

        group(self.tasks.stamp.s(key) for _ in range(n)).apply_async()

    def wait(self, handle: Any, timeout: float) -> None:
        handle.get(timeout=timeout)

    def ping(self) -> float:
        start = time.perf_counter()
        replies = self.tasks.app.control.ping(timeout=5.0, limit=1)
        if not replies:
            raise NotAvailable("no worker answered the ping")
        return time.perf_counter() - start


class CelerySystem(System):
    name = "celery"
    label = "Celery"
    distributions = ("celery", "kombu")
    settings = (
        "`celery worker -P prefork -c N --without-gossip --without-mingle --without-heartbeat`,"
        " default prefetch (4 per process), acks_late off (default), Redis result backend"
    )
    batch_api = "`group(...).apply_async()`"
    recycle_option = "`--max-tasks-per-child`"
    producer = CeleryProducer

    def configure(self, site: Site, processes: int, max_tasks_per_child: int) -> list[str]:
        command = [str(self.bin / "celery"), "-A", APP, "worker", "-P", "prefork"]
        command += ["-c", str(processes), "-l", "warning", "-n", "bench@%h"]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        if max_tasks_per_child:
            command += ["--max-tasks-per-child", str(max_tasks_per_child)]
        return command

    def ping_command(self, site: Site) -> list[str] | None:
        return [str(self.bin / "celery"), "-A", APP, "inspect", "ping"]

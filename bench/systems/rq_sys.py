"""RQ: `rq worker-pool` of N workers, each forking a work horse per job (RQ's default)."""

from __future__ import annotations

from typing import Any

from bench.systems.base import QUEUE, Producer, Site, System


class RQProducer(Producer):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        from redis import Redis
        from rq import Queue

        from bench.tasks import rq_tasks

        self.stamp = rq_tasks.stamp
        self.queue = Queue(QUEUE, connection=Redis.from_url(config["redis_url"]))

    def submit(self, key: str) -> Any:
        return self.queue.enqueue(self.stamp, key)

    def submit_batch(self, key: str, n: int) -> None:
        from rq import Queue

        self.queue.enqueue_many([Queue.prepare_data(self.stamp, (key,)) for _ in range(n)])

    def wait(self, handle: Any, timeout: float) -> None:
        from rq.results import Result

        result = handle.latest_result(timeout=max(1, round(timeout)))
        if result is None or result.type != Result.Type.SUCCESSFUL:
            raise RuntimeError(f"job {handle.id} ended without a successful result: {result}")


class RQSystem(System):
    name = "rq"
    label = "RQ"
    distributions = ("rq",)
    settings = "`rq worker-pool -n N`: a work horse is forked per job (RQ's default)"
    batch_api = "`Queue.enqueue_many(...)` (one pipeline)"
    recycle_option = "always (a fresh work horse per job)"
    producer = RQProducer

    def configure(self, site: Site, processes: int, max_tasks_per_child: int) -> list[str]:
        pool = [str(self.bin / "rq"), "worker-pool", "-n", str(processes)]
        return pool + ["-u", site.redis_url, "-l", "WARNING", QUEUE]

    def producer_config(self, site: Site) -> dict[str, Any]:
        return {"redis_url": site.redis_url}

"""fleetd: one arbiter, one worker "w" with a pool of N children, on the Redis or SQLite broker."""

from __future__ import annotations

import abc
import importlib
import time
from typing import Any

from bench.systems.base import ASYNC_CONCURRENCY, QUEUE, REPO, NotAvailable, Producer, Site, System

TASK = "bench.tasks.fleetd_tasks.stamp"
ASYNC_TASK = "bench.tasks.fleetd_async_tasks.astamp"
CONFIG = "fleetd.toml"
PREFETCH = 3  # 8 tasks in flight with 2 processes: what Celery holds by default (multiplier 4)
FLEETD_SETTINGS = (
    "`concurrency = N`, `prefetch = 3` (8 tasks in flight with 2 processes, as Celery's"
    " default multiplier of 4), acks_late on, results stored"
)


class FleetdProducer(Producer):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        from worker import Client

        # The broker module now, as every peer's producer imports redis-py when it is made:
        # the Client would import it at its first submit, inside the timed enqueue.
        scheme = "redis" if config["broker"].startswith("redis") else "sqlite"
        importlib.import_module(f"worker.brokers.{scheme}")
        self.client = Client(config["broker"])
        self.control: Any = None

    def submit(self, key: str) -> Any:
        return self.client.submit(TASK, key, queue=QUEUE)

    def submit_batch(self, key: str, n: int) -> None:
        self.client.submit_many([(TASK, (key,), {})] * n, queue=QUEUE)

    def submit_async(self, key: str, n: int) -> None:
        for _ in range(n):
            self.client.submit(ASYNC_TASK, key, queue=QUEUE)

    def wait(self, handle: Any, timeout: float) -> None:
        handle.get(timeout=timeout)

    def ping(self) -> float:
        if self.control is None:
            try:
                from ctl.client import ControlClient
                from supervisor.config import load
            except ImportError as exc:
                raise NotAvailable("control plane not built") from exc
            bind = load(self.config["config"], check_imports=False).control.bind
            self.control = ControlClient([b for b in bind if b.startswith("ipc://")], timeout=5.0)
        start = time.perf_counter()
        reply = self.control.call("ping")
        elapsed = time.perf_counter() - start
        if reply.missing or not reply.replies:
            raise RuntimeError(f"ping: no reply from {reply.missing or 'any node'}")
        return elapsed

    def close(self) -> None:
        if self.control is not None:
            self.control.close()


class FleetdSystem(System):
    is_fleetd = True
    distributions = ("fleetd",)
    batch_api = "`Client.submit_many(...)`"
    recycle_option = "`max_tasks_per_child`"
    producer = FleetdProducer

    def configure(self, site: Site, processes: int, max_tasks_per_child: int) -> list[str]:
        return self.write_config(
            site, CONFIG, processes, f"max_tasks_per_child = {max_tasks_per_child}", TASK
        )

    def configure_async(self, site: Site, processes: int) -> list[str]:
        return self.write_config(
            site,
            "fleetd-async.toml",
            processes,
            f"async_concurrency = {ASYNC_CONCURRENCY}",
            ASYNC_TASK,
        )

    workers = 1  # worker processes the children are spread over
    prefetch = PREFETCH

    def write_config(
        self, site: Site, name: str, processes: int, setting: str, task: str
    ) -> list[str]:
        """Write a config of `workers` workers on the one queue with `processes` children
        between them, `setting` in its [defaults] and the module of `task` to import; the
        command that starts it."""
        config = site.workdir / name
        workers = min(self.workers, processes)
        pools = [processes // workers + (i < processes % workers) for i in range(workers)]
        config.write_text(
            "[fleet]\n"
            'node = "bench"\n'
            f'broker = "{self.broker_url(site, relative=True)}"\n'
            'state_dir = "state"\n'
            f'imports = ["{task.rpartition(".")[0]}"]\n'
            f'pythonpath = ["{REPO}"]\n'
            "[control]\n"
            'bind = ["ipc://state/control.sock"]\n'
            "[defaults]\n"
            f"concurrency = {processes}\n"
            f"prefetch = {self.prefetch}\n"
            f"{setting}\n"
            + "".join(
                f'[[worker]]\nname = "w{i or ""}"\nqueues = ["{QUEUE}"]\nconcurrency = {pool}\n'
                for i, pool in enumerate(pools)
            )
        )
        return [str(self.bin / "fleetd"), "start", "-c", str(config), "--log-level", "warning"]

    def ping_command(self, site: Site) -> list[str] | None:
        return [str(self.bin / "fleetctl"), "-c", str(site.workdir / CONFIG), "--json", "ping"]

    def producer_config(self, site: Site) -> dict[str, Any]:
        return {
            "broker": self.broker_url(site, relative=False),
            "config": str(site.workdir / CONFIG),
        }

    @abc.abstractmethod
    def broker_url(self, site: Site, relative: bool) -> str:
        """The broker as the config file names it (relative) or as a producer elsewhere does."""


class FleetdRedis(FleetdSystem):
    name = "fleetd-redis"
    label = "fleetd (Redis)"
    settings = "`fleetd start`, broker Redis Streams, " + FLEETD_SETTINGS

    def broker_url(self, site: Site, relative: bool) -> str:
        return site.redis_url


class FleetdSQLite(FleetdSystem):
    name = "fleetd-sqlite"
    label = "fleetd (SQLite)"
    settings = "`fleetd start`, broker SQLite (WAL), " + FLEETD_SETTINGS
    uses_redis = False

    def broker_url(self, site: Site, relative: bool) -> str:
        return "sqlite:///queue.db" if relative else f"sqlite:///{site.workdir / 'queue.db'}"


class FleetdRedisSpread(FleetdRedis):
    """fleetd on Redis with its children spread over 4 workers on the one queue (fewer when
    the pool is smaller): the setting for a many-core host, where one worker's dispatch would
    cap the pool (`python -m bench.scale`; not a column of `make bench`)."""

    name = "fleetd-redis-4w"
    label = "fleetd (Redis), up to 4 workers"
    settings = "as fleetd (Redis), the children spread over 4 workers on the one queue"
    workers = 4


class FleetdSQLiteSpread(FleetdSQLite):
    """fleetd on SQLite, its children spread as FleetdRedisSpread's."""

    name = "fleetd-sqlite-4w"
    label = "fleetd (SQLite), up to 4 workers"
    settings = "as fleetd (SQLite), the children spread over 4 workers on the one queue"
    workers = 4

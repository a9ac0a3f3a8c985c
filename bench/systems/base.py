"""What every system driver provides: how the harness starts its workers, how a producer feeds it.

A driver is two classes in one module. `System` is the harness side: it runs in the project's
venv, never imports the system, and says which commands start its workers. `Producer` is the
client side: it runs inside `bench.agent`, in the system's own venv, and enqueues and waits.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

REPO = Path(__file__).resolve().parents[2]
# fleetd's commands and dependencies from `pip install .` (no editable-install import hook;
# the peers are regular installs too); its code runs from the working tree.
FLEETD_BIN = REPO / ".bench-fleetd-venv" / "bin"
PEERS_BIN = REPO / ".bench-venv" / "bin"
# SAQ and arq: their redis-py (arq: < 6) cannot share a venv with the other peers'.
ASYNC_PEERS_BIN = REPO / ".bench-async-venv" / "bin"
QUEUE = "default"
ASYNC_CONCURRENCY = 500  # async tasks one worker process runs at once, in every system


class NotAvailable(Exception):
    """A figure that does not apply to this system, or a feature that is not built yet."""


@dataclass(frozen=True)
class Site:
    """Where one session of one system runs: its private folder and the shared Redis server."""

    workdir: Path
    redis_url: str


class Producer(abc.ABC):
    """The client side of a system: submits the benchmark task and waits for its result."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    @abc.abstractmethod
    def submit(self, key: str) -> Any:
        """Enqueue one `stamp(key)` task and return the system's handle on it."""

    def submit_batch(self, key: str, n: int) -> None:
        """Enqueue n `stamp(key)` tasks with the system's own batch API."""
        raise NotAvailable("no batched enqueue API")

    def submit_async(self, key: str, n: int) -> None:
        """Enqueue n `astamp(key)` tasks: `await asyncio.sleep(0.1)`, then the body."""
        raise NotAvailable("no async def tasks")

    @abc.abstractmethod
    def wait(self, handle: Any, timeout: float) -> None:
        """Block until the task's result is stored (raise if it failed or timed out)."""

    def ping(self) -> float:
        """One control-plane ping of every node, in-process; return its round trip in seconds."""
        raise NotAvailable("no control plane")

    def close(self) -> None:  # noqa: B027 - a hook: most producers hold nothing to release
        """Release what the producer holds open (the agent is about to exit)."""


class System(abc.ABC):
    """The harness side of a system: what to run, with which settings, in which venv."""

    name: ClassVar[str]  # key in the results, e.g. "fleetd-redis"
    label: ClassVar[str]  # column header in RESULTS.md
    distributions: ClassVar[tuple[str, ...]]  # pip distributions whose versions are reported
    settings: ClassVar[str]  # one line for RESULTS.md: how its workers run
    batch_api: ClassVar[str | None] = None  # the batched-enqueue call; None: the system has none
    recycle_option: ClassVar[str | None] = None  # how max-tasks-per-child is set; None: not offered
    is_fleetd: ClassVar[bool] = False
    async_only: ClassVar[bool] = False  # an async-first queue: measured on async tasks alone
    uses_redis: ClassVar[bool] = True  # its broker is Redis: the bench reports Redis's CPU per task
    producer: ClassVar[type[Producer]]

    @property
    def bin(self) -> Path:
        if self.async_only:
            return ASYNC_PEERS_BIN
        return FLEETD_BIN if self.is_fleetd else PEERS_BIN

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def env(self, site: Site) -> dict[str, str]:
        """The environment of every process of this system: where the task module and Redis are."""
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
        env.update(BENCH_REDIS_URL=site.redis_url, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        env["BENCH_ASYNC_CONCURRENCY"] = str(ASYNC_CONCURRENCY)
        return env

    @abc.abstractmethod
    def configure(self, site: Site, processes: int, max_tasks_per_child: int) -> list[str]:
        """Write whatever config the workers need; return the command that starts them."""

    def configure_async(self, site: Site, processes: int) -> list[str]:
        """The command that starts workers running `astamp`, ASYNC_CONCURRENCY at once each."""
        raise NotAvailable("no async def tasks")

    def ping_command(self, site: Site) -> list[str] | None:
        """The command-line ping of every node, or None when the system has no control plane."""
        return None

    def producer_config(self, site: Site) -> dict[str, Any]:
        """What the producer needs beyond BENCH_REDIS_URL (passed to `Producer.__init__`)."""
        return {}


class AsyncFirstProducer(Producer):
    """The producer of an async-first queue, measured on async tasks alone."""

    def submit(self, key: str) -> Any:
        raise NotImplementedError("measured on async tasks only")

    def wait(self, handle: Any, timeout: float) -> None:
        raise NotImplementedError("measured on async tasks only")


class AsyncFirstSystem(System):
    """An async-first queue (SAQ, arq): measured on async tasks alone, in .bench-async-venv."""

    async_only = True

    def configure(self, site: Site, processes: int, max_tasks_per_child: int) -> list[str]:
        raise NotImplementedError("measured on async tasks only")

"""Drain rate and CPU per task by prefetch: `python -m bench.prefetch [--broker redis|sqlite]
[--tasks 20000] [--prefetch 3 15] [--repeat 2]`.

For each prefetch (alternated, `--repeat` times): a fleet with `concurrency = 2` drains a
queue pre-filled with N no-op tasks (Redis: a private server). Printed per prefetch, as
medians [min–max]: tasks/s from the first task done to the last, the worker process's CPU
per task (1 / that is the most one worker can hand out, however many cores its children
have), its children's CPU per task, and on Redis the server's CPU per task. The client
polls the first and the last task's state only (every 2 ms), so that its own waits cost
the drain nothing; `bench.throughput` waits on every task.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.redis_server import RedisServer
from bench.throughput import FLEETD, stat_fields, write_config
from fleetd import Client

POLL = 0.002
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = stat_fields(pid)
    return (fields[10] + fields[11]) / CLOCK_TICKS


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(p) for p in children.read().split()]


def wait_done(handle: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while handle.state not in ("SUCCESS", "FAILURE"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"a task not done after {timeout} s")
        time.sleep(POLL)


def drain_once(
    folder: Path, broker: str, prefetch: int, tasks: int, server: RedisServer | None
) -> dict[str, float]:
    config = write_config(folder, broker, prefetch, 0)
    client = Client.from_config(str(config))
    handles = []
    for start in range(0, tasks, 100):
        handles += client.submit_many([("tput_tasks.noop", (), {})] * min(100, tasks - start))
    fleet = subprocess.Popen([FLEETD, "start", "-c", str(config), "--log-level", "warning"])
    try:
        wait_done(handles[0], 30)
        started = time.perf_counter()
        [worker] = children_of(fleet.pid)
        kids = children_of(worker)
        worker_cpu = cpu_seconds(worker)
        kids_cpu = sum(cpu_seconds(k) for k in kids)
        redis_cpu = server.cpu_seconds() if server else 0.0
        wait_done(handles[-1], 300)
        seconds = time.perf_counter() - started
        out = {
            "tasks/s": (tasks - 1) / seconds,
            "worker CPU per task (us)": (cpu_seconds(worker) - worker_cpu) / tasks * 1e6,
            "children CPU per task (us)": (sum(cpu_seconds(k) for k in kids) - kids_cpu)
            / tasks
            * 1e6,
        }
        if server:
            out["Redis CPU per task (us)"] = (server.cpu_seconds() - redis_cpu) / tasks * 1e6
        return out
    finally:
        fleet.terminate()
        fleet.wait(60)
        client.close()


def spread(values: list[float]) -> str:
    """The median and [min–max]: one slow run in three shows."""
    return f"{statistics.median(values):,.0f} [{min(values):,.0f}–{max(values):,.0f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=("sqlite", "redis"), default="redis")
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--prefetch", type=int, nargs="+", default=[3, 15])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    runs: dict[int, list[dict[str, float]]] = {p: [] for p in args.prefetch}
    with tempfile.TemporaryDirectory(prefix="fleetd-prefetch-") as tmp:
        folder = Path(tmp)
        for _ in range(args.repeat):
            for prefetch in args.prefetch:  # alternated: the machine's state weighs alike
                run = folder / f"run{len(runs[prefetch])}-{prefetch}"
                run.mkdir()
                if args.broker == "redis":
                    with RedisServer(run / "redis") as server:
                        runs[prefetch].append(
                            drain_once(run, server.url, prefetch, args.tasks, server)
                        )
                else:
                    runs[prefetch].append(
                        drain_once(run, "sqlite:///queue.db", prefetch, args.tasks, None)
                    )
    print(f"{args.broker}, {args.tasks} no-op tasks, concurrency 2, median of {args.repeat}:")
    for prefetch, results in runs.items():
        figures = ", ".join(f"{name} {spread([r[name] for r in results])}" for name in results[0])
        print(f"  prefetch {prefetch:3}: {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

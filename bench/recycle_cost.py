"""Where a recycled child's time goes: `python -m bench.recycle_cost [--broker sqlite|redis]
[--tasks N]`.

fleetd with `concurrency = 2`, `prefetch = 1`, `max_tasks_per_child = 1` drains N pre-filled
no-op tasks, so every task costs a fork, a child's start and exit, and a reap. Printed per
task: the arbiter's CPU, the worker's own (user, system), its children's (user, system, and
the page faults they took: mostly copy-on-write copies of the worker's pages), and, as the
floor, the same for a process that imports fleetd's worker modules and only forks children
that exit at once. 2 cores divided by the total CPU per task is the most tasks per second
recycling can reach on such a machine, whatever fleetd does around the fork.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.redis_server import RedisServer
from bench.throughput import FLEETD, stat_fields, write_config
from fleetd import Client

FORKS = 500  # of the floor's bare forks


def fleet_figures(config: Path, tasks: int) -> dict[str, float]:
    client = Client.from_config(str(config))
    first = client.submit("tput_tasks.noop")
    fleet = subprocess.Popen([FLEETD, "start", "-c", str(config), "--log-level", "warning"])
    try:
        first.get(timeout=30)
        [worker] = psutil.Process(fleet.pid).children()
        before = stat_fields(fleet.pid), stat_fields(worker.pid)
        handles = client.submit_many([("tput_tasks.noop", (), {})] * tasks)
        started = time.perf_counter()
        for handle in handles:
            handle.get(timeout=120)
        seconds = time.perf_counter() - started
        after = stat_fields(fleet.pid), stat_fields(worker.pid)
    finally:
        fleet.terminate()
        fleet.wait(60)
        client.close()
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK") / tasks

    def spent(process: int, field: int) -> float:
        return (after[process][field] - before[process][field]) * tick_ms

    return {
        "tasks/s": tasks / seconds,
        "arbiter CPU (ms)": spent(0, 10) + spent(0, 11),
        "worker user (ms)": spent(1, 10),
        "worker system (ms)": spent(1, 11),
        "children user (ms)": spent(1, 12),
        "children system (ms)": spent(1, 13),
        "children page faults": (after[1][7] - before[1][7]) / tasks,
    }


def floor_figures() -> dict[str, float]:
    """A fork of a process holding the worker's modules, whose child exits at once."""
    import gc

    import worker.brokers.sqlite  # noqa: F401 - the worker's modules, as a worker holds them
    import worker.process  # noqa: F401

    children, own = resource.RUSAGE_CHILDREN, resource.RUSAGE_SELF
    before = resource.getrusage(children), resource.getrusage(own)
    for _ in range(FORKS):
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        gc.unfreeze()
        os.waitpid(pid, 0)
    after = resource.getrusage(children), resource.getrusage(own)
    per = 1000 / FORKS
    return {
        "parent user (ms)": (after[1].ru_utime - before[1].ru_utime) * per,
        "parent system (ms)": (after[1].ru_stime - before[1].ru_stime) * per,
        "child user (ms)": (after[0].ru_utime - before[0].ru_utime) * per,
        "child system (ms)": (after[0].ru_stime - before[0].ru_stime) * per,
        "child page faults": (after[0].ru_minflt - before[0].ru_minflt) / FORKS,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--tasks", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetd-recycle-") as tmp:
        folder = Path(tmp)
        if args.broker == "redis":
            with RedisServer(folder / "redis") as redis:
                figures = fleet_figures(write_config(folder, redis.url, 1, 1), args.tasks)
        else:
            figures = fleet_figures(write_config(folder, "sqlite:///queue.db", 1, 1), args.tasks)
    total = sum(v for k, v in figures.items() if k.endswith("(ms)"))
    print(f"fleetd on {args.broker}, max_tasks_per_child = 1, {args.tasks} no-op tasks, per task:")
    for name, value in figures.items():
        print(f"  {name:32} {value:8.2f}")
    print(f"  {'total CPU (ms)':32} {total:8.2f}")
    print(f"  {'ceiling on 2 cores (tasks/s)':32} {2000 / total:8.0f}")
    floor = floor_figures()
    print(f"a bare fork and exit of a process holding the worker's modules, {FORKS} times, each:")
    for name, value in floor.items():
        print(f"  {name:32} {value:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

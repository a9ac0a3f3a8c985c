"""Where a recycled child's time goes: `python -m bench.recycle_cost [--broker sqlite|redis]
[--tasks N] [--body noop|stamp]`.

fleetd with `concurrency = 2`, `prefetch = 1`, `max_tasks_per_child = 1` drains N pre-filled
no-op tasks, so every task costs a fork, a child's start and exit, and a reap. Printed per
task: the arbiter's CPU, the worker's own (user, system), its children's (user, system, and
the page faults they took: mostly copy-on-write copies of the worker's pages), and, as the
floor, the same for a process that imports fleetd's worker modules and only forks children
that exit at once. 2 cores divided by the total CPU per task is the most tasks per second
recycling can reach on such a machine, whatever fleetd does around the fork.

`--body stamp` runs `make bench`'s own task body instead (bench/tasks/body.py: a fresh
child's first Redis connection, then an RPUSH), in the fleet and in the floor's children
alike: the floor is then what any system pays per recycled child for that body.
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
from bench.systems.base import REPO
from bench.systems.fleetd_sys import TASK as STAMP  # make bench's: an RPUSH to BENCH_REDIS_URL
from bench.throughput import FLEETD, stat_fields, write_config
from fleetd import Client

FORKS = 500  # of the floor's bare forks


def fleet_figures(config: Path, tasks: int, body: str) -> dict[str, float]:
    client = Client.from_config(str(config))
    call = ("tput_tasks.noop", (), {}) if body == "noop" else (STAMP, ("recycle",), {})
    first = client.submit(call[0], *call[1])
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # for the stamp task's module
    command = [FLEETD, "start", "-c", str(config), "--log-level", "warning"]
    fleet = subprocess.Popen(command, env=env)
    try:
        first.get(timeout=30)
        [worker] = psutil.Process(fleet.pid).children()
        before = stat_fields(fleet.pid), stat_fields(worker.pid)
        handles = client.submit_many([call] * tasks)
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


def floor_figures(body: str) -> dict[str, float]:
    """A fork of a process holding the worker's modules, whose child runs `body` (noop:
    nothing) and exits."""
    import gc

    import worker.brokers.sqlite  # noqa: F401 - the worker's modules, as a worker holds them
    import worker.process  # noqa: F401
    from bench.tasks import body as bodies

    children, own = resource.RUSAGE_CHILDREN, resource.RUSAGE_SELF
    before = resource.getrusage(children), resource.getrusage(own)
    for _ in range(FORKS):
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            if body == "stamp":
                bodies.stamp("recycle-floor")
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
    parser.add_argument("--body", choices=("noop", "stamp"), default="noop")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetd-recycle-") as tmp:
        folder = Path(tmp)
        with RedisServer(folder / "redis") as redis:  # the broker, the stamp body's store, or idle
            os.environ["BENCH_REDIS_URL"] = redis.url
            url = redis.url if args.broker == "redis" else "sqlite:///queue.db"
            imports = ("bench.tasks.fleetd_tasks",) if args.body == "stamp" else ()
            config = write_config(folder, url, 1, 1, imports)
            figures = fleet_figures(config, args.tasks, args.body)
            floor = floor_figures(args.body)
    what = "no-op" if args.body == "noop" else "stamp (make bench's)"
    show(
        f"fleetd on {args.broker}, max_tasks_per_child = 1, {args.tasks} {what} tasks, per task:",
        figures,
    )
    show(
        f"a bare fork of a process holding the worker's modules, its child running the {what}"
        f" task body and exiting, {FORKS} times, each:",
        floor,
    )
    return 0


def show(title: str, figures: dict[str, float]) -> None:
    """The figures under `title`, then their total CPU and the most tasks/s 2 cores allow."""
    total = sum(v for k, v in figures.items() if k.endswith("(ms)"))
    print(title)
    for name, value in [*figures.items(), ("total CPU (ms)", total)]:
        print(f"  {name:32} {value:8.2f}")
    print(f"  {'ceiling on 2 cores (tasks/s)':32} {2000 / total:8.0f}")


if __name__ == "__main__":
    sys.exit(main())

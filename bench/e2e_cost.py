"""Where an end-to-end task's CPU goes: `python -m bench.e2e_cost [--broker redis|sqlite]
[--tasks N] [--runs R]`.

`make bench`'s enqueue-while-draining run on fleetd alone, as make bench configures it (one
worker, `concurrency = 2`, `prefetch = 3`, make bench's task body: bench/tasks/body.py, an
RPUSH to a private redis-server): this process submits N tasks one call each to the idle
fleet. Per run: tasks per second (first submit to the last body's stamp), and the CPU per
task of each party: the producer (this process), the Redis server (`INFO cpu`: the broker
and the body's store, or the body's store alone on SQLite), the arbiter, the worker and its
children. On 2 cores the run's rate is what these leave each other; the producer, one
submit at a time, sets it. Medians of R runs, each on a fresh fleet.
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

import psutil

from bench.redis_server import RedisServer
from bench.systems.base import REPO
from bench.systems.fleetd_sys import PREFETCH
from bench.systems.fleetd_sys import TASK as STAMP
from bench.throughput import FLEETD, process_cpu, write_config
from fleetd import Client

KEY = "e2e"


def one_run(folder: Path, broker: str, server: RedisServer, tasks: int) -> dict[str, float]:
    config = write_config(folder, broker, PREFETCH, 0, ("bench.tasks.fleetd_tasks",))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [FLEETD, "start", "-c", str(config), "--log-level", "warning"]
    client = Client.from_config(str(config))
    fleet = subprocess.Popen(command, env=env, cwd=folder)
    try:
        client.submit(STAMP, "warm-up").get(timeout=30)
        arbiter = psutil.Process(fleet.pid)
        [worker] = arbiter.children()
        children = [child.pid for child in worker.children()]
        parties = {"arbiter": [fleet.pid], "worker": [worker.pid], "children": children}
        before = {name: sum(map(process_cpu, pids)) for name, pids in parties.items()}
        server_before, own_before = server.cpu_seconds(), time.process_time()
        started = time.time()
        for _ in range(tasks):
            client.submit(STAMP, KEY)
        producer = time.process_time() - own_before
        store, deadline = server.client, time.monotonic() + 120
        while store.llen(KEY) < tasks:
            if time.monotonic() > deadline or fleet.poll() is not None:
                raise RuntimeError(f"{store.llen(KEY)} of {tasks} tasks ran")
            time.sleep(0.01)
        last = max(float(stamp) for stamp in store.lrange(KEY, 0, -1))
        per_task = 1e6 / tasks  # seconds -> us per task
        figures = {
            "tasks/s": tasks / (last - started),
            "producer (us)": producer * per_task,
            "redis-server (us)": (server.cpu_seconds() - server_before) * per_task,
        }
        for name, pids in parties.items():  # the children that left count in the worker's
            figures[f"{name} (us)"] = (sum(map(process_cpu, pids)) - before[name]) * per_task
    finally:
        fleet.terminate()
        fleet.wait(60)
        client.close()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=("redis", "sqlite"), default="redis")
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="fleetd-e2e-") as tmp:
        with RedisServer(Path(tmp) / "redis") as server:
            os.environ["BENCH_REDIS_URL"] = server.url  # the body's store
            for index in range(args.runs):
                folder = Path(tmp) / f"run{index}"
                folder.mkdir()
                broker = server.url if args.broker == "redis" else "sqlite:///queue.db"
                runs.append(one_run(folder, broker, server, args.tasks))
                server.client.flushall()
    print(
        f"fleetd on {args.broker}, enqueue while draining as make bench runs it,"
        f" {args.tasks} tasks: medians of {args.runs} runs, CPU per task"
    )
    total = 0.0
    for name in runs[0]:
        value = statistics.median(run[name] for run in runs)
        total += value if name.endswith("(us)") else 0.0
        print(f"  {name:24} {value:9.1f}")
    print(f"  {'total CPU (us)':24} {total:9.1f}")
    rate = statistics.median(run["tasks/s"] for run in runs)
    print(f"  {'cores busy at that rate':24} {total * rate / 1e6:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a submit costs the caller: `python -m bench.submit_cost [--broker redis|sqlite]
[--tasks 20000] [--rounds 3]`.

A Client submits N no-op tasks one call each, then N in batches of 100 (`submit_many`),
with no worker running, on a private redis-server (or a SQLite file in a temp folder).
For each way, the median of the rounds: tasks per second, the caller's own CPU per task
(time.process_time: the body's JSON, the id, the command, the reply's read), and, on
Redis, the server's CPU per task. The enqueue figures of `python -m bench` are the same
calls timed from outside; this splits them between the caller and the broker.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from bench.redis_server import RedisServer
from fleetd import Client

TASK = "bench_tasks.noop"
BATCH = 100


def measure(client: Client, server: RedisServer | None, n: int, batched: bool) -> list[float]:
    """[tasks/s, caller CPU us per task, server CPU us per task (0 without a server)]."""
    calls = [(TASK, (), {})] * BATCH
    submit: Callable[[], object] = (
        (lambda: client.submit_many(calls)) if batched else (lambda: client.submit(TASK))
    )
    rounds = max(n // BATCH, 1) if batched else n
    server_before = server.cpu_seconds() if server else 0.0
    cpu_before, started = time.process_time(), time.perf_counter()
    for _ in range(rounds):
        submit()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_before
    tasks = rounds * (BATCH if batched else 1)
    server_cpu = (server.cpu_seconds() - server_before) if server else 0.0
    return [tasks / elapsed, cpu / tasks * 1e6, server_cpu / tasks * 1e6]


def report(broker: str, runs: dict[str, list[list[float]]]) -> None:
    print(f"submit cost on {broker}: medians of {len(runs['one call'])} rounds")
    for way, rows in runs.items():
        rate, caller, server = (statistics.median(column) for column in zip(*rows, strict=True))
        line = f"  {way:18s} {rate:9,.0f} tasks/s   caller CPU {caller:6.1f} us/task"
        if broker == "redis":
            line += f"   Redis CPU {server:5.1f} us/task"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.submit_cost", description=__doc__)
    parser.add_argument("--broker", choices=["redis", "sqlite"], default="redis")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[list[float]]] = {"one call": [], f"batches of {BATCH}": []}
    with tempfile.TemporaryDirectory(prefix="fleetd-submit-cost-") as name, ExitStack() as stack:
        folder = Path(name)
        server = None
        if args.broker == "redis":
            server = stack.enter_context(RedisServer(folder / "redis"))
        client = Client(server.url if server else f"sqlite:///{folder / 'queue.db'}")
        stack.callback(client.close)
        client.submit(TASK)  # connected, the queue registered
        for _ in range(args.rounds):
            runs["one call"].append(measure(client, server, args.tasks, False))
            runs[f"batches of {BATCH}"].append(measure(client, server, args.tasks, True))
    report(args.broker, runs)


if __name__ == "__main__":
    main()

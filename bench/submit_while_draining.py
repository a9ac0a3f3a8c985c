"""Submits while workers drain, on Redis: `python -m bench.submit_while_draining [--workers W]
[--task-ms MS] [--tasks N] [--runs R]`.

W workers (`[[worker]]` entries, one child each, prefetch 3) consume one queue on a private
redis-server while a producer submits N tasks one call each, as fast as it can; each task
sleeps MS milliseconds (0: a no-op). For each run this prints the tasks per second (first
submit to last task done), the Redis server's CPU per task and the fleet's (every fleetd
process), and how many PUBLISH calls Redis ran: the wake-ups. A submit wakes the queue's
workers only while one of them waits (its last reserve came back short), so a fleet that
the queue keeps busy (`--task-ms 5` and up on 2 cores) takes few.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from bench.redis_server import RedisServer
from bench.throughput import FLEETD, fleet_cpu
from fleetd import Client

QUEUE = "default"
TASKS = """import time
from fleetd import task


@task
def nap(ms):
    if ms:
        time.sleep(ms / 1000)
"""


def write_config(folder: Path, broker: str, workers: int) -> Path:
    (folder / "tput_tasks.py").write_text(TASKS)
    config = folder / "fleet.toml"
    lines = [
        "[fleet]",
        'node = "drain"',
        f'broker = "{broker}"',
        'state_dir = "state"',
        'imports = ["tput_tasks"]',
        "[defaults]",
        "concurrency = 1",
        "prefetch = 3",
    ]
    for index in range(workers):
        lines += ["[[worker]]", f'name = "w{index}"', f'queues = ["{QUEUE}"]']
    config.write_text("\n".join(lines) + "\n")
    return config


def one_run(workers: int, tasks: int, task_ms: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="fleetd-submit-drain-") as name:
        folder = Path(name)
        with RedisServer(folder / "redis") as server:
            config = write_config(folder, server.url, workers)
            fleet = subprocess.Popen(
                [FLEETD, "start", "-c", str(config), "--log-level", "warning"], cwd=folder
            )
            client = Client(server.url)
            try:
                client.submit("tput_tasks.nap", 0, queue=QUEUE).get(timeout=30)
                arbiter = psutil.Process(fleet.pid)
                deadline = time.monotonic() + 30
                while len(arbiter.children()) < workers:  # every worker and its child
                    if time.monotonic() > deadline:
                        raise SystemExit("bench: the workers did not all start")
                    time.sleep(0.05)
                time.sleep(0.5)
                server.client.config_resetstat()
                redis_before, fleet_before = server.cpu_seconds(), fleet_cpu(fleet.pid)
                started = time.monotonic()
                handles = [
                    client.submit("tput_tasks.nap", task_ms, queue=QUEUE) for _ in range(tasks)
                ]
                # Polled (a state read is one command), not waited on: a get per task
                # would be Redis's work too. The tasks end about in the order submitted.
                while handles[-1].state != "SUCCESS":
                    if time.monotonic() > started + 300:
                        raise SystemExit("bench: the tasks did not all run within 300 s")
                    time.sleep(0.005)
                seconds = time.monotonic() - started
                redis_seconds = server.cpu_seconds() - redis_before
                fleet_seconds = fleet_cpu(fleet.pid) - fleet_before
                stats = server.client.info("commandstats").get("cmdstat_publish", {})
                for handle in handles:  # every one ran (outside the figures)
                    handle.get(timeout=120)
            finally:
                fleet.terminate()
                fleet.wait(60)
                client.close()
    return {
        "tasks/s": tasks / seconds,
        "redis us/task": redis_seconds / tasks * 1e6,
        "fleet us/task": fleet_seconds / tasks * 1e6,
        "publishes": float(stats.get("calls", 0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.submit_while_draining", description=__doc__
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--task-ms", type=float, default=0.0, help="each task sleeps this long")
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = [one_run(args.workers, args.tasks, args.task_ms) for _ in range(args.runs)]
    print(
        f"{args.workers} workers, {args.tasks} tasks of {args.task_ms:g} ms submitted one by"
        f" one, {args.runs} runs:"
    )
    for key in runs[0]:
        values = [run[key] for run in runs]
        shown = ", ".join(f"{v:,.0f}" for v in values)
        print(f"  {key:<14}{statistics.median(values):>10,.0f}   ({shown})")


if __name__ == "__main__":
    main()

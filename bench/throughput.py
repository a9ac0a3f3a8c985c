"""fleetd alone, quickly: no-op throughput, cold start and latency on one broker.

`python -m bench.throughput [--broker sqlite|redis] [--tasks 5000] [--prefetch 1]
[--max-tasks-per-child 0]` starts a fleet with `concurrency = 2` in a temp dir (Redis: a
private server), and prints tasks/s for a pre-filled queue and for enqueue-while-draining,
the fleet's CPU per task over the drain (the figure a loaded machine disturbs least), the
time from `fleetd start` to the first task done, and submit-to-result latency.
`make bench` is the side-by-side comparison; this is the figure to watch while
changing fleetd.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.redis_server import RedisServer
from fleetd import Client

FLEETD = str(Path(sys.executable).parent / "fleetd")
TASKS = "from fleetd import task\n\n\n@task\ndef noop():\n    return None\n"


def write_config(
    folder: Path,
    broker: str,
    prefetch: int,
    max_tasks_per_child: int,
    imports: tuple[str, ...] = (),
) -> Path:
    """A fleet of one worker, `concurrency = 2`, on `broker`; its tasks: `noop` in
    tput_tasks, written beside it, and the modules `imports` names."""
    (folder / "tput_tasks.py").write_text(TASKS)
    modules = ", ".join(f'"{module}"' for module in ("tput_tasks", *imports))
    config = folder / "fleet.toml"
    config.write_text(
        f'[fleet]\nnode = "tput"\nbroker = "{broker}"\nimports = [{modules}]\n'
        f"[defaults]\nconcurrency = 2\nprefetch = {prefetch}\n"
        f"max_tasks_per_child = {max_tasks_per_child}\n"
        '[[worker]]\nname = "w"\n'
    )
    return config


def drain(client: Client, handles: list) -> None:
    for handle in handles:
        handle.get(timeout=120)


def stat_fields(pid: int) -> list[int]:
    """/proc/PID/stat from its 4th field on (minflt at [6], cminflt [7], utime [10], stime
    [11], cutime [12], cstime [13]), in ticks and counts."""
    with open(f"/proc/{pid}/stat") as stat:
        return [int(field) for field in stat.read().rsplit(")", 1)[1].split()[1:15]]


def process_cpu(pid: int) -> float:
    """CPU seconds of process `pid`: its own and its reaped children's (utime, stime, cutime,
    cstime), so a child that exits during a run still counts. OSError if it is gone."""
    return sum(stat_fields(pid)[10:14]) / os.sysconf("SC_CLK_TCK")


def fleet_cpu(pid: int) -> float:
    """CPU seconds of the fleet under `pid`: process_cpu of each of its processes."""
    seconds = 0.0
    pids, seen = [pid], set()
    while pids:
        current = pids.pop()
        seen.add(current)
        try:
            cpu = process_cpu(current)
            with open(f"/proc/{current}/task/{current}/children") as children:
                pids += [int(p) for p in children.read().split() if int(p) not in seen]
        except OSError:  # it exited meanwhile: its parent's cutime holds it
            continue
        seconds += cpu
    return seconds


def measure(config: Path, tasks: int) -> dict[str, float]:
    client = Client.from_config(str(config))
    out: dict[str, float] = {}
    first = client.submit("tput_tasks.noop")
    started = time.perf_counter()
    fleet = subprocess.Popen([FLEETD, "start", "-c", str(config), "--log-level", "warning"])
    try:
        first.get(timeout=30)
        out["cold start to first task (s)"] = time.perf_counter() - started
        handles = client.submit_many([("tput_tasks.noop", (), {})] * tasks)
        started, cpu = time.perf_counter(), fleet_cpu(fleet.pid)
        drain(client, handles)
        out["pre-filled drain (tasks/s)"] = tasks / (time.perf_counter() - started)
        out["fleet CPU per task, drain (ms)"] = (fleet_cpu(fleet.pid) - cpu) / tasks * 1000
        started = time.perf_counter()
        handles = []
        for _ in range(0, tasks, 100):
            handles += client.submit_many([("tput_tasks.noop", (), {})] * 100)
        drain(client, handles)
        out["enqueue while draining (tasks/s)"] = tasks / (time.perf_counter() - started)
        latencies = []
        for _ in range(500):
            started = time.perf_counter()
            client.submit("tput_tasks.noop").get(timeout=10)
            latencies.append(time.perf_counter() - started)
        latencies.sort()
        out["submit to result p50 (ms)"] = latencies[len(latencies) // 2] * 1000
        out["submit to result p99 (ms)"] = latencies[int(len(latencies) * 0.99)] * 1000
    finally:
        fleet.terminate()
        fleet.wait(60)
        client.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--max-tasks-per-child", type=int, default=0)
    args = parser.parse_args()
    settings = args.prefetch, args.max_tasks_per_child
    with tempfile.TemporaryDirectory(prefix="fleetd-tput-") as tmp:
        folder = Path(tmp)
        if args.broker == "redis":
            with RedisServer(folder / "redis") as redis:
                figures = measure(write_config(folder, redis.url, *settings), args.tasks)
        else:
            figures = measure(write_config(folder, "sqlite:///queue.db", *settings), args.tasks)
    print(
        f"fleetd on {args.broker}, concurrency 2, prefetch {args.prefetch},"
        f" max_tasks_per_child {args.max_tasks_per_child}, {args.tasks} tasks"
    )
    for name, value in figures.items():
        print(f"  {name:36} {value:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

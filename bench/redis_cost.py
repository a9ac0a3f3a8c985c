"""Where the Redis server's CPU goes per task: `python -m bench.redis_cost [--tasks N]`.

Runs a private redis-server, enqueues N no-op tasks (half one by one, half in batches of
100), then starts a fleet (`concurrency = 2`, `--prefetch`, 1 unless given) and drains
them, then submits tasks and waits for each in turn, and prints for each phase the
server's CPU per task (utime + stime) and `INFO commandstats` per task: calls and
microseconds of every command, those that scripts ran included. An idle phase at the
end shows what an idle fleet costs the server per millisecond.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.redis_server import RedisServer
from bench.throughput import FLEETD, write_config
from fleetd import Client

IDLE_SECONDS = 3.0
SEQUENTIAL = 200  # tasks submitted and waited for one at a time


def command_stats(server: RedisServer) -> dict[str, tuple[int, int]]:
    stats: dict[str, Any] = server.client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): (int(s["calls"]), int(s["usec"]))
        for name, s in stats.items()
    }


def report(title: str, server: RedisServer, cpu: float, tasks: float, per: str) -> None:
    spent = server.cpu_seconds() - cpu
    stats = command_stats(server)
    print(f"{title}: server CPU {spent / tasks * 1e6:.1f} us per {per}")
    rows = sorted(stats.items(), key=lambda row: -row[1][1])
    for name, (calls, usec) in rows:
        if calls:
            print(
                f"  {name:22} {calls / tasks:8.2f} calls  {usec / tasks:8.1f} us"
                f"  ({usec / calls:6.1f} us/call)"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--monitor", metavar="FILE", help="write MONITOR's log of the drain")
    args = parser.parse_args()
    n = args.tasks
    with tempfile.TemporaryDirectory(prefix="fleetd-rcost-") as tmp:
        folder = Path(tmp)
        with RedisServer(folder / "redis") as server:
            config = write_config(folder, server.url, args.prefetch, 0)
            client = Client.from_config(str(config))
            client.submit_many([("tput_tasks.noop", (), {})])  # the queue exists
            server.client.config_resetstat()
            cpu = server.cpu_seconds()
            handles = [client.submit("tput_tasks.noop") for _ in range(n // 2)]
            report("enqueue, one by one", server, cpu, n // 2, "task")
            server.client.config_resetstat()
            cpu = server.cpu_seconds()
            for start in range(n // 2, n, 100):
                handles += client.submit_many([("tput_tasks.noop", (), {})] * min(100, n - start))
            report("enqueue, batches of 100", server, cpu, n - n // 2, "task")
            server.client.config_resetstat()
            cpu = server.cpu_seconds()
            monitor = None
            if args.monitor:
                out = open(args.monitor, "w")  # noqa: SIM115 - closed with the monitor
                cli = ["redis-cli", "-p", str(server.port), "monitor"]
                monitor = subprocess.Popen(cli, stdout=out)
                time.sleep(0.2)
            fleet = subprocess.Popen([FLEETD, "start", "-c", str(config), "--log-level", "warning"])
            try:
                deadline = time.monotonic() + 300
                while server.client.xinfo_groups("fleetd:q:default")[0]["lag"] not in (0, None):
                    if time.monotonic() > deadline or fleet.poll() is not None:
                        raise SystemExit("the fleet did not drain its queue")
                    time.sleep(0.05)
                # Every result stored: read the last ones (reads cost little beside the rest).
                for handle in handles[-10:]:
                    handle.get(timeout=60)
                while server.client.xlen("fleetd:q:default"):
                    time.sleep(0.01)
                if monitor is not None:
                    monitor.terminate()
                    monitor.wait()
                report("drain (reserve, ack, result)", server, cpu, n, "task")
                server.client.config_resetstat()
                cpu = server.cpu_seconds()
                for _ in range(SEQUENTIAL):
                    client.submit("tput_tasks.noop").get(timeout=10)
                report("submit then get, one at a time", server, cpu, SEQUENTIAL, "task")
                server.client.config_resetstat()
                cpu = server.cpu_seconds()
                time.sleep(IDLE_SECONDS)
                report("idle fleet", server, cpu, IDLE_SECONDS * 1e3, "ms")
            finally:
                fleet.terminate()
                fleet.wait(60)
                client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

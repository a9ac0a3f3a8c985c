"""Redis server CPU per task with a no-op body, fleetd against Huey on one private server:
`python -m bench.redis_noop [--tasks N] [--repeat R]`.

The figure of issue 16's first target, measured as it is worded: 2 processes each (fleetd:
one worker, `concurrency = 2`, `prefetch = 3`, as `make bench`; Huey: `huey_consumer -k
process -w 2` on the RedisHuey of `make bench`, `notify_result=True`), a pre-filled queue
of N tasks that return 1 (both store the result), and the server's utime + stime from the
launch to the last result stored, divided by N. `make bench` measures the same drain with
the shared body, whose RPUSH (and the harness's LLEN polls) every system pays alike; here
only the queue's own work is left. Huey runs from `.bench-venv` (`make bench` makes it).
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

from bench.redis_server import RedisServer
from bench.systems.base import PEERS_BIN
from bench.throughput import FLEETD
from fleetd import Client

FLEETD_TASKS = "from fleetd import task\n\n\n@task\ndef noop():\n    return 1\n"
HUEY_TASKS = (
    "import os\n\nfrom huey import RedisHuey\n\n"
    'huey = RedisHuey("bench", url=os.environ["BENCH_REDIS_URL"], notify_result=True)\n\n\n'
    "@huey.task()\ndef noop():\n    return 1\n"
)
# Run by .bench-venv's python: enqueue N no-op tasks (`fill`), or wait until N results are
# stored (`wait`), on the Huey of the module beside it.
HUEY_DRIVER = (
    "import sys, time\n"
    "from noop_huey import huey, noop\n"
    "n = int(sys.argv[2])\n"
    "if sys.argv[1] == 'fill':\n"
    "    for _ in range(n):\n"
    "        noop()\n"
    "else:\n"
    "    deadline = time.monotonic() + 120\n"
    "    while huey.storage.result_store_size() < n:\n"
    "        if time.monotonic() > deadline:\n"
    "            sys.exit('huey: results missing after 120 s')\n"
    "        time.sleep(0.002)\n"
)


def fleetd_cost(folder: Path, server: RedisServer, n: int) -> float:
    (folder / "noop_fleetd.py").write_text(FLEETD_TASKS)
    config = folder / "fleet.toml"
    config.write_text(
        f'[fleet]\nnode = "noop"\nbroker = "{server.url}?prefix=noop{time.monotonic_ns()}"\n'
        'imports = ["noop_fleetd"]\n[defaults]\nconcurrency = 2\nprefetch = 3\n'
        '[[worker]]\nname = "w"\n'
    )
    client = Client.from_config(str(config))
    handles = []
    for start in range(0, n, 100):
        handles += client.submit_many([("noop_fleetd.noop", (), {})] * min(100, n - start))
    cpu = server.cpu_seconds()
    fleet = subprocess.Popen(
        [FLEETD, "start", "-c", str(config), "--log-level", "warning"], cwd=folder
    )
    try:
        # Polled as Huey's results are below (every 2 ms), not waited on: a waiting get
        # costs the server work of its own.
        deadline = time.monotonic() + 120
        while handles[-1].state not in ("SUCCESS", "FAILURE"):
            if time.monotonic() > deadline:
                raise TimeoutError("fleetd: the last task not done after 120 s")
            time.sleep(0.002)
        spent = (server.cpu_seconds() - cpu) / n
        for handle in handles:  # all of them ran (the few still in flight end meanwhile)
            handle.get(timeout=30)
        return spent
    finally:
        fleet.terminate()
        fleet.wait(60)
        client.close()


def huey_cost(folder: Path, server: RedisServer, n: int) -> float:
    (folder / "noop_huey.py").write_text(HUEY_TASKS)
    (folder / "huey_driver.py").write_text(HUEY_DRIVER)
    server.client.flushall()
    env = {**os.environ, "BENCH_REDIS_URL": server.url, "PYTHONPATH": str(folder)}
    python = str(PEERS_BIN / "python")
    subprocess.run([python, "huey_driver.py", "fill", str(n)], cwd=folder, env=env, check=True)
    cpu = server.cpu_seconds()
    consumer = [str(PEERS_BIN / "huey_consumer"), "noop_huey.huey", "-k", "process", "-w", "2"]
    fleet = subprocess.Popen([*consumer, "-q"], cwd=folder, env=env)
    try:
        subprocess.run([python, "huey_driver.py", "wait", str(n)], cwd=folder, env=env, check=True)
        return (server.cpu_seconds() - cpu) / n
    finally:
        fleet.terminate()
        fleet.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not (PEERS_BIN / "huey_consumer").exists():
        print(f"no Huey in {PEERS_BIN.parent}: run `make bench-quick` once", file=sys.stderr)
        return 2
    figures: dict[str, list[float]] = {"fleetd": [], "huey": []}
    with tempfile.TemporaryDirectory(prefix="fleetd-noop-") as tmp:
        folder = Path(tmp)
        with RedisServer(folder / "redis") as server:
            for _ in range(args.repeat):  # alternated, so that the machine's state weighs alike
                figures["fleetd"].append(fleetd_cost(folder, server, args.tasks))
                figures["huey"].append(huey_cost(folder, server, args.tasks))
    fleetd, huey = (statistics.median(figures[k]) * 1e6 for k in ("fleetd", "huey"))
    print(f"Redis server CPU per no-op task, {args.tasks} tasks, median of {args.repeat}:")
    for name, values in figures.items():
        runs = ", ".join(f"{v * 1e6:.1f}" for v in values)
        print(f"  {name:7} {statistics.median(values) * 1e6:6.1f} us  ({runs})")
    print(f"  fleetd / Huey: {fleetd / huey:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

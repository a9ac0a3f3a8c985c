"""Where a cold start goes: `python -m bench.cold_start [--broker redis|sqlite] [--runs N]
[--task-imports MODULE ...]`.

Launches `fleetd start` (concurrency 2, from `.bench-fleetd-venv`, as `make bench` runs it)
on a queue that holds one task, N times, and splits the time from the launch to that task's
run by what the logs and the task say: the arbiter's "spawned worker" line (its interpreter,
command line, config, broker probe), the worker's "consuming" line (its interpreter, its
modules, the task modules, the broker's boot calls, the pool's forks) and the task's own
clock (the first turn, the hand-over to a child). Medians of the N runs, in ms. Beside them,
the floors: a bare interpreter's start, and the imports of the task modules alone in one,
which every system whose workers import the same modules pays as well. `--task-imports
redis` adds redis-py to the task module, as the benchmark's task body has it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench.environment import compile_bytecode, ensure_fleetd_venv
from bench.redis_server import RedisServer
from bench.systems.base import FLEETD_BIN, REPO
from fleetd import Client

TASKS = "{imports}from fleetd import task\n\n\n@task\ndef stamp():\n    return time.time()\n"
PHASES = ["launch → worker spawned", "spawned → worker ready", "ready → first task ran"]


def write_fleet(folder: Path, broker: str, imports: list[str]) -> Path:
    lines = "".join(f"import {name}\n" for name in ["time", *imports])
    (folder / "cold_tasks.py").write_text(TASKS.format(imports=lines))
    config = folder / "fleet.toml"
    config.write_text(
        f'[fleet]\nnode = "cold"\nbroker = "{broker}"\nstate_dir = "state"\n'
        f'imports = ["cold_tasks"]\npythonpath = ["."]\n'
        "[defaults]\nconcurrency = 2\n"
        '[[worker]]\nname = "w"\n'
    )
    return config


def logged_at(lines: list[str], message_start: str) -> float:
    """The epoch time of the first JSON log line whose message starts so."""
    for line in lines:
        entry = json.loads(line) if line.startswith("{") else {}
        if entry.get("message", "").startswith(message_start):
            return datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()
    raise RuntimeError(f"no log line starting {message_start!r}: {lines[-5:]}")


def one_start(config: Path, env: dict[str, str]) -> list[float]:
    """The phases of one cold start, in ms."""
    client = Client.from_config(str(config))
    handle = client.submit("cold_tasks.stamp")
    log = config.parent / "fleet.log"
    command = [str(FLEETD_BIN / "fleetd"), "start", "-c", str(config), "--log-format", "json"]
    with open(log, "w") as out:
        launched = time.time()
        fleet = subprocess.Popen(command, env=env, cwd=config.parent, stderr=out)
    try:
        ran = handle.get(timeout=60)
    finally:
        fleet.terminate()
        fleet.wait(60)
        client.close()
    lines = log.read_text().splitlines()
    stamps = [
        launched,
        logged_at(lines, "spawned worker"),
        logged_at(lines, "consuming"),
        ran,
    ]
    return [(later - earlier) * 1000 for earlier, later in itertools.pairwise(stamps)]


def floor_ms(env: dict[str, str], code: str, runs: int) -> float:
    """Median wall time of `python -c code` in the fleetd venv, in ms."""
    python = str(FLEETD_BIN / "python")
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([python, "-P", "-c", code], env=env, check=True)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=("sqlite", "redis"), default="redis")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--task-imports", nargs="*", default=[], metavar="MODULE")
    args = parser.parse_args()
    ensure_fleetd_venv()
    compile_bytecode()
    with tempfile.TemporaryDirectory(prefix="fleetd-cold-") as tmp:
        folder = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
        env.update(PYTHONPATH=f"{REPO}{os.pathsep}{folder}")
        if args.broker == "redis":
            with RedisServer(folder / "redis") as redis:
                config = write_fleet(folder, redis.url, args.task_imports)
                runs = [one_start(config, env) for _ in range(args.runs)]
        else:
            config = write_fleet(folder, "sqlite:///queue.db", args.task_imports)
            runs = [one_start(config, env) for _ in range(args.runs)]
        bare = floor_ms(env, "pass", args.runs)
        imports = floor_ms(env, "import cold_tasks", args.runs)
    print(
        f"fleetd cold start on {args.broker}, task module imports"
        f" {', '.join(['time', *args.task_imports])}: medians of {args.runs} runs (ms)"
    )
    for index, phase in enumerate(PHASES):
        print(f"  {phase:34} {statistics.median(r[index] for r in runs):8.1f}")
    print(f"  {'launch → first task ran':34} {statistics.median(sum(r) for r in runs):8.1f}")
    print("floors, each a whole `python -c` in the same venv (ms):")
    print(f"  {'a bare interpreter':34} {bare:8.1f}")
    print(f"  {'one that imports the task module':34} {imports:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

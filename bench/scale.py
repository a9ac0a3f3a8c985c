"""The scale table: `python -m bench.scale [--procs 2,8,16] [--tasks 10000] [--reps 2]
[--systems ...] [--output FILE]`.

For each pool size (every system's worker processes) and each system, N tasks are enqueued
with the workers stopped, then the workers are started and the drain is timed from the first
task done to the last (the body: one RPUSH to Redis, in every system). Beside the drain rate
it prints, over the same span, the CPU per task of the Redis server and of every process of
the system, and for fleetd that of its worker processes alone (one worker dispatches for all
its children, so its CPU per task caps the pool). Those are the figures that predict the table
on a machine without the cores: `--procs 2` here shows them.

The columns: Celery and Huey (the peers that scale with processes), and fleetd on SQLite and
on Redis, each with one worker and with its children spread over 4 workers on the one queue
(`fleetd-sqlite-4w`, `fleetd-redis-4w`; fewer workers when the pool is smaller). On a
many-core machine with no network, `bench/device.sh` runs it from wheels (see its header).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench import environment
from bench.agent import Agent
from bench.measure import QUICK, Session, wait_timeout
from bench.redis_server import RedisServer
from bench.systems import scale_systems
from bench.systems.base import System
from bench.systems.fleetd_sys import PREFETCH, FleetdSystem

HERE = Path(__file__).parent
POLL = 0.005  # seconds between two looks at the done list while waiting for the first task
FIGURES = {  # key: (title, unit, digits)
    "drain": ("Drain of a pre-filled queue", "tasks/s", 0),
    "redis_cpu": ("Redis server CPU per task, over the drain", "µs", 1),
    "fleet_cpu": ("CPU per task of every process of the system, over the drain", "µs", 1),
    "dispatch_cpu": ("fleetd worker processes' CPU per task, over the drain", "µs", 1),
}


def one_run(
    system: System, procs: int, tasks: int, redis: RedisServer, folder: Path
) -> dict[str, float]:
    """Pre-fill `tasks`, start `system` with `procs` processes, time the drain."""
    plan = dataclasses.replace(QUICK, reps=1, tasks=tasks, processes=procs)
    session = Session(system, plan, redis, folder, 0)
    session.site.workdir.mkdir(parents=True)
    session.redis.flushall()
    key = session.key("drain")
    with Agent(system, session.site, session.site.workdir / "producer.log") as session.agent:
        batched = system.batch_api is not None  # the drain's speed, not the enqueue's
        session.enqueue(key, tasks, batched=batched)
        fleet = session.launch("scale", max_tasks_per_child=0)
        try:
            deadline = time.monotonic() + wait_timeout(tasks)
            while session.redis.llen(key) == 0:
                fleet.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no task done; the log ends: {fleet.log_tail()}")
                time.sleep(POLL)
            spent, dispatch = session.cpu_seconds(fleet)
            redis_cpu, done = redis.cpu_seconds(), session.redis.llen(key)
            stamps = sorted(session.stamps(key, tasks, fleet))
            spent_after, dispatch_after = session.cpu_seconds(fleet)
            counted = tasks - done
            if counted < 100:  # the CPU figures would be the boot's, not the drain's
                raise RuntimeError(
                    f"{done} of {tasks} done at the first look: ask for more --tasks"
                )
            values = {
                "drain": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                "redis_cpu": (redis.cpu_seconds() - redis_cpu) / counted * 1e6,
                "fleet_cpu": (spent_after - spent) / counted * 1e6,
            }
            if system.is_fleetd:
                values["dispatch_cpu"] = (dispatch_after - dispatch) / counted * 1e6
            return values
        finally:
            fleet.kill()


def render(
    table: dict[int, dict[str, list[dict[str, float]]]],
    systems: list[System],
    tasks: int,
    prefetch: int,
    machine: dict[str, str],
    versions: dict[str, str],
    started: str,
) -> str:
    """The tables, one per figure: a row per pool size, a column per system (medians)."""
    lines = [
        "# fleetd at scale: drain of a pre-filled queue by pool size",
        "",
        f"Written by `python -m bench.scale` on {started}: {tasks:,} no-op tasks (each RPUSHes"
        " to Redis) enqueued with the workers stopped, then drained; fleetd's prefetch"
        f" {prefetch}; the median of the repetitions.",
        "",
        "## Machine",
        "",
        *(f"- {name}: {value}" for name, value in machine.items()),
        "",
        "## Versions",
        "",
        *(f"- {name}: {value}" for name, value in versions.items()),
    ]
    for key, (title, unit, digits) in FIGURES.items():
        lines += ["", f"## {title} ({unit})", ""]
        lines.append("| pool size | " + " | ".join(s.label for s in systems) + " |")
        lines.append("|---" * (len(systems) + 1) + "|")
        for procs, by_system in table.items():
            cells = []
            for system in systems:
                runs = [run[key] for run in by_system.get(system.name, []) if key in run]
                cells.append(f"{statistics.median(runs):,.{digits}f}" if runs else "n/a")
            lines.append(f"| {procs} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--procs", default="2,8,16", help="pool sizes (default: 2,8,16)")
    parser.add_argument("--tasks", type=int, default=10000, help="tasks per drain (10000)")
    parser.add_argument("--reps", type=int, default=2, help="repetitions of each run (2)")
    parser.add_argument("--systems", help="default: " + ",".join(s.name for s in scale_systems()))
    parser.add_argument(
        "--prefetch",
        type=int,
        default=PREFETCH,
        help=f"fleetd's prefetch ({PREFETCH}, as make bench; the README's advice for short"
        " tasks is more)",
    )
    parser.add_argument("--output", type=Path, default=HERE / "SCALE.md")
    args = parser.parse_args()
    try:
        pool_sizes = [int(n) for n in args.procs.split(",")]
    except ValueError:
        parser.error(f"--procs: whole numbers separated by commas, not {args.procs!r}")
    if min(pool_sizes) < 1 or args.tasks < 2 or args.reps < 1 or args.prefetch < 0:
        parser.error(
            "--procs must be 1 or more, --tasks 2 or more, --reps 1 or more, --prefetch 0 or more"
        )
    systems = scale_systems()
    if args.systems:
        names = args.systems.split(",")
        unknown = set(names) - {s.name for s in systems}
        if unknown:
            parser.error(f"unknown system(s): {', '.join(sorted(unknown))}")
        systems = [s for s in systems if s.name in names]
    for system in systems:
        if isinstance(system, FleetdSystem):
            system.prefetch = args.prefetch
    if any(not s.is_fleetd for s in systems):
        environment.ensure_peers_venv()
    environment.compile_bytecode()
    if any(s.is_fleetd for s in systems):
        environment.ensure_fleetd_venv()
        missing = environment.fleetd_missing()
        if missing:
            raise SystemExit(f"bench.scale: {missing}")
    machine = environment.machine()
    started = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    table: dict[int, dict[str, list[dict[str, float]]]] = {}
    folder = Path(tempfile.mkdtemp(prefix="fleetd-scale-"))
    try:
        with RedisServer(folder / "redis") as redis:
            peers = [d for s in systems if not s.is_fleetd for d in s.distributions]
            versions = environment.versions(redis.version, peers)
            for procs in pool_sizes:
                for rep in range(args.reps):
                    order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
                    for system in order:
                        where = folder / f"{system.name}-{procs}-{rep}"
                        try:
                            values = one_run(system, procs, args.tasks, redis, where)
                        except Exception as exc:  # noqa: BLE001 - a failed run is a result too
                            print(f"  {procs} {system.name}: error: {exc}", flush=True)
                            continue
                        table.setdefault(procs, {}).setdefault(system.name, []).append(values)
                        shown = ", ".join(f"{k}={v:,.1f}" for k, v in values.items())
                        print(f"  {procs} {system.name}: {shown}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    machine["load average at end (1, 5, 15 min)"] = environment.load_average()
    args.output.write_text(
        render(table, systems, args.tasks, args.prefetch, machine, versions, started)
    )
    raw = {"tasks": args.tasks, "prefetch": args.prefetch, "machine": machine}
    raw |= {"versions": versions, "runs": table}
    args.output.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print(args.output.read_text())


if __name__ == "__main__":
    main()

"""One benchmark run: the peers' venv, a private Redis, every system in turn, the report."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench import environment, report
from bench.measure import ASYNC_ONLY, FIGURES, Plan, Session, SessionResult
from bench.redis_server import RedisServer
from bench.systems import all_systems
from bench.systems.base import System


def progress(result: SessionResult) -> str:
    values = ", ".join(
        f"{figure.key}={result.values[figure.key]:.{max(figure.digits, 1)}f}"
        for figure in FIGURES
        if figure.key in result.values
    )
    problems = "".join(
        f"\n    {key}: {note}" for key, note in result.notes.items() if note != ASYNC_ONLY
    )
    return f"  {result.system} ({result.seconds:.0f} s): {values}{problems}"


def not_built(system: System, rep: int, reason: str) -> SessionResult:
    return SessionResult(system.name, rep, notes={f.key: f"n/a ({reason})" for f in FIGURES})


def run(plan: Plan, names: list[str] | None, output: Path, keep: bool) -> None:
    systems = [s for s in all_systems() if names is None or s.name in names]
    if any(not s.is_fleetd and not s.async_only for s in systems):  # fleetd needs no peers
        environment.ensure_peers_venv()
    if any(s.async_only for s in systems):
        environment.ensure_async_peers_venv()
    environment.compile_bytecode()
    if any(s.is_fleetd for s in systems):
        environment.ensure_fleetd_venv()
    missing = environment.fleetd_missing() if any(s.is_fleetd for s in systems) else None
    runnable = [s for s in systems if not (s.is_fleetd and missing)]
    if missing:
        print(f"bench: {missing}; fleetd is left out of this run", flush=True)
    if not runnable:
        raise SystemExit("bench: no system left to run")
    machine = environment.machine()
    started = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    clock = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="fleetd-bench-"))
    failed = True  # until the run ends with no error: an interrupted run keeps its logs too
    try:
        with RedisServer(folder / "redis") as redis:
            peers = [
                d for s in runnable if not s.is_fleetd and not s.async_only for d in s.distributions
            ]
            async_peers = [d for s in runnable if s.async_only for d in s.distributions]
            versions = environment.versions(redis.version, peers, async_peers)
            results = run_sessions(plan, runnable, redis, folder)
        failed = any(note.startswith("error") for r in results for note in r.notes.values())
    finally:
        if keep or failed:
            print(f"bench: the workers' logs and state are kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    machine["load average at end (1, 5, 15 min)"] = environment.load_average()
    if missing:
        skipped = [s for s in systems if s not in runnable]
        results += [not_built(s, rep, missing) for rep in range(plan.reps) for s in skipped]
    seconds = time.perf_counter() - clock
    output.write_text(report.render(plan, systems, results, machine, versions, started, seconds))
    raw = report.raw(plan, results, machine, versions)
    output.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print(f"\nbench: {plan.name} run done in {seconds / 60:.1f} min; wrote {output}\n")
    print(output.read_text())


def run_sessions(
    plan: Plan, systems: list[System], redis: RedisServer, folder: Path
) -> list[SessionResult]:
    """Every repetition: each runnable system once, the order rotated by one each time."""
    results: list[SessionResult] = []
    for rep in range(plan.reps):
        order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
        print(
            f"repetition {rep + 1} of {plan.reps}: {', '.join(s.name for s in order)}",
            flush=True,
        )
        for system in order:
            result = Session(system, plan, redis, folder / f"{system.name}-{rep}", rep).run()
            results.append(result)
            print(progress(result), flush=True)
    return results

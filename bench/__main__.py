"""`python -m bench --quick | --full`: run the benchmarks and write RESULTS.md."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from bench.harness import run
from bench.measure import FULL, QUICK
from bench.systems import all_systems

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="fewer tasks, 3 repetitions (< 3 min)")
    mode.add_argument(
        "--full", action="store_true", help="5,000-task runs, 3 repetitions (< 20 min)"
    )
    parser.add_argument(
        "--systems", help="comma-separated subset of: " + ", ".join(s.name for s in all_systems())
    )
    parser.add_argument(
        "--output", type=Path, help="default: bench/RESULTS.md (--quick: bench/RESULTS-quick.md)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the workers' logs and state")
    parser.add_argument(
        "--procs",
        type=int,
        metavar="N",
        help="worker processes (pool size) of every system (default: 2)",
    )
    parser.add_argument(
        "--tasks",
        type=int,
        metavar="N",
        help="tasks of the drain and concurrent runs (default: 200 quick, 5000 full); a few"
        " thousand steady the per-task Redis CPU, which a worker's start weighs on",
    )
    args = parser.parse_args()
    plan = FULL if args.full else QUICK
    if args.tasks is not None:
        if args.tasks < 2:
            parser.error(f"--tasks must be 2 or more, not {args.tasks}")
        plan = dataclasses.replace(plan, tasks=args.tasks)
    if args.procs is not None:
        if args.procs < 1:
            parser.error(f"--procs must be 1 or more, not {args.procs}")
        plan = dataclasses.replace(plan, processes=args.procs)
    output = args.output or HERE / ("RESULTS.md" if args.full else "RESULTS-quick.md")
    names = args.systems.split(",") if args.systems else None
    if names:
        unknown = set(names) - {s.name for s in all_systems()}
        if unknown:
            parser.error(f"unknown system(s): {', '.join(sorted(unknown))}")
    run(plan, names, output, args.keep)


if __name__ == "__main__":
    main()

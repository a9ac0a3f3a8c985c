"""RESULTS.md: the machine, the versions, the table, and fleetd's figures against the best peer."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict

from bench.measure import FIGURES, Figure, Plan, SessionResult, Stat, summarize
from bench.systems.base import System

Table = dict[str, dict[str, Stat | str]]


def cell(figure: Figure, value: Stat | str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value.split(":", 1)[0] if value.startswith("error") else value
    digits = figure.digits
    if 0 < abs(value.median) < 10:  # two significant digits at least: 0.2, not 0
        digits = max(digits, 1 - math.floor(math.log10(abs(value.median))))
    number = f"{{:,.{digits}f}}"
    text = f"{number.format(value.median)} [{number.format(value.low)}–{number.format(value.high)}]"
    return text if value.reps == value.runs else f"{text} ({value.reps} of {value.runs} runs)"


def best_peer(figure: Figure, table: Table, peers: list[System]) -> tuple[System, Stat] | None:
    found = [
        (peer, stat)
        for peer in peers
        if isinstance(stat := table.get(peer.name, {}).get(figure.key), Stat)
    ]
    if not found:
        return None
    pick = max if figure.higher_is_better else min
    return pick(found, key=lambda item: item[1].median)


def results_table(table: Table, systems: list[System]) -> list[str]:
    lines = [
        "| figure | unit | better | " + " | ".join(s.label for s in systems) + " |",
        "|---|---|---|" + "---|" * len(systems),
    ]
    for figure in FIGURES:
        if figure.fleetd_only:
            continue
        cells = [cell(figure, table.get(s.name, {}).get(figure.key)) for s in systems]
        arrow = "higher" if figure.higher_is_better else "lower"
        lines.append(f"| {figure.title} | {figure.unit} | {arrow} | " + " | ".join(cells) + " |")
    return lines


def ratio_table(table: Table, systems: list[System]) -> list[str]:
    fleets = [s for s in systems if s.is_fleetd]
    peers = [s for s in systems if not s.is_fleetd]
    lines = [
        "| figure | better | best peer | "
        + " | ".join(f"{s.label} ÷ best peer" for s in fleets)
        + " |",
        "|---|---|---|" + "---|" * len(fleets),
    ]
    for figure in FIGURES:
        if figure.fleetd_only:
            continue
        best = best_peer(figure, table, peers)
        if best is None:
            continue
        peer, stat = best
        ratios = []
        for fleet in fleets:
            mine = table.get(fleet.name, {}).get(figure.key)
            ratios.append(f"{mine.median / stat.median:.2f}×" if isinstance(mine, Stat) else "n/a")
        arrow = "higher" if figure.higher_is_better else "lower"
        best_text = f"{peer.label}, {cell(figure, stat).split(' [')[0]} {figure.unit}"
        lines.append(f"| {figure.title} | {arrow} | {best_text} | " + " | ".join(ratios) + " |")
    return lines


def fleetd_table(table: Table, systems: list[System]) -> list[str]:
    fleets = [s for s in systems if s.is_fleetd]
    lines = [
        "| figure | unit | " + " | ".join(s.label for s in fleets) + " |",
        "|---|---|" + "---|" * len(fleets),
    ]
    for figure in FIGURES:
        if figure.fleetd_only:
            cells = [cell(figure, table.get(s.name, {}).get(figure.key)) for s in fleets]
            lines.append(f"| {figure.title} | {figure.unit} | " + " | ".join(cells) + " |")
    return lines


def method(plan: Plan) -> list[str]:
    n = f"{plan.tasks:,}"
    return [
        '- One private `redis-server` (free loopback port, temp dir, `--save "" --appendonly no`)'
        " serves every system; it is flushed before each system's session, while no worker runs.",
        f"- Every system runs {plan.processes} worker processes and the same task body"
        " (`bench/tasks/body.py`): one `RPUSH` of `time.time()` onto a Redis list named for the"
        " session and phase, on a connection the process keeps, and the timestamp as result."
        " Every system stores that result (Celery, Dramatiq and Huey with a Redis result"
        ' backend, RQ and fleetd by default). "Start" and "done" are read from those lists,'
        " so measuring costs every system the same one round trip per task.",
        "- Producers run in a separate process (`bench/agent.py`), in the system's own venv:"
        " peers in `.bench-venv` (SAQ and arq in `.bench-async-venv`: arq pins an older"
        " redis-py), fleetd in `.bench-fleetd-venv` (its commands and dependencies"
        " as `pip install .` makes them, not the project's editable install, whose import hook"
        " costs every process start; the code runs from the working tree, byte-compiled first,"
        " as pip does for the peers).",
        f"- Repetitions: {plan.reps}. In each, every system runs once, in an order rotated by one"
        " each repetition so that drift of the machine hits all alike. A figure is the median"
        " over the repetitions, [min–max] beside it.",
        f"- Enqueue rate: with no worker running, {plan.tasks // 2:,} tasks submitted one call per"
        f" task, then {plan.tasks - plan.tasks // 2:,} in batches of {plan.batch} through the"
        " system's batch API. Both halves stay in the queue for the drain run.",
        f"- Drain of a pre-filled queue ({n} tasks): the workers start on the full queue;"
        " (tasks − 1) ÷ (last stamp − first stamp). Cold start is the first stamp minus the"
        " moment the worker command was launched. Redis CPU per task: the Redis server's"
        " user + system CPU (its own getrusage figures, `INFO cpu`, to the microsecond) from"
        " the launch to the last task done, ÷ tasks, for every system whose broker is Redis;"
        " it holds the workers' start, the body's RPUSH and the harness's LLEN polls (every"
        " 20 ms), the same for every system.",
        f"- I/O-bound async tasks ({plan.async_tasks:,} tasks): a queue pre-filled with tasks"
        " that `await asyncio.sleep(0.1)`, then run the body, drained by workers running"
        " 500 of them at once per process (fleetd's `async_concurrency`, SAQ's `concurrency`,"
        " arq's `max_jobs`; arq's other settings its defaults); (tasks − 1) ÷ (last stamp −"
        " first stamp). Systems without async tasks: n/a. SAQ and arq, async-first queues,"
        " are measured on this figure alone.",
        f"- Enqueue while draining ({n} tasks): one producer submits one task per call to the"
        " idle fleet; tasks ÷ (last stamp − first submit). Fleet CPU per task: the user +"
        " system CPU of every process of the fleet over that run (a process that ended counts"
        " in the one that reaped it), ÷ tasks; the Redis server and the producer are not in"
        " it. For fleetd also its worker process's own CPU per task: one worker hands out"
        " every task of its children, so 1 ÷ that figure is the most tasks per second one"
        " worker can dispatch, however many cores its children have.",
        f"- Latency: {plan.latency_tasks:,} tasks submitted one after the other on an idle fleet,"
        " each waited for through the system's own result API before the next; start = stamp −"
        " submit, result = the client's return − submit; p50 and p99 per repetition. The result"
        " APIs: Celery `AsyncResult.get()` (Redis pub/sub), RQ `Job.latest_result(timeout=)`"
        " (blocking XREAD), Dramatiq `Message.get_result(block=True)` (blocking list pop), Huey"
        " `Result.get(blocking=True)` with `notify_result=True` (BLPOP), fleetd `Handle.get()`.",
        "- Idle memory: after the latency run, 0.5 s idle; USS (memory_full_info) of every"
        " process of the fleet, summed. For fleetd also the RSS of arbiter and worker, the USS"
        " of each pool child (each has run tasks, so each has opened its own Redis connection"
        " in the task body), and the USS of a child that TTIN adds to the idle worker, 0.5 s"
        " after it was forked and before it ran a task (TTOU then shrinks the pool back).",
        f"- Control ping: the command line ({plan.cli_pings} run(s), launch to exit: `fleetctl"
        " --json ping` against `celery inspect ping`), and in process, the median of"
        f" {plan.rtt_pings} round trips after a first one that connects (fleetd's ControlClient"
        " against `app.control.ping(limit=1)`).",
        "- TERM → exit: TERM to the launched command of the idle fleet, until every process of"
        " its tree has exited.",
        f"- max-tasks-per-child = 1: {plan.recycle_tasks:,} tasks pre-filled, then drained by a"
        " fleet that replaces each process after one task; a run still going after"
        f" {plan.recycle_budget:.0f} s is measured on the tasks done by then. Huey replaces a"
        " recycled worker at its next health check (`-c`, every 10 s by default).",
        "- HUP under load (fleetd): a fleet started on a queue deep enough for three times the"
        f" run gets HUP {plan.hup_warm:.0f} s after its first task; tasks done per 100 ms"
        f" bucket, the smallest bucket in the {plan.hup_window:.1f} s after the HUP against the"
        " median bucket before it (the first bucket, warming up, left out), and the longest"
        " time in that window without a task done.",
        "- Settings differ where the systems' defaults differ: fleetd runs with acks_late on (a"
        " task is acknowledged after it ran) and stores every result; Celery runs with acks_late"
        " off, its default, and prefetches 4 per process; RQ forks a work horse per job; Dramatiq"
        " and Huey keep their defaults but for one thread per process.",
        "- Results are data, not assertions: nothing here fails when a figure is worse.",
    ]


def grouped_notes(results: list[SessionResult], keep: Callable[[str], bool]) -> list[str]:
    """One line per system, repetition and note, naming every figure the note is about."""
    lines = []
    for result in results:
        keys_by_note: dict[str, list[str]] = {}
        for key, note in result.notes.items():
            if keep(note):
                keys_by_note.setdefault(note, []).append(key)
        for note, keys in keys_by_note.items():
            where = f"{result.system}, repetition {result.rep + 1}"
            lines.append(f"- {where}: {', '.join(keys)}: {note}")
    return lines


def render(
    plan: Plan,
    systems: list[System],
    results: list[SessionResult],
    machine: dict[str, str],
    versions: dict[str, str],
    started: str,
    seconds: float,
) -> str:
    table = summarize(results)
    lines = [
        "# fleetd against Celery, RQ, Dramatiq, Huey, SAQ and arq",
        "",
        f"Written by `python -m bench --{plan.name}` on {started}, in {seconds / 60:.1f} min."
        f" Each figure: median of {plan.reps} repetitions [min–max].",
        "",
        "## Machine",
        "",
        *(f"- {name}: {value}" for name, value in machine.items()),
        "",
        "## Versions and settings",
        "",
        *(f"- {name}: {version}" for name, version in versions.items()),
        "",
        *(f"- {s.label}: {s.settings}." for s in systems),
        "",
        "## Results",
        "",
        *results_table(table, systems),
        "",
        "## fleetd against the best peer",
        "",
        "fleetd's median divided by the best peer's: above 1 is ahead where higher is better,"
        " below 1 is ahead where lower is better.",
        "",
        *ratio_table(table, systems),
        "",
        "## fleetd only",
        "",
        *fleetd_table(table, systems),
        "",
        "## Method",
        "",
        *method(plan),
    ]
    errors = grouped_notes(results, lambda note: note.startswith("error"))
    if errors:
        lines += ["", "## Errors", "", *errors]
    partial = grouped_notes(results, lambda note: not note.startswith(("error", "n/a")))
    if partial:
        lines += ["", "## Runs cut short by their time budget", "", *partial]
    return "\n".join(lines) + "\n"


def raw(
    plan: Plan, results: list[SessionResult], machine: dict[str, str], versions: dict[str, str]
) -> dict[str, object]:
    """Everything measured, for the JSON file written beside RESULTS.md."""
    return {
        "plan": asdict(plan),
        "machine": machine,
        "versions": versions,
        "sessions": [asdict(result) for result in results],
    }

"""How every figure is measured, the same way for every system, and how repetitions are summarised.

A `Session` is one repetition of every measurement for one system. Each task body pushes the
time it ran onto a Redis list named for the session and phase (`bench.tasks.body`); the
harness reads those lists, so "started" and "done" cost every system one RPUSH.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.agent import Agent
from bench.processes import Fleet, FleetDied, process_memory
from bench.redis_server import RedisServer
from bench.systems.base import NotAvailable, Site, System

BUCKET = 0.1  # seconds, for the HUP-under-load histogram
POLL = 0.02  # seconds between two looks at a list's length
STALL = 20.0  # seconds without a task done after which a run has failed
ASYNC_ONLY = "n/a (measured on async tasks only)"  # the note on an async-first peer's figures


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    digits: int = 0
    fleetd_only: bool = False


FIGURES = [
    Figure("throughput_concurrent", "Throughput, enqueue while draining", "tasks/s", True),
    Figure("throughput_drain", "Throughput, drain of a pre-filled queue", "tasks/s", True),
    Figure("redis_cpu", "Redis server CPU per task, drain of a pre-filled queue", "µs", False),
    Figure("fleet_cpu", "Fleet CPU per task, enqueue while draining", "µs", False),
    Figure(
        "dispatch_cpu",
        "Worker process CPU per task (dispatch), enqueue while draining",
        "µs",
        False,
        0,
        True,
    ),
    Figure("enqueue_single", "Enqueue rate, one task per call", "tasks/s", True),
    Figure("enqueue_batch", "Enqueue rate, batches of 100", "tasks/s", True),
    Figure("start_p50", "Latency submit → start, p50", "ms", False, 2),
    Figure("start_p99", "Latency submit → start, p99", "ms", False, 2),
    Figure("result_p50", "Latency submit → result, p50", "ms", False, 2),
    Figure("result_p99", "Latency submit → result, p99", "ms", False, 2),
    Figure("cold_start", "Cold start, command → first task done", "s", False, 2),
    Figure("term_exit", "Idle fleet, TERM → every process exited", "s", False, 3),
    Figure("throughput_recycle", "Throughput, max-tasks-per-child = 1", "tasks/s", True),
    Figure(
        "throughput_async_io",
        "Throughput, I/O-bound async tasks (await sleep 0.1 s), drain",
        "tasks/s",
        True,
    ),
    Figure("ping_cli", "Control ping of every node, command line", "ms", False),
    Figure("ping_rtt", "Control ping of every node, in-process round trip", "ms", False, 2),
    Figure("idle_uss", "Idle fleet memory, USS summed over every process", "MiB", False, 1),
    Figure("arbiter_rss", "Idle fleet: arbiter RSS", "MiB", False, 1, True),
    Figure("worker_rss", "Idle fleet: worker RSS", "MiB", False, 1, True),
    Figure("child_uss", "Idle fleet: USS per pool child", "MiB", False, 1, True),
    Figure("extra_child_uss", "Idle fleet: USS of a child added by TTIN", "MiB", False, 1, True),
    Figure("hup_steady", "HUP under load: steady median per 100 ms", "tasks", True, 0, True),
    Figure("hup_min", "HUP under load: smallest 100 ms bucket after HUP", "tasks", True, 0, True),
    Figure("hup_dip", "HUP under load: smallest bucket / steady median", "ratio", True, 2, True),
    Figure("hup_gap", "HUP under load: longest time without a task done", "ms", False, 1, True),
]
FIGURE = {figure.key: figure for figure in FIGURES}


@dataclass(frozen=True)
class Plan:
    """The sizes of one benchmark run."""

    name: str
    reps: int
    tasks: int  # per throughput run; the enqueue rates split the pre-filled queue in two halves
    latency_tasks: int
    recycle_tasks: int
    recycle_budget: float  # seconds: a slower max-tasks-per-child run is measured on what ran
    cli_pings: int
    rtt_pings: int
    hup_warm: float  # seconds of steady draining before the HUP
    hup_window: float  # seconds after the HUP in which the smallest bucket is looked for
    async_tasks: int  # of the I/O-bound async run
    processes: int = 2
    batch: int = 100


QUICK = Plan(
    "quick", reps=3, tasks=200, latency_tasks=100, recycle_tasks=50, recycle_budget=3,
    cli_pings=1, rtt_pings=10, hup_warm=1.0, hup_window=2.0, async_tasks=3000,
)  # fmt: skip
FULL = Plan(
    "full", reps=3, tasks=5000, latency_tasks=1000, recycle_tasks=300, recycle_budget=10,
    cli_pings=3, rtt_pings=50, hup_warm=2.0, hup_window=3.0, async_tasks=10000,
)  # fmt: skip


@dataclass
class SessionResult:
    system: str
    rep: int
    values: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # why a figure has no value
    phases: dict[str, float] = field(default_factory=dict)  # seconds each phase took
    seconds: float = 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def wait_timeout(n: int) -> float:
    """Generous: a run this long has failed (slower than 20 tasks/s, or stuck)."""
    return 60.0 + n / 20


class Session:
    """One repetition of every measurement for one system, each phase on fresh keys."""

    def __init__(
        self, system: System, plan: Plan, redis: RedisServer, workdir: Path, rep: int
    ) -> None:
        self.system = system
        self.plan = plan
        self.redis = redis.client
        self.redis_server = redis
        self.site = Site(workdir, redis.url)
        self.result = SessionResult(system.name, rep)

    def run(self) -> SessionResult:
        start = time.perf_counter()
        self.site.workdir.mkdir(parents=True)
        self.redis.flushall()
        with Agent(self.system, self.site, self.site.workdir / "producer.log") as self.agent:
            if self.system.async_only:
                others = [f.key for f in FIGURES if f.key != "throughput_async_io"]
                self.note(others, ASYNC_ONLY)
                self.phase(["throughput_async_io"], self.async_io)
                self.result.seconds = time.perf_counter() - start
                return self.result
            self.phase(["enqueue_single", "enqueue_batch"], self.prefill_drain_queue)
            try:
                self.on_main_fleet()
            except FleetDied as exc:
                applicable = [f.key for f in FIGURES if self.system.is_fleetd or not f.fleetd_only]
                self.note(applicable, f"error: skipped, {exc}")
            else:
                self.phase(["throughput_recycle"], self.recycle)
                self.phase(["throughput_async_io"], self.async_io)
                if self.system.is_fleetd:
                    self.phase(["hup_steady", "hup_min", "hup_dip", "hup_gap"], self.hup_under_load)
        self.result.seconds = time.perf_counter() - start
        return self.result

    def on_main_fleet(self) -> None:
        """The phases that share one fleet: launched on the pre-filled queue, TERMed at the end."""
        redis_cpu = self.redis_server.cpu_seconds()  # before the workers connect
        fleet = self.launch("main", max_tasks_per_child=0)
        try:
            drained = ["cold_start", "throughput_drain", "redis_cpu"]
            self.phase(drained, lambda: self.drain(fleet, redis_cpu))
            if "throughput_drain" not in self.result.values:
                raise FleetDied("the fleet did not drain its queue")
            concurrent = ["throughput_concurrent", "fleet_cpu", "dispatch_cpu"]
            self.phase(concurrent, lambda: self.concurrent(fleet))
            latency = ["start_p50", "start_p99", "result_p50", "result_p99"]
            self.phase(latency, lambda: self.latency(fleet))
            fleetd_memory = ["arbiter_rss", "worker_rss", "child_uss", "extra_child_uss"]
            memory = ["idle_uss", *(fleetd_memory if self.system.is_fleetd else [])]
            self.phase(memory, lambda: self.idle_memory(fleet))
            self.phase(["ping_cli"], self.ping_cli)
            self.phase(["ping_rtt"], self.ping_rtt)
            self.phase(["term_exit"], lambda: self.term_exit(fleet))
        finally:
            fleet.kill()

    def phase(self, keys: list[str], measure: Callable[[], dict[str, float]]) -> None:
        """Run one measurement; a failure becomes a note on its figures, never a stop."""
        start = time.perf_counter()
        try:
            self.result.values.update(measure())
        except NotAvailable as exc:
            self.note(keys, f"n/a ({exc})")
        except Exception as exc:  # noqa: BLE001 - results are data: an error is one of them
            self.note(keys, f"error: {type(exc).__name__}: {exc}")
        self.result.phases[keys[0]] = time.perf_counter() - start

    def note(self, keys: list[str], text: str) -> None:
        for key in keys:
            if key not in self.result.values:
                self.result.notes.setdefault(key, text)

    def key(self, phase: str) -> str:
        return f"bench:{self.system.name}:{self.result.rep}:{phase}"

    def launch(self, phase: str, max_tasks_per_child: int) -> Fleet:
        command = self.system.configure(self.site, self.plan.processes, max_tasks_per_child)
        log = self.site.workdir / f"workers-{phase}.log"
        return Fleet(command, self.system.env(self.site), self.site.workdir, log)

    def enqueue(self, key: str, n: int, batched: bool) -> dict[str, Any]:
        batch = self.plan.batch if batched and self.system.batch_api else 0
        return self.agent.call("enqueue", wait_timeout(n), key=key, n=n, batch=batch)

    def stamps(self, key: str, n: int, fleet: Fleet, budget: float | None = None) -> list[float]:
        """Wait until n tasks of `key` have run; their start times, in the order they ran.
        With a budget, return what ran within it instead of failing."""
        timeout = wait_timeout(n) if budget is None else budget
        deadline = time.monotonic() + timeout
        last, progressed = 0, time.monotonic()
        while (done := self.redis.llen(key)) < n:
            fleet.check_alive()
            now = time.monotonic()
            if now > deadline and budget is not None:
                break
            if done > last:
                last, progressed = done, now
            if now > deadline or now - progressed > STALL:
                raise TimeoutError(
                    f"{done} of {n} tasks done, none for {now - progressed:.0f} s;"
                    f" the workers' log ends: {fleet.log_tail()}"
                )
            time.sleep(POLL)
        return [float(stamp) for stamp in self.redis.lrange(key, 0, -1)]

    def prefill_drain_queue(self) -> dict[str, float]:
        """Enqueue the drain run's tasks, workers stopped: half one by one, half batched."""
        half = self.plan.tasks // 2
        single = self.enqueue(self.key("drain"), half, batched=False)
        values = {"enqueue_single": half / single["seconds"]}
        rest = self.plan.tasks - half
        batched = self.enqueue(self.key("drain"), rest, batched=True)
        if self.system.batch_api:
            values["enqueue_batch"] = rest / batched["seconds"]
        else:
            self.note(["enqueue_batch"], "n/a (no batched enqueue API)")
        return values

    def drain(self, fleet: Fleet, redis_cpu: float) -> dict[str, float]:
        """Workers launched on the pre-filled queue: cold start, then drain rate; and the Redis
        server's CPU per task from the launch to the last task done (with the boot's commands,
        the body's RPUSH and the harness's LLEN polls: those cost every system alike)."""
        stamps = sorted(self.stamps(self.key("drain"), self.plan.tasks, fleet))
        values = {
            "cold_start": stamps[0] - fleet.launched_at,
            "throughput_drain": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        }
        if self.system.uses_redis:
            spent = self.redis_server.cpu_seconds() - redis_cpu
            values["redis_cpu"] = spent / self.plan.tasks * 1e6
        else:
            self.note(["redis_cpu"], "n/a (its broker is not Redis)")
        return values

    def cpu_seconds(self, fleet: Fleet) -> tuple[float, float]:
        """CPU seconds spent so far by every process of the fleet (those that ended count in
        the process that reaped them), and by fleetd's worker processes alone (their own:
        one worker dispatches for all its children, so its CPU per task is what caps it on
        many cores, 1 / it being the most tasks per second it can hand out)."""
        tree = fleet.tree()
        spent = dispatch = 0.0
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                spent += sum(proc.cpu_times()[:4])  # user, system, children's user and system
        if self.system.is_fleetd and tree:
            with contextlib.suppress(psutil.Error):
                dispatch = sum(sum(w.cpu_times()[:2]) for w in tree[0].children())
        return spent, dispatch

    def concurrent(self, fleet: Fleet) -> dict[str, float]:
        """One producer submits the tasks one by one while the idle fleet drains them."""
        n = self.plan.tasks
        spent, dispatch = self.cpu_seconds(fleet)
        sent = self.enqueue(self.key("concurrent"), n, batched=False)
        stamps = self.stamps(self.key("concurrent"), n, fleet)
        spent_after, dispatch_after = self.cpu_seconds(fleet)
        values = {
            "throughput_concurrent": n / (max(stamps) - sent["first"]),
            "fleet_cpu": (spent_after - spent) / n * 1e6,
        }
        if self.system.is_fleetd:
            values["dispatch_cpu"] = (dispatch_after - dispatch) / n * 1e6
        return values

    def latency(self, fleet: Fleet) -> dict[str, float]:
        """Sequential tasks on an idle fleet: submit → body ran, submit → result in the client."""
        n = self.plan.latency_tasks
        times = self.agent.call("latency", 60 + 30 * n, key=self.key("latency"), n=n)
        stamps = self.stamps(self.key("latency"), n, fleet)
        to_start = [(s - t) * 1000 for s, t in zip(stamps, times["submitted"], strict=True)]
        to_result = [
            (r - t) * 1000 for r, t in zip(times["returned"], times["submitted"], strict=True)
        ]
        return {
            "start_p50": percentile(to_start, 50),
            "start_p99": percentile(to_start, 99),
            "result_p50": percentile(to_result, 50),
            "result_p99": percentile(to_result, 99),
        }

    def idle_memory(self, fleet: Fleet) -> dict[str, float]:
        time.sleep(0.5)
        tree = fleet.tree()
        memory = {proc.pid: process_memory(proc) for proc in tree}
        values = {"idle_uss": sum(m["uss"] for m in memory.values())}
        if self.system.is_fleetd:
            arbiter = tree[0]
            workers = arbiter.children()
            children = [child for worker in workers for child in worker.children()]
            if not workers or not children:
                raise RuntimeError(
                    f"expected arbiter → worker → children, found {len(tree)} processes"
                )
            values["arbiter_rss"] = memory[arbiter.pid]["rss"]
            values["worker_rss"] = statistics.mean(memory[w.pid]["rss"] for w in workers)
            values["child_uss"] = statistics.mean(memory[c.pid]["uss"] for c in children)
            values["extra_child_uss"] = self.extra_child(workers[0])
        return values

    def async_io(self) -> dict[str, float]:
        """A queue pre-filled with I/O-bound async tasks (each awaits 0.1 s, then stamps),
        drained by workers that run ASYNC_CONCURRENCY of them at once per process."""
        n = self.plan.async_tasks
        command = self.system.configure_async(self.site, self.plan.processes)
        key = self.key("async")
        self.agent.call("enqueue_async", wait_timeout(n), key=key, n=n)
        log = self.site.workdir / "workers-async.log"
        fleet = Fleet(command, self.system.env(self.site), self.site.workdir, log)
        try:
            stamps = sorted(self.stamps(key, n, fleet))
        finally:
            fleet.kill()
        return {"throughput_async_io": (len(stamps) - 1) / (stamps[-1] - stamps[0])}

    def extra_child(self, worker: Any) -> float:
        """USS of a child that TTIN (`pool grow`) adds to the idle worker, 0.5 s after it was
        forked and before it ran a task; TTOU then takes the pool back to its size."""
        before = {child.pid for child in worker.children()}
        worker.send_signal(signal.SIGTTIN)
        deadline = time.monotonic() + 10
        while not (added := [c for c in worker.children() if c.pid not in before]):
            if time.monotonic() > deadline:
                raise RuntimeError("no child added 10 s after TTIN")
            time.sleep(POLL)
        time.sleep(0.5)
        uss = process_memory(added[0])["uss"]
        worker.send_signal(signal.SIGTTOU)
        return uss

    def ping_cli(self) -> dict[str, float]:
        command = self.system.ping_command(self.site)
        if command is None:
            raise NotAvailable("no control plane")
        times = []
        for _ in range(self.plan.cli_pings):
            start = time.perf_counter()
            done = subprocess.run(
                command,
                env=self.system.env(self.site),
                cwd=self.site.workdir,
                capture_output=True,
                text=True,
                timeout=60,
            )
            times.append(time.perf_counter() - start)
            if done.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(command[:3])} exited {done.returncode}: "
                    f"{(done.stderr or done.stdout).strip()[-300:]}"
                )
            if self.system.is_fleetd and json.loads(done.stdout).get("missing"):
                raise RuntimeError(f"fleetctl ping: nodes missing: {done.stdout.strip()}")
        return {"ping_cli": statistics.median(times) * 1000}

    def ping_rtt(self) -> dict[str, float]:
        """In-process pings; the first one, which connects, is left out."""
        n = self.plan.rtt_pings + 1
        answer = self.agent.call("ping", 30 + 10 * n, n=n)
        return {"ping_rtt": statistics.median(answer["seconds"][1:]) * 1000}

    def term_exit(self, fleet: Fleet) -> dict[str, float]:
        seconds = fleet.stop(timeout=60)
        if seconds is None:
            raise TimeoutError("the fleet had not exited 60 s after TERM (then KILLed)")
        return {"term_exit": seconds}

    def hup_under_load(self) -> dict[str, float]:
        """A fleet draining a deep queue gets HUP; tasks done per 100 ms across the reload.
        The last phase of a session: what is still queued after the window is flushed with it."""
        rates = [
            self.result.values.get(k, 0.0) for k in ("throughput_drain", "throughput_concurrent")
        ]
        seconds = self.plan.hup_warm + self.plan.hup_window + 1.0
        n = min(100_000, int(max(1000.0, *rates) * seconds * 3))  # thrice: rates vary by run
        key = self.key("hup")
        self.enqueue(key, n, batched=True)
        fleet = self.launch("hup", max_tasks_per_child=0)
        try:
            self.stamps(key, 1, fleet)
            time.sleep(self.plan.hup_warm)
            hup_at = time.time()
            fleet.signal(signal.SIGHUP)
            time.sleep(self.plan.hup_window + 2 * BUCKET)
            fleet.check_alive()
            stamps = sorted(float(stamp) for stamp in self.redis.lrange(key, 0, -1))
        finally:
            fleet.kill()
        return hup_buckets(stamps, hup_at, self.plan.hup_window)

    def recycle(self) -> dict[str, float]:
        if self.system.recycle_option is None:
            raise NotAvailable("no max-tasks-per-child option")
        n = self.plan.recycle_tasks
        self.enqueue(self.key("recycle"), n, batched=True)
        fleet = self.launch("recycle", max_tasks_per_child=1)
        try:
            budget = self.plan.recycle_budget
            stamps = sorted(self.stamps(self.key("recycle"), n, fleet, budget))
            stopped_looking = time.time()
        finally:
            fleet.kill()
        if len(stamps) < 2:
            raise TimeoutError(f"{len(stamps)} of {n} tasks done within {budget:.0f} s")
        if len(stamps) < n:
            self.note(["throughput_recycle"], f"{len(stamps)} of {n} tasks within {budget:.0f} s")
            return {"throughput_recycle": (len(stamps) - 1) / (stopped_looking - stamps[0])}
        return {"throughput_recycle": (n - 1) / (stamps[-1] - stamps[0])}


def hup_buckets(stamps: list[float], hup_at: float, window: float) -> dict[str, float]:
    """Tasks done per 100 ms bucket: the steady median before `hup_at`, the smallest bucket
    and the longest gap within `window` seconds after it."""
    if stamps[-1] < hup_at + window:
        raise RuntimeError("the queue ran dry before the reload window ended; enlarge the run")
    full = int((stamps[-1] - stamps[0]) / BUCKET)
    counts = [0] * full
    for stamp in stamps:
        index = int((stamp - stamps[0]) / BUCKET)
        if index < full:
            counts[index] += 1
    hup_index = int((hup_at - stamps[0]) / BUCKET)
    steady = statistics.median(counts[1:hup_index])  # the first bucket is the fleet warming up
    smallest = min(counts[hup_index : hup_index + round(window / BUCKET)])
    after = [stamp for stamp in stamps if hup_at <= stamp <= hup_at + window]
    gap = max(b - a for a, b in zip([hup_at, *after], [*after, hup_at + window], strict=True))
    return {
        "hup_steady": steady,
        "hup_min": smallest,
        "hup_dip": smallest / steady,
        "hup_gap": gap * 1000,
    }


@dataclass(frozen=True)
class Stat:
    median: float
    low: float
    high: float
    reps: int  # repetitions that gave a value
    runs: int  # repetitions run


def summarize(results: list[SessionResult]) -> dict[str, dict[str, Stat | str]]:
    """Per system, per figure: median, min and max over the repetitions, or why there is none."""
    table: dict[str, dict[str, Stat | str]] = {}
    for system in dict.fromkeys(result.system for result in results):
        mine = [result for result in results if result.system == system]
        row: dict[str, Stat | str] = {}
        for key in FIGURE:
            values = [result.values[key] for result in mine if key in result.values]
            notes = [result.notes[key] for result in mine if key in result.notes]
            if values:
                spread = min(values), max(values)
                row[key] = Stat(statistics.median(values), *spread, len(values), len(mine))
            elif notes:
                row[key] = notes[0]
        table[system] = row
    return table

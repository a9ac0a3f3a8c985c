"""`python -m tests.chaos --tasks N --duration S [--broker redis]`: a bounded stress run
under kills and reloads.

It starts a real fleet (on SQLite, or with `--broker redis` on a private redis-server),
submits N journaled tasks at a steady rate over S seconds and, spread over the same
time, SIGKILLs random pool children (preferably busy ones) and workers, HUPs the
arbiter, TERM-restarts it, QUIT-restarts it (a cold shutdown that kills every running
task), sends bursts of USR1 to the workers (signals that land while frames are written)
and of TTIN then TTOU to the arbiter (pools that grow and shrink under load), stalls the
broker (Redis stopped with SIGSTOP, or the queue file's write lock held by another
process: a hung peer) and, on Redis, kills and restarts the server (its append-only file
written at every write: nothing it acknowledged is lost, every connection is cut). Mixed
into the load: big tasks (a body of BIG_TASK bytes, past a pipe's buffer) and poison
records written straight into the broker (the queue file, or Redis's records and
streams), as a hostile producer would (each must end FAILURE BadMessage, costing nothing
else). Then it waits for every task and prints what happened: submitted, completed,
lost, duplicated, poisons dead-lettered, and the kills it made.

A share of the tasks are `async def` (ASYNC_SHARE): several of them run at once on a
child's event loop, so a child kill interrupts them all; each is journaled as the others.

Some tasks also start a process in a session of its own (`Popen(start_new_session=True)`)
that would sleep for ten minutes: once the fleet is stopped, none of them may be left.

Every task writes "S id pid" when it starts and "E id pid" when it ends, so the run
knows exactly which executions a kill interrupted. The contract (DESIGN section 3):
nothing is lost, and only an interrupted task may run twice, so duplicates are bounded by
the tasks running in killed processes. The exit code is 1 when either fails.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.fleet import Fleet, wait_for
from tests.poison import RawTask, poison_bodies, write_redis, write_sqlite
from tests.redisserver import RedisServer, start_redis
from worker import Client

EXIT_OK, EXIT_BROKEN = 0, 1

WORKERS = [
    {"name": "alpha", "queues": ["default"], "concurrency": 2},
    {"name": "beta", "queues": ["default"], "concurrency": 2},
    # Recycles its child every few tasks: spares, children that leave by themselves, and
    # reaps, all under the same kills and signals.
    {"name": "gamma", "queues": ["default"], "concurrency": 1, "max_tasks_per_child": 3},
]
DEFAULTS = {
    "prefetch": 2,
    "max_deliveries": 10,
}  # a task unlucky enough to be hit twice still completes
BATCH = 20
MAX_TASK_SECONDS = 0.1
BIG_EVERY = 10  # batches between two big tasks
BIG_TASK = 1 << 20  # bytes of padding in a big task: past any pipe's buffer
POISON_EVERY = 7  # batches between two poison records
USR1_BURST = 20  # USR1 signals per burst, each worker
RESIZE_BURST = 3  # TTIN signals to the arbiter, then as many TTOU
STALL_SECONDS = 2.0  # how long the broker is stalled: well within the lease (30 s)
ESCAPE_SHARE = 0.05  # of the tasks, those that also start a process in a session of its own
ASYNC_SHARE = 0.3  # of the tasks, those that are `async def`
ESCAPE_TASKS = '''
import asyncio, os, subprocess, time
from worker import task
from tasks import journal_line as line  # tests/fleet.py's task module, imported beside this

def append(path, line):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)

@task(bind=True)
def escape(self, path, seconds, pidfile):
    """As tasks.journal, and a sleeper that leaves the task's process group and session."""
    append(path, line("S", self.request.id))
    sleeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
    append(pidfile, f"{sleeper.pid}\\n")
    time.sleep(seconds)
    append(path, line("E", self.request.id))
    return os.getpid()

@task(bind=True)
async def ajournal(self, path, seconds):
    """As tasks.journal, on the child's event loop."""
    append(path, line("S", self.request.id))
    await asyncio.sleep(seconds)
    append(path, line("E", self.request.id))
    return os.getpid()
'''


def send(pid: int, signum: int) -> bool:
    """`signum` to `pid`; False if that process had ended since it was listed (a child
    recycled after its last task or retired by a shrink, a worker a reload replaced, a
    stopped one that its parent killed and reaped meanwhile)."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Chaos:
    fleet: Fleet
    journal: Path
    rng: random.Random
    kills: collections.Counter[str] = field(default_factory=collections.Counter)
    killed_pids: set[int] = field(default_factory=set)
    held_by_killed: dict[int, set[str]] = field(default_factory=dict)  # killed pid -> ids held
    poisons: list[str] = field(default_factory=list)  # ids of the records written past the Client
    redis_server: RedisServer | None = None  # the private server, on Redis
    queue_file: Path | None = None  # the queue file, on SQLite

    # --- the fleet's processes -------------------------------------------------------------
    def workers(self) -> list[int]:
        return self.fleet.worker_pids()

    def executions(self) -> Iterator[tuple[str, str, int, int]]:
        """The journal's lines as (S or E, task id, pid, its parent's pid: the worker it ran
        under); the last may be half written."""
        for line in self.journal.read_text().splitlines() if self.journal.exists() else []:
            words = line.split()
            if len(words) == 4 and words[2].isdigit() and words[3].isdigit():
                yield words[0], words[1], int(words[2]), int(words[3])

    def busy_children(self, children: list[int]) -> list[int]:
        """Children with a started, unfinished execution in the journal."""
        running: dict[int, int] = collections.Counter()
        for kind, _, pid, _ in self.executions():
            running[pid] += 1 if kind == "S" else -1
        return [c for c in children if running.get(c, 0) > 0]

    def ended_in(self, pid: int) -> set[str]:
        """The ids of the executions the journal says ended in process `pid`."""
        return {
            task_id
            for kind, task_id, ran_in, _ in self.executions()
            if (kind, ran_in) == ("E", pid)
        }

    # --- the events --------------------------------------------------------------------------
    def kill_child(self) -> bool:
        children = self.fleet.child_pids()
        if not children:
            return False
        try:  # a busy one if there is one soon: a kill should interrupt a task
            busy = wait_for(lambda: self.busy_children(self.fleet.child_pids()), 2, 0.01)
        except AssertionError:
            busy = []
        victim = self.rng.choice(busy or children)
        # Stopped, it reports nothing more: a task it ended whose outcome its worker has not
        # acknowledged yet may have ended after its last report, and runs again.
        if not send(victim, signal.SIGSTOP):  # it ended meanwhile: the event picks again
            return False
        self.killed_pids.add(victim)
        self.held_by_killed[victim] = self.ended_in(victim) & held_by(self.fleet.client)
        send(victim, signal.SIGKILL)
        self.kills["child"] += 1
        return True

    def kill_worker(self) -> bool:
        workers = self.workers()
        if not workers:
            return False
        victim = self.rng.choice(workers)
        # stopped, it neither reserves nor acks: what it holds now is what it holds when it dies
        if not send(victim, signal.SIGSTOP):  # it ended meanwhile: the event picks again
            return False
        self.killed_pids |= set(self.fleet.child_pids(victim))
        self.held_by_killed[victim] = held_by(self.fleet.client, victim)
        send(victim, signal.SIGKILL)
        self.kills["worker"] += 1
        return True

    def hup(self) -> bool:
        before = self.fleet.log().count("reload complete")
        self.fleet.signal(signal.SIGHUP)
        wait_for(
            lambda: self.fleet.log().count("reload complete") > before,
            60,
            0.1,
            "the reload to complete",
        )
        self.kills["hup"] += 1
        return True

    def usr1(self) -> bool:
        """A burst of USR1 at every worker: each lands in whatever the worker writes then."""
        workers = self.workers()
        if not workers:
            return False
        for _ in range(USR1_BURST):
            for pid in workers:
                send(pid, signal.SIGUSR1)
            time.sleep(0.005)
        self.kills["usr1"] += 1
        return True

    def restart(self) -> bool:
        self.fleet.signal(signal.SIGTERM)
        code = self.fleet.wait_exit(120)
        if code != 0:
            raise AssertionError(f"fleetd exited {code} on TERM")
        self.fleet.start()
        self.kills["restart"] += 1
        return True

    def quit(self) -> bool:
        """A cold shutdown (QUIT), then a start. Every running task is killed with its child.
        The workers and children are stopped first, so that what they hold when QUIT lands
        is what the broker says they hold now: an ended task whose outcome was not acked yet
        runs again, as a killed worker's does."""
        workers = self.workers()
        if not workers:
            return False
        processes = self.fleet.child_pids() + workers
        for pid in processes:
            send(pid, signal.SIGSTOP)
        self.killed_pids |= set(self.fleet.child_pids())
        for pid in workers:
            self.held_by_killed[pid] = held_by(self.fleet.client, pid)
        self.fleet.signal(signal.SIGQUIT)
        for pid in processes:
            send(pid, signal.SIGCONT)
        self.fleet.wait_exit(120)
        self.fleet.start()
        self.kills["quit"] += 1
        return True

    def resize(self) -> bool:
        """TTIN a few times, then TTOU as many: every pool grows, then shrinks back."""
        for signum in (signal.SIGTTIN, signal.SIGTTOU):
            for _ in range(RESIZE_BURST):
                self.fleet.signal(signum)
                time.sleep(0.1)
        self.kills["resize"] += 1
        return True

    def stall(self) -> bool:
        """The broker stops answering for STALL_SECONDS: Redis stopped, or the queue file's
        write lock held by another process."""
        if self.redis_server is not None:
            assert self.redis_server.process is not None
            pid = self.redis_server.process.pid
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(STALL_SECONDS)
            finally:
                os.kill(pid, signal.SIGCONT)
        else:
            assert self.queue_file is not None
            db = sqlite3.connect(self.queue_file, timeout=30, isolation_level=None)
            try:
                db.execute("BEGIN IMMEDIATE")
                time.sleep(STALL_SECONDS)
                db.execute("ROLLBACK")
            finally:
                db.close()
        self.kills["stall"] += 1
        return True

    def broker_restart(self) -> bool:
        """Redis killed (SIGKILL: every connection cut, mid-call) and started again on the
        same port and data; its append-only file is written at every write."""
        if self.redis_server is None:
            return False
        self.redis_server.kill()
        self.redis_server.start()
        self.kills["broker_restart"] += 1
        return True


def plan(rng: random.Random, duration: float, counts: dict[str, int]) -> list[tuple[float, str]]:
    """The events, shuffled, at even intervals over the run (a restart never first or last)."""
    events = [kind for kind, n in counts.items() for _ in range(n)]
    rng.shuffle(events)
    if "restart" in events and len(events) > 2:
        events.remove("restart")
        events.insert(rng.randrange(1, len(events)), "restart")
    step = duration / (len(events) + 1)
    return [(step * (i + 1), kind) for i, kind in enumerate(events)]


def submit_steadily(
    client: Client,
    journal: Path,
    n: int,
    duration: float,
    ids: list[str],
    poisons: list[str],
    rng: random.Random,
    failure: list[BaseException],
) -> None:
    """Submit `n` tasks in batches at an even rate over `duration` seconds, a big one every
    BIG_EVERY batches, and a poison record every POISON_EVERY."""
    kinds = sorted(poison_bodies("x"))
    kinds.remove("x-huge")  # 64 MiB a record: the size limit has tests of its own
    try:
        start = time.monotonic()
        batches = max(1, n // BATCH)
        for b in range(batches):
            size = n - len(ids) if b == batches - 1 else BATCH
            calls = [journaled(journal, rng) for _ in range(size)]
            if b % BIG_EVERY == BIG_EVERY - 1:
                calls[-1] = ("tasks.journal", (str(journal), 0.0, "x" * BIG_TASK), {})
            ids.extend(h.id for h in client.submit_many(calls))
            if b % POISON_EVERY == POISON_EVERY - 1:
                kind = kinds[len(poisons) % len(kinds)].removeprefix("x-")
                task_id = f"poison-{len(poisons)}-{kind}"
                raw = poison_bodies(f"poison-{len(poisons)}")[f"poison-{len(poisons)}-{kind}"]
                write_poison(client, RawTask(task_id.encode(), raw))
                poisons.append(task_id)
            delay = start + duration * (b + 1) / batches - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    except BaseException as exc:  # noqa: BLE001 - reported by the main thread
        failure.append(exc)


def journaled(journal: Path, rng: random.Random) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """A journaled task: one in ESCAPE_SHARE also starts a process in a session of its own,
    one in ASYNC_SHARE is `async def`."""
    seconds = round(rng.uniform(0, MAX_TASK_SECONDS), 3)
    draw = rng.random()
    if draw < ESCAPE_SHARE:
        return "chaos_tasks.escape", (str(journal), seconds, str(escapees_file(journal))), {}
    if draw < ESCAPE_SHARE + ASYNC_SHARE:
        return "chaos_tasks.ajournal", (str(journal), seconds), {}
    return "tasks.journal", (str(journal), seconds), {}


def escapees_file(journal: Path) -> Path:
    return journal.with_name("escapees.txt")


def escapees(journal: Path) -> list[psutil.Process]:
    """The processes the tasks started in sessions of their own that are still alive."""
    path = escapees_file(journal)
    alive = []
    for pid in path.read_text().split() if path.exists() else []:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(int(pid))
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


def tally(fleet: Fleet, chaos: Chaos, ids: list[str]) -> tuple[dict[str, Any], set[str]]:
    """The run's figures, and the ids of the duplicates no kill explains."""
    states = collections.Counter(i["state"] for i in fleet.infos(ids))
    starts: collections.Counter[str] = collections.Counter()
    unfinished: set[tuple[str, int]] = set()
    started_by: dict[str, set[int]] = collections.defaultdict(set)
    started_under: dict[str, set[int]] = collections.defaultdict(set)  # their workers' pids
    for kind, task_id, pid, worker in chaos.executions():
        if kind == "S":
            starts[task_id] += 1
            unfinished.add((task_id, pid))
            started_by[task_id].add(pid)
            started_under[task_id].add(worker)
        else:
            unfinished.discard((task_id, pid))
    # executions a kill interrupted: started in a killed process and never ended there, or
    # ended there but not yet acknowledged when that process (a worker, or a child whose
    # outcome its worker may not have read) was killed. Under a killed worker that counts a
    # child that had already retired (max_tasks_per_child) when the worker was killed: its
    # outcomes, read, were not acknowledged yet, and it is in no list of the kill's children.
    interrupted = {task_id for task_id, pid in unfinished if pid in chaos.killed_pids}
    for victim, held in chaos.held_by_killed.items():
        interrupted |= {
            t for t in held if started_by[t] & chaos.killed_pids or victim in started_under[t]
        }
    duplicated = {t for t, n in starts.items() if n > 1}
    ended = fleet.infos(chaos.poisons)
    figures: dict[str, Any] = {
        "poisons": len(chaos.poisons),
        "poisons_dead_lettered": sum(
            1 for i in ended if (i["state"], i.get("exc_type")) == ("FAILURE", "BadMessage")
        ),
        "submitted": len(ids),
        "completed": states.get("SUCCESS", 0),
        "lost": len(ids) - states.get("SUCCESS", 0),
        "duplicated": len(duplicated),
        "running_in_killed": len(interrupted),
        "unexplained_duplicates": len(duplicated - interrupted),
        "never_ran": sum(1 for i in ids if not starts[i]),
    }
    return figures, duplicated - interrupted


def explain(fleet: Fleet, chaos: Chaos, unexplained: set[str]) -> None:
    """Print what the journal and the fleet's log say of each duplicate no kill explains."""
    runs: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for kind, task_id, pid, _ in chaos.executions():
        if task_id in unexplained:
            runs[task_id].append((kind, pid))
    log = fleet.log().splitlines()
    for task_id, executions in sorted(runs.items()):
        pids = {str(pid) for _, pid in executions}
        print(f"chaos: {task_id} ran more than once, and no kill explains it:", file=sys.stderr)
        for kind, pid in executions:
            killed = " (killed)" if pid in chaos.killed_pids else ""
            print(f"  journal: {kind} {task_id} {pid}{killed}", file=sys.stderr)
        for line in log:
            if task_id in line or any(pid in line for pid in pids):
                print(f"  log: {line}", file=sys.stderr)


def held_by(client: Client, pid: int | None = None) -> set[str]:
    """The ids of the tasks that the worker `pid` (None: any worker) holds now, as its
    broker knows them."""
    owner = "%" if pid is None else f"%:{pid}:%"
    broker: Any = client.broker
    if hasattr(broker, "db"):  # SQLite
        rows = broker.db.execute(
            "SELECT id FROM tasks WHERE status = 1 AND owner LIKE ?", (owner,)
        ).fetchall()
        return {r[0] for r in rows}
    stream = f"{broker.prefix}:q:default"  # Redis: the entries its consumer has pending
    ids = set()
    for entry in broker.redis.xpending_range(stream, "workers", "-", "+", 100_000):
        if pid is None or f":{pid}:" in entry["consumer"]:
            found = broker.redis.xrange(stream, entry["message_id"], entry["message_id"])
            ids |= {fields["id"] for _, fields in found}
    return ids


def write_poison(client: Client, task: RawTask) -> None:
    """Put a task body that is no task straight into the broker, bypassing the client."""
    broker: Any = client.broker
    if hasattr(broker, "path"):  # SQLite
        write_sqlite(broker.path, [task])
    else:
        write_redis(broker.redis, broker.prefix, [task])


def run(args: argparse.Namespace) -> int:
    folder = Path(args.folder or tempfile.mkdtemp(prefix="fleetd-chaos-"))
    rng = random.Random(args.seed)
    redis_server: RedisServer | None = None
    broker = "sqlite:///queue.db"
    if args.broker == "redis":  # a private server, stopped by its pid at the end
        # What it acknowledged must outlive a kill when the run kills it.
        redis_server = start_redis(folder, appendonly=args.broker_restarts > 0)
        broker = redis_server.url
    elif args.broker_restarts:
        raise SystemExit("chaos: --broker-restarts needs --broker redis")
    try:
        return run_on(args, folder, rng, broker, redis_server)
    finally:
        if redis_server is not None:
            redis_server.stop()


def run_on(
    args: argparse.Namespace,
    folder: Path,
    rng: random.Random,
    broker: str,
    redis_server: RedisServer | None,
) -> int:
    fleet = Fleet(
        folder,
        workers=WORKERS,
        defaults=DEFAULTS,
        fleet={"imports": ["tasks", "chaos_tasks"], "broker": broker},
    )
    (folder / "chaos_tasks.py").write_text(textwrap.dedent(ESCAPE_TASKS))
    journal = folder / "journal.txt"
    chaos = Chaos(fleet, journal, rng, redis_server=redis_server)
    if redis_server is None:
        chaos.queue_file = folder / "queue.db"
    ids: list[str] = []
    failure: list[BaseException] = []
    counts = {
        "child": args.child_kills,
        "worker": args.worker_kills,
        "hup": args.hups,
        "restart": args.restarts,
        "usr1": args.usr1_bursts,
        "quit": args.quits,
        "resize": args.resizes,
        "stall": args.stalls,
        "broker_restart": args.broker_restarts,
    }
    started = time.monotonic()
    try:
        fleet.start()
        producer_client = Client.from_config(str(fleet.config))
        producer = threading.Thread(
            target=submit_steadily,
            daemon=True,
            args=(
                producer_client,
                journal,
                args.tasks,
                args.duration,
                ids,
                chaos.poisons,
                rng,
                failure,
            ),
        )
        producer.start()
        actions = {
            "child": chaos.kill_child,
            "worker": chaos.kill_worker,
            "hup": chaos.hup,
            "restart": chaos.restart,
            "usr1": chaos.usr1,
            "quit": chaos.quit,
            "resize": chaos.resize,
            "stall": chaos.stall,
            "broker_restart": chaos.broker_restart,
        }
        for at, kind in plan(rng, args.duration, counts):
            delay = started + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            wait_for(actions[kind], 30, 0.05, f"a process to {kind}")
        producer.join(args.duration + 120)
        producer_client.close()
        if failure:
            raise failure[0]
        settled = time.monotonic()
        try:
            fleet.wait_all_final(ids + chaos.poisons, args.drain_timeout)
        except AssertionError as exc:
            print(f"chaos: {exc}", file=sys.stderr)
        drained = time.monotonic() - settled
        figures, unexplained = tally(fleet, chaos, ids)
        fleet.signal(signal.SIGTERM)  # its own stop: the harness's ends what it finds left
        fleet.wait_exit(120)
        escaped = escapees(journal)
    finally:
        fleet.stop()
        for process in escapees(journal):
            process.kill()
    left = fleet.leftovers()
    figures.update(
        {f"{k}_kills" if k in ("child", "worker") else f"{k}s": chaos.kills[k] for k in counts}
    )
    figures["left_behind"] = len(left)
    path = escapees_file(journal)
    figures["escapees"] = len(path.read_text().split()) if path.exists() else 0
    figures["escapees_left"] = len(escaped)
    figures["seconds"] = round(time.monotonic() - started, 1)
    figures["drain_seconds"] = round(drained, 1)
    print(
        json.dumps(figures) if args.json else "\n".join(f"{k:>22}: {v}" for k, v in figures.items())
    )
    broken = (
        figures["lost"] > 0
        or figures["poisons_dead_lettered"] != figures["poisons"]
        or figures["duplicated"] > figures["running_in_killed"]
        or figures["unexplained_duplicates"] > 0
        or left
        or escaped
    )
    if broken:
        explain(fleet, chaos, unexplained)
        print(f"chaos: BROKEN; the fleet's folder is kept: {folder}", file=sys.stderr)
    elif not args.folder:
        shutil.rmtree(folder, ignore_errors=True)
    return EXIT_BROKEN if broken else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--tasks", type=int, default=6000)
    parser.add_argument(
        "--duration", type=float, default=180, help="seconds of submitting and killing"
    )
    parser.add_argument("--child-kills", type=int, default=24)
    parser.add_argument("--worker-kills", type=int, default=4)
    parser.add_argument("--hups", type=int, default=3)
    parser.add_argument("--restarts", type=int, default=1, help="TERM-restarts of the arbiter")
    parser.add_argument("--usr1-bursts", type=int, default=6, help="USR1 bursts at the workers")
    parser.add_argument("--quits", type=int, default=1, help="QUIT-restarts of the arbiter")
    parser.add_argument("--resizes", type=int, default=3, help="TTIN then TTOU bursts")
    parser.add_argument(
        "--stalls", type=int, default=3, help=f"broker stalls of {STALL_SECONDS:g} s"
    )
    parser.add_argument(
        "--broker-restarts",
        type=int,
        default=0,
        help="kills and restarts of Redis (--broker redis)",
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=120, help="seconds to wait for the last tasks"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--broker",
        choices=("sqlite", "redis"),
        default="sqlite",
        help="redis: a private redis-server in the run's folder",
    )
    parser.add_argument("--folder", help="run here and keep it (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

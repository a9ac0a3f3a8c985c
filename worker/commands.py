"""The built-in control commands that run in each worker and reply for its node."""

from __future__ import annotations

import logging
import os
import resource
import signal
import time
from typing import TYPE_CHECKING, Any

from .autoscale import MAX_POOL, moved
from .brokers.base import utf8_text
from .control import OPTIONAL, Arg, register
from .spec import parse_rate
from .task import REGISTRY

if TYPE_CHECKING:
    from .brokers.base import Delivery
    from .process import Worker

log = logging.getLogger("fleetd.worker")

NUM = (int, float)
TASK = Arg((str,), help="a task name")
POOL_N = Arg((int,), 1, "how many children (default: 1)", positional=True, minimum=1)
FDS_PER_CHILD = 3  # its worker's ends of a child's task, result and revoke pipes
FDS_SPARE = 32  # for the broker's files and connections, /proc reads, a fork's other pipe ends


@register("ping", "Check that the node answers.", envelope=("dest", "limit"))
def ping(worker: Worker) -> dict[str, Any]:
    return {"ok": "pong"}


@register("stats", "Counters, pool and uptime of the node.", lines={"inspect stats": {}})
def stats(worker: Worker) -> dict[str, Any]:
    return worker.stats()


@register(
    "active",
    "Tasks running now, with their child pid and runtime.",
    lines={"inspect active": {}},
)
def active(worker: Worker) -> list[dict[str, Any]]:
    now = time.monotonic()
    return [
        {
            "id": r.delivery.id,
            "name": r.delivery.name,
            "pid": c.pid,
            "runtime": now - r.started,
            "deliveries": r.delivery.deliveries,
        }
        for c in worker.children.values()
        for r in c.in_flight
    ]


@register(
    "reserved",
    "Tasks reserved by the node, not started yet (also those waiting in a child's pipe).",
    lines={"inspect reserved": {}},
)
def reserved(worker: Worker) -> list[dict[str, Any]]:
    waiting: list[tuple[Delivery, int | None]] = [
        (r.delivery, c.pid) for c in worker.children.values() for r in list(c.tasks)[1:]
    ]
    waiting += [(d, None) for d in worker.reserved]
    return [
        {"id": d.id, "name": d.name, "deliveries": d.deliveries, "child": pid} for d, pid in waiting
    ]


@register(
    "scheduled",
    "ETA tasks waiting in the node's queues: how many, when the next is due.",
    lines={"inspect scheduled": {}},
)
def scheduled(worker: Worker) -> dict[str, Any]:
    queues = worker.spec.queues
    waiting = {d.queue: d.scheduled for d in worker.broker.depths() if d.queue in queues}
    return {"next_due": worker.broker.next_due(queues), "scheduled": waiting}


@register("registered", "Task names the node can run.", lines={"inspect registered": {}})
def registered(worker: Worker) -> list[str]:
    return sorted(REGISTRY)


@register(
    "revoked",
    "Revoked task ids: the broker's set, and those revoked by broadcast to the node.",
    lines={"inspect revoked": {}},
)
def revoked(worker: Worker) -> list[str]:
    return sorted(worker.revoked | worker.broker.revoked())


@register(
    "conf",
    "The node's effective settings, and where each task's limits come from.",
    lines={"inspect conf": {}},
)
def conf(worker: Worker) -> dict[str, Any]:
    return {
        **worker.spec.to_json(),
        "rate_limits": dict(worker.rate_limits.rates),
        "time_limits": {k: {"soft": s, "hard": h} for k, (s, h) in worker.time_limits.items()},
        "limits_from": {
            "rate_limits": {
                name: limit_source(worker, name, "rate") for name in worker.rate_limits.rates
            },
            "time_limits": {
                name: limit_source(worker, name, "time") for name in worker.time_limits
            },
        },
        "concurrency": worker.target_children,
    }


def limit_source(worker: Worker, name: str, kind: str) -> str:
    """ "fleetctl" (saved in the state_dir), "config" ([rate_limits]) or "task" (@task)."""
    saved = worker.runtime_limits.rates if kind == "rate" else worker.runtime_limits.times
    if name in saved:
        return "fleetctl"
    return "config" if kind == "rate" and name in worker.spec.rate_limits else "task"


def rate_problem(args: dict[str, Any]) -> str | None:
    if not args["task"]:  # kept across restarts, for a name no task has
        return "task must be a task name, not ''"
    if not utf8_text(args["task"]):  # a byte that was no UTF-8 on a command line
        return f"task must be UTF-8 text, not {args['task']!r:.80}"
    try:
        parse_rate(str(args["rate"]))
    except ValueError as exc:
        return str(exc)
    return None


@register(
    "rate_limit",
    "Limit a task name to N/s, N/m or N/h on the node, kept across reloads and restarts;"
    " 0 clears it (back to the config's or the task's own limit).",
    {"task": TASK, "rate": Arg((str, int, float), help="N/s, N/m or N/h; 0 clears it")},
    check=rate_problem,
)
def rate_limit(worker: Worker, task: str, rate: str | float) -> dict[str, Any]:
    saved = worker.runtime_limits
    if parse_rate(str(rate)) <= 0:
        saved.rates.pop(task, None)
        worker.rate_limits.set(task, worker.configured_rates.get(task, "0"))
        done = f"rate limit of {task} cleared: {worker.rate_limits.rates.get(task, 'none')}"
    else:
        saved.rates[task] = str(rate)
        worker.rate_limits.set(task, str(rate))
        done = f"rate limit of {task} set to {rate}"
    return kept(worker, done, task)


def time_limit_problem(args: dict[str, Any]) -> str | None:
    """Soft and hard (0 = none), soft below hard; or clear."""
    if not args["task"]:
        return "task must be a task name, not ''"
    if args.get("clear"):
        return None
    soft, hard = args.get("soft"), args.get("hard")
    if soft is None or hard is None:
        return "give soft and hard, or clear"
    if soft < 0 or hard < 0 or (soft and hard and soft >= hard):
        return "time limits must be >= 0, and soft below hard"
    return None


@register(
    "time_limit",
    "Soft and hard time limits (seconds) of a task name, for tasks that start from now on,"
    " kept across reloads and restarts; clear: back to the task's own.",
    {
        "task": TASK,
        "soft": Arg(NUM, OPTIONAL, "seconds; 0 = none"),
        "hard": Arg(NUM, OPTIONAL, "seconds; 0 = none"),
        "clear": Arg((bool,), OPTIONAL, "back to the task's own limits"),
    },
    check=time_limit_problem,
)
def time_limit(
    worker: Worker, task: str, soft: float = 0, hard: float = 0, clear: bool = False
) -> dict[str, Any]:
    saved = worker.runtime_limits
    if clear:
        saved.times.pop(task, None)
        worker.time_limits.pop(task, None)
        if task in worker.configured_times:
            worker.time_limits[task] = worker.configured_times[task]
        return kept(worker, f"time limits of {task} cleared", task)
    worker.time_limits[task] = saved.times[task] = (float(soft), float(hard))
    return kept(worker, f"time limits of {task} set to soft={soft} hard={hard}", task)


def kept(worker: Worker, done: str, task: str) -> dict[str, Any]:
    """The reply of a limit change: saved for the next start, or in force until then only.
    A name that no task of the node has is kept too (a reload may bring the task), but the
    reply says so: a mistyped name would otherwise look like a limit in force."""
    if task not in REGISTRY:
        done += f" (no task {task} on this node: it applies once a reload brings one)"
    problem = worker.runtime_limits.save()
    return {"ok": done} if problem is None else {"ok": f"{done}; {problem}"}


def revoke_problem(args: dict[str, Any]) -> str | None:
    ids = args["ids"]
    if not ids or not all(isinstance(i, str) and i for i in ids):
        return "ids must be a non-empty list of task ids"
    for task_id in ids:  # a byte that was no UTF-8 on a command line: no broker stores it
        if not utf8_text(task_id):
            return f"task ids must be UTF-8 text, not {task_id!r:.80}"
    if signal_number(args["signal"]) is None:
        return f"unknown signal {args['signal']!r:.80}"
    return None


@register(
    "revoke",
    "Revoke task ids, for good: they never start; with terminate, running ones get "
    "the signal (TERM unless given).",
    {
        "ids": Arg((list,), help="task ids"),
        "terminate": Arg((bool,), False, "signal the child running one"),
        "signal": Arg((str,), "TERM", "with --terminate (default: TERM)"),
    },
    check=revoke_problem,
    envelope=(),  # fleetctl: every node, as the broker's record of it holds for every node
)
def revoke(worker: Worker, ids: list[str], terminate: bool, signal: str) -> dict[str, Any]:
    signum = signal_number(signal)
    worker.revoked.update(ids)
    worker.revoke_waiting(set(ids))
    terminated = []
    if terminate and signum is not None:  # never None: revoke_problem checked it
        for child in list(worker.children.values()):
            running = child.running
            if running and running.delivery.id in ids and not running.settled:
                terminated.append(running.delivery.id)
                worker.terminate(child, signum)
            for task_id in set(ids) & child.aio.keys():  # cancelled, not signalled
                if not child.aio[task_id].settled:
                    terminated.append(task_id)
                    worker.terminate_async(child, child.aio[task_id])
    # In the broker too, so that it holds for every worker and across restarts (an
    # unreachable broker makes this raise: the reply is then that error). Every worker
    # of every host addressed writes it: the same ids, so no harm done.
    worker.broker.revoke(ids)
    return {"ok": f"revoked {len(set(ids))}", "terminated": terminated}


def signal_number(name: str) -> int | None:
    """`"TERM"`, `"sigkill"` or `"9"` -> the signal's number; None if there is no such signal."""
    if name.isdigit():  # "²" is a digit to Python, and 5,000 digits are too many for int()
        if not (name.isascii() and len(name) <= 3):
            return None
        return int(name) if int(name) in signal.valid_signals() else None
    name = name.upper()
    try:
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except KeyError:
        return None


@register(
    "pool_grow",
    "Add N children to the node's pool (as SIGTTIN does, one at a time); never above"
    " autoscale's MAX.",
    {"n": POOL_N},
    lines={"pool grow": {}},
)
def pool_grow(worker: Worker, n: int) -> dict[str, Any]:
    if not worker.spec.autoscale and worker.target_children + n > MAX_POOL:  # a typo
        return {"error": f"the pool can be at most {MAX_POOL}"}
    wanted, bound = moved(worker.target_children, n, *worker.pool_bounds())
    if wanted == worker.target_children:
        return pool_is(worker, bound, moved_at_all=False)
    size, limit = pool_room(worker, wanted)
    worker.target_children = max(worker.target_children, size)  # the worker's loop forks them
    worker.grown_by_hand_at = time.monotonic()  # autoscale shrinks it no sooner than it would
    if limit:
        message = f"pool is {worker.target_children}: {limit}"
        log.warning("%s", message, extra={"node": worker.node})
        return {"error": message}
    return pool_is(worker, bound)


def pool_room(worker: Worker, wanted: int) -> tuple[int, str | None]:
    """The pool size, up to `wanted`, that the worker's open-files limit lets it hold, and
    what stops it short of `wanted` (None if nothing does)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted, None
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # no descriptor left even to count them
        in_use = soft
    others = in_use - FDS_PER_CHILD * len(worker.children)
    room = max(0, (soft - others - FDS_SPARE) // FDS_PER_CHILD)
    if wanted <= room:
        return wanted, None
    return room, f"the open-files limit ({soft}) allows no more"


@register(
    "pool_shrink",
    "Retire N children of the node's pool, each once it is idle (as SIGTTOU"
    " does, one at a time); never below one, nor below autoscale's MIN.",
    {"n": POOL_N},
    lines={"pool shrink": {}},
)
def pool_shrink(worker: Worker, n: int) -> dict[str, Any]:
    wanted, bound = moved(worker.target_children, -n, *worker.pool_bounds())
    if wanted == worker.target_children:
        return pool_is(worker, bound, moved_at_all=False)
    worker.target_children = wanted
    return pool_is(worker, bound)  # the loop retires idle children


def pool_is(worker: Worker, bound: str | None, moved_at_all: bool = True) -> dict[str, Any]:
    """The reply of a pool change by hand: its size now, and the bound that stopped it if
    one did (an error if it stopped it before it began); logged, as autoscale's changes
    are (TTIN and TTOU have no other answer)."""
    size = f"pool is {worker.target_children}"
    reply = size if bound is None else f"{size}: {bound}"
    log.info(
        "%s: %s",
        "resized by hand" if moved_at_all else "not resized",
        reply,
        extra={"node": worker.node},
    )
    return {"ok" if moved_at_all else "error": reply}


@register(
    "events",
    "Turn task events and heartbeats on or off for the node.",
    {"enable": Arg((bool,))},
    lines={"events enable": {"enable": True}, "events disable": {"enable": False}},
)
def events(worker: Worker, enable: bool) -> dict[str, Any]:
    worker.events_enabled = enable
    return {"ok": "events " + ("enabled" if enable else "disabled")}

"""The built-in control commands that run in each worker and reply for its node."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from .control import REQUIRED, register
from .task import REGISTRY

if TYPE_CHECKING:
    from .process import Worker

NUM = (int, float)


@register("ping", "Check that the node answers.")
def ping(worker: Worker) -> dict[str, Any]:
    return {"ok": "pong"}


@register("stats", "Counters, pool and uptime of the node.")
def stats(worker: Worker) -> dict[str, Any]:
    return worker.stats()


@register("active", "Tasks running now, with their child pid and runtime.")
def active(worker: Worker) -> list[dict[str, Any]]:
    now = time.monotonic()
    return [
        {"id": c.running.delivery.id, "name": c.running.delivery.name, "pid": c.pid,
         "runtime": now - c.running.started, "deliveries": c.running.delivery.deliveries}
        for c in worker.children.values() if c.running
    ]


@register("reserved", "Tasks reserved by the node, not started yet.")
def reserved(worker: Worker) -> list[dict[str, Any]]:
    return [{"id": d.id, "name": d.name, "deliveries": d.deliveries} for d in worker.reserved]


@register("scheduled", "ETA tasks of the node's queues: when each is due.")
def scheduled(worker: Worker) -> dict[str, Any]:
    return {"next_due": worker.broker.next_due(worker.spec.queues)}


@register("registered", "Task names the node can run.")
def registered(worker: Worker) -> list[str]:
    return sorted(REGISTRY)


@register("revoked", "Revoked task ids the node knows.")
def revoked(worker: Worker) -> list[str]:
    return sorted(worker.revoked)


@register("conf", "The node's effective settings.")
def conf(worker: Worker) -> dict[str, Any]:
    return {**worker.spec.to_json(), "rate_limits": dict(worker.rate_limits.rates),
            "time_limits": {k: {"soft": s, "hard": h} for k, (s, h) in worker.time_limits.items()},
            "concurrency": worker.target_children}


@register("rate_limit", "Limit a task name to N/s, N/m or N/h on the node; 0 clears.",
          {"task": ((str,), REQUIRED), "rate": ((str, int, float), REQUIRED)})
def rate_limit(worker: Worker, task: str, rate: str | float) -> dict[str, Any]:
    try:
        worker.rate_limits.set(task, str(rate))
    except ValueError as exc:
        return {"error": str(exc)}
    return {"ok": f"rate limit of {task} set to {rate}"}


@register("time_limit", "Soft and hard time limits (seconds) for tasks of a name that start from now.",
          {"task": ((str,), REQUIRED), "soft": (NUM, 0), "hard": (NUM, 0)})
def time_limit(worker: Worker, task: str, soft: float, hard: float) -> dict[str, Any]:
    if soft < 0 or hard < 0 or (soft and hard and soft >= hard):
        return {"error": "time limits must be >= 0 and soft below hard"}
    worker.time_limits[task] = (float(soft), float(hard))
    return {"ok": f"time limits of {task} set to soft={soft} hard={hard}"}


@register("revoke", "Revoke task ids: they will not start; with terminate, running ones get a signal.",
          {"ids": ((list,), REQUIRED), "terminate": ((bool,), False), "signal": ((str,), "TERM")})
def revoke(worker: Worker, ids: list[str], terminate: bool, signal: str) -> dict[str, Any]:
    signum = signal_number(signal)
    if signum is None:
        return {"error": f"unknown signal {signal!r}"}
    wanted = {str(i) for i in ids}
    worker.revoked |= wanted
    terminated = []
    if terminate:
        for child in list(worker.children.values()):
            if child.running and child.running.delivery.id in wanted:
                worker.terminate(child, signum)
                terminated.append(child.running.delivery.id if child.running else None)
    return {"ok": f"revoked {len(wanted)}", "terminated": [t for t in terminated if t]}


def signal_number(name: str) -> int | None:
    name = name.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    return getattr(signal, name, None)


@register("pool_grow", "Add N children to the node's pool.", {"n": ((int,), 1)})
def pool_grow(worker: Worker, n: int) -> dict[str, Any]:
    if n < 1:
        return {"error": "n must be >= 1"}
    worker.target_children += n
    worker.manage_children()
    return {"ok": f"pool is {worker.target_children}"}


@register("pool_shrink", "Retire N idle children of the node's pool.", {"n": ((int,), 1)})
def pool_shrink(worker: Worker, n: int) -> dict[str, Any]:
    if n < 1:
        return {"error": "n must be >= 1"}
    worker.target_children = max(1, worker.target_children - n)
    worker.manage_children()
    return {"ok": f"pool is {worker.target_children}"}


@register("events", "Turn task events on or off for the node.", {"enable": ((bool,), REQUIRED)})
def events(worker: Worker, enable: bool) -> dict[str, Any]:
    worker.events_enabled = enable
    return {"ok": "events " + ("enabled" if enable else "disabled")}


@register("memory", "Resident memory of the worker and each child.")
def memory(worker: Worker) -> dict[str, Any]:
    import psutil

    out: dict[str, Any] = {"worker": psutil.Process(os.getpid()).memory_info().rss, "children": {}}
    for child in worker.children.values():
        with contextlib.suppress(psutil.Error):
            out["children"][str(child.pid)] = psutil.Process(child.pid).memory_info().rss
    return out

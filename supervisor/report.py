"""What the arbiter tells of its host: the status table (`fleetctl status`), the one line
it gives systemd, and the answers of /healthz and /readyz."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from .metrics import Probe
from .states import BACKOFF, FATAL, RUNNING
from .workers import WorkerProc, by_node

if TYPE_CHECKING:
    from .arbiter import Arbiter

HEALTHY_SILENCE = 5.0  # seconds a running worker may go unheard and still count as healthy


def host_status(arbiter: Arbiter) -> dict[str, Any]:
    return {
        "host": arbiter.config.node,
        "pid": os.getpid(),
        "generation": arbiter.generation,
        "workers": [node_status(procs) for procs in by_node(arbiter.workers).values()],
    }


def node_status(procs: list[WorkerProc]) -> dict[str, Any]:
    """A node as operators see it: the worker that serves it (its newest RUNNING one), else
    its newest; a newer generation that failed to start is a `reload_failed` note on it."""
    newest = procs[-1]  # generations are appended in order
    shown = next((w for w in reversed(procs) if w.state == RUNNING), newest)
    view: dict[str, Any] = {
        "node": shown.node,
        "pid": shown.pid,
        "state": shown.state.name,
        "generation": shown.generation,
        "uptime": time.monotonic() - shown.started_at if shown.pid else None,
        **{k: v for k, v in shown.stats.items() if k in ("reserved", "active", "children")},
    }
    if shown.state in (BACKOFF, FATAL):
        view["error"] = shown.failure
    if newest is not shown and newest.state == FATAL:
        view["reload_failed"] = f"generation {newest.generation} {newest.failure}"
    return view


def status_line(arbiter: Arbiter) -> str:
    running = sum(1 for w in arbiter.workers if w.state == RUNNING)
    live = [w.stats for w in arbiter.workers if w.state == RUNNING]
    children = sum(int(s.get("children", 0)) for s in live)
    done = arbiter.tasks_done + sum(
        int(s.get("succeeded", 0)) + int(s.get("failed", 0)) for s in live
    )
    line = f"{running} nodes running, {children} children, {done} tasks done"
    if arbiter.reload_failure and any(
        w.state == FATAL and w.generation == arbiter.generation for w in arbiter.workers
    ):
        line += f"; {arbiter.reload_failure}"
    return line


def health(arbiter: Arbiter, now: float) -> Probe:
    """/healthz: every configured worker runs and was heard from lately; else the first
    one that does not, and why."""
    for spec in arbiter.config.workers:
        serving = [w for w in arbiter.workers if w.spec.name == spec.name and w.state == RUNNING]
        if not serving:
            seen = [w.state.name for w in arbiter.workers if w.spec.name == spec.name]
            return Probe(False, f"{spec.node} is {seen[-1] if seen else 'not started'}")
        silent = min(now - w.heard_at for w in serving)
        if silent > HEALTHY_SILENCE:
            return Probe(False, f"{spec.node} silent for {silent:.0f}s")
    return Probe(True, f"{len(arbiter.config.workers)} workers running")


def readiness(arbiter: Arbiter) -> Probe:
    """/readyz: every configured worker has booted (once; a restart later is /healthz's)."""
    waiting = [s.node for s in arbiter.config.workers if s.name not in arbiter.booted]
    if waiting:
        return Probe(False, f"not booted yet: {', '.join(waiting)}")
    return Probe(True, "every worker has booted")

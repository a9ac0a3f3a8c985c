"""The arbiter's control commands: the host ones, its half of the worker ones, and the routing.

A request for a host command (`scope="host"`) is answered here at once; one for a worker
command goes to each addressed worker, after that command's `before_send` (the arbiter's
half), and its replies are gathered into one answer: when all came, when `limit` of them
came, or at the request's deadline, naming the nodes that did not reply. Host commands
share their code path with the signals: `shutdown` of a host is TERM, `reload` is HUP.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import worker.commands  # noqa: F401 - the built-in worker commands: to check their arguments
from worker.control import COMMANDS, Arg, CommandError, before_send, register

from .states import BACKOFF, FATAL, STOPPED, STOPPING

if TYPE_CHECKING:
    from .arbiter import Arbiter
    from .config import WorkerSpec
    from .control import Request
    from .workers import WorkerProc

log = logging.getLogger("fleetd.arbiter")

MAX_COMMAND_TIMEOUT = 60.0  # seconds a host holds a request at most, whatever it asks for


@dataclass
class PendingCommand:
    request: Request
    waiting: dict[str, str]  # message id sent to a worker -> node
    replies: dict[str, Any]
    deadline: float


class Router:
    """Runs each control request of one arbiter, and gathers its workers' replies."""

    def __init__(self, arbiter: Arbiter) -> None:
        self.arbiter = arbiter
        self.pending: dict[str, PendingCommand] = {}
        self.message_seq = 0

    def run(self, request: Request) -> None:
        """Answer the request, or send it on to its workers; a command that fails (an
        argument its checks let through, a bug) is an error reply, and the host goes on."""
        try:
            self.dispatch(request)
        except Exception as exc:
            self.arbiter.control.peer_log.log(
                logging.ERROR,
                "control request failed id=%s cmd=%s: %s: %s",
                request.id[:40],
                request.cmd[:40],
                type(exc).__name__,
                str(exc)[:200],
            )
            for mid, pending in list(self.pending.items()):
                if pending.request is request:  # sent to some of its workers: no reply later
                    del self.pending[mid]
            self.arbiter.control.reply_error(
                request,
                f"{request.cmd[:40]} failed on this host: {type(exc).__name__}: {str(exc)[:200]}",
            )

    def dispatch(self, request: Request) -> None:
        command = COMMANDS.get(request.cmd)
        try:
            if command is not None:
                args = command.validate(request.args)
            elif any(request.cmd in w.commands for w in self.arbiter.workers):
                args = request.args  # a custom command: its workers check the arguments
            else:
                raise CommandError(f"unknown command {request.cmd[:40]!r}")
        except CommandError as exc:
            self.arbiter.control.peer_log.log(
                logging.WARNING, "control request refused id=%s: %s", request.id[:40], exc
            )
            self.arbiter.control.reply_error(request, str(exc))
            return
        if command is not None and command.scope == "broker":
            self.arbiter.control.reply_error(
                request, f"{request.cmd} runs in fleetctl, not on a host"
            )
            return
        if command is not None and command.scope == "host":
            assert command.effect is not None
            self.arbiter.control.reply(request, command.effect(self.arbiter, request.dest, **args))
            return
        deadline = time.monotonic() + min(request.timeout, MAX_COMMAND_TIMEOUT)
        pending = PendingCommand(request, {}, {}, deadline)
        targets = self.arbiter.targets(request.dest)
        # A node that is down says so; not to a request for the first N replies (`--limit`),
        # which asks who answers: the word of one that cannot would end its wait.
        if request.limit is None:
            live = {w.node for w in targets}
            for w in self.arbiter.addressed(request.dest)[0]:
                if w.state in (FATAL, BACKOFF) and w.node not in live:
                    pending.replies[w.node] = {"error": f"not running ({w.state.name})"}
        for w in targets:
            if command is not None and command.before_send is not None:
                command.before_send(self.arbiter, w, **args)
            self.send(pending, w, args)
        if not pending.waiting:
            self.arbiter.control.reply(request, pending.replies)

    def send(self, pending: PendingCommand, w: WorkerProc, args: dict[str, Any]) -> None:
        self.message_seq += 1
        mid = str(self.message_seq)
        message = {"type": "cmd", "id": mid, "cmd": pending.request.cmd, "args": args}
        if self.arbiter.send(w, message):
            pending.waiting[mid] = w.node
            self.pending[mid] = pending
        else:
            pending.replies[w.node] = {"error": "the node does not read commands (hung or stopped)"}

    def on_reply(self, mid: str, node: str, reply: Any) -> None:
        """A worker's reply to the command sent to it as message `mid`."""
        pending = self.pending.pop(mid, None)
        if pending is None:
            return  # too late: its command was answered without it
        del pending.waiting[mid]
        pending.replies[node] = reply
        limit = pending.request.limit
        if limit is not None and len(pending.replies) >= limit:
            for other in pending.waiting:  # not needed: their replies will come too late
                del self.pending[other]
            pending.waiting.clear()
        if not pending.waiting:
            self.arbiter.control.reply(pending.request, pending.replies)

    def expire(self, now: float) -> None:
        """Answer commands whose deadline passed, naming the nodes that did not reply."""
        for mid, pending in list(self.pending.items()):
            if now >= pending.deadline:
                del self.pending[mid]
                node = pending.waiting.pop(mid)
                pending.replies[node] = {"error": "no reply before the deadline"}
                if not pending.waiting:
                    self.arbiter.control.reply(pending.request, pending.replies)

    def deadlines(self) -> list[float]:
        return [p.deadline for p in self.pending.values()]

    def answer_all(self) -> None:
        """Answer every command still waiting, now: the arbiter stops."""
        for pending in list(self.pending.values()):
            for node in pending.waiting.values():
                pending.replies[node] = {"error": "the host stopped before the node replied"}
            if pending.waiting:
                pending.waiting.clear()
                self.arbiter.control.reply(pending.request, pending.replies)
        self.pending.clear()


# --- the arbiter's half of worker commands --------------------------------------------------
@before_send("events")
def remember_events(arbiter: Arbiter, w: WorkerProc, enable: bool) -> None:
    """A node's events setting outlives its process: the next one (a restart, a reload)
    starts with it."""
    (arbiter.events_on.add if enable else arbiter.events_on.discard)(w.node)


# --- host commands: the code paths of the signals ------------------------------------------
@register("shutdown", "Warm-shut-down the addressed nodes (a whole host: as TERM).", scope="host")
def shutdown(arbiter: Arbiter, dest: list[str] | None) -> dict[str, Any]:
    chosen, whole = arbiter.addressed(dest)
    if whole:
        arbiter.handle_term()
    else:
        for w in chosen:
            arbiter.stop_worker(w)
    return {w.node: {"ok": "shutting down"} for w in chosen}


@register("reload", "Graceful reload of the host (as HUP): fresh code, new config.", scope="host")
def reload(arbiter: Arbiter, dest: list[str] | None) -> dict[str, Any]:
    chosen, whole = arbiter.addressed(dest)
    if not whole:
        return {
            w.node: {"error": f"a reload is for a whole host: --dest {arbiter.config.node}"}
            for w in chosen
        }
    refused = arbiter.reload()  # what HUP runs
    return {w.node: {"error": refused} if refused else {"ok": "reloading"} for w in chosen}


@register("status", "Hosts, nodes and their states.", scope="host")
def status(arbiter: Arbiter, dest: list[str] | None) -> dict[str, Any]:
    from .report import host_status  # the arbiter's side: fleetctl imports this table too

    # Those shut down on purpose too (STOPPED): their state is the answer here, where the
    # other commands leave them out.
    chosen = {w.node for w in arbiter.addressed(dest, stopped=True)[0]}
    return {w["node"]: w for w in host_status(arbiter)["workers"] if w["node"] in chosen}


@register(
    "start",
    "Start FATAL or shut-down nodes again, without a reload.",
    {"nodes": Arg((list,), help="nodes (name@host) or hosts")},
    scope="host",
    envelope=(),
)
def start(arbiter: Arbiter, dest: list[str] | None, nodes: list[str]) -> dict[str, Any]:
    return start_nodes(arbiter, nodes)


def start_nodes(arbiter: Arbiter, dest: list[str] | None) -> dict[str, Any]:
    """`fleetctl start`: start each addressed node of this host that is FATAL or STOPPED
    again, from the running config, and say per node what became of it. A node of this
    host that the config does not name is an error; other hosts answer for theirs."""
    whole = dest is None or arbiter.config.node in dest
    from .workers import by_node  # the arbiter's side: fleetctl imports this table too

    nodes = by_node(arbiter.workers)
    replies = {
        spec.node: start_node(arbiter, spec, nodes.get(spec.node, []))
        for spec in arbiter.config.workers
        if whole or (dest and spec.node in dest)
    }
    for node in dest or ():
        if node.endswith(f"@{arbiter.config.node}") and node not in replies:
            replies[node] = {"error": f"no such node: {arbiter.config.path} has no {node}"}
    return replies


def start_node(arbiter: Arbiter, spec: WorkerSpec, procs: list[WorkerProc]) -> dict[str, Any]:
    """Start a node's newest worker again if it is FATAL or STOPPED; the node's reply."""
    if arbiter.halting:
        return {"error": "the host is shutting down"}
    w = procs[-1] if procs else None  # the newest generation
    if w is not None and w.state == STOPPING:
        return {"error": "it is STOPPING: start it once it is STOPPED"}
    if w is not None and w.state not in (FATAL, STOPPED):
        return {"ok": f"already {w.state.name}"}
    was = w.state.name if w is not None else STOPPED.name
    if w is not None:
        w.fast_deaths = 0  # an operator's start: a fresh count of failed starts
    arbiter.spawn_worker(spec, arbiter.generation, "fleetctl start", replacing=w)
    return {"ok": f"starting (was {was})"}

"""The channel to the arbiter: messages out (through an outbox: the worker never waits
on its arbiter), commands in, events, stats and status. The arbiter half of `Worker`."""

# The methods below are checked as `Worker`'s (`self: Worker`, the class they are mixed into);
# mypy's rule that a self type be a supertype of its class does not fit a mixin.
# mypy: disable-error-code="misc"

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .control import COMMANDS, CommandError
from .protocol import Outbox, ProtocolError, encode

if TYPE_CHECKING:
    from .process import Worker

from .pool import POLL_IN, ChildProc, rss

log = logging.getLogger("fleetd.worker")

STATS_EVERY = 1.0  # seconds between stats reports to the arbiter
# Seconds a custom command may run: the worker's loop waits for it (no task is handed out,
# no time limit enforced meanwhile), and one still running past this is interrupted. One
# that hung would otherwise leave the worker silent until the arbiter killed it, and the
# tasks its children ran with it, to run again.
COMMAND_TIME_LIMIT = 10.0
# Bytes of JSON a custom command may reply (as a control request may hold): a reply of 50 MiB
# (an object returned by mistake) went through the arbiter's memory, past fleetctl's timeout.
MAX_CUSTOM_REPLY = 1 << 20
# Bytes waiting for an arbiter that reads nothing (stopped, hung) past which events and
# stats are dropped, counted; ready and replies never are.
ARBITER_BACKLOG_MAX = 4 << 20
ARBITER_DRAIN_WAIT = 1.0  # seconds an exiting worker gives its arbiter to read its last words


class ArbiterChannel:
    """What the worker says to its arbiter, and what it does with what the arbiter says."""

    # State of the worker's that this half writes (declared where it is written).
    arbiter_fd: int | None
    arbiter_out: Outbox | None
    events: list[dict[str, Any]]
    arbiter_batched: bool

    def report(self: Worker, now: float) -> None:
        """Once a second: counters (and queue depths, with metrics on) to the arbiter."""
        self.next_report = now + STATS_EVERY
        message: dict[str, Any] = {"type": "stats", **self.stats_counts()}
        if self.metrics_enabled and self.broker_available():
            with self.broker_call("read queue depths"):
                message["depths"] = {
                    d.queue: d.ready for d in self.broker.depths() if d.queue in self.spec.queues
                }
        if self.events_enabled:
            self.emit("worker-heartbeat", **self.stats_counts())
        self.send(message, droppable=True)

    def send(
        self: Worker, message: dict[str, Any], droppable: bool = False, batch: bool = False
    ) -> None:
        """Write a frame to the arbiter without waiting for it: what the socket does not take
        now goes when it has room. While the arbiter reads nothing, a `droppable` message
        (stats, events) is dropped once ARBITER_BACKLOG_MAX bytes wait. A `batch` one waits
        for the end of the loop's turn (announce), to go with the turn's others in one write:
        each write wakes the arbiter, and on a busy host that wake-up costs us the CPU."""
        out = self.arbiter_out
        if out is None:
            return
        if droppable and out.size > ARBITER_BACKLOG_MAX:
            self.drop(message)
            return
        try:
            frame = encode(message)
        except (ProtocolError, TypeError, ValueError) as exc:
            # Over MAX_FRAME_SIZE (events naming thousands of ids a producer chose, a MiB
            # each), or no JSON: that message is lost, never the worker and its tasks.
            log.error(
                "a %s message to the arbiter cannot be sent, dropped: %s",
                message.get("type"),
                exc,
                extra={"node": self.node},
            )
            self.counts["events_dropped"] += len(message.get("events", ()))
            return
        try:
            if batch:
                out.add(frame)
                self.arbiter_batched = True
            else:
                out.send(frame)
        except OSError:
            self.lose_arbiter()
            return
        if out:
            self.poller.modify(out.fd, POLL_IN | select.POLLOUT)

    def announce(self: Worker) -> None:
        """Write what waits for the arbiter: the children forked and reaped in this turn
        among it. Every child forked so far is then known to the arbiter, which ends its
        group if we are killed (dispatch calls this before a new child's first task)."""
        self.arbiter_batched = False
        if self.arbiter_out:
            self.flush_arbiter()
        for child in self.children.values():
            child.announced = True

    def drop(self: Worker, message: dict[str, Any]) -> None:
        if not self.arbiter_stalled:
            self.arbiter_stalled = True
            log.warning(
                "the arbiter reads nothing: dropping events and stats until it does",
                extra={"node": self.node},
            )
        self.counts["events_dropped"] += len(message.get("events", ()))

    def talk_to_arbiter(self: Worker, events: int) -> None:
        if events & select.POLLOUT:
            self.flush_arbiter()
        if events & POLL_IN and self.arbiter_fd is not None:
            self.read_arbiter()

    def flush_arbiter(self: Worker) -> None:
        """The socket has room: write what waits for the arbiter."""
        out = self.arbiter_out
        assert out is not None
        try:
            out.flush()
        except OSError:
            self.lose_arbiter()
            return
        if out:
            return
        self.poller.modify(out.fd, POLL_IN)
        if self.arbiter_stalled:
            self.arbiter_stalled = False
            log.warning(
                "the arbiter reads again; %d events dropped in all",
                self.counts["events_dropped"],
                extra={"node": self.node},
            )

    def drain_arbiter(self: Worker, wait: float) -> None:
        """Give the arbiter up to `wait` seconds to read what still waits for it."""
        out = self.arbiter_out
        if not out:
            return
        writable = select.poll()
        writable.register(out.fd, select.POLLOUT)
        give_up = time.monotonic() + wait
        while out and time.monotonic() < give_up:
            writable.poll(max(0.0, give_up - time.monotonic()) * 1000)
            try:
                out.flush()
            except OSError:
                return

    def read_arbiter(self: Worker) -> None:
        assert self.arbiter_fd is not None
        try:
            frames = self.arbiter_reader.read_frames(self.arbiter_fd)
        except (ProtocolError, OSError):
            frames = None
        if frames is None:
            self.lose_arbiter()
            return
        for message in frames:
            self.handle_message(message)
            # A custom command may take seconds (COMMAND_TIME_LIMIT), and several may come
            # in one read: leases and the worker's reports must not wait for them all (the
            # lease ran out and another worker started the task again).
            self.keep_up(time.monotonic())

    def lose_arbiter(self: Worker) -> None:
        """The channel broke or ended: the arbiter is gone, shut down warm (as on TERM)."""
        if self.arbiter_fd is None:
            return
        self.poller.unregister(self.arbiter_fd)
        with contextlib.suppress(OSError):
            os.close(self.arbiter_fd)
        self.arbiter_fd = self.arbiter_out = None
        self.begin_shutdown("warm")

    def handle_message(self: Worker, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "recover":
            self.dead_owners.append(str(message.get("owner")))
            self.recover_dead_owners()
        elif kind == "cmd":
            reply = self.run_command(message)
            try:
                size = len(encode(reply, strict=True))
            except (TypeError, ValueError, ProtocolError, RecursionError) as exc:
                reply = {"error": f"the reply of {message.get('cmd')} is not JSON: {exc}"}
            else:
                command = COMMANDS.get(str(message.get("cmd")))
                if size > MAX_CUSTOM_REPLY and command is not None and command.custom:
                    reply = {
                        "error": f"the reply of {command.name} is {size} bytes, over the"
                        f" {MAX_CUSTOM_REPLY >> 20} MiB a custom command's reply may hold"
                    }
            self.send({"type": "reply", "id": message.get("id"), "reply": reply})

    def run_command(self: Worker, message: dict[str, Any]) -> Any:
        command = COMMANDS.get(str(message.get("cmd")))
        if command is None or command.scope != "worker" or command.effect is None:
            return {"error": f"unknown command {message.get('cmd')!r}"}
        try:
            args = command.validate(message.get("args", {}))
            # Only a task module's is bounded: ours are quick, and one cut short could leave
            # a child forked but not recorded.
            with time_limited(COMMAND_TIME_LIMIT) if command.custom else contextlib.nullcontext():
                return command.effect(self, **args)
        except CommandError as exc:
            log.warning("command refused: %s", exc, extra={"node": self.node})
            return {"error": str(exc)}
        # sys.exit() or KeyboardInterrupt too: a custom command must not take the worker
        # down, nor with it the tasks its children run.
        except BaseException as exc:  # noqa: BLE001
            log.exception("command %s failed", command.name, extra={"node": self.node})
            return {"error": f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__}
        finally:
            if os.getpid() != self.pid:
                # A copy the command forked, back from it: two workers would share our
                # arbiter channel, broker links and pool (as a task module's, import_tasks).
                os._exit(0)
            if command.custom:  # code not ours: it may have taken our signals
                self.reclaim_signals(f"command {command.name}")

    def send_events(self: Worker) -> None:
        if self.events:
            events, self.events = self.events, []
            self.send(
                {"type": "events", "events": events, "publish": self.events_enabled},
                droppable=True,
            )

    def stats_counts(self: Worker) -> dict[str, Any]:
        waiting = sum(max(0, len(c.tasks) - 1) for c in self.children.values())  # in a pipe
        return {
            "reserved": len(self.reserved) + waiting,
            "active": sum(len(c.in_flight) for c in self.children.values()),
            "children": len(self.children),
            "pool_size": self.target_children,  # what the pool holds, or is on its way to
            # A fixed pool moves only by `pool grow|shrink`: its bounds are its size.
            "pool_min": self.spec.autoscale[0] if self.spec.autoscale else self.target_children,
            "pool_max": self.spec.autoscale[1] if self.spec.autoscale else self.target_children,
            **self.counts,
        }

    def stats(self: Worker) -> dict[str, Any]:
        now = time.monotonic()
        return {
            **self.stats_counts(),  # first: its "children" count gives way to the list below
            "node": self.node,
            "pid": os.getpid(),
            "uptime": time.time() - self.started_at,
            "queues": self.spec.queues,
            "concurrency": self.target_children,
            "rss": rss(os.getpid()),
            "children": [
                {
                    "pid": c.pid,
                    "state": child_state(c),
                    "task": c.running.delivery.id if c.running else None,
                    "task_name": c.running.delivery.name if c.running else None,
                    "runtime": now - c.running.started if c.running else None,
                    "async_tasks": len(c.aio),
                    "tasks_done": c.tasks_done,
                    "rss": rss(c.pid),
                    "uptime": time.time() - c.born,
                }
                for c in self.children.values()
            ],
        }


def child_state(child: ChildProc) -> str:
    if child.running or child.aio:
        return "busy"
    if child.retiring:
        return "retiring"
    return "spare" if child.spare else "idle"


class CommandTimeLimit(Exception):
    """A command ran past COMMAND_TIME_LIMIT."""


@contextlib.contextmanager
def time_limited(seconds: float) -> Iterator[None]:
    """Raise CommandTimeLimit in the code run inside if it runs past `seconds` (SIGALRM,
    which the worker's loop otherwise ignores, to a raising handler meanwhile)."""

    def expire(signum: int, frame: Any) -> None:
        raise CommandTimeLimit(f"ran past {seconds:g}s, holding its worker's loop: interrupted")

    loop_handler = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, loop_handler or signal.SIG_IGN)

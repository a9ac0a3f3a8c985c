"""The worker process: reserves tasks, feeds them to its forked children, acks the outcomes.

One thread, one poll loop (`Worker.run`), reading top to bottom as the lifecycle:
signals, arbiter messages, children's outcomes and deaths, time limits, then
reserve, dispatch and flush to the broker in batches. No threads and no ZeroMQ
here: the worker forks its children.
"""

from __future__ import annotations

import contextlib

# The IDNA codec (with unicodedata and stringprep) is imported by a process's first
# connection to a host by name, which most tasks make: imported here, before the fork,
# the children share it instead of each importing its own copy.
import encodings.idna  # noqa: F401
import gc
import importlib
import json
import logging
import os
import random
import select
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .brokers import open_broker
from .brokers.base import BAD_MESSAGE, FAILURE, REVOKED, SUCCESS, Delivery, Outcome, Retry
from .child import (
    CLEAN_STOP,
    MESSAGE_LIMIT,
    TYPE_NAME_LIMIT,
    child_main,
    outcome_of,
    printable,
    set_parent_death_signal,
)
from .commands import pool_grow, pool_room, pool_shrink
from .control import COMMANDS, CommandError, worker_command_names
from .limits import RuntimeLimits
from .protocol import FrameReader, Outbox, ProtocolError, encode, oversize
from .ratelimit import RateLimits
from .scheduler import worker_scheduler
from .spec import WorkerSpec
from .task import REGISTRY

log = logging.getLogger("fleetd.worker")
child_log = logging.getLogger("fleetd.child")

POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR
EXIT_OK = 0
EXIT_IMPORT_ERROR = 4
STATS_EVERY = 1.0  # seconds between stats reports to the arbiter
STARTED_FLUSH_DELAY = 0.02  # seconds a STARTED mark may wait for the next transaction
TERMINATE_GRACE = 1.0  # seconds a terminated task's child gets before SIGKILL
BROKER_BACKOFF_MIN = 0.2  # seconds before trying an unreachable broker again; doubles each time
BROKER_BACKOFF_MAX = 5.0
SPAWN_BACKOFF_MIN = 0.5  # seconds before forking again after a failed fork; doubles each time
SPAWN_BACKOFF_MAX = 5.0
SHUTDOWN_FLUSH_WAIT = 10.0  # seconds an exiting worker keeps trying to ack what finished
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
RATE_LIMITED_MAX = 100  # tasks held waiting for a rate-limit token on top of the prefetch
# Bytes waiting for an arbiter that reads nothing (stopped, hung) past which events and
# stats are dropped, counted; ready and replies never are.
ARBITER_BACKLOG_MAX = 4 << 20
ARBITER_DRAIN_WAIT = 1.0  # seconds an exiting worker gives its arbiter to read its last words


@dataclass
class Running:
    """A task handed to a child: running if it is the child's first, else waiting in its pipe."""

    delivery: Delivery
    started: float = 0.0  # monotonic; set when it becomes the child's first task
    soft_deadline: float | None = None
    hard_deadline: float | None = None
    soft_sent: bool = False
    settled: bool = False  # its outcome is written already (time limit, revoked with terminate)
    terminated_at: float | None = None  # revoked with terminate: killed after a grace period


@dataclass
class ChildProc:
    """A child and its pipes. The worker never waits on a child: its task and revoke pipes
    are non-blocking, and what they do not take now waits in their outbox."""

    pid: int
    tasks_out: Outbox  # task frames, to the child's task pipe (fd -1 once closed)
    result_fd: int  # worker reads outcomes here
    revokes_out: Outbox  # ids revoked while their task waits in the task pipe, one a line
    reader: FrameReader = field(default_factory=FrameReader)
    tasks: deque[Running] = field(default_factory=deque)  # in the order the child runs them
    tasks_done: int = 0
    recycle_after: int = 0  # 0 = never
    retiring: bool = False
    said_bye: bool = False  # it wrote BYE: it stops cleanly, between tasks
    born: float = field(default_factory=time.time)

    @property
    def running(self) -> Running | None:
        """The task the child runs now (the first of those handed to it), if any."""
        return self.tasks[0] if self.tasks else None


class Worker:
    def __init__(self, spec: WorkerSpec, arbiter_fd: int | None) -> None:
        self.spec = spec
        self.node = spec.node
        self.arbiter_fd = arbiter_fd
        self.arbiter_out = None if arbiter_fd is None else Outbox(arbiter_fd)
        self.arbiter_reader = FrameReader()
        self.arbiter_stalled = False  # it read nothing for a while: events are dropped
        self.children: dict[int, ChildProc] = {}  # by result_fd
        self.writing: dict[int, ChildProc] = {}  # children's pipes polled for room, by fd
        self.reserved: deque[Delivery] = deque()
        self.outcomes: list[Outcome] = []
        self.retries: list[Retry] = []
        self.started_ids: list[str] = []
        self.revoked: set[str] = set()
        self.rate_limits = RateLimits(spec.rate_limits)
        self.time_limits: dict[str, tuple[float, float]] = {}  # name -> (soft, hard)
        self.target_children = spec.concurrency
        self.signals: deque[int] = deque()
        self.shutdown: str | None = None  # None, "warm" or "cold"
        self.shutdown_deadline: float | None = None
        self.events_enabled = os.environ.get("FLEETD_EVENTS") == "1"  # the arbiter remembers
        self.events: list[dict[str, Any]] = []
        self.counts = {
            "succeeded": 0,
            "failed": 0,
            "retried": 0,
            "revoked": 0,
            "redelivered": 0,
            "dead_lettered": 0,
            "recycled": 0,
            "time_limit_kills": 0,
            "events_dropped": 0,  # the arbiter read nothing for a while: see send()
        }
        self.started_at = time.time()
        self.pid = os.getpid()
        self.owner = ""
        self.poller = select.poll()
        self.next_renew = 0.0
        self.next_report = 0.0
        self.queue_dry = True  # the last reserve got less than it asked for: look at ETAs
        self.started_flush_at = 0.0  # when started-marks go out if no turn took them along
        self.metrics_enabled = os.environ.get("FLEETD_METRICS") == "1"
        self.rate_wait_until = 0.0
        self.rate_limited = 0  # reserved tasks that wait for a rate-limit token
        self.broker_backoff = 0.0  # > 0 while the broker is unreachable: seconds between tries
        self.broker_retry_at = 0.0  # monotonic: no broker call before this
        self.dead_owners: list[str] = []  # dead consumers whose tasks are still to be given back
        self.spawn_backoff = 0.0  # > 0 while forks fail: seconds between tries
        self.spawn_retry_at = 0.0  # monotonic: no fork before this

    # --- lifecycle ---------------------------------------------------------------
    def run(self) -> int:
        self.setup_signals()
        self.import_tasks()
        self.broker = open_broker(
            self.spec.broker,
            durability=self.spec.durability,
            result_ttl=self.spec.result_ttl,
            fail_fast=True,
        )
        # Who holds our tasks in the broker: pid and start time, so a reused pid is not us.
        self.owner = f"{self.node}:{os.getpid()}:{int(time.time() * 1000)}"
        with self.broker_call("read revokes"):
            self.revoked = self.broker.revoked()
            self.broker.recover_expired(self.spec.queues)
            # Where each task goes, for clients that submit by name without its code.
            self.broker.set_routes({name: task.queue for name, task in REGISTRY.items()})
        self.scheduler = worker_scheduler(self.broker, self.spec, self.owner, self.emit)
        self.wakeup = self.broker.wakeup(self.spec.queues)
        self.poller.register(self.wakeup.fileno(), select.POLLIN)
        if self.arbiter_fd is not None:
            os.set_blocking(self.arbiter_fd, False)
            self.poller.register(self.arbiter_fd, POLL_IN)
        self.end_polite_boot()
        size, limit = pool_room(self, self.target_children)
        if limit:
            log.warning(
                "pool is %d, not %d: %s",
                size,
                self.target_children,
                limit,
                extra={"node": self.node},
            )
            self.target_children = max(1, size)
        self.fill_pool()
        self.send(
            {
                "type": "ready",
                "owner": self.owner,
                "pid": os.getpid(),
                "commands": worker_command_names(),
            }
        )
        self.emit("worker-online")
        log.info(
            "consuming %s with %d children",
            ",".join(self.spec.queues),
            len(self.children),
            extra={"node": self.node},
        )
        while not self.finished():
            self.step(self.poll_timeout())
        self.close()
        return EXIT_OK

    def step(self, timeout: float) -> None:
        """One turn of the loop: wait, take in what happened, act on it, flush."""
        self.wakeup.arm()
        for fd, events in self.poller.poll(timeout * 1000):
            if fd == self.signal_fd:
                self.handle_signals()
            elif fd == self.wakeup.fileno():
                self.wakeup.clear()
            elif fd == self.arbiter_fd:
                self.talk_to_arbiter(events)
            elif fd == self.output_fd:
                self.log_output()
            elif fd in self.children:
                self.read_child(self.children[fd])
            elif fd in self.writing:
                self.feed_child(self.writing[fd])
        if self.signals:  # a signal that came in while we were busy
            self.handle_signals()
        now = time.monotonic()
        self.enforce_time_limits(now)
        if self.shutdown is None:
            self.manage_children()
            self.reserve_more()
            self.dispatch(now)
        else:
            self.continue_shutdown(now)
        if self.outcomes or self.retries or (self.started_ids and now >= self.started_flush_at):
            self.flush()
        elif self.started_ids and not self.started_flush_at:
            self.started_flush_at = now + STARTED_FLUSH_DELAY
        self.send_events()
        if self.shutdown is None and self.broker_available():
            with self.broker_call("tidy up and run the schedules"):
                if self.held():  # a fleet that is never idle must still drop old results
                    self.broker.expire()
                else:
                    self.broker.maintain()
                self.scheduler.step(time.time())  # cheap unless this worker leads
        if now >= self.next_renew:
            self.renew(now)
        if now >= self.next_report:
            self.report(now)

    def finished(self) -> bool:
        return self.shutdown is not None and not self.children

    def poll_timeout(self) -> float:
        if self.shutdown is None and self.has_work_to_dispatch():
            return 0.0
        now = time.monotonic()
        deadlines = [self.next_renew, self.next_report]
        if self.shutdown is None and self.broker_available():  # when step() runs the schedules
            deadlines.append(now + self.scheduler.timeout(time.time()))
        if self.started_flush_at:
            deadlines.append(self.started_flush_at)
        for child in self.children.values():
            if child.running:
                if child.running.soft_deadline and not child.running.soft_sent:
                    deadlines.append(child.running.soft_deadline)
                if child.running.hard_deadline:
                    deadlines.append(child.running.hard_deadline)
                if child.running.terminated_at is not None:
                    deadlines.append(child.running.terminated_at + TERMINATE_GRACE)
        if self.reserved and self.rate_wait_until:
            deadlines.append(self.rate_wait_until)
        if self.shutdown_deadline:
            deadlines.append(self.shutdown_deadline)
        if self.shutdown is None and self.queue_dry and self.broker_available():
            with self.broker_call("read ETAs"):
                due = self.broker.next_due(self.spec.queues)
                if due is not None:
                    deadlines.append(now + max(0.0, due - time.time()))
        return max(0.0, min(min(deadlines) - now, 1.0))

    def has_work_to_dispatch(self) -> bool:
        return (
            bool(self.reserved) and self.child_with_room() is not None and not self.rate_wait_until
        )

    def close(self) -> None:
        give_up = time.monotonic() + SHUTDOWN_FLUSH_WAIT
        self.flush()
        while self.unflushed() and time.monotonic() < give_up:
            time.sleep(max(0.0, min(self.broker_retry_at, give_up) - time.monotonic()))
            self.flush()
        if self.unflushed():
            log.warning(
                "broker unreachable: %d finished tasks not acked, they will run again",
                len(self.outcomes) + len(self.retries),
                extra={"node": self.node},
            )
        self.emit("worker-offline")
        self.send_events()
        self.drain_arbiter(ARBITER_DRAIN_WAIT)
        self.wakeup.close()
        self.broker.close()
        log.info("stopped", extra={"node": self.node})

    # --- setup -------------------------------------------------------------------
    def end_polite_boot(self) -> None:
        """A reload's worker boots at idle CPU priority (the arbiter set it), so the generation
        still serving keeps the CPU; back to the fleet's policy before the children fork."""
        policy = os.environ.get("FLEETD_SCHED_POLICY")
        if policy is None:
            return
        try:
            os.sched_setscheduler(0, int(policy), os.sched_param(0))
        except (OSError, ValueError) as exc:
            log.warning("still at idle CPU priority after booting: %s", exc)

    def setup_signals(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.signal_fd = read_fd
        self.poller.register(read_fd, select.POLLIN)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in (
            signal.SIGTERM,
            signal.SIGINT,
            signal.SIGQUIT,
            signal.SIGTTIN,
            signal.SIGTTOU,
            signal.SIGUSR1,
            signal.SIGHUP,
            signal.SIGCHLD,
        ):
            signal.signal(sig, self.on_signal)
        set_parent_death_signal(signal.SIGTERM)  # the arbiter vanished: warm shutdown
        # The children's stdout and stderr: logged line by line, marked with our node.
        self.output_fd, self.output_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.output_fd, False)
        self.output_tail = b""
        self.poller.register(self.output_fd, select.POLLIN)
        if os.environ.get("FLEETD_ARBITER_PID") and os.getppid() != int(
            os.environ["FLEETD_ARBITER_PID"]
        ):
            self.signals.append(signal.SIGTERM)

    def on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)  # only enqueue: the loop acts on it

    def import_tasks(self) -> None:
        for path in reversed(self.spec.pythonpath):
            if path not in sys.path:
                sys.path.insert(0, path)
        for module in self.spec.imports:
            importlib.import_module(module)
        for name, task in REGISTRY.items():
            if task.time_limit or task.soft_time_limit:
                self.time_limits[name] = (task.soft_time_limit or 0, task.time_limit or 0)
            if task.rate_limit and name not in self.spec.rate_limits:
                self.rate_limits.set(name, task.rate_limit)
        # What the config and the decorators say; fleetctl's saved limits go over them.
        self.configured_rates = dict(self.rate_limits.rates)
        self.configured_times = dict(self.time_limits)
        self.runtime_limits = RuntimeLimits.load(self.spec.state_dir, self.node)
        for name, rate in self.runtime_limits.rates.items():
            self.rate_limits.set(name, rate)
        self.time_limits.update(self.runtime_limits.times)

    # --- signals -----------------------------------------------------------------
    def handle_signals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.signal_fd, 512):
                pass
        while self.signals:
            signum = self.signals.popleft()
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.begin_shutdown("warm")
            elif signum == signal.SIGQUIT:
                self.begin_shutdown("cold")
            elif signum == signal.SIGTTIN:
                pool_grow(self, 1)
            elif signum == signal.SIGTTOU:
                pool_shrink(self, 1)
            elif signum == signal.SIGUSR1:
                log.info("status %s", json.dumps(self.stats()), extra={"node": self.node})
            elif signum == signal.SIGCHLD:
                self.reap_children()

    # --- children ----------------------------------------------------------------
    def fill_pool(self) -> None:
        """Fork children up to the target. A pipe or fork that fails (EMFILE, EAGAIN, ENOMEM)
        is logged and tried again after a backoff, never the worker's death."""
        while self.live_children() < self.target_children:
            if time.monotonic() < self.spawn_retry_at:
                return
            try:
                self.spawn_child()
            except OSError as exc:
                level = logging.DEBUG if self.spawn_backoff else logging.WARNING
                self.spawn_backoff = min(
                    SPAWN_BACKOFF_MAX, max(SPAWN_BACKOFF_MIN, 2 * self.spawn_backoff)
                )
                self.spawn_retry_at = time.monotonic() + self.spawn_backoff
                log.log(
                    level,
                    "cannot fork a child (%s): pool is %d of %d; trying again in %.1fs",
                    exc,
                    self.live_children(),
                    self.target_children,
                    self.spawn_backoff,
                    extra={"node": self.node},
                )
                return
            if self.spawn_backoff:
                self.spawn_backoff = 0.0
                log.info("forking children again", extra={"node": self.node})

    def spawn_child(self) -> ChildProc:
        """Fork a pool child; OSError, with nothing left open, if a pipe or the fork fails."""
        pipes = open_pipes(3)
        task_r, task_w, result_r, result_w, revoke_r, revoke_w = pipes
        keep_closed = [task_w, result_r, revoke_w, self.signal_fd, self.wakeup.fileno()]
        if self.arbiter_fd is not None:
            keep_closed.append(self.arbiter_fd)
        for other in self.children.values():
            keep_closed += [other.tasks_out.fd, other.result_fd, other.revokes_out.fd]
        gc.freeze()  # a child's collector then leaves the inherited objects (and their pages) alone
        try:
            pid = os.fork()
        except OSError:
            close_all(pipes)
            raise
        if pid == 0:
            signal.set_wakeup_fd(-1)
            os.dup2(self.output_w, 1)
            os.dup2(self.output_w, 2)
            keep_closed += [self.output_fd, self.output_w]
            for fd in keep_closed:
                with contextlib.suppress(OSError):
                    os.close(fd)
            os.set_blocking(revoke_r, False)
            child_main(task_r, result_w, revoke_r, self.pid)
        os.close(task_r)
        os.close(result_w)
        os.close(revoke_r)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        # Before any task reaches the child: if we are killed, the arbiter ends its group.
        self.send({"type": "child", "pid": pid})
        for fd in (task_w, result_r, revoke_w):
            os.set_blocking(fd, False)
        child = ChildProc(pid, Outbox(task_w), result_r, Outbox(revoke_w))
        if self.spec.max_tasks_per_child:
            jitter = random.randint(0, max(0, self.spec.max_tasks_per_child // 10))
            child.recycle_after = self.spec.max_tasks_per_child + jitter
        self.children[result_r] = child
        self.poller.register(result_r, POLL_IN)
        return child

    def log_output(self) -> None:
        """Log what the children printed, a line at a time."""
        with contextlib.suppress(BlockingIOError):
            data = self.output_tail + os.read(self.output_fd, 65536)
            *lines, self.output_tail = data.split(b"\n")
            if len(self.output_tail) > 65536:
                lines.append(self.output_tail)
                self.output_tail = b""
            for line in lines:
                child_log.info("%s", line.decode(errors="replace"))

    def drain_child(self, child: ChildProc, status: int) -> None:
        """Take in every outcome a (dead) child wrote before it went."""
        while child.result_fd in self.children:
            try:
                data = os.read(child.result_fd, 65536)
            except BlockingIOError:
                return
            if not data:
                self.child_gone(child, status)
                return
            for reply in child.reader.feed(data):
                self.task_done(child, reply)

    def read_child(self, child: ChildProc) -> None:
        try:
            frames = child.reader.read_frames(child.result_fd)
        except ProtocolError as exc:
            log.error(
                "child %d sent garbage (%s); killing it", child.pid, exc, extra={"node": self.node}
            )
            frames = None
            self.kill_group(child.pid)
        if frames is None:
            self.child_gone(child)
            return
        for reply in frames:
            self.task_done(child, reply)

    def task_done(self, child: ChildProc, reply: Any) -> None:
        if not isinstance(reply, dict):  # a task can write to its child's pipe: trust nothing
            reply = {}
        if reply.get("bye"):  # not an outcome: the child is leaving between tasks
            child.said_bye = True
            return
        if not child.tasks:
            return
        running = child.tasks.popleft()
        child.tasks_done += 1
        if child.tasks:  # the next one in its pipe starts now
            self.begin(child.tasks[0], time.monotonic())
        if reply.get("exit"):
            child.retiring = True  # it got a TERM: it leaves after this outcome and is replaced
        if running.settled:
            if running.terminated_at is not None:
                self.retire_child(child)
            return
        self.settle(running.delivery, reply)
        if self.should_recycle(child):
            self.retire_child(child)

    def settle(self, delivery: Delivery, reply: dict[str, Any]) -> None:
        """Take in the outcome a child reported for its task."""
        ended = outcome_of(delivery, reply, self.node)
        if isinstance(ended, Retry):
            self.retries.append(ended)
            self.counts["retried"] += 1
            self.emit("task-retried", delivery)
        elif ended.state == REVOKED:  # revoked while it waited in the child's pipe
            self.outcomes.append(ended)
            self.counts["revoked"] += 1
            self.emit("task-revoked", delivery)
        elif ended.state == SUCCESS:
            self.outcomes.append(ended)
            self.counts["succeeded"] += 1
            self.emit("task-succeeded", delivery, runtime=ended.runtime)
        else:
            self.outcomes.append(ended)
            self.counts["failed"] += 1
            self.emit("task-failed", delivery, runtime=ended.runtime, exc_type=ended.exc_type)

    def should_recycle(self, child: ChildProc) -> bool:
        if child.retiring or self.shutdown is not None:
            return False
        if child.recycle_after and child.tasks_done >= child.recycle_after:
            return True
        if self.spec.max_memory_per_child:
            return (rss(child.pid) or 0) > self.spec.max_memory_per_child
        return False

    def retire_child(self, child: ChildProc) -> None:
        """Replace a child after its task: the new one is forked first, so the pool never
        shrinks."""
        child.retiring = True
        self.counts["recycled"] += 1
        self.emit("child-recycled")
        self.fill_pool()
        self.let_go(child)

    def let_go(self, child: ChildProc) -> None:
        """Hand the child nothing more: it runs what its pipe holds, reads EOF and exits.
        (The pipe closes once it holds every task the child was given: see feed_child.)"""
        child.retiring = True
        if not child.tasks_out:
            self.close_task_pipe(child)

    def close_task_pipe(self, child: ChildProc) -> None:
        if child.tasks_out.fd < 0:
            return
        self.unwatch(child.tasks_out.fd)
        with contextlib.suppress(OSError):
            os.close(child.tasks_out.fd)
        child.tasks_out.fd = -1

    def write_child(self, child: ChildProc, outbox: Outbox, frame: bytes) -> bool:
        """Write to a child's pipe without waiting: what the pipe does not take now goes as
        the child reads. False if the child is gone (its EOF settles its tasks)."""
        try:
            outbox.send(frame)
        except BrokenPipeError:
            self.child_unreachable(child)
            return False
        if outbox:
            self.writing[outbox.fd] = child
            self.poller.register(outbox.fd, select.POLLOUT)
        return True

    def feed_child(self, child: ChildProc) -> None:
        """A pipe of the child has room: write what waits for it."""
        for outbox in (child.tasks_out, child.revokes_out):
            try:
                outbox.flush()
            except BrokenPipeError:
                self.child_unreachable(child)
                return
            if not outbox:
                self.unwatch(outbox.fd)
        if child.retiring and not child.tasks_out:
            self.close_task_pipe(child)  # let go (or dying): its pipe now holds all it gets

    def child_unreachable(self, child: ChildProc) -> None:
        """The child closed its pipes: it is dying. Nothing more goes to it; what it was
        handed is settled by its EOF (child_gone)."""
        child.retiring = True
        for outbox in (child.tasks_out, child.revokes_out):
            outbox.clear()
            self.unwatch(outbox.fd)

    def unwatch(self, fd: int) -> None:
        if self.writing.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def live_children(self) -> int:
        return sum(1 for c in self.children.values() if not c.retiring)

    def child_gone(self, child: ChildProc, status: int | None = None) -> None:
        """The child exited or was killed (its pipe closed, or it was reaped): settle its tasks.

        Of the tasks it was handed and did not answer, only the first can have started, and
        only if the child did not stop cleanly; the others go back as never started.
        """
        self.poller.unregister(child.result_fd)
        del self.children[child.result_fd]
        self.child_unreachable(child)
        for fd in (child.result_fd, child.tasks_out.fd, child.revokes_out.fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.kill_group(child.pid)  # whatever its task started dies with it
        if status is None:
            try:
                status = os.waitpid(child.pid, 0)[1]
            except ChildProcessError:
                status = -1
        clean = child.said_bye and os.WIFEXITED(status) and os.WEXITSTATUS(status) == CLEAN_STOP
        unanswered = [r for r in child.tasks if not r.settled]
        if unanswered and not clean and unanswered[0] is child.tasks[0]:
            lost = unanswered.pop(0).delivery
            self.task_lost(lost)
            log.warning(
                "child %d died running task %s",
                child.pid,
                lost.id,
                extra={"node": self.node, "task": lost.id},
            )
        if unanswered:
            self.release_now([r.delivery.id for r in unanswered], started=False)
        child.tasks.clear()

    def task_lost(self, delivery: Delivery) -> None:
        """A child died mid-task: redeliver at once, or dead-letter after max_deliveries
        (at once with acks_late off: such a task is never run twice)."""
        if not self.spec.acks_late or delivery.deliveries >= self.spec.max_deliveries:
            self.dead_letter(
                delivery, "WorkerLost", f"the process running it died {delivery.deliveries} times"
            )
        else:
            self.release_now([delivery.id], started=True)
            self.counts["redelivered"] += 1
            self.emit("redelivered")

    def dead_letter(self, delivery: Delivery, exc_type: str, message: str) -> None:
        self.outcomes.append(
            Outcome(
                delivery.id,
                FAILURE,
                exc_type=exc_type,
                exc_message=message,
                node=self.node,
                dead_letter=True,
            )
        )
        self.counts["dead_lettered"] += 1
        self.emit("task-failed", delivery, exc_type=exc_type)
        self.emit("dead-lettered")

    def release_now(self, ids: list[str], started: bool) -> None:
        """Give tasks back at once. While the broker is unreachable they stay ours, unrenewed,
        and their lease gives them back."""
        self.flush()
        if self.broker_available():
            with self.broker_call("give tasks back"):
                self.broker.release(ids, started=started)

    def kill_group(self, pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def reap_children(self) -> None:
        """Collect exit statuses; a child's death itself is noticed through its pipe."""
        known = {c.pid for c in self.children.values()}
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in known:
                for child in list(self.children.values()):
                    if child.pid == pid:
                        self.drain_child(child, status)
                        if child.result_fd in self.children:
                            self.child_gone(child, status)

    def manage_children(self) -> None:
        self.fill_pool()
        extra = self.live_children() - self.target_children
        for child in list(self.children.values()):
            if extra <= 0:
                break
            if not child.retiring and child.running is None:
                self.let_go(child)
                extra -= 1

    def child_with_room(self) -> ChildProc | None:
        """The child with the fewest tasks, if it can take one more: an idle child at once,
        else one whose pipe holds fewer than `prefetch` waiting tasks (so it never waits
        for us between tasks). Never one about to be recycled."""
        best: ChildProc | None = None
        for child in self.children.values():
            if child.retiring or len(child.tasks) > self.spec.prefetch:
                continue
            if child.recycle_after and child.tasks_done + len(child.tasks) >= child.recycle_after:
                continue
            if best is None or len(child.tasks) < len(best.tasks):
                best = child
        return best

    def revoke_waiting(self, ids: set[str]) -> None:
        """Tell the children holding revoked tasks in their pipe not to start them."""
        for child in self.children.values():
            waiting = [r.delivery.id for r in list(child.tasks)[1:] if r.delivery.id in ids]
            if waiting:
                self.write_child(
                    child, child.revokes_out, "".join(f"{i}\n" for i in waiting).encode()
                )

    def terminate(self, child: ChildProc, signum: int) -> None:
        """Revoke the running task with a signal to its child's group: REVOKED, never redelivered.

        The child is replaced; if the signal does not end it, it is killed after a grace period.
        """
        running = child.running
        if running is None or running.settled:
            return
        running.settled = True
        running.terminated_at = time.monotonic()
        self.outcomes.append(Outcome(running.delivery.id, REVOKED, node=self.node))
        self.counts["revoked"] += 1
        self.emit("task-revoked", running.delivery, terminated=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signum)

    # --- time limits -------------------------------------------------------------
    def enforce_time_limits(self, now: float) -> None:
        for child in list(self.children.values()):
            running = child.running
            if running is None:
                continue
            if running.settled:
                if (
                    running.terminated_at is not None
                    and now - running.terminated_at >= TERMINATE_GRACE
                ):
                    self.kill_group(child.pid)
                continue
            if running.soft_deadline and not running.soft_sent and now >= running.soft_deadline:
                running.soft_sent = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGUSR1)
            if running.hard_deadline and now >= running.hard_deadline:
                delivery = running.delivery
                running.settled = True
                child.retiring = True  # dying: no task may be dispatched to it before its EOF
                self.kill_group(child.pid)
                limit = running.hard_deadline - running.started
                self.outcomes.append(
                    Outcome(
                        delivery.id,
                        FAILURE,
                        exc_type="TimeLimitExceeded",
                        exc_message=f"hard time limit ({limit:g}s) exceeded",
                        node=self.node,
                    )
                )
                self.counts["time_limit_kills"] += 1
                self.counts["failed"] += 1
                self.emit("time-limit-kill")
                self.emit("task-failed", delivery, exc_type="TimeLimitExceeded")
                log.warning(
                    "task %s killed: hard time limit",
                    delivery.id,
                    extra={"node": self.node, "task": delivery.id},
                )

    # --- broker ------------------------------------------------------------------
    def capacity(self) -> int:
        return self.target_children * (1 + self.spec.prefetch)

    def held(self) -> int:
        """Tasks that count against the prefetch. Those waiting for a rate-limit token do not
        (up to RATE_LIMITED_MAX): other task types queued behind them still come in and run."""
        handed = sum(len(c.tasks) for c in self.children.values())
        return len(self.reserved) - min(self.rate_limited, RATE_LIMITED_MAX) + handed

    def reserve_more(self) -> None:
        """Top up the reserved buffer, in batches: only once it is half empty."""
        want = self.capacity() - self.held()
        if want <= 0 or (self.reserved and want < max(1, self.capacity() // 2)):
            return
        if not self.broker_available():
            return
        with self.broker_call("reserve"):
            # What the last turns did goes in the same transaction.
            deliveries = self.broker.exchange(
                self.started_ids,
                self.node,
                self.outcomes,
                self.retries,
                self.spec.queues,
                want,
                self.owner,
                self.spec.lease,
            )
            self.started_ids, self.outcomes, self.retries = [], [], []
            self.queue_dry = len(deliveries) < want
            for delivery in deliveries:
                self.accept(delivery)

    def accept(self, delivery: Delivery) -> None:
        """Take in a reservation: run it later, or settle it now if it must not run."""
        if delivery.id in self.revoked:
            self.outcomes.append(Outcome(delivery.id, REVOKED, node=self.node))
            self.counts["revoked"] += 1
            self.emit("task-revoked", delivery)
        elif delivery.deliveries > self.spec.max_deliveries:
            self.dead_letter(
                delivery,
                "WorkerLost",
                f"delivered {delivery.deliveries - 1} times without finishing",
            )
        elif too_large := oversize(delivery.body):
            self.dead_letter(delivery, "TaskTooLarge", too_large)
        elif (problem := body_problem(delivery)) is not None:
            self.dead_letter(delivery, BAD_MESSAGE, problem)
        elif delivery.name not in REGISTRY:
            name = printable(delivery.name, TYPE_NAME_LIMIT)
            self.dead_letter(delivery, "NotRegistered", f"no task named {name!r} on {self.node}")
        else:
            self.reserved.append(delivery)
            self.emit("task-received", delivery)

    def dispatch(self, now: float) -> None:
        """Give reserved tasks to idle children, honouring rate limits."""
        self.rate_wait_until = 0.0
        skipped: list[Delivery] = []
        while self.reserved:
            child = self.child_with_room()
            if child is None:
                break
            delivery = self.reserved.popleft()
            if delivery.id in self.revoked:
                self.outcomes.append(Outcome(delivery.id, REVOKED, node=self.node))
                self.emit("task-revoked", delivery)
                continue
            wait = self.rate_limits.take(delivery.name, now)
            if wait:
                skipped.append(delivery)
                until = now + wait
                self.rate_wait_until = min(self.rate_wait_until or until, until)
                continue
            self.start(child, delivery, now)
        self.reserved.extendleft(reversed(skipped))
        self.rate_limited = len(skipped)

    def start(self, child: ChildProc, delivery: Delivery, now: float) -> None:
        """Hand a task to a child: it runs at once if the child is idle, else right after
        the child's current task (without waiting for us)."""
        running = Running(delivery)
        child.tasks.append(running)
        if len(child.tasks) == 1:
            self.begin(running, now)
        self.write_child(child, child.tasks_out, encode_task(delivery))

    def begin(self, running: Running, now: float) -> None:
        """The task is now its child's current one: it is STARTED (one waiting in the pipe is
        not), and its time limits count from here."""
        soft, hard = self.time_limits.get(
            running.delivery.name, (self.spec.soft_time_limit, self.spec.time_limit)
        )
        running.started = now
        running.soft_deadline = now + soft if soft else None
        running.hard_deadline = now + hard if hard else None
        if running.delivery.id not in self.revoked:  # the child skips it: REVOKED, not run
            self.started_ids.append(running.delivery.id)
            self.emit("task-started", running.delivery)

    def flush(self) -> None:
        """Write what happened to the broker in one transaction. While the broker is
        unreachable it stays buffered here, and goes out whole once the broker answers."""
        self.started_flush_at = 0.0
        if self.unflushed() and self.broker_available():
            with self.broker_call("ack"):
                self.broker.flush(self.started_ids, self.node, self.outcomes, self.retries)
                self.started_ids, self.outcomes, self.retries = [], [], []
        self.send_events()

    def unflushed(self) -> bool:
        return bool(self.started_ids or self.outcomes or self.retries)

    def renew(self, now: float) -> None:
        """Renew the leases of everything held; take back tasks whose owner's lease ran out."""
        self.next_renew = now + max(0.5, self.spec.lease / 3)
        held = [d.id for d in self.reserved] + [
            r.delivery.id for c in self.children.values() for r in c.tasks
        ]
        with self.broker_call("renew leases"):
            self.broker.extend(held, self.owner, self.spec.lease)
            if self.shutdown is None:
                self.broker.recover_expired(self.spec.queues)
                self.revoked |= self.broker.revoked()
        self.recover_dead_owners()

    def recover_dead_owners(self) -> None:
        """Give back the tasks of the consumers the arbiter saw die (later, if the broker is
        unreachable now)."""
        while self.dead_owners and self.broker_available():
            with self.broker_call("give back a dead consumer's tasks"):
                count = self.broker.recover(self.dead_owners[-1])
                if count:  # counted as a child's death counts its task
                    self.counts["redelivered"] += count
                    self.emit("redelivered", count=count)
                log.info(
                    "gave back %d tasks of dead consumer %s",
                    count,
                    self.dead_owners.pop(),
                    extra={"node": self.node},
                )

    def broker_available(self) -> bool:
        """False while backing off from an unreachable broker."""
        return time.monotonic() >= self.broker_retry_at

    @contextlib.contextmanager
    def broker_call(self, doing: str) -> Iterator[None]:
        """Around broker calls: an unreachable broker (down, restarting, locked) is waited out.

        The loop goes on meanwhile with what it holds: children run the tasks reserved,
        outcomes stay buffered (the caller keeps its state when the call fails), and the
        broker is tried again with a growing backoff; leases are renewed first thing.
        """
        try:
            yield
        except self.broker.unavailable as exc:
            level = logging.DEBUG if self.broker_backoff else logging.WARNING
            self.broker_backoff = min(
                BROKER_BACKOFF_MAX, max(BROKER_BACKOFF_MIN, 2 * self.broker_backoff)
            )
            self.broker_retry_at = self.next_renew = time.monotonic() + self.broker_backoff
            log.log(
                level,
                "broker unreachable (%s: %s) to %s; trying again in %.1fs",
                type(exc).__name__,
                exc,
                doing,
                self.broker_backoff,
                extra={"node": self.node},
            )
            return
        if self.broker_backoff:
            self.broker_backoff = 0.0
            log.info("broker reachable again", extra={"node": self.node})

    def report(self, now: float) -> None:
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

    # --- shutdown ----------------------------------------------------------------
    def begin_shutdown(self, mode: str) -> None:
        if self.shutdown == "cold" or self.shutdown == mode:
            return
        log.info("%s shutdown", mode, extra={"node": self.node})
        self.shutdown = mode
        if self.broker_available():
            with self.broker_call("hand the schedules' lead over"):
                self.scheduler.resign()
        returned = [d.id for d in self.reserved]
        self.reserved.clear()
        if returned:
            self.release_now(returned, started=False)
        if mode == "cold":
            self.kill_running()
            return
        for child in self.children.values():  # finish the current task, start no other
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
        if self.spec.shutdown_timeout:
            self.shutdown_deadline = time.monotonic() + self.spec.shutdown_timeout

    def kill_running(self) -> None:
        """Kill every child at once; their tasks go back to the broker (redelivered)."""
        lost, waiting = [], []
        for child in list(self.children.values()):
            self.kill_group(child.pid)
            unanswered = [r for r in child.tasks if not r.settled]
            if unanswered and unanswered[0] is child.tasks[0]:
                lost.append(unanswered.pop(0).delivery.id)
            waiting += [r.delivery.id for r in unanswered]
            child.tasks.clear()
        if lost:
            self.release_now(lost, started=True)
        if waiting:
            self.release_now(waiting, started=False)

    def continue_shutdown(self, now: float) -> None:
        if self.shutdown_deadline and now >= self.shutdown_deadline:
            log.warning(
                "shutdown_timeout passed: killing running tasks (they are redelivered)",
                extra={"node": self.node},
            )
            self.shutdown_deadline = None
            self.kill_running()
        for child in self.children.values():
            if not child.tasks and not child.retiring:
                self.let_go(child)

    # --- arbiter channel ---------------------------------------------------------
    def send(self, message: dict[str, Any], droppable: bool = False) -> None:
        """Write a frame to the arbiter without waiting for it: what the socket does not take
        now goes when it has room. While the arbiter reads nothing, a `droppable` message
        (stats, events) is dropped once ARBITER_BACKLOG_MAX bytes wait."""
        out = self.arbiter_out
        if out is None:
            return
        if droppable and out.size > ARBITER_BACKLOG_MAX:
            self.drop(message)
            return
        try:
            out.send(encode(message))
        except OSError:
            self.lose_arbiter()
            return
        if out:
            self.poller.modify(out.fd, POLL_IN | select.POLLOUT)

    def drop(self, message: dict[str, Any]) -> None:
        if not self.arbiter_stalled:
            self.arbiter_stalled = True
            log.warning(
                "the arbiter reads nothing: dropping events and stats until it does",
                extra={"node": self.node},
            )
        self.counts["events_dropped"] += len(message.get("events", ()))

    def talk_to_arbiter(self, events: int) -> None:
        if events & select.POLLOUT:
            self.flush_arbiter()
        if events & POLL_IN and self.arbiter_fd is not None:
            self.read_arbiter()

    def flush_arbiter(self) -> None:
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

    def drain_arbiter(self, wait: float) -> None:
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

    def read_arbiter(self) -> None:
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

    def lose_arbiter(self) -> None:
        """The channel broke or ended: the arbiter is gone, shut down warm (as on TERM)."""
        if self.arbiter_fd is None:
            return
        self.poller.unregister(self.arbiter_fd)
        with contextlib.suppress(OSError):
            os.close(self.arbiter_fd)
        self.arbiter_fd = self.arbiter_out = None
        self.begin_shutdown("warm")

    def handle_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "recover":
            self.dead_owners.append(str(message.get("owner")))
            self.recover_dead_owners()
        elif kind == "cmd":
            reply = self.run_command(message)
            try:
                encode(reply)
            except (TypeError, ValueError, ProtocolError) as exc:
                reply = {"error": f"the reply of {message.get('cmd')} is not JSON: {exc}"}
            self.send({"type": "reply", "id": message.get("id"), "reply": reply})

    def run_command(self, message: dict[str, Any]) -> Any:
        command = COMMANDS.get(str(message.get("cmd")))
        if command is None or command.scope != "worker" or command.effect is None:
            return {"error": f"unknown command {message.get('cmd')!r}"}
        try:
            args = command.validate(message.get("args", {}))
            return command.effect(self, **args)
        except CommandError as exc:
            log.warning("command refused: %s", exc, extra={"node": self.node})
            return {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a custom command must not take the worker down
            log.exception("command %s failed", command.name, extra={"node": self.node})
            return {"error": f"{type(exc).__name__}: {exc}"}

    # --- events and status ---------------------------------------------------------
    def emit(self, kind: str, delivery: Delivery | None = None, **fields: Any) -> None:
        if not (self.events_enabled or self.metrics_enabled) and not kind.startswith(
            ("child-", "time-", "redel", "dead-")
        ):
            return
        event: dict[str, Any] = {"type": kind, "node": self.node, "ts": time.time()}
        if delivery is not None:
            event["id"] = delivery.id
            event["name"] = delivery.name
        event.update(fields)
        self.events.append(event)

    def send_events(self) -> None:
        if self.events:
            events, self.events = self.events, []
            self.send(
                {"type": "events", "events": events, "publish": self.events_enabled},
                droppable=True,
            )

    def stats_counts(self) -> dict[str, Any]:
        waiting = sum(max(0, len(c.tasks) - 1) for c in self.children.values())  # in a pipe
        return {
            "reserved": len(self.reserved) + waiting,
            "active": sum(1 for c in self.children.values() if c.running),
            "children": len(self.children),
            **self.counts,
        }

    def stats(self) -> dict[str, Any]:
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
                    "state": "busy" if c.running else ("retiring" if c.retiring else "idle"),
                    "task": c.running.delivery.id if c.running else None,
                    "task_name": c.running.delivery.name if c.running else None,
                    "runtime": now - c.running.started if c.running else None,
                    "tasks_done": c.tasks_done,
                    "rss": rss(c.pid),
                    "uptime": time.time() - c.born,
                }
                for c in self.children.values()
            ],
        }


def rss(pid: int) -> int | None:
    """Resident memory of a process in bytes; None if it is gone (read from /proc, as
    psutil does, without importing psutil into every worker)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def open_pipes(count: int) -> list[int]:
    """The read and write ends of `count` new pipes; OSError, with none left open, if one
    cannot be made."""
    fds: list[int] = []
    try:
        for _ in range(count):
            fds += os.pipe()
    except OSError:
        close_all(fds)
        raise
    return fds


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def encode_task(delivery: Delivery) -> bytes:
    """The frame a child reads: `[deliveries, body]` around the broker's body as it is (JSON
    already, checked by `body_problem`), so that no body is decoded and encoded again."""
    head, body = b"[%d," % delivery.deliveries, delivery.body.encode()
    return b"".join(((len(head) + len(body) + 1).to_bytes(4, "big"), head, body, b"]"))


def body_problem(delivery: Delivery) -> str | None:
    """Why a delivered body is not a task a child can run, or None if it is one: the JSON
    object `{"id", "name", "args", "kwargs", "retries"}` that `encode_body` writes for it."""
    try:
        delivery.body.encode()
    except UnicodeEncodeError:
        return "the body is not UTF-8"
    try:
        body = json.loads(delivery.body)
    except (ValueError, RecursionError) as exc:
        return printable(f"the body is not JSON: {exc}", MESSAGE_LIMIT)
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    if body.get("id") != delivery.id or body.get("name") != delivery.name:
        return "the body's id or name is not the task's"
    if not isinstance(body.get("args"), list) or not isinstance(body.get("kwargs"), dict):
        return "the body's args are not a list or its kwargs not an object"
    retries = body.get("retries")
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        return "the body's retries are not a count"
    return None


def main() -> int:
    """`python -m worker`: run one worker; the arbiter passes the spec and a socket fd."""
    from .logs import setup_logging

    spec = WorkerSpec.from_json(json.loads(os.environ["FLEETD_WORKER_SPEC"]))
    setup_logging(
        os.environ.get("FLEETD_LOG_LEVEL", "info"),
        os.environ.get("FLEETD_LOG_FORMAT", "text"),
        spec.node,
    )
    fd = os.environ.get("FLEETD_WORKER_FD")
    arbiter_fd = int(fd) if fd else None
    worker = Worker(spec, arbiter_fd)
    try:
        return worker.run()
    except ImportError as exc:
        log.error("cannot import task modules: %s", exc, extra={"node": spec.node})
        return EXIT_IMPORT_ERROR

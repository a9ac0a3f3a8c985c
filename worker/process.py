"""The worker process: its state and its loop, which reads top to bottom as its life.

`Worker.run` boots (signals, task modules, broker, children) and turns `step` until a
shutdown has let every child go: each turn waits on its descriptors, takes in signals,
arbiter messages and children's outcomes and deaths, enforces time limits, then
reserves, dispatches and flushes to the broker in batches. No threads and no ZeroMQ
here: the worker forks its children. Its jobs live in one module each:

    worker/pool.py     the children: fork, pipes, reaping, recycling, time limits
    worker/aiopool.py  async tasks among them: routing, replies by id, cancels
    worker/settle.py   the one place a task's outcome is recorded, counted, emitted
    worker/link.py     the broker: batches, leases, giving back, backoff
    worker/channel.py  the arbiter: messages out and in, commands, stats
"""

from __future__ import annotations

import contextlib

# The IDNA codec (with unicodedata and stringprep) is imported by a process's first
# connection to a host by name, which most tasks make: imported here, before the fork,
# the children share it instead of each importing its own copy.
import encodings.idna  # noqa: F401
import importlib
import json
import logging
import math
import os
import select
import signal
import time
from collections import deque
from typing import Any

from .aiopool import TERMINATE_GRACE, AsyncPool
from .brokers import open_broker
from .brokers.base import FAIL_FAST_WAIT, Delivery, Outcome, Retry
from .channel import ARBITER_DRAIN_WAIT, STATS_EVERY, ArbiterChannel
from .child import become_subreaper, set_parent_death_signal
from .commands import pool_grow, pool_room, pool_shrink
from .control import worker_command_names
from .imports import TaskImportError, import_modules
from .limits import RuntimeLimits
from .link import DRY_RECHECK, STARTED_FLUSH_DELAY, BrokerLink
from .pool import POLL_IN, ChildProc, Pool, ask_to_finish
from .protocol import FrameReader, Outbox
from .ratelimit import RateLimits
from .scheduler import worker_scheduler
from .settle import Settlement
from .spec import WorkerSpec
from .task import REGISTRY
from .tree import BOOT_BLOCKED, SENDER_CHECKED, STRAY_SIGNALS, SenderChecked, set_dispositions

log = logging.getLogger("fleetd.worker")

EXIT_OK = 0
EXIT_IMPORT_ERROR = 4
KILL_READ_WAIT = 0.5  # seconds a cold stop waits for the rest of a reply a child is writing
# Seconds a stopping worker waits for an unreachable broker once its tasks have ended, to
# ack them and give back what it held (README: "waits up to 10 s for Redis").
SHUTDOWN_FLUSH_WAIT = 10.0
# What the worker takes in through its loop (DESIGN section 2; the stray ones are logged).
HANDLED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGHUP,
    signal.SIGCHLD,
    *STRAY_SIGNALS,
)


class Worker(Pool, AsyncPool, Settlement, BrokerLink, ArbiterChannel):
    """One worker process. Its state lives here; its jobs live in the modules of its
    halves: the pool, the settlement, the broker link and the arbiter channel."""

    def __init__(self, spec: WorkerSpec, arbiter_fd: int | None) -> None:
        self.spec: WorkerSpec = spec
        self.node: str = spec.node
        # name@host: the host whose workers' leases are theirs while they run, where the
        # arbiter ends a hung one (worker_timeout); with none, the lease alone decides.
        self.keep_host = self.node.rpartition("@")[2] if spec.worker_timeout else ""
        self.arbiter_fd: int | None = arbiter_fd
        self.arbiter_out: Outbox | None = None if arbiter_fd is None else Outbox(arbiter_fd)
        self.arbiter_reader: FrameReader = FrameReader()
        self.arbiter_stalled: bool = False  # it read nothing for a while: events are dropped
        self.arbiter_batched: bool = False  # frames wait for the end of the turn: announce
        self.children: dict[int, ChildProc] = {}  # by result_fd
        self.exiting: set[int] = set()  # children gone from `children`, not yet reaped
        self.writing: dict[int, ChildProc] = {}  # children's pipes polled for room, by fd
        self.unsent: dict[int, ChildProc] = {}  # children handed tasks in this dispatch pass
        self.reserved: deque[Delivery] = deque()
        self.outcomes: list[Outcome] = []
        self.retries: list[Retry] = []
        self.started_ids: list[str] = []
        self.unreleased: dict[bool, list[str]] = {False: [], True: []}  # release_now's, by died
        self.lease_lost: set[str] = set()  # handed to children, then lost: BrokerLink.drop_lost
        self.revoked: set[str] = set()
        self.rate_limits: RateLimits = RateLimits(spec.rate_limits)
        self.time_limits: dict[str, tuple[float, float]] = {}  # name -> (soft, hard)
        self.async_names: set[str] = set()  # the tasks that are `async def`
        self.async_reserved_at: float = -math.inf  # when a reserve last brought one
        self.dispatch_stuck: bool = False  # no child has room for the kinds of tasks reserved
        self.target_children: int = spec.concurrency
        self.signals: deque[int] = deque()
        self.shutdown: str | None = None  # None, "warm" or "cold"
        self.ready = False  # told the arbiter so; before, a failure is a boot error
        self.shutdown_deadline: float | None = None
        self.broker_deadline: float | None = None  # see BrokerLink.give_up_on_broker_at
        # When the last poll returned, and the one before it: what a turn takes in happened
        # after `news_since`, however long a broker call held the loop in between.
        self.polled_at: float = time.monotonic()
        self.news_since: float = self.polled_at
        self.events_enabled: bool = os.environ.get("FLEETD_EVENTS") == "1"  # the arbiter remembers
        self.events: list[dict[str, Any]] = []
        self.counts: dict[str, int] = {
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
        self.started_at: float = time.time()
        self.pid: int = os.getpid()
        self.owner: str = ""
        self.poller: select.poll = select.poll()
        self.next_renew: float = 0.0
        self.renewed_at: float = time.monotonic()  # the last renew that went through
        self.next_report: float = 0.0
        self.queue_dry: bool = True  # the last reserve got less than it asked for: look at ETAs
        self.reserve_again: bool = False  # it got all it asked for and settled it at once
        # Tasks held here may have been revoked in the broker since we last asked (a wake-up
        # said so, or a broker call failed): asked when due, before the step reserves
        # (revokes_due, read_revokes).
        self.revokes_unread: bool = False
        self.revokes_read_from: float = 0.0  # not before, after a wake-up: REVOKES_READ_GAP
        # The next ETA of our queues as last read (None: none), until a wake-up says a task
        # was scheduled (every write that schedules one publishes so), it comes due, or it
        # is DRY_RECHECK old.
        self.next_eta: float | None = None
        self.etas_read_at: float | None = None  # when they were read; None: read them again
        self.queue_changed = True  # a wake-up came since the last reserve
        self.dry_recheck_at = 0.0  # when a dry queue is looked at again, woken or not
        self.flush_at: float = 0.0  # when what happened goes out if no turn took it along
        self.metrics_enabled: bool = os.environ.get("FLEETD_METRICS") == "1"
        self.rate_wait_until: float = 0.0
        self.rate_limited: int = 0  # reserved tasks that wait for a rate-limit token
        self.broker_backoff: float = (
            0.0  # > 0 while the broker is unreachable: seconds between tries
        )
        self.broker_retry_at: float = 0.0  # monotonic: no broker call before this
        self.broker_failing = ""  # what the last broker call that failed was doing
        self.booted_in_broker = False  # see BrokerLink.boot_in_broker
        self.dead_owners: list[str] = []  # dead consumers whose tasks are still to be given back
        self.spawn_backoff: float = 0.0  # > 0 while forks fail: seconds between tries
        self.spawn_retry_at: float = 0.0  # monotonic: no fork before this
        self.autoscaled_at: float = 0.0  # monotonic: the last autoscale decision
        self.grown_by_hand_at: float = -math.inf  # monotonic: the last `pool grow` or TTIN
        self.busy_marks: dict[int, tuple[int, float]] = {}  # by pid: see Pool.busy_mark

    # --- the life of a worker ------------------------------------------------------
    def run(self) -> int:
        self.setup_signals()
        become_subreaper()  # what outlives a dead child comes to us (child_gone ends it)
        self.import_tasks()
        self.reclaim_signals("importing fleet.imports")
        self.read_quit_senders()
        wait = broker_wait(self.spec.worker_timeout)
        self.broker = open_broker(
            self.spec.broker,
            durability=self.spec.durability,
            result_ttl=self.spec.result_ttl,
            fail_fast=True,
            connect_timeout=wait,
            call_wait=wait,
        )
        # Who holds our tasks in the broker: pid and start time, so a reused pid is not us.
        self.owner = f"{self.node}:{os.getpid()}:{int(time.time() * 1000)}"
        self.boot_in_broker()
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
        self.ready = True
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
        ready = self.poller.poll(timeout * 1000)
        self.news_since, self.polled_at = self.polled_at, time.monotonic()
        for fd, events in ready:
            if fd == self.signal_fd:
                self.handle_signals()
            elif fd == self.quit_fd:
                self.take_quits()
            elif fd == self.wakeup.fileno():
                if self.wakeup.clear():
                    self.etas_read_at = None
                if self.wakeup.news():  # not for tasks our last reserve took
                    self.queue_changed = True
                if self.wakeup.revoked():
                    self.revokes_unread = True
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
        if self.revokes_due(now):
            with self.broker_call("ask which held tasks were revoked"):
                self.read_revokes(self.held_ids())
        if self.shutdown is None:
            self.renew_first(now)  # after a stall: drop what others took back before dispatch
            self.manage_children()
            self.reserve_more()
            self.dispatch(now)
            self.autoscale(now)  # after dispatch: a child that just finished has its next task
        else:
            self.continue_shutdown(now)
        self.mark_read()
        if self.flush_due(now):
            self.flush()
        self.send_events()
        if self.arbiter_batched:
            self.announce()
        if self.shutdown is None and self.broker_available():
            with self.broker_call("tidy up and run the schedules"):
                if self.held():  # a fleet that is never idle must still drop old results
                    self.broker.expire()
                else:
                    self.broker.maintain()
                self.scheduler.step(time.time())  # cheap unless this worker leads
        self.keep_up(now)

    def keep_up(self, now: float) -> None:
        """Renew the leases, and report to the arbiter, if it is time to."""
        if now >= self.next_renew:
            self.renew(now)
        if now >= self.next_report:
            self.report(now)

    def finished(self) -> bool:
        return self.shutdown is not None and not self.children and not self.exiting

    def poll_timeout(self) -> float:
        if self.shutdown is None and (self.reserve_again or self.has_work_to_dispatch()):
            return 0.0
        now = time.monotonic()
        deadlines = [self.next_renew, self.next_report]
        if self.shutdown is None and self.broker_available():  # when step() runs the schedules
            deadlines.append(now + self.scheduler.timeout(time.time()))
        if self.flush_at:
            deadlines.append(self.flush_at)
        for child in self.children.values():
            if child.timed:
                deadlines += self.async_deadlines(child)
            if child.unmarked:  # look again soon whether it has read them (mark_read)
                deadlines.append(now + STARTED_FLUSH_DELAY)
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
        if self.revokes_unread and self.broker_available():
            deadlines.append(self.revokes_read_from)
        if self.shutdown is None and self.queue_dry and self.broker_available():
            if self.etas_stale(now):
                with self.broker_call("read ETAs"):
                    self.next_eta = self.broker.next_due(self.spec.queues)
                    self.etas_read_at = now
            if self.next_eta is not None:
                deadlines.append(now + max(0.0, self.next_eta - time.time()))
        return max(0.0, min(min(deadlines) - now, 1.0))

    def etas_stale(self, now: float) -> bool:
        """Whether the next ETA read is out of date: a wake-up announced a scheduled task, it
        came due, or it is DRY_RECHECK old (an announcement may have been missed, as when
        Redis was unreachable)."""
        if self.etas_read_at is None or now >= self.etas_read_at + DRY_RECHECK:
            return True
        return self.next_eta is not None and self.next_eta <= time.time()

    def has_work_to_dispatch(self) -> bool:
        if self.async_names:
            return bool(self.reserved) and not self.dispatch_stuck and not self.rate_wait_until
        return (
            bool(self.reserved) and self.child_with_room() is not None and not self.rate_wait_until
        )

    def close(self) -> None:
        give_up = self.broker_deadline
        if give_up is None:  # no turn found it idle (continue_shutdown)
            give_up = time.monotonic() + SHUTDOWN_FLUSH_WAIT
            self.give_up_on_broker_at(give_up)
        self.flush()
        while self.unflushed():
            now = time.monotonic()
            if max(now, self.broker_retry_at) >= give_up:
                break  # the next try would come too late
            # Still here, waiting for the broker (a write lock someone holds): the arbiter
            # must not take us for hung and kill us, and what we would ack run again.
            self.report(now)
            time.sleep(max(0.0, min(self.broker_retry_at, now + STATS_EVERY) - now))
            self.flush()
        if self.unflushed():
            log.warning(
                "broker unreachable: %d finished tasks not acked, they will run again;"
                " %d not given back, they return after their lease",
                len(self.outcomes) + len(self.retries),
                sum(len(ids) for ids in self.unreleased.values()),
                extra={"node": self.node},
            )
        self.emit("worker-offline")
        self.send_events()
        self.drain_arbiter(ARBITER_DRAIN_WAIT)
        self.wakeup.close()
        self.broker.close()
        log.info("stopped", extra={"node": self.node})

    # --- boot -------------------------------------------------------------------------
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
        self.signal_fd, self.signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.poller.register(self.signal_fd, select.POLLIN)
        signal.set_wakeup_fd(self.signal_w, warn_on_full_buffer=False)
        # Ours through the loop; SIGPIPE ignored, as Python has it: a dead child's pipe is
        # an EPIPE, not our end.
        self.dispositions: dict[int, Any] = dict.fromkeys(HANDLED_SIGNALS, self.on_signal)
        self.dispositions[signal.SIGPIPE] = signal.SIG_IGN
        set_dispositions(self.dispositions)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, BOOT_BLOCKED)  # what came meanwhile: now
        self.quit_fd = -1  # see read_quit_senders
        set_parent_death_signal(signal.SIGTERM)  # the arbiter vanished: warm shutdown
        # The children's stdout and stderr: logged line by line, marked with our node.
        self.output_fd, self.output_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.output_fd, False)
        self.output_tail = b""
        self.poller.register(self.output_fd, select.POLLIN)
        if os.environ.get("FLEETD_ARBITER_PID") and os.getppid() != int(
            os.environ["FLEETD_ARBITER_PID"]
        ):
            # The arbiter died before our parent-death signal was set: no one will end us,
            # and nothing is held yet (a task module's import that hangs would keep us for
            # good, the loop that acts on a TERM never reached).
            os._exit(0)

    def on_signal(self, signum: int, frame: Any) -> None:
        if not self.ready and signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            # Booting (importing the task modules, which may take long or hang): nothing is
            # held yet, nothing to finish or give back. The children forked so far die with
            # us (their parent-death signal). No logging here: a handler may interrupt it.
            os._exit(0)
        self.signals.append(signum)  # only enqueue: the loop acts on it

    def reclaim_signals(self, what: str) -> None:
        """Take back the signals that `what` (the task modules' import, a custom command: code
        that is not ours) took from this process, and say which. An app's SIGTERM handler
        that exits would end us in the middle of a warm shutdown, SIGCHLD ignored would keep
        our children's exits from us, SIGPIPE at its default would end us on a dead child's
        pipe. A task module's handlers run in no fleetd process: the children set their own."""
        taken = [signal.Signals(sig).name for sig in set_dispositions(self.dispositions)]
        handled = [sig for sig in HANDLED_SIGNALS if sig not in SENDER_CHECKED]
        blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
        taken += [f"{signal.Signals(s).name} (blocked)" for s in handled if s in blocked]
        if self.quit_fd >= 0:  # they must stay blocked for quit_fd to read them
            taken += [
                f"{signal.Signals(s).name} (unblocked)" for s in SENDER_CHECKED if s not in blocked
            ]
            signal.pthread_sigmask(signal.SIG_BLOCK, SENDER_CHECKED)
        if signal.set_wakeup_fd(self.signal_w, warn_on_full_buffer=False) != self.signal_w:
            taken.append("the signal wake-up descriptor")
        if taken:
            log.warning(
                "%s took the worker's %s: its own handling is back",
                what,
                ", ".join(taken),
                extra={"node": self.node},
            )

    def import_tasks(self) -> None:
        try:
            import_modules(self.spec.pythonpath, self.spec.imports)
        finally:
            if os.getpid() != self.pid:
                # A copy that a task module forked at its import, back from it: two workers
                # would share our arbiter channel and pool. It ends before it says anything.
                os._exit(0)
        for index, schedule in enumerate(self.spec.schedules):
            if schedule["task"] not in REGISTRY:  # as `fleetd check` refuses it
                raise UnregisteredSchedule(
                    f"schedule[{index}].task: task {schedule['task']!r} is not registered by"
                    f" fleet.imports ({', '.join(self.spec.imports) or 'none'})"
                )
        self.async_names = {name for name, task in REGISTRY.items() if task.is_async}
        if self.async_names:  # the children's event loop, imported once, before they fork
            importlib.import_module(".aio", __package__)
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

    # --- signals (DESIGN section 2) ----------------------------------------------------
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
            elif signum in STRAY_SIGNALS:
                stray = signal.Signals(signum).name
                log.warning(
                    "%s means nothing to a worker: ignored", stray, extra={"node": self.node}
                )

    def read_quit_senders(self) -> None:
        """From now on a QUIT is read with who sent it (take_quits). Not before the task
        modules' import: what they start keeps Python's signal mask, QUIT unblocked."""
        self.quit_senders = SenderChecked(self.pid)
        self.quit_fd = self.quit_senders.fd
        if self.quit_senders.problem:
            log.warning(
                "cannot tell who sends a QUIT (%s): one from a task stops this worker too",
                self.quit_senders.problem,
                extra={"node": self.node},
            )
            return
        self.poller.register(self.quit_fd, select.POLLIN)

    def take_quits(self) -> None:
        """A QUIT is a cold shutdown, unless a process below us sent it: a task's."""
        act, from_below = self.quit_senders.read()
        for _, sender in from_below:
            log.warning(
                "SIGQUIT from pid %d, a process of a task of ours: ignored (a task cannot stop"
                " its worker)",
                sender,
                extra={"node": self.node},
            )
        if act:
            self.begin_shutdown("cold")

    # --- shutdown ---------------------------------------------------------------------
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
            self.release_now(returned, died=False)
        if mode == "cold":
            self.kill_running()
            return
        for child in self.children.values():
            ask_to_finish(child.pid)
        if self.spec.shutdown_timeout:
            self.shutdown_deadline = time.monotonic() + self.spec.shutdown_timeout

    def kill_running(self) -> None:
        """Kill every child at once; their tasks go back to the broker (redelivered). The
        operator stopped them: no delivery counts as a death (max_deliveries)."""
        stopped = []
        for child in list(self.children.values()):
            self.take_in_replies(child)
            if child.result_fd not in self.children:
                continue  # it had left, and child_gone settled its tasks
            self.kill_group(child.pid)
            stopped += [r.delivery.id for r in child.tasks if not r.settled]
            stopped += [r.delivery.id for r in child.aio.values() if not r.settled]
            child.tasks.clear()
            child.aio.clear()
        if stopped:
            self.release_now(stopped, died=False)

    def take_in_replies(self, child: ChildProc) -> None:
        """What a child answered already (replies in its pipe that the loop had not read when
        a cold stop came) is settled, not given back to run again; a reply larger than the
        pipe is read to its end as the child writes the rest, KILL_READ_WAIT at most."""
        give_up = time.monotonic() + KILL_READ_WAIT
        readable = select.poll()
        readable.register(child.result_fd, select.POLLIN)
        while child.result_fd in self.children:
            if self.read_child(child):
                continue
            left = give_up - time.monotonic()
            if not child.reader.holding or left <= 0 or not readable.poll(left * 1000):
                return

    def continue_shutdown(self, now: float) -> None:
        if self.shutdown_deadline and now >= self.shutdown_deadline:
            log.warning(
                "shutdown_timeout passed: killing running tasks (they are redelivered)",
                extra={"node": self.node},
            )
            self.shutdown_deadline = None
            self.kill_running()
        for child in self.children.values():
            if not child.handed and not child.retiring:
                self.let_go(child)
        if self.broker_deadline is None and not self.busy():
            # None left: they ended (or the stop came) after `news_since` at the earliest,
            # and the wait for the broker counts from there, a call that held the loop
            # meanwhile included (README: "waits up to 10 s for Redis").
            self.give_up_on_broker_at(self.news_since + SHUTDOWN_FLUSH_WAIT)


class UnregisteredSchedule(Exception):
    """A [[schedule]] whose task the task modules do not register: the boot ends, as `fleetd
    check` refuses the config (else the leader would fire it to a dead letter every tick)."""


def broker_wait(worker_timeout: float) -> float:
    """Seconds after which a worker's connect or broker call gives up: FAIL_FAST_WAIT, or a
    quarter of a shorter worker_timeout. A hung broker then holds the loop (a connect, a
    call and its one retry) for less than the silence that has the arbiter take the worker
    for hung: it would kill it (its running tasks would run again) and each replacement."""
    return min(FAIL_FAST_WAIT, worker_timeout / 4) if worker_timeout else FAIL_FAST_WAIT


def main() -> int:
    """`python -m worker`: run one worker; the arbiter passes the spec and a socket fd."""
    from .logs import setup_logging, shield_standard_streams

    spec = WorkerSpec.from_json(json.loads(os.environ["FLEETD_WORKER_SPEC"]))
    setup_logging(
        os.environ.get("FLEETD_LOG_LEVEL", "info"),
        os.environ.get("FLEETD_LOG_FORMAT", "text"),
        spec.node,
    )
    shield_standard_streams()  # before the task modules' imports, which may print
    fd = os.environ.get("FLEETD_WORKER_FD")
    arbiter_fd = int(fd) if fd else None
    worker = Worker(spec, arbiter_fd)
    try:
        return worker.run()
    except (TaskImportError, UnregisteredSchedule) as exc:
        error = f"cannot import task modules: {exc}" if isinstance(exc, TaskImportError) else exc
        log.error("%s", error, extra={"node": spec.node})
        worker.send({"type": "boot-error", "error": str(error)})
        return EXIT_IMPORT_ERROR
    except Exception as exc:
        if not worker.ready:  # the arbiter's last line names it: the broker refused us, say
            worker.send({"type": "boot-error", "error": f"{type(exc).__name__}: {exc}"})
        raise

"""The pool: a worker's forked children, their pipes, their tasks, reaping, recycling,
time limits and terminate. The pool half of `Worker` (worker/process.py).

Sync tasks only here; where a worker has `async def` tasks, worker/aiopool.py routes
them and watches their deadlines.
"""

# The methods below are checked as `Worker`'s (`self: Worker`, the class they are mixed into);
# mypy's rule that a self type be a supertype of its class does not fit a mixin.
# mypy: disable-error-code="misc"

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import random
import select
import signal
import struct
import termios
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .aiopool import TERMINATE_GRACE
from .autoscale import DECIDE_EVERY, MAX_POOL, Load, decide
from .brokers.base import FAILURE, Delivery, Outcome
from .child import CLEAN_STOP, child_main
from .commands import pool_room
from .protocol import FrameReader, Outbox, ProtocolError, encode_task, id_line
from .tree import SENDER_CHECKED, end_adopted, is_stopped

if TYPE_CHECKING:
    from .process import Worker

log = logging.getLogger("fleetd.worker")
child_log = logging.getLogger("fleetd.child")

POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR
SPAWN_BACKOFF_MIN = 0.5  # seconds before forking again after a failed fork; doubles each time
SPAWN_BACKOFF_MAX = 5.0
# Seconds part of a child's reply may wait for the rest: a child writes each reply whole, at
# once (64 MiB at most, through a pipe the worker drains), so only bytes that are no reply
# (a task writing into the child's pipe) wait this long.
PARTIAL_REPLY_LIMIT = 10.0
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Running:
    """A task handed to a child: running if it is the child's first or async, else waiting in
    its pipe."""

    delivery: Delivery
    started: float = 0.0  # monotonic; set when it becomes the child's first task, or is async
    soft_deadline: float | None = None
    hard_deadline: float | None = None
    soft_sent: bool = False
    settled: bool = False  # its outcome is written already (time limit, revoked with terminate)
    terminated_at: float | None = None  # revoked with terminate: killed after a grace period
    number: int = 0  # of the task frames written to its child, from 1
    frame_end: int = 0  # bytes of task frames handed to its child, to the end of this one's


@dataclass
class ChildProc:
    """A child and its pipes. The worker never waits on a child: its task and revoke pipes
    are non-blocking, and what they do not take now waits in their outbox."""

    pid: int
    tasks_out: Outbox  # task frames, to the child's task pipe (fd -1 once closed)
    result_fd: int  # worker reads outcomes here
    revokes_out: Outbox  # ids revoked while their task waits in the task pipe, one a line
    reader: FrameReader = field(default_factory=FrameReader)
    tasks: deque[Running] = field(default_factory=deque)  # sync, in the order the child runs them
    aio: dict[str, Running] = field(default_factory=dict)  # async, in flight, by id
    timed: set[str] = field(default_factory=set)  # of those, the ones with a deadline to watch
    draining: bool = False  # takes no async task: a sync or last-chance one waiting gets it
    blocked: bool = False  # killed for a blocked loop: its other tasks were not at fault
    tasks_done: int = 0
    frames_sent: int = 0  # task frames written to it (its own count names one it cannot read)
    bytes_handed: int = 0  # bytes of the task frames handed to it (written, or in tasks_out)
    bytes_dropped: int = 0  # of those, what was left in tasks_out when it became unreachable
    unmarked: deque[Running] = field(default_factory=deque)  # async, not yet read: mark_read
    recycle_after: int = 0  # 0 = never
    retiring: bool = False
    # Forked ahead for a child handed its last task (max_tasks_per_child): it gets no task
    # until a child retires, then takes over at once instead of the pool waiting for a fork.
    spare: bool = False
    said_bye: bool = False  # it wrote BYE: it stops cleanly, between tasks
    announced: bool = False  # its pid was written to the arbiter (see dispatch)
    born: float = field(default_factory=time.time)
    partial_since: float | None = None  # monotonic time from which part of a reply waits

    @property
    def running(self) -> Running | None:
        """The sync task the child runs now (the first of those handed to it), if any."""
        return self.tasks[0] if self.tasks else None

    @property
    def in_flight(self) -> list[Running]:
        """The tasks the child runs now: its async ones, or its first sync one."""
        return list(self.aio.values()) if self.aio else list(self.tasks)[:1]

    @property
    def handed(self) -> int:
        return len(self.tasks) + len(self.aio)


def ask_to_finish(pid: int) -> None:
    """TERM a child (finish the current task, start no other), then CONT, as systemd does: a
    child that its task stopped (SIGSTOP, a shell's job control) must run to leave, or a warm
    shutdown would wait on it for good."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)


class Pool:
    """Forks, feeds, reads and ends the children. The worker's loop calls it; it calls the
    settlement (worker/settle.py) for every outcome it learns and the broker link
    (worker/link.py) to give tasks back."""

    # State of the worker's that this half writes (declared where it is written).
    output_tail: bytes

    def fill_pool(self: Worker) -> None:
        """Fork children up to the target. A pipe or fork that fails (EMFILE, EAGAIN, ENOMEM)
        is logged and tried again after a backoff, never the worker's death. A spare takes
        a place before any fork."""
        while self.live_children() < self.target_children:
            spares = self.spares()
            if spares:
                spares[0].spare = False
            elif self.try_spawn() is None:
                return

    def try_spawn(self: Worker) -> ChildProc | None:
        """Fork a child unless forks are backing off; None if none was forked."""
        if time.monotonic() < self.spawn_retry_at:
            return None
        try:
            child = self.spawn_child()
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
            return None
        if self.spawn_backoff:
            self.spawn_backoff = 0.0
            log.info("forking children again", extra={"node": self.node})
        return child

    def on_last_task(self: Worker, child: ChildProc) -> bool:
        """The child holds the last task it may run before it is recycled."""
        return (
            not child.retiring
            and not child.spare
            and bool(child.recycle_after)
            and child.tasks_done + child.handed >= child.recycle_after
        )

    def spares_wanted(self: Worker) -> int:
        """One spare per child on its last task; none while shutting down."""
        if self.shutdown is not None:
            return 0
        return sum(1 for c in self.children.values() if self.on_last_task(c))

    def spares(self: Worker) -> list[ChildProc]:
        return [c for c in self.children.values() if c.spare and not c.retiring]

    def fork_spares(self: Worker) -> None:
        """Fork a spare for each child handed its last task, so that its retirement costs
        no fork (max_tasks_per_child = 1 would otherwise wait for one per task). Called once
        the tasks are written: the child runs its task while we fork."""
        while len(self.spares()) < self.spares_wanted():
            spare = self.try_spawn()
            if spare is None:
                return
            spare.spare = True

    def spawn_child(self: Worker) -> ChildProc:
        """Fork a pool child; OSError, with nothing left open, if a pipe or the fork fails."""
        pipes = open_pipes(3)
        task_r, task_w, result_r, result_w, revoke_r, revoke_w = pipes
        ours = [self.signal_fd, self.signal_w, self.quit_fd, self.wakeup.fileno()]  # -1: none
        keep_closed = [task_w, result_r, revoke_w, *ours]
        if self.arbiter_fd is not None:
            keep_closed.append(self.arbiter_fd)
        for other in self.children.values():
            keep_closed += [other.tasks_out.fd, other.result_fd, other.revokes_out.fd]
        recycle_after = 0
        if self.spec.max_tasks_per_child:
            jitter = random.randint(0, max(0, self.spec.max_tasks_per_child // 10))
            recycle_after = self.spec.max_tasks_per_child + jitter
        gc.freeze()  # a child's collector then leaves the inherited objects (and their pages) alone
        try:
            pid = os.fork()
        except OSError:
            close_all(pipes)
            raise
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SENDER_CHECKED)  # a task's, as Python's
            os.dup2(self.output_w, 1)
            os.dup2(self.output_w, 2)
            keep_closed += [self.output_fd, self.output_w]
            for fd in keep_closed:
                with contextlib.suppress(OSError):
                    os.close(fd)
            os.set_blocking(revoke_r, False)
            try:  # whatever happens in there, never back into the worker's loop
                child_main(task_r, result_w, revoke_r, self.pid, recycle_after)
            finally:
                os._exit(1)
        gc.unfreeze()  # ours to collect again: frozen for good, dead cycles would pile up
        os.close(task_r)
        os.close(result_w)
        os.close(revoke_r)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        # Before any task reaches the child (dispatch flushes it first), so that if we are
        # killed the arbiter ends its group; with this turn's other words to it, in one write.
        self.send({"type": "child", "pid": pid}, batch=True)
        for fd in (task_w, result_r, revoke_w):
            os.set_blocking(fd, False)
        child = ChildProc(pid, Outbox(task_w), result_r, Outbox(revoke_w))
        child.recycle_after = recycle_after
        self.children[result_r] = child
        self.poller.register(result_r, POLL_IN)
        return child

    def log_output(self: Worker) -> None:
        """Log what the children printed, a line at a time."""
        with contextlib.suppress(BlockingIOError):
            data = self.output_tail + os.read(self.output_fd, 65536)
            *lines, self.output_tail = data.split(b"\n")
            if len(self.output_tail) > 65536:
                lines.append(self.output_tail)
                self.output_tail = b""
            for line in lines:
                child_log.info("%s", line.decode(errors="replace"))

    def drain_child(self: Worker, child: ChildProc, status: int) -> None:
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

    def read_child(self: Worker, child: ChildProc) -> bool:
        """Take in what the child wrote; whether a whole reply came (more may wait)."""
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
            return False
        # From the last read that brought bytes: a big reply that the worker was slow to read
        # (stopped by an operator, say) is no stall of the child's.
        child.partial_since = time.monotonic() if child.reader.holding else None
        for reply in frames:
            self.task_done(child, reply)
        return bool(frames)

    def task_done(self: Worker, child: ChildProc, reply: Any) -> None:
        if not isinstance(reply, dict):  # a task can write to its child's pipe: trust nothing
            reply = {}
        if reply.get("bye"):  # not an outcome: the child is leaving between tasks
            child.said_bye = True
            return
        if child.aio:
            task_id = reply.get("id")
            if isinstance(task_id, str):
                running = child.aio.pop(task_id, None)
            else:
                running = self.undecodable_async(child, reply.get("n"))
            if running is not None:
                self.async_done(child, running, reply)
                return
        if not child.tasks:
            return
        running = child.tasks.popleft()
        child.tasks_done += 1
        # The child leaves after this outcome: it took a TERM, or this was the last task it
        # may run (max_tasks_per_child: Child.last_task), and it is replaced. The next one
        # in its pipe then never runs: a started mark, event and time limit would be false.
        leaving = bool(reply.get("exit"))
        if child.tasks and not leaving:
            self.begin(child.tasks[0], time.monotonic())
        if self.shutdown == "warm" and child.tasks and not leaving:
            # Our TERM went to a handler of that task's own (the child has its own back
            # now): send it again, or the child would run every task in its pipe.
            ask_to_finish(child.pid)
        if running.settled:
            if running.terminated_at is not None:
                self.retire_child(child)
        else:
            self.settle(running.delivery, reply)
            if self.should_recycle(child):
                self.retire_child(child)
        if leaving:
            child.retiring = True

    def should_recycle(self: Worker, child: ChildProc) -> bool:
        if child.retiring or self.shutdown is not None:
            return False
        if child.recycle_after and child.tasks_done >= child.recycle_after:
            return True
        if self.spec.max_memory_per_child:
            return (rss(child.pid) or 0) > self.spec.max_memory_per_child
        return False

    def retire_child(self: Worker, child: ChildProc) -> None:
        """Replace a child after its task: its spare (forked when it was handed its last
        task) takes its place, else a new one is forked first, so the pool never shrinks."""
        child.retiring = True
        self.counts["recycled"] += 1
        self.emit("child-recycled")
        self.fill_pool()
        self.let_go(child)

    def let_go(self: Worker, child: ChildProc) -> None:
        """Hand the child nothing more: it runs what its pipe holds, reads EOF and exits.
        (The pipe closes once it holds every task the child was given: see feed_child.)"""
        child.retiring = True
        if not child.tasks_out:
            self.close_task_pipe(child)

    def close_task_pipe(self: Worker, child: ChildProc) -> None:
        if child.tasks_out.fd < 0:
            return
        self.unwatch(child.tasks_out.fd)
        with contextlib.suppress(OSError):
            os.close(child.tasks_out.fd)
        child.tasks_out.fd = -1

    def write_child(self: Worker, child: ChildProc, outbox: Outbox, frame: bytes = b"") -> bool:
        """Write `frame` (none: what was added) to a child's pipe without waiting: the rest
        goes as the child reads. False if the child is gone (its EOF settles its tasks)."""
        try:
            if frame:
                outbox.send(frame)
            else:
                outbox.flush()
        except BrokenPipeError:
            self.child_unreachable(child)
            return False
        if outbox:
            self.writing[outbox.fd] = child
            self.poller.register(outbox.fd, select.POLLOUT)
        return True

    def feed_child(self: Worker, child: ChildProc) -> None:
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

    def child_unreachable(self: Worker, child: ChildProc) -> None:
        """The child closed its pipes: it is dying. Nothing more goes to it; what it was
        handed is settled by its EOF (child_gone)."""
        child.retiring = True
        child.bytes_dropped += child.tasks_out.size  # frames it never read (bytes_read)
        for outbox in (child.tasks_out, child.revokes_out):
            outbox.clear()
            self.unwatch(outbox.fd)

    def unwatch(self: Worker, fd: int) -> None:
        if self.writing.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def live_children(self: Worker) -> int:
        """Children that take tasks: neither retiring nor spare."""
        return sum(1 for c in self.children.values() if not c.retiring and not c.spare)

    def child_gone(self: Worker, child: ChildProc, status: int | None = None) -> None:
        """The child exited or was killed (its pipe closed, or it was reaped): settle its tasks.

        Of the tasks it was handed and did not answer, only the first can have started, and
        only if the child read its frame and did not stop cleanly; the others go back as never
        started.
        """
        # Before its pipe and outbox go: the async tasks left unmarked, it never read, and
        # whether it read its first sync task's frame (else it cannot have started it).
        self.mark_child_read(child)
        unread = {r.delivery.id for r in child.unmarked}
        first_unread = bool(child.tasks) and never_read(child.tasks[0], bytes_read(child))
        self.poller.unregister(child.result_fd)
        del self.children[child.result_fd]
        self.child_unreachable(child)
        for fd in (child.result_fd, child.tasks_out.fd, child.revokes_out.fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.kill_group(child.pid)  # whatever its task started dies with it
        unanswered = [r for r in child.tasks if not r.settled]
        if status is None:
            # Its pipe closed as it exits. Its status only matters to tasks it leaves
            # unanswered (did it stop cleanly?): then wait for it; else reap it when its
            # SIGCHLD comes, and go on (a recycled child would stall the pool each time).
            if unanswered or any(not r.settled for r in child.aio.values()):
                status = wait_for(child.pid, 0)
            else:
                status = wait_for(child.pid, os.WNOHANG)
            if status is None:
                self.exiting.add(child.pid)
        if status is not None:
            self.child_reaped(child.pid)
        clean = (
            status is not None
            and child.said_bye
            and os.WIFEXITED(status)
            and os.WEXITSTATUS(status) == CLEAN_STOP
        )
        self.async_child_gone(child, clean, unread)
        if unanswered and not clean and not first_unread and unanswered[0] is child.tasks[0]:
            lost = unanswered.pop(0).delivery
            self.task_lost(lost)
            log.warning(
                "child %d died running task %s",
                child.pid,
                lost.id,
                extra={"node": self.node, "task": lost.id},
            )
        if unanswered:
            self.release_now([r.delivery.id for r in unanswered], died=False)
        child.tasks.clear()

    def child_reaped(self: Worker, pid: int) -> None:
        """A child whose pipe closed is reaped: end what it left us, and tell the arbiter."""
        self.exiting.discard(pid)
        # What its tasks started in other groups and sessions came to us when it died.
        end_adopted({c.pid for c in self.children.values()} | self.exiting)
        # Its group and what it left us are ended: the arbiter's run record may drop it (else
        # the record holds every child of the last seconds, rewritten at each fork).
        self.send({"type": "child-gone", "pid": pid}, batch=True)

    def kill_group(self: Worker, pid: int) -> None:
        """SIGKILL a child and its process group (signal_group); what its task started in
        other groups comes to us when it dies, and child_gone ends it."""
        signal_group(pid, signal.SIGKILL)

    def reap_children(self: Worker) -> None:
        """Collect exit statuses; a child's death itself is noticed through its pipe."""
        known = {c.pid for c in self.children.values()}
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.exiting:
                self.child_reaped(pid)
            elif pid in known:
                for child in list(self.children.values()):
                    if child.pid == pid:
                        self.drain_child(child, status)
                        if child.result_fd in self.children:
                            self.child_gone(child, status)

    def manage_children(self: Worker) -> None:
        self.fill_pool()
        extra = self.live_children() - self.target_children
        for child in list(self.children.values()):
            if extra <= 0:
                break
            if not child.retiring and not child.spare and not child.handed:
                self.let_go(child)
                extra -= 1
        for spare in self.spares()[self.spares_wanted() :]:  # the pool shrank under them
            self.let_go(spare)

    def child_with_room(self: Worker) -> ChildProc | None:
        """The child with the fewest sync tasks, if it can take one more: an idle child at
        once, else one whose pipe holds fewer than `prefetch` waiting tasks (so it never waits
        for us between tasks). Never one with async tasks in flight."""
        return self.least_loaded(
            lambda c: len(c.tasks), lambda c: not c.aio and len(c.tasks) <= self.spec.prefetch
        )

    def least_loaded(
        self: Worker, load: Callable[[ChildProc], int], takes: Callable[[ChildProc], bool]
    ) -> ChildProc | None:
        """Of the children that `takes` a task, the one of the least `load`; never a spare,
        one retiring, or one whose tasks handed already reach its recycling count."""
        best: ChildProc | None = None
        for child in self.children.values():
            if child.retiring or child.spare or not takes(child):
                continue
            if child.recycle_after and child.tasks_done + child.handed >= child.recycle_after:
                continue
            if best is None or load(child) < load(best):
                best = child
        return best

    def revoke_waiting(self: Worker, ids: set[str]) -> None:
        """Tell the children holding revoked tasks in their pipe not to start them."""
        for child in self.children.values():
            waiting = [r.delivery.id for r in list(child.tasks)[1:] if r.delivery.id in ids]
            # Async ones too: one running runs on, one whose frame waits unread never starts.
            waiting += [task_id for task_id in child.aio if task_id in ids]
            if waiting:
                self.write_child(child, child.revokes_out, b"".join(map(id_line, waiting)))

    def terminate(self: Worker, child: ChildProc, signum: int) -> None:
        """Revoke the running task with a signal to its child's group: REVOKED, never redelivered.

        The child is replaced; if the signal does not end it, it is killed after a grace period.
        """
        running = child.running
        if running is None or running.settled:
            return
        running.settled = True
        running.terminated_at = time.monotonic()
        self.revoke_now(running.delivery, terminated=True)
        signal_group(child.pid, signum)

    def end_partial_reply(self: Worker, child: ChildProc) -> None:
        """A child writes a reply at once, whole: bytes that a task wrote into the child's
        pipe began a frame that never ends, and every reply after it would be taken for its
        rest (the slot wedged, its tasks never settled). The child is killed."""
        log.error(
            "child %d left part of a reply for %gs (something wrote into its pipe); killing it",
            child.pid,
            PARTIAL_REPLY_LIMIT,
            extra={"node": self.node},
        )
        child.partial_since = None
        child.retiring = True
        self.kill_group(child.pid)

    def enforce_time_limits(self: Worker, now: float) -> None:
        for child in list(self.children.values()):
            if child.partial_since is not None and now - child.partial_since >= PARTIAL_REPLY_LIMIT:
                if is_stopped(child.pid):  # SIGSTOP, a debugger: the rest comes once it runs
                    child.partial_since = now
                else:
                    self.end_partial_reply(child)
                    continue
            if child.timed:
                self.enforce_async_limits(child, now)
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
                unread = never_read(running, bytes_read(child))
                child.retiring = True  # dying: no task may be dispatched to it before its EOF
                self.kill_group(child.pid)
                if unread:  # stopped or stuck before it: child_gone gives the task back
                    running.hard_deadline = None  # killed once
                    log.warning(
                        "child %d did not read task %s within its time limit: killed",
                        child.pid,
                        running.delivery.id,
                        extra={"node": self.node, "task": running.delivery.id},
                    )
                    continue
                running.settled = True
                self.time_limit_exceeded(running, "killed")

    def time_limit_exceeded(self: Worker, running: Running, done: str) -> None:
        """FAILURE TimeLimitExceeded for a task past its hard limit (`done`: what befell it)."""
        delivery = running.delivery
        limit = (running.hard_deadline or running.started) - running.started
        message = f"hard time limit ({limit:g}s) exceeded"
        ended = Outcome(
            delivery.id,
            FAILURE,
            exc_type="TimeLimitExceeded",
            exc_message=message,
            node=self.node,
        )
        self.record(delivery, ended)
        self.counts["time_limit_kills"] += 1
        self.emit("time-limit-kill")
        log.warning(
            "task %s %s: hard time limit",
            delivery.id,
            done,
            extra={"node": self.node, "task": delivery.id},
        )

    def dispatch(self: Worker, now: float) -> None:
        """Give reserved tasks to idle children, honouring rate limits; then write each child
        the frames of its new tasks at once (one write, one wake-up of the child)."""
        if self.async_names:
            self.dispatch_mixed(now)
        else:
            self.rate_wait_until = 0.0
            skipped: list[Delivery] = []
            while self.reserved:
                child = self.child_with_room()
                if child is None:
                    break
                self.hand_over(child, self.reserved.popleft(), now, skipped)
            self.reserved.extendleft(reversed(skipped))
            self.rate_limited = len(skipped)
        for child in self.unsent.values():
            if not child.announced:
                self.announce()  # the arbiter knows its pid before it runs a task
            self.write_child(child, child.tasks_out)
        self.unsent.clear()
        self.fork_spares()

    def hand_over(
        self: Worker,
        child: ChildProc,
        delivery: Delivery,
        now: float,
        skipped: list[Delivery],
        is_async: bool = False,
    ) -> None:
        """Start the task on the child, unless it is revoked (REVOKED, never run) or must
        wait for a rate-limit token (into `skipped`)."""
        if delivery.id in self.revoked:
            self.revoke_now(delivery)
            return
        wait = self.rate_limits.take(delivery.name, now)
        if wait:
            skipped.append(delivery)
            until = now + wait
            self.rate_wait_until = min(self.rate_wait_until or until, until)
            return
        self.start(child, delivery, now, is_async)

    def start(
        self: Worker, child: ChildProc, delivery: Delivery, now: float, is_async: bool = False
    ) -> None:
        """Hand a task to a child: an async one, or a sync one to an idle child, runs at once;
        else right after the child's current task (without waiting for us)."""
        child.frames_sent += 1
        child.draining = False  # a child drains for the sync or last-chance task it gets now
        running = Running(delivery, number=child.frames_sent)
        if is_async:
            child.aio[delivery.id] = running
            self.begin(running, now, mark=False)  # STARTED once the child read it: mark_read
            child.unmarked.append(running)
            if running.soft_deadline or running.hard_deadline:
                child.timed.add(delivery.id)
        else:
            child.tasks.append(running)
            if len(child.tasks) == 1:
                self.begin(running, now)
        frame = encode_task(delivery.deliveries, delivery.body)
        child.bytes_handed += len(frame)
        running.frame_end = child.bytes_handed
        child.tasks_out.add(frame)  # see dispatch
        self.unsent[child.pid] = child

    def begin(self: Worker, running: Running, now: float, mark: bool = True) -> None:
        """The task is now its child's current one: it is STARTED (one waiting in the pipe is
        not), and its time limits count from here. `mark`: say so to the broker now (an
        async task: once its child has read it, mark_read)."""
        soft, hard = self.time_limits.get(
            running.delivery.name, (self.spec.soft_time_limit, self.spec.time_limit)
        )
        running.started = now
        running.soft_deadline = now + soft if soft else None
        running.hard_deadline = now + hard if hard else None
        if mark:
            self.mark_started(running)

    def mark_started(self: Worker, running: Running) -> None:
        """The broker's STARTED mark and the event: a death from now on may be the task's."""
        if running.delivery.id not in self.revoked:  # the child skips it: REVOKED, not run
            self.started_ids.append(running.delivery.id)
            self.emit("task-started", running.delivery)

    def mark_read(self: Worker) -> None:
        """STARTED for the async tasks whose frames their child has read: one handed to a
        child whose loop another task blocks waits unread, and is no task a death of the
        worker (or the child) may be charged to."""
        for child in self.children.values():
            self.mark_child_read(child)

    def mark_child_read(self: Worker, child: ChildProc) -> None:
        if not child.unmarked:
            return
        read = bytes_read(child)
        while child.unmarked and (read is None or child.unmarked[0].frame_end <= read):
            running = child.unmarked.popleft()
            if not running.settled and running.delivery.id in child.aio:
                self.mark_started(running)

    # --- autoscale: worker/autoscale.py decides, the lines above fork and let go -----------
    def pool_bounds(self: Worker) -> tuple[int, int]:
        """The bounds `pool grow|shrink` and TTIN/TTOU move the pool within: autoscale's MIN
        and MAX, else 1 and MAX_POOL."""
        low, high = self.spec.autoscale or (1, MAX_POOL)
        return low, high

    def autoscale(self: Worker, now: float) -> None:
        """With autoscale set, every DECIDE_EVERY seconds: move the pool's target by what the
        policy says of the load, and fork or let an idle child go at once."""
        if not self.spec.autoscale or now < self.autoscaled_at + DECIDE_EVERY:
            return
        low, high = self.spec.autoscale
        load = self.measure_load(now)
        self.autoscaled_at = now
        wait, idle = self.spec.autoscale_wait, self.spec.autoscale_idle
        step = decide(self.target_children, low, high, load, wait, idle)
        if step < 0 and now - self.grown_by_hand_at < idle:
            step = 0  # an operator's grow stands for autoscale_idle, as an idle child does
        if step > 0:  # never more children than the open-files limit lets the worker hold
            step = max(0, pool_room(self, self.target_children + step)[0] - self.target_children)
        if step:
            self.target_children += step
            log.info(
                "autoscale: pool %s to %d (longest wait %.1fs, longest idle %.1fs)",
                "grows" if step > 0 else "shrinks",
                self.target_children,
                load.wait,
                load.idle_for,
                extra={"node": self.node},
            )
            self.manage_children()

    def measure_load(self: Worker, now: float) -> Load:
        """The longest a task waited to start, of those waiting now and those started since
        the last decision (seconds since it was ready in its queue), and how long children
        sat idle. Tasks of a rate-limited name are not timed: a token, not a child, may be
        what they waited for."""
        wall = time.time()
        waiting = list(self.reserved)[self.rate_limited :]  # after those waiting for a token
        started: list[tuple[Delivery, float]] = []
        live = [c for c in self.children.values() if not c.retiring and not c.spare]
        for child in live:
            waiting += [r.delivery for r in list(child.tasks)[1:]]
            for running in child.in_flight:  # its async tasks, or its first sync one
                if running.started >= self.autoscaled_at:
                    started.append((running.delivery, wall - (now - running.started)))
        timed = started + [(d, wall) for d in waiting]
        waits = [at - d.ready_at for d, at in timed if self.timed(d)]
        marks = {c.pid: self.busy_mark(c, now) for c in live}
        self.busy_marks = marks
        idle = [now - marks[c.pid][1] for c in live if not c.handed]
        return Load(
            wait=max(waits, default=0.0),
            backlog=bool(waiting) or not self.queue_dry,
            idle_children=len(idle),
            idle_for=max(idle, default=0.0),
        )

    def timed(self: Worker, delivery: Delivery) -> bool:
        """Whether the task's wait counts: its broker said when it was ready, and no rate
        limit may have held it back (more children would not have started it sooner)."""
        return bool(delivery.ready_at) and delivery.name not in self.rate_limits.buckets

    def busy_mark(self: Worker, child: ChildProc, now: float) -> tuple[int, float]:
        """(tasks done, when it last had a task) of the child, as the decisions see it: a
        child that holds a task, or ran one since the last decision, was busy now."""
        done, at = self.busy_marks.get(child.pid, (-1, now))
        return child.tasks_done, now if child.handed or child.tasks_done != done else at


def rss(pid: int) -> int | None:
    """Resident memory of a process in bytes; None if it is gone (read from /proc, as
    psutil does, without importing psutil into every worker)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def wait_for(pid: int, options: int) -> int | None:
    """A child's exit status (-1 if it is not ours to wait for); None if it has not exited."""
    try:
        reaped, status = os.waitpid(pid, options)
    except ChildProcessError:
        return -1
    return status if reaped else None


def signal_group(pid: int, signum: int) -> None:
    """Signal a child's process group, and the child itself: a task may move its child out of
    that group (into its worker's, or into a group of a subprocess of its own), and a child
    not yet reaped is ours whatever group it is in."""
    for send in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            send(pid, signum)


def bytes_read(child: ChildProc) -> int | None:
    """How many bytes of the task frames handed to the child it has read: those handed, less
    those in its pipe (FIONREAD on our end, which Linux answers after the reader is gone)
    and in the outbox; None if that cannot be told (its pipe closed)."""
    if child.tasks_out.fd < 0:
        return None
    try:
        held = fcntl.ioctl(child.tasks_out.fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return None
    in_pipe = struct.unpack("i", held)[0]
    return child.bytes_handed - in_pipe - child.tasks_out.size - child.bytes_dropped


def never_read(running: Running, read: int | None) -> bool:
    """Whether the child has not read all of `running`'s frame (`read`: bytes_read), so
    cannot have started it; False where that cannot be told."""
    return read is not None and read < running.frame_end


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

"""Async tasks in the pool: where they go, their replies in any order, their deadlines and
cancels, and their child's death. The async half of the pool (worker/pool.py), mixed into
`Worker` (worker/process.py).

Sync and `async def` tasks share the children. A sync task goes to a child with no async task
in flight, and waits in its pipe behind the sync ones it holds (`prefetch`); an async task goes
to a child running no sync task, up to `async_concurrency` of them in flight there, every one
running (the worker keeps `prefetch` per slot reserved for them, and hands one over as a slot
frees). So a sync task never stalls async tasks in flight, and a sync task waiting for a child
drains one: the async child with the fewest in flight takes no new async task until it is
empty, then runs the sync task.

Each async task keeps its own deadlines here. Its soft limit and its cancel (hard limit,
revoke with terminate) go to the child as control lines (worker/protocol.py's marks, read
by worker/aio.py); a child that does not end a cancelled task within TERMINATE_GRACE (a
task blocks its loop) is killed, and its other tasks go back to the queue without a
delivery strike. A child that dies otherwise
(KILL, OOM) takes a delivery from every task it had in flight, which all go back at once.
Which of them killed it cannot be told, so a task on its last chance (a death now makes it
WorkerLost) runs alone, on a child with no other task, which takes none until it ends: the
death that dead-letters a task is one that it alone can have caused. Where every death
dead-letters (max_deliveries = 1, acks_late off), none runs alone.
"""

# The methods below are checked as `Worker`'s (`self: Worker`, the class they are mixed into);
# mypy's rule that a self type be a supertype of its class does not fit a mixin.
# mypy: disable-error-code="misc"

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .brokers.base import Delivery
from .protocol import CANCEL_MARK, SOFT_MARK, id_line

if TYPE_CHECKING:
    from .pool import ChildProc, Running
    from .process import Worker

log = logging.getLogger("fleetd.worker")

TERMINATE_GRACE = 1.0  # seconds a terminated (or cancelled async) task's child gets before SIGKILL
LOOKAHEAD = 256  # reserved tasks dispatch looks past, for a kind of task a child has room for
# The kinds of task dispatch finds a child for: a sync one, an async one, and an async one on
# its last chance, which runs alone.
SYNC, ASYNC, ALONE = "sync", "async", "alone"
KINDS = (SYNC, ASYNC, ALONE)


class AsyncPool:
    """Where async tasks go and how they end; the worker's loop calls it through the pool."""

    # State of the worker's that this half writes (declared where it is written).
    dispatch_stuck: bool

    def async_done(self: Worker, child: ChildProc, running: Running, reply: dict[str, Any]) -> None:
        """An async task's reply, in whatever order they end: the others run on."""
        if running in child.unmarked:  # it ran before mark_read saw its frame read
            child.unmarked.remove(running)
            self.mark_started(running)
        child.timed.discard(running.delivery.id)
        child.tasks_done += 1
        if reply.get("exit"):
            child.retiring = True
        if not running.settled:  # else: time limit or terminate settled it when it was cancelled
            self.settle(running.delivery, reply)
        if self.should_recycle(child):
            self.retire_child(child)  # its pipe closes: it ends what it holds, then leaves

    def undecodable_async(self: Worker, child: ChildProc, number: Any) -> Running | None:
        """The async task whose frame the child could not read (it has no id to answer by,
        so it names the frame by its number), taken from those in flight."""
        for running in child.aio.values():
            if running.number == number:
                return child.aio.pop(running.delivery.id)
        return None

    def async_child_gone(
        self: Worker, child: ChildProc, clean: bool, unread: set[str] | None = None
    ) -> None:
        """Settle the async tasks of a child that is gone: each in flight is redelivered at
        once, counting a delivery, as a sync task is; none counts if the child left cleanly
        (they never started) or was killed because another task blocked its loop, nor do
        those whose frames it had not read (`unread`: they never started either)."""
        unanswered = [r.delivery for r in child.aio.values() if not r.settled]
        child.aio.clear()
        child.timed.clear()
        if not unanswered:
            return
        if clean or child.blocked:
            self.release_now([d.id for d in unanswered], died=False)
            return
        never = [d.id for d in unanswered if d.id in (unread or ())]
        if never:
            self.release_now(never, died=False)
            unanswered = [d for d in unanswered if d.id not in never]
            if not unanswered:
                return
        log.warning(
            "child %d died running %d async tasks",
            child.pid,
            len(unanswered),
            extra={"node": self.node},
        )
        self.tasks_lost(unanswered)

    def child_for_async(self: Worker) -> ChildProc | None:
        """The child with the fewest async tasks in flight, if it runs no sync task and has
        fewer than `async_concurrency`. Never one about to be recycled, one draining, nor one
        running a task alone."""
        room = self.spec.async_concurrency
        return self.least_loaded(
            lambda c: len(c.aio),
            lambda c: (
                not c.tasks and not c.draining and len(c.aio) < room and not self.runs_alone(c)
            ),
        )

    def child_for_alone(self: Worker) -> ChildProc | None:
        """A child with no task at all, for an async task on its last chance (one draining
        for a sync task too: whichever of them comes first takes it)."""
        return self.least_loaded(lambda c: 0, lambda c: not c.aio and not c.tasks)

    def last_chance(self: Worker, delivery: Delivery) -> bool:
        """A death now dead-letters the task (settle.py's `tasks_lost`): it runs alone. Not
        where every death does (max_deliveries = 1, acks_late off): every task would run
        alone, one at a time, to spare none of them anything; they run together as before."""
        spec = self.spec
        return (
            spec.acks_late
            and spec.max_deliveries > 1
            and delivery.deliveries >= spec.max_deliveries
        )

    def runs_alone(self: Worker, child: ChildProc) -> bool:
        """The child runs a task on its last chance: handed only to a child with no task,
        it is the one task in flight there until it ends."""
        if len(child.aio) != 1:
            return False
        [running] = child.aio.values()
        return self.last_chance(running.delivery)

    def drain_a_child(self: Worker) -> None:
        """A task that needs a child of its own (a sync task, an async one on its last
        chance) waits and every child has async tasks: the one with the fewest takes no more
        until it is empty, and then runs it (see the module's docstring)."""
        live = [c for c in self.children.values() if not c.retiring and not c.spare]
        if not live or any(c.draining or not c.aio for c in live):
            return  # one drains already, or one without async tasks will have room
        min(live, key=lambda c: len(c.aio)).draining = True

    def terminate_async(self: Worker, child: ChildProc, running: Running) -> None:
        """Revoke an async task with terminate: REVOKED, cancelled on its child's loop (no
        signal: the child runs other tasks)."""
        self.revoke_now(running.delivery, terminated=True)
        self.cancel_async(child, running, time.monotonic())

    def cancel_async(self: Worker, child: ChildProc, running: Running, now: float) -> None:
        """End an async task that is settled already (time limit, revoke with terminate): it
        is cancelled on its child's loop, and the child is killed if it is not done in time."""
        running.settled = True
        running.terminated_at = now
        child.timed.add(running.delivery.id)
        self.write_child(child, child.revokes_out, id_line(running.delivery.id, CANCEL_MARK))

    def enforce_async_limits(self: Worker, child: ChildProc, now: float) -> None:
        """The deadlines of a child's async tasks: a soft limit and a cancel are control
        lines to it; a cancel it did not act on in time means its loop is blocked. A task
        it has not read yet (its loop blocked by another) has not started: its limits wait,
        and a cancel's grace counts from when it can be read (the child skips it then)."""
        unread = {r.delivery.id for r in child.unmarked}
        for task_id in list(child.timed):
            running = child.aio[task_id]
            if task_id in unread:
                if running.terminated_at is not None:
                    running.terminated_at = now
                continue
            if running.terminated_at is not None:
                if now - running.terminated_at >= TERMINATE_GRACE:
                    self.kill_blocked(child, running)
                    return
                continue
            if running.soft_deadline and not running.soft_sent and now >= running.soft_deadline:
                running.soft_sent = True
                self.write_child(child, child.revokes_out, id_line(task_id, SOFT_MARK))
            if running.hard_deadline and now >= running.hard_deadline:
                self.time_limit_exceeded(running, "cancelled")
                self.cancel_async(child, running, now)
            elif running.hard_deadline is None and running.soft_sent:
                child.timed.discard(task_id)  # nothing left to watch

    def async_deadlines(self: Worker, child: ChildProc) -> list[float]:
        """When `enforce_async_limits` has something to do for the child next."""
        deadlines = []
        unread = {r.delivery.id for r in child.unmarked}  # mark_read looks at those
        for task_id in child.timed:
            if task_id in unread:
                continue
            running = child.aio[task_id]
            if running.terminated_at is not None:
                deadlines.append(running.terminated_at + TERMINATE_GRACE)
                continue
            if running.soft_deadline and not running.soft_sent:
                deadlines.append(running.soft_deadline)
            if running.hard_deadline:
                deadlines.append(running.hard_deadline)
        return deadlines

    def kill_blocked(self: Worker, child: ChildProc, running: Running) -> None:
        log.warning(
            "child %d did not cancel task %s in %gs (a task blocks its loop): killing it; its "
            "other tasks go back to the queue",
            child.pid,
            running.delivery.id,
            TERMINATE_GRACE,
            extra={"node": self.node, "task": running.delivery.id},
        )
        child.blocked = True
        child.retiring = True
        child.timed.clear()
        self.kill_group(child.pid)

    def dispatch_mixed(self: Worker, now: float) -> None:
        """`dispatch` where some tasks are `async def`: each kind to a child with room for
        it; a task whose kind has no room lets those behind it (up to LOOKAHEAD) go first."""
        self.rate_wait_until = 0.0
        skipped: list[Delivery] = []  # waiting for a rate-limit token
        passed: list[Delivery] = []  # waiting for a child with room for their kind
        full: set[str] = set()  # the kinds no child has room for
        while self.reserved and len(full) < len(KINDS) and len(passed) < LOOKAHEAD:
            delivery = self.reserved.popleft()
            kind = self.kind_of(delivery)
            child = None if kind in full else self.child_for(kind)
            if child is None:
                full.add(kind)  # and every kind no child has room for: no use looking further
                full.update(k for k in KINDS if k not in full and self.child_for(k) is None)
                passed.append(delivery)
                continue
            self.hand_over(child, delivery, now, skipped, kind != SYNC)
        if any(self.kind_of(d) != ASYNC for d in passed):
            self.drain_a_child()
        else:
            for child in self.children.values():
                child.draining = False
        self.reserved.extendleft(reversed(skipped + passed))
        self.rate_limited = len(skipped)
        self.dispatch_stuck = bool(passed)

    def kind_of(self: Worker, delivery: Delivery) -> str:
        if delivery.name not in self.async_names:
            return SYNC
        return ALONE if self.last_chance(delivery) else ASYNC

    def child_for(self: Worker, kind: str) -> ChildProc | None:
        if kind == SYNC:
            return self.child_with_room()
        return self.child_for_alone() if kind == ALONE else self.child_for_async()

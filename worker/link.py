"""The link to the broker: reserving in batches, taking in deliveries, flushing what
happened, renewing leases, giving tasks back, and waiting out an unreachable broker.
The broker half of `Worker`."""

# The methods below are checked as `Worker`'s (`self: Worker`, the class they are mixed into);
# mypy's rule that a self type be a supertype of its class does not fit a mixin.
# mypy: disable-error-code="misc"

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .brokers.base import BAD_MESSAGE, Delivery, Outcome, Retry, Turn
from .child import (
    TYPE_NAME_LIMIT,
    printable,
)
from .protocol import oversize
from .task import REGISTRY, body_problem

if TYPE_CHECKING:
    from .process import Worker

log = logging.getLogger("fleetd.worker")

BROKER_BACKOFF_MIN = 0.2  # seconds before trying an unreachable broker again; doubles each time
BROKER_BACKOFF_MAX = 5.0
STARTED_FLUSH_DELAY = 0.02  # seconds a STARTED mark may wait for the next turn
OUTCOME_FLUSH_DELAY = 0.005  # seconds an outcome may wait for it while other tasks run
DRY_RECHECK = 1.0  # seconds after a short reserve before reserving again unwoken
RATE_LIMITED_MAX = 100  # tasks held waiting for a rate-limit token on top of the prefetch
# Seconds between two reads of revokes that revoke wake-ups ask for, at least: a flood of
# revokes costs a worker ten small reads a second at most.
REVOKES_READ_GAP = 0.1
ASYNC_SLOTS_FOR = 1.0  # seconds a worker reserves for async slots after it last got an async task
# Of the lease, how old the last renew that went through may be before the next comes ahead
# of handing tasks out (renew_first); in the normal flow one comes every third of a lease.
LEASE_AT_RISK = 2 / 3


class BrokerLink:
    """One turn to the broker per loop turn where it can (`Broker.turn`)."""

    # State of the worker's that this half writes (declared where it is written).
    started_ids: list[str]
    outcomes: list[Outcome]
    retries: list[Retry]
    unreleased: dict[bool, list[str]]
    lease_lost: set[str]
    renewed_at: float
    booted_in_broker: bool
    etas_read_at: float | None
    reserve_again: bool
    revokes_unread: bool
    revokes_read_from: float
    broker_deadline: float | None

    def release_now(self: Worker, ids: list[str], died: bool) -> None:
        """Give tasks back at once. While the broker is unreachable they wait here, unrenewed,
        and go with the first flush that gets through, if still ours (else their lease gave
        them back meanwhile, and someone else may hold them now). Those whose lease was lost
        already (drop_lost) are not ours to give back."""
        if self.lease_lost:
            ids = [i for i in ids if not self.forget_lost(i)]
        self.unreleased[died] += ids
        self.flush()

    def send_releases(self: Worker) -> None:
        for died, ids in self.unreleased.items():
            if ids and self.broker_available():
                with self.broker_call("give tasks back"):
                    self.broker.release(ids, died=died, owner=self.owner)
                    self.unreleased[died] = []

    def capacity(self: Worker) -> int:
        """Tasks held at most: per child, one running and `prefetch` waiting for each of its
        slots: `async_concurrency` of them while async tasks come in (a reserve brought one
        in the last ASYNC_SLOTS_FOR seconds, or one runs), else one. Sync tasks alone are
        held as a sync pool holds them, even where some tasks are `async def`: the other
        workers on the same queues get their share of them."""
        slots = self.spec.async_concurrency if self.async_slots_open() else 1
        held = self.target_children * slots * (1 + self.spec.prefetch)
        if self.spec.autoscale and not self.spec.prefetch:
            # One more, which waits here while every child is busy: its wait is what tells
            # autoscale that the queue keeps tasks waiting (a long task starts nothing new
            # for as long as it runs, and with none waiting here the pool would never grow).
            held += self.target_children < self.spec.autoscale[1]
        return held

    def async_slots_open(self: Worker) -> bool:
        """Async tasks come in: a reserve brought one a moment ago, or one runs."""
        if not self.async_names:
            return False
        if time.monotonic() - self.async_reserved_at < ASYNC_SLOTS_FOR:
            return True
        return any(c.aio for c in self.children.values())

    def held(self: Worker) -> int:
        """Tasks that count against the prefetch. Those waiting for a rate-limit token do not
        (up to RATE_LIMITED_MAX): other task types queued behind them still come in and run."""
        handed = sum(c.handed for c in self.children.values())
        return len(self.reserved) - min(self.rate_limited, RATE_LIMITED_MAX) + handed

    def reserve_more(self: Worker) -> None:
        """Top up the reserved buffer, in batches: once it is half empty, or sooner when a
        child is about to run out of tasks with none reserved to give it. A reserve that
        brought the first async tasks in a while widens the capacity: the rest of them are
        reserved at once, not after the tasks in flight end."""
        self.reserve_again = False
        capacity = self.capacity()
        self.reserve_up_to(capacity)
        if (wider := self.capacity()) > capacity:
            self.reserve_up_to(wider)

    def boot_in_broker(self: Worker) -> bool:
        """The boot's broker work, done once: its risks logged, the expired leases of this
        host's dead workers given back, the task routes published. Whether it is done: a
        broker unreachable at the boot has it done once it answers, before any reserve (else
        a task a deploy moved to another queue would wait where no worker reads it)."""
        if self.booted_in_broker:
            return True
        with self.broker_call("boot"):
            for risk in self.broker.risks():
                log.warning("%s", risk, extra={"node": self.node})
            self.broker.recover_expired(self.spec.queues, self.keep_host, self.owner)
            # Where each task goes, for clients that submit by name without its code.
            self.broker.set_routes({name: task.queue for name, task in REGISTRY.items()})
            self.booted_in_broker = True
        return self.booted_in_broker

    def reserve_up_to(self: Worker, capacity: int) -> None:
        want = capacity - self.held()
        if want <= 0:
            return
        if want < max(1, capacity // 2) and (self.reserved or not self.running_dry()):
            return
        if not self.broker_available() or self.known_dry() or not self.boot_in_broker():
            return
        with self.broker_call("reserve"):
            # What the last turns did goes in the same transaction.
            deliveries = self.broker.turn(self.written_turn(want))
            self.started_ids, self.outcomes, self.retries = [], [], []
            self.flush_at = 0.0  # what happened went along
            was_dry, self.queue_dry = self.queue_dry, len(deliveries) < want
            if self.queue_dry and not was_dry:  # no scheduled task was announced to a busy
                self.etas_read_at = None  # worker (a Redis one's): read the ETAs afresh
            self.queue_changed = False  # a wake-up published meanwhile is read next turn
            self.dry_recheck_at = time.monotonic() + DRY_RECHECK
            for delivery in deliveries:
                self.accept(delivery)
            # Tasks settled as they came in (dead-lettered, revoked) took none of the room
            # they were reserved for: with more waiting, reserve again at once, not at the
            # next wake-up or second (a backlog under a renamed task's old name, say).
            if not self.queue_dry and self.held() < capacity:
                self.reserve_again = True

    def known_dry(self: Worker) -> bool:
        """Whether the last reserve came back short and nothing since says there is more: no
        wake-up (every write that adds a task publishes one to a worker whose reserve came
        back short, as ours did), no ETA come due, and less than
        DRY_RECHECK seconds gone (a lease that ran out frees a task without one)."""
        eta_due = self.next_eta is not None and self.next_eta <= time.time()
        return (
            self.queue_dry
            and not self.queue_changed
            and not eta_due
            and time.monotonic() < self.dry_recheck_at
        )

    def running_dry(self: Worker) -> bool:
        """Whether a child that can take tasks has at most the one it is running."""
        child = self.child_with_room()
        return child is not None and len(child.tasks) <= 1

    def accept(self: Worker, delivery: Delivery) -> None:
        """Take in a reservation: run it later, or settle it now if it must not run."""
        if delivery.id in self.revoked:
            self.revoke_now(delivery)
        elif delivery.deliveries > self.spec.max_deliveries:
            self.dead_letter(
                delivery,
                "WorkerLost",
                f"delivered {delivery.deliveries - 1} times without finishing",
            )
        elif too_large := oversize(delivery.body):
            self.dead_letter(delivery, "TaskTooLarge", too_large)
        elif (problem := body_problem(delivery.body, delivery.id, delivery.name)) is not None:
            self.dead_letter(delivery, BAD_MESSAGE, problem)
        elif delivery.name not in REGISTRY:
            name = printable(delivery.name, TYPE_NAME_LIMIT)
            self.dead_letter(delivery, "NotRegistered", f"no task named {name!r} on {self.node}")
        else:
            if delivery.name in self.async_names:
                self.async_reserved_at = time.monotonic()
            self.reserved.append(delivery)
            self.emit("task-received", delivery)

    def flush(self: Worker) -> None:
        """Write what happened to the broker in one transaction. While the broker is
        unreachable it stays buffered here, and goes out whole once the broker answers."""
        self.flush_at = 0.0
        if self.unacked() and self.broker_available():
            with self.broker_call("ack"):
                self.broker.turn(self.written_turn())
                self.started_ids, self.outcomes, self.retries = [], [], []
        self.send_releases()
        self.send_events()

    def flush_due(self: Worker, now: float) -> bool:
        """Whether what happened goes to the broker now rather than with the next turn.

        Outcomes go at once when no child has a task left (someone may be waiting for the
        result, and no turn is coming), when stopping, and after OUTCOME_FLUSH_DELAY; retries
        at once; STARTED marks after STARTED_FLUSH_DELAY. Until then the turn that reserves
        more takes them along, so that a busy worker acks and stores results in batches.
        """
        if not self.unflushed() or not self.broker_available():
            return False  # an unreachable broker: the next try is on the renew deadline
        if self.retries or (self.outcomes and (self.shutdown is not None or not self.busy())):
            return True
        delay = OUTCOME_FLUSH_DELAY if self.outcomes else STARTED_FLUSH_DELAY
        self.flush_at = min(self.flush_at or now + delay, now + delay)
        return now >= self.flush_at

    def busy(self: Worker) -> bool:
        return any(child.handed for child in self.children.values())

    def written_turn(self: Worker, want: int = 0) -> Turn:
        """What the last turns did, for the broker, and `want` more tasks to reserve."""
        started = self.started_ids
        if self.lease_lost:  # a child's skip of one is no start, and the task another's
            started = [i for i in started if i not in self.lease_lost]
        return Turn(
            node=self.node,
            started=started,
            outcomes=self.outcomes,
            retries=self.retries,
            queues=self.spec.queues,
            n=want,
            owner=self.owner,
            lease=self.spec.lease,
        )

    def unacked(self: Worker) -> bool:
        """Whether a turn has something to write: STARTED marks, outcomes, retries."""
        return bool(self.started_ids or self.outcomes or self.retries)

    def unflushed(self: Worker) -> bool:
        return self.unacked() or any(self.unreleased.values())

    def renew(self: Worker, now: float) -> None:
        """Renew the leases of everything held, and let go of what was lost meanwhile; take
        back tasks whose owner's lease ran out."""
        self.next_renew = now + max(0.5, self.spec.lease / 3)
        held = self.held_ids()
        # Those ended here whose outcome waits for the next flush are still ours there:
        # renewed too, else recover_expired would give them back to run again.
        ended = [o.id for o in self.outcomes] + [r.id for r in self.retries]
        with self.broker_call("renew leases"):
            self.drop_lost(self.broker.extend(held + ended, self.owner, self.spec.lease))
            self.renewed_at = now
            if self.shutdown is None:
                self.broker.recover_expired(self.spec.queues, self.keep_host, self.owner)
                self.read_revokes(held)
        self.recover_dead_owners()

    def renew_first(self: Worker, now: float) -> None:
        """Renew now, before tasks are handed to children, if the leases may have run out:
        the last renew that went through is most of a lease old (the worker was stopped, or
        cut off from the broker). A task another owner took back meanwhile is then dropped
        here, not started twice. In the normal flow a renew is never that late."""
        if now >= self.next_renew and now - self.renewed_at >= self.spec.lease * LEASE_AT_RISK:
            self.renew(now)

    def drop_lost(self: Worker, lost: list[str]) -> None:
        """Let go of the tasks whose lease ran out while this worker was stopped or cut off
        from the broker past its lease (`Broker.extend`'s lost ones): another owner may run
        them now. Those reserved are forgotten, and those waiting in a child's pipe are not
        started; neither is given back nor ended by us (Settlement.lost_end). Those running
        run on: a start cannot be undone, and the stall interrupted them as a host's death
        would, after which a task may run twice; what they end in is written."""
        if not lost:
            return
        gone = set(lost)
        waiting_for_token = list(self.reserved)[: self.rate_limited]  # at its head: dispatch
        self.rate_limited -= sum(d.id in gone for d in waiting_for_token)
        kept = [d for d in self.reserved if d.id not in gone]
        forgotten = len(self.reserved) - len(kept)
        self.reserved.clear()
        self.reserved.extend(kept)
        # Not those settled already (a time limit, a revoke with terminate): ended here.
        handed, running = set[str](), set[str]()
        for child in self.children.values():
            handed.update(
                r.delivery.id for r in (*child.tasks, *child.aio.values()) if not r.settled
            )
            running.update(r.delivery.id for r in child.in_flight)
        handed &= gone
        if not (forgotten or handed):
            return
        self.lease_lost |= handed
        self.revoke_waiting(handed)
        log.warning(
            "lost the lease of tasks held here (the worker was stopped, or cut off from the"
            " broker, past its lease): %d running run on, and may run elsewhere too; %d not"
            " started are left to their new owner",
            len(handed & running),
            forgotten + len(handed - running),
            extra={"node": self.node},
        )

    def forget_lost(self: Worker, task_id: str) -> bool:
        """Whether the task, which ends here now, had its lease lost here (drop_lost); it
        is forgotten."""
        if task_id not in self.lease_lost:
            return False
        self.lease_lost.discard(task_id)
        return True

    def held_ids(self: Worker) -> list[str]:
        """The ids of the tasks held here: reserved, waiting in a child's pipe, running; not
        those whose lease was lost (drop_lost)."""
        ids = [d.id for d in self.reserved] + [
            r.delivery.id for c in self.children.values() for r in (*c.tasks, *c.aio.values())
        ]
        return [i for i in ids if i not in self.lease_lost] if self.lease_lost else ids

    def read_revokes(self: Worker, held: list[str]) -> None:
        """Ask the broker which of the tasks `held` here were revoked there (`Client.revoke`
        writes the broker alone; `fleetctl revoke` tells the workers too): one reserved or
        waiting in a child's pipe is then not started. Only the held ids are asked about,
        so a read costs the same however many ids were ever revoked. Tasks not held here
        need no read: the broker ends a queued task REVOKED at its revoke, and one submitted
        or given back after it at once."""
        fresh = self.broker.revoked_among(held) - self.revoked
        self.revokes_unread = False
        self.revokes_read_from = time.monotonic() + REVOKES_READ_GAP
        if fresh:
            self.revoked |= fresh
            self.revoke_waiting(fresh)

    def revokes_due(self: Worker, now: float) -> bool:
        """Whether ids revoked meanwhile are to be read now: a wake-up announced them, or a
        broker call failed, and REVOKES_READ_GAP has passed (not after a failure)."""
        return self.revokes_unread and self.broker_available() and now >= self.revokes_read_from

    def recover_dead_owners(self: Worker) -> None:
        """Give back the tasks of the consumers the arbiter saw die (later, if the broker is
        unreachable now)."""
        while self.dead_owners and self.broker_available():
            with self.broker_call("give back a dead consumer's tasks"):
                count = self.broker.recover(self.dead_owners[-1])
                if count:  # counted as a child's death counts its task
                    self.counts["redelivered"] += count
                    self.emit("redelivered", count=count)
                owner = self.dead_owners.pop()
                log.info(
                    "gave back %d tasks of dead consumer %s",
                    count,
                    owner,
                    extra={"node": self.node},
                )
                self.send({"type": "recovered", "owner": owner})  # the arbiter may forget it

    def give_up_on_broker_at(self: Worker, deadline: float) -> None:
        """A stopping worker's tasks have ended: from now on no broker call holds it past
        `deadline`. What it could not ack or give back by then stays leased to it, and its
        lease gives it back (at-least-once)."""
        self.broker_deadline = deadline
        self.broker.give_up_at(deadline)

    def broker_available(self: Worker) -> bool:
        """False while backing off from an unreachable broker."""
        return time.monotonic() >= self.broker_retry_at

    @contextlib.contextmanager
    def broker_call(self: Worker, doing: str) -> Iterator[None]:
        """Around broker calls: an unreachable broker (down, restarting, locked) is waited out.

        The loop goes on meanwhile with what it holds: children run the tasks reserved,
        outcomes stay buffered (the caller keeps its state when the call fails), and the
        broker is tried again with a growing backoff; leases are renewed first thing.
        """
        try:
            yield
        except Exception as exc:
            if not self.broker.unavailable_now(exc):
                raise
            # Revokes made meanwhile, or since the last renew, are read before the next
            # reserve (the step that makes it reads them first, whatever the gap): the
            # first one once the broker answers may come before any renew.
            self.revokes_unread, self.revokes_read_from = True, 0.0
            level = logging.DEBUG if self.broker_backoff else logging.WARNING
            self.broker_backoff = min(
                BROKER_BACKOFF_MAX, max(BROKER_BACKOFF_MIN, 2 * self.broker_backoff)
            )
            self.broker_retry_at = self.next_renew = time.monotonic() + self.broker_backoff
            self.broker_failing = doing
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
        if self.broker_backoff and self.broker_back(doing):
            self.broker_backoff = 0.0
            log.info("broker reachable again", extra={"node": self.node})

    def broker_back(self: Worker, doing: str) -> bool:
        """Whether a call that went through says the broker is reachable again: one of the
        kind that failed last, or any once that kind has not been tried for a while (the
        worker no longer needed it). Not any call: a full disk under the queue file refuses
        every write, while reads and writes of nothing (a renew with no task held) go on;
        the backoff started over at each of those, and the worker tried again, and logged
        two lines, every 0.2 s for as long as the disk stayed full."""
        return (
            doing == self.broker_failing
            or time.monotonic() >= self.broker_retry_at + BROKER_BACKOFF_MAX
        )

"""The settlement: the one place a task's outcome is recorded (for the next flush to the
broker), counted (stats) and emitted (events, metrics). The settlement half of `Worker`."""

# The methods below are checked as `Worker`'s (`self: Worker`, the class they are mixed into);
# mypy's rule that a self type be a supertype of its class does not fit a mixin.
# mypy: disable-error-code="misc"

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .brokers.base import FAILURE, REVOKED, SUCCESS, Delivery, Outcome, Retry
from .child import (
    outcome_of,
)

if TYPE_CHECKING:
    from .process import Worker


# An outcome's state: the count it adds to, and its event.
ENDINGS = {
    SUCCESS: ("succeeded", "task-succeeded"),
    FAILURE: ("failed", "task-failed"),
    REVOKED: ("revoked", "task-revoked"),
}


class Settlement:
    """Every path that ends a task (a child's reply, a death, a time limit, a revoke, a
    dead letter) ends it here."""

    def record(self: Worker, delivery: Delivery, ended: Outcome | Retry, **event: Any) -> None:
        """The one place a task ends: its outcome goes to the next flush, its state is
        counted, and its event emitted (`event`: the event's extra fields)."""
        if self.lease_lost and self.lost_end(delivery, ended):
            return
        if isinstance(ended, Retry):
            self.retries.append(ended)
            self.counts["retried"] += 1
            self.emit("task-retried", delivery, **event)
            return
        self.outcomes.append(ended)
        if ended.dead_letter:
            self.counts["dead_lettered"] += 1
            self.emit("task-failed", delivery, exc_type=ended.exc_type, **event)
            self.emit("dead-lettered")
            return
        counter, kind = ENDINGS.get(ended.state, ("failed", "task-failed"))
        self.counts[counter] += 1
        if ended.state == FAILURE:
            event.setdefault("exc_type", ended.exc_type)
        if ended.runtime is not None:
            event.setdefault("runtime", ended.runtime)
        self.emit(kind, delivery, **event)

    def lost_end(self: Worker, delivery: Delivery, ended: Outcome | Retry) -> bool:
        """Whether `ended` ends a task whose lease was lost here (BrokerLink.drop_lost) and
        is not ours to write, the task being another owner's now: a revoke (its child
        skipped it: it never ran here), a retry (the owner's run retries it if it must;
        ours would queue it again while that one runs) or a dead letter (its child died:
        the owner's run decides). A run that ended here, in success or failure, is written
        as any finish is: it is true, and spares a run where no one took the task yet."""
        if not self.forget_lost(delivery.id):
            return False
        if isinstance(ended, Retry) or ended.state == REVOKED or ended.dead_letter:
            if delivery.id in self.started_ids:  # its child skipped it: no start to write
                self.started_ids.remove(delivery.id)
            return True
        return False

    def settle(self: Worker, delivery: Delivery, reply: dict[str, Any]) -> None:
        """Take in the outcome a child reported for its task."""
        self.record(delivery, outcome_of(delivery, reply, self.node))

    def revoke_now(self: Worker, delivery: Delivery, **event: Any) -> None:
        """The task was revoked: REVOKED, never (or no more) run."""
        self.record(delivery, Outcome(delivery.id, REVOKED, node=self.node), **event)

    def task_lost(self: Worker, delivery: Delivery) -> None:
        """A child died mid-task: redeliver at once, or dead-letter after max_deliveries
        (at once with acks_late off: such a task is never run twice)."""
        self.tasks_lost([delivery])

    def tasks_lost(self: Worker, deliveries: list[Delivery]) -> None:
        """`task_lost` for every task a child had in flight, given back in one call."""
        back = []
        for delivery in deliveries:
            if not self.spec.acks_late or delivery.deliveries >= self.spec.max_deliveries:
                self.dead_letter(
                    delivery,
                    "WorkerLost",
                    f"the process running it died {delivery.deliveries} times",
                )
            else:
                back.append(delivery.id)
        if back:
            self.release_now(back, died=True)
            self.counts["redelivered"] += len(back)
            for _ in back:
                self.emit("redelivered")

    def dead_letter(self: Worker, delivery: Delivery, exc_type: str, message: str) -> None:
        """FAILURE `exc_type`, kept in the dead-letter list; never run again."""
        ended = Outcome(
            delivery.id,
            FAILURE,
            exc_type=exc_type,
            exc_message=message,
            node=self.node,
            dead_letter=True,
        )
        self.record(delivery, ended)

    def emit(self: Worker, kind: str, delivery: Delivery | None = None, **fields: Any) -> None:
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

"""The broker interface: the few verbs a worker and a client need, nothing more.

A broker stores task messages (an opaque JSON text body per task), hands them out
under a lease to one owner at a time, and keeps results, dead letters and revokes.
Every verb takes and returns batches, so that a worker spends one round trip (one
transaction) per batch, never one per task. `tests/brokers/` runs the same
contract suite against every implementation.

A broker holds whatever a producer wrote, so no read may fail on a stored value: text
that is not UTF-8 comes back with its undecodable bytes as lone surrogates
(`surrogateescape`: `text.encode("utf-8", "surrogateescape")` gives the bytes back), and
a record `reserve` cannot hand out (an id or name that is not UTF-8 text, no record
behind a Redis entry) ends there and then as FAILURE `BadMessage`, kept whole in the
dead-letter list. So a Delivery's id, queue and name are always text; its body is as
stored, for the worker to judge.
"""

from __future__ import annotations

import abc
import json
import math
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..task import LAST_ETA

# User-facing task states (DESIGN section 7).
PENDING = "PENDING"
STARTED = "STARTED"
RETRY = "RETRY"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
FINAL_STATES = frozenset({SUCCESS, FAILURE, REVOKED})

# Seconds a fail-fast caller's call (the worker's loop, fleetctl: see open_broker) waits on
# a broker that does not answer: a hung Redis, a SQLite write lock someone else holds. The
# loop's control replies, time limits and reaping wait no longer than that at a time (twice
# that on Redis, where a call that timed out is sent again once: redis.CallRetry).
FAIL_FAST_WAIT = 3.0


class BrokerUnavailable(Exception):
    """The broker cannot be reached or opened (down, refused, a path that cannot be made):
    one line naming the broker's URL (its password hidden) and why."""


def unavailable_error(url: str, exc: BaseException) -> BrokerUnavailable:
    """The BrokerUnavailable that `exc`, raised by the broker at `url`, stands for."""
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        reason = str(exc) or type(exc).__name__
    return BrokerUnavailable(f"broker {shown_url(url)}: {reason}")


def shown_url(url: str) -> str:
    """The URL with its password, if it has one, replaced by ***: fit for a message."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclass(frozen=True)
class Envelope:
    """A task message on its way into the broker."""

    id: str
    queue: str
    name: str
    body: str  # JSON text, decoded by the worker (a bad body is dead-lettered, not dropped)
    eta: float | None = None  # epoch seconds; None = ready now


@dataclass(frozen=True)
class Delivery:
    """A task message handed to one owner under a lease."""

    id: str
    queue: str
    name: str
    body: str  # as stored: the worker checks that it is a task (see the module docstring)
    deliveries: int  # counts this delivery: 1 the first time a task is handed out
    # Epoch seconds since when it waits to run (enqueued, due, given back); 0 = unknown.
    ready_at: float = field(default=0.0, compare=False)


@dataclass
class Outcome:
    """How a delivered task ended; a `Turn` that carries it acks it and stores its result."""

    id: str
    state: str  # SUCCESS | FAILURE | REVOKED
    result: Any = None
    exc_type: str | None = None
    exc_message: str | None = None
    traceback: str | None = None
    node: str | None = None
    runtime: float | None = None
    dead_letter: bool = False  # keep the raw message in the dead-letter list too
    name: str | None = None  # for records of tasks the broker never saw (undecodable)
    result_json: str | None = None  # the result as JSON text already (a child's): kept as is

    def stored_result(self) -> str:
        """The result as the JSON text to store."""
        return self.result_json if self.result_json is not None else json.dumps(self.result)


@dataclass
class Retry:
    """A delivered task going back to the broker with an ETA (state RETRY)."""

    id: str
    body: str  # the body to deliver next time (with its retry count raised)
    eta: float
    exc_type: str | None = None
    exc_message: str | None = None


@dataclass(frozen=True, kw_only=True)
class Turn:
    """What a worker writes to its broker once per loop turn, and what it asks of it: one
    transaction (one Redis script) with every part optional.

    In that order: the tasks in `started` began running on `node` (state STARTED, if still
    held); `outcomes` are acked and stored as results, and an outcome for an id the broker
    does not hold (an undecodable message with a made-up id) is stored as a result too;
    `retries` go back with their ETA and state RETRY; then up to `n` due tasks of `queues`
    are reserved for `owner` until now + `lease`.
    """

    node: str = ""
    started: Sequence[str] = ()
    outcomes: Sequence[Outcome] = ()
    retries: Sequence[Retry] = ()
    queues: Sequence[str] = ()
    n: int = 0  # how many to reserve: 0 reserves none
    owner: str = ""
    lease: float = 0.0  # seconds

    @property
    def wanted(self) -> int:
        """How many tasks to reserve: none without a queue to take them from."""
        return max(self.n, 0) if self.queues else 0

    @property
    def empty(self) -> bool:
        """Whether the turn writes nothing and asks for nothing."""
        return not (self.started or self.outcomes or self.retries or self.wanted)

    def marks(self) -> list[str]:
        """The started ids to mark STARTED: not those whose outcome in this turn names a node,
        which overwrites the state and the node anyway (an outcome without one keeps the
        node the start wrote)."""
        ending = {o.id for o in self.outcomes if o.node is not None}
        return [i for i in self.started if i not in ending] if ending else list(self.started)


@dataclass
class QueueDepth:
    queue: str
    ready: int = 0  # due now, waiting for a worker
    scheduled: int = 0  # waiting for their ETA
    reserved: int = 0  # handed to a worker (started or not)


@dataclass
class DeadLetter:
    id: str
    queue: str
    name: str
    body: str
    reason: str
    at: float
    extra: dict[str, Any] = field(default_factory=dict)


BAD_MESSAGE = "BadMessage"  # the reason for a message that is not a task
BAD_RESULT = "BadResult"  # what a stored result that is not JSON reads as


def no_constant(name: str) -> Any:
    """json.loads' parse_constant for strict JSON: NaN and infinity are not (Python's
    json.dumps writes them unless told not to; other readers of a result refuse them)."""
    raise ValueError(f"{name} is no JSON value")


def finite_number(text: str) -> float:
    """json.loads' parse_float for strict JSON: a number past a float's range (1e400) would
    read as infinity, which fleetctl's JSON output would then write as no JSON value."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is past the range of a float")
    return value


def number_or_text(text: str) -> float | str:
    """json.loads' parse_float for what is read as it is (a dead letter): a number past a
    float's range stays the text it was, as parse_constant=str keeps NaN."""
    value = float(text)
    return value if math.isfinite(value) else text


TEXT_FIELDS = ("name", "queue", "state", "exc_type", "exc_message", "traceback", "node")
INFO_FIELDS = (*TEXT_FIELDS, "result", "deliveries", "runtime")  # what task_info reads


def stored_text(value: Any) -> str | None:
    """A stored field as text: raw bytes (a BLOB) as the module docstring says."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def utf8_text(value: Any) -> bool:
    """Whether `value` is a str that UTF-8 can hold: no lone surrogate (as bytes that were
    not UTF-8 read back) in it."""
    if not isinstance(value, str):
        return False
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def stored_number(value: Any) -> float | None:
    """A stored field as a finite number, None if it is not one."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def stored_tick(value: Any) -> float | None:
    """A stored schedule tick as epoch seconds, None if it cannot be one: no finite number,
    or outside the calendar (before 1970, past the year 9999), which the schedule arithmetic
    (datetime, cronsim) cannot take."""
    number = stored_number(value)
    return number if number is not None and 0 <= number <= LAST_ETA else None


def owner_runs(owner: Any) -> bool:
    """Whether the worker process an owner names (`node:pid:epoch ms`, worker.process) still
    runs on this host: that pid, started no later than the owner was named (not a process
    that took the pid over since), and not a zombie. Anything else, someone else's value
    included, names no process that runs: text that is no UTF-8 too (no node name is), which
    the callers would hand back to their broker, which cannot take it."""
    from worker.tree import create_time  # a worker's call: producers never load ctypes

    if not utf8_text(owner):
        return False
    try:
        _, pid_text, named_ms = str(owner).rsplit(":", 2)
        pid, named = int(pid_text), int(named_ms) / 1000
    except ValueError:
        return False
    started = create_time(pid)
    return started is not None and started <= named + 1.0


def task_info(task_id: str, fields: dict[str, Any], done: bool) -> dict[str, Any]:
    """A task's info dict (`Broker.get_result`) from its stored fields, whatever they hold.

    A result that does not decode reads as FAILURE `BadResult`, never as an exception."""
    info: dict[str, Any] = {key: stored_text(fields.get(key)) for key in TEXT_FIELDS}
    info["id"] = task_id
    deliveries = stored_number(fields.get("deliveries"))
    info["deliveries"] = int(deliveries) if deliveries is not None else 0
    info["runtime"] = stored_number(fields.get("runtime"))
    info["result"] = None
    result = stored_text(fields.get("result"))
    if done and result is not None:
        try:
            info["result"] = json.loads(
                result, parse_constant=no_constant, parse_float=finite_number
            )
        except (ValueError, RecursionError) as exc:
            info.update(
                state=FAILURE,
                exc_type=BAD_RESULT,
                exc_message=f"the stored result is not JSON: {exc}",
            )
    return info


def dead_letter_from(fields: dict[str, Any]) -> DeadLetter:
    """A DeadLetter from its stored fields, whatever they hold."""
    extra = fields.get("extra")
    if not isinstance(extra, dict):
        try:
            extra = json.loads(
                stored_text(extra) or "{}", parse_constant=str, parse_float=number_or_text
            )
        except (ValueError, RecursionError):
            extra = {"raw": stored_text(extra)}
    return DeadLetter(
        id=stored_text(fields.get("id")) or "",
        queue=stored_text(fields.get("queue")) or "",
        name=stored_text(fields.get("name")) or "",
        body=stored_text(fields.get("body")) or "",
        reason=stored_text(fields.get("reason")) or "",
        at=stored_number(fields.get("at")) or 0.0,
        extra=extra if isinstance(extra, dict) else {"raw": extra},
    )


class Wakeup(abc.ABC):
    """A file descriptor that becomes readable when new work may be available.

    An idle worker polls it (with its children's pipes) instead of sleeping. Spurious
    wake-ups are allowed; missed ones are not, once `arm` returned, while some worker of
    the queue waits: one whose last reserve came back short. A broker may keep quiet while
    every reserve came back full (Redis does: a worker that got all it asked for reserves
    again once it has room, and a busy fleet would be woken at every submit otherwise).
    """

    @abc.abstractmethod
    def fileno(self) -> int: ...

    @abc.abstractmethod
    def arm(self) -> None:
        """Get ready to sleep: after this, new work makes `fileno()` readable."""

    @abc.abstractmethod
    def clear(self) -> bool:
        """Consume the readiness after a wake-up (never blocks). True if it may announce a
        task scheduled for later, so that the worker reads the queues' ETAs again."""

    def news(self) -> bool:
        """Whether the wake-ups that the last `clear` consumed may announce a task that the
        broker's last short reserve did not see (one that read every entry there was), so
        that the worker reserves again; True whenever `clear` returned True. A broker that
        cannot tell says True."""
        return True

    def revoked(self) -> bool:
        """Whether the wake-ups that the last `clear` consumed may announce ids revoked in
        the broker (`Client.revoke`), so that the worker asks at once which of its tasks
        were revoked rather than at its next lease renewal. A broker that cannot tell says
        False: the renewal asks anyway."""
        return False

    @abc.abstractmethod
    def close(self) -> None: ...


class Broker(abc.ABC):
    """One broker connection. Not shared across fork: open a new one in each process."""

    url: str
    # What a call raises when the broker cannot be reached or is busy for now (down,
    # restarting, locked): nothing was lost, and the same call can be made again later.
    unavailable: tuple[type[Exception], ...] = ()

    def unavailable_now(self, exc: BaseException) -> bool:
        """Whether `exc`, raised by a call to this broker, says it cannot take that call for
        now: one of `unavailable`, or a refusal that only its message tells apart (Redis's
        MISCONF, BUSY). Nothing of the call ran; it can be made again later."""
        return isinstance(exc, self.unavailable)

    # --- producing -------------------------------------------------------------
    @abc.abstractmethod
    def enqueue(self, envelopes: Sequence[Envelope]) -> None:
        """Store the messages (one transaction) and wake idle consumers of their queues.

        An id that is still queued or held is left as it is; an id whose task ended
        starts over as a new task.
        """

    # --- consuming -------------------------------------------------------------
    @abc.abstractmethod
    def turn(self, turn: Turn) -> list[Delivery]:
        """Write what the turn says happened and reserve what it asks for, in one transaction;
        returns the deliveries, oldest first (due ETA messages included). A task acked in
        the turn is never among them.

        Two concurrent callers never get the same message. Each delivery raises the
        message's delivery count. An empty turn does nothing.
        """

    def reserve(self, queues: Sequence[str], n: int, owner: str, lease: float) -> list[Delivery]:
        """A turn that only reserves: up to `n` due messages to `owner` until now + `lease`."""
        return self.turn(Turn(queues=queues, n=n, owner=owner, lease=lease))

    @abc.abstractmethod
    def release(self, ids: list[str], died: bool, owner: str | None = None) -> None:
        """Give delivered tasks back to their queue at once (`owner`: only those it holds).

        `died=True`: the process running them died (a crash, an OOM kill, a SIGKILL); this
        delivery keeps counting toward `max_deliveries`. `died=False`: they never started
        (returned on a warm shutdown) or the operator stopped them (a cold shutdown); the
        delivery count this delivery added is taken back, however often that happens.
        """

    @abc.abstractmethod
    def extend(self, ids: list[str], owner: str, lease: float) -> list[str]:
        """Renew the lease of tasks this owner still holds; returns those of `ids` it no
        longer holds (lost: their lease ran out and they went back to the queue, another
        owner took them, or they ended), which it must not start (a fence: it may have been
        stopped past its lease)."""

    @abc.abstractmethod
    def recover(self, owner: str) -> int:
        """Give back every task held by a consumer known to be dead; returns how many."""

    @abc.abstractmethod
    def recover_expired(self, queues: list[str], host: str = "", me: str = "") -> int:
        """Give back tasks whose lease ran out (their owner is presumed gone). With `host`
        (this host's name, given where worker_timeout bounds a hung worker), not those of an
        owner that is a worker of that host whose process still runs: stopped or slowed past
        its lease, its children run those tasks still, and a second start would run them
        twice; were it hung, its arbiter ends it and they come back at once. `me`, the
        caller, is no such owner: it renews all it knows it holds before this call, so what
        of its own ran out is what it never learned it reserved (a reply lost)."""

    @abc.abstractmethod
    def wakeup(self, queues: list[str]) -> Wakeup:
        """A wake-up descriptor for new work on these queues."""

    @abc.abstractmethod
    def next_due(self, queues: list[str]) -> float | None:
        """Epoch seconds of the earliest scheduled (ETA) message, or None."""

    # --- results, dead letters, revokes --------------------------------------
    @abc.abstractmethod
    def get_result(self, task_id: str) -> dict[str, Any] | None:
        """The task's info dict (id, name, state, result, exc_type, exc_message,
        traceback, deliveries, node, queue), or None if the broker never saw it."""

    # Whether the broker announces a task's end (wait_for_end; else the caller polls), and
    # how late its wait may return when nothing ends (the server's timer step).
    announces_ends = False
    end_wait_late = 0.0

    def wait_for_end(self, task_id: str, timeout: float) -> dict[str, Any] | None:
        """Return once the task may have ended, or after `timeout` seconds (a broker that
        announces ends), with what get_result then says: read in the same round trip."""
        raise NotImplementedError

    @abc.abstractmethod
    def depths(self) -> list[QueueDepth]: ...

    @abc.abstractmethod
    def dead_letters(
        self, limit: int | None = 100, ids: Sequence[str] | None = None
    ) -> list[DeadLetter]:
        """Dead letters, newest first: the `limit` newest (None: all), of `ids` only if given."""

    @abc.abstractmethod
    def retry_dead(self, ids: Sequence[str]) -> list[str]:
        """Put these dead letters back on their queue with their raw body as new tasks (state
        PENDING, no deliveries) and off the dead-letter list, in one transaction; returns the
        ids that were dead letters. An id that is queued or held again already stays as it is.
        """

    @abc.abstractmethod
    def purge_dead(self) -> int:
        """Delete every dead letter (their tasks' records stay until they expire); returns
        how many."""

    @abc.abstractmethod
    def revoke(self, ids: list[str]) -> None:
        """Remember these ids as revoked (persistently); queued ones end REVOKED at once."""

    @abc.abstractmethod
    def revoked(self) -> set[str]:
        """Every id revoked (`inspect revoked`): the whole set, read whole."""

    @abc.abstractmethod
    def revoked_among(self, ids: list[str]) -> set[str]:
        """Which of these ids are revoked: what a worker asks of the tasks it holds, at a
        cost that grows with them, not with the revoked set."""

    @abc.abstractmethod
    def set_routes(self, routes: dict[str, str]) -> None:
        """Record the queue each task name goes to (workers publish their @task queues at
        boot), so that a client submitting by name without the task's code finds it."""

    @abc.abstractmethod
    def routes(self) -> dict[str, str]:
        """Task name -> queue, as the workers last published them."""

    def ping(self) -> None:  # noqa: B027 - optional hook
        """Raise one of `unavailable` if the broker does not answer; a broker that answered when it
        was opened (a file) keeps this no-op."""

    def risks(self) -> list[str]:
        """What in the broker's own settings can lose tasks, one line each, for a worker to
        warn of at its start."""
        return []

    def maintain(self) -> None:  # noqa: B027 - optional hook
        """Housekeeping a worker runs when it is idle (nothing held); must be cheap when
        there is nothing to do."""

    def expire(self) -> int:
        """Delete records of tasks that ended more than `result_ttl` seconds ago; returns
        how many. A worker calls it on every turn it holds tasks, and `maintain` (which
        should call it too) on the others: it must be cheap until due, and may leave a
        backlog to later calls rather than hold a turn up. Brokers whose records expire on
        their own (Redis keys carry a TTL) keep this no-op."""
        return 0

    def give_up_at(self, deadline: float | None) -> None:  # noqa: B027 - optional hook
        """From now on no call of this thread waits past `deadline` (time.monotonic()),
        whatever its own timeouts and retries: it raises one of `unavailable` (a stopping
        worker's bound, Handle.get's timeout); None: their own timeouts again. A broker
        whose calls are bounded already (SQLite's lock wait) keeps this no-op."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    # --- schedules (worker/scheduler.py) -----------------------------------------
    @abc.abstractmethod
    def claim_lead(self, key: str, holder: str, ttl: float) -> tuple[str, float]:
        """Take the lease `key` for `holder` if it is free or ran out, or renew it if `holder`
        has it, for `ttl` seconds; returns who holds it now and for how many seconds more."""

    @abc.abstractmethod
    def release_lead(self, key: str, holder: str) -> None:
        """Give the lease `key` up if `holder` has it."""

    @abc.abstractmethod
    def lead_holder(self, key: str) -> str | None:
        """Who holds the lease `key` now, if anyone."""

    @abc.abstractmethod
    def fire_schedule(self, name: str, tick: float | None, envelope: Envelope | None) -> bool:
        """In one transaction: move the schedule's last fired tick forward to `tick` and enqueue
        `envelope`, or do nothing and return False if the stored tick is `tick` or later.
        No `tick` (a manual run): enqueue only. The envelope, if any, becomes the last run."""

    @abc.abstractmethod
    def schedule_states(self) -> dict[str, dict[str, Any]]:
        """Every schedule the broker knows: name -> last_tick, last_id, last_at (epoch
        seconds of the last run's enqueue), paused."""

    @abc.abstractmethod
    def pause_schedule(self, name: str, paused: bool) -> None:
        """Pause or resume the schedule, fleet-wide and for good."""

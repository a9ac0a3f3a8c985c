"""Submitting tasks and reading their outcome: `Client`, `Handle` and their errors."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from .brokers import open_broker
from .brokers.base import (
    FAILURE,
    FINAL_STATES,
    PENDING,
    REVOKED,
    TEXT_FIELDS,
    Broker,
    BrokerUnavailable,
    DeadLetter,
    Envelope,
    QueueDepth,
    unavailable_error,
)
from .protocol import oversize
from .task import DEFAULT_QUEUE, REGISTRY, body_problem, env_broker_source, eta_seconds, seconds

__all__ = ["BrokerUnavailable", "Client", "Handle", "TaskFailed", "TaskRevoked", "TaskTooLarge"]

T = TypeVar("T")
# A client that fails fast (a command line) gives up on a new Redis connection after this
# many seconds, and sends a call cut off by a lost connection again only briefly.
FAIL_FAST_CONNECT_TIMEOUT = 2.0
NOT_DEAD = "not a dead letter"
NOT_A_TASK = "its body is not a JSON task, so it cannot run; it stays a dead letter"
END_WAIT = 1.0  # seconds Handle.get waits on an announced end before it looks again
# Seconds past its timeout that Handle.get lets a broker call run, where the broker hangs
# (Redis stopped, swapping): its own timeouts and retries would hold it some 20 s.
CALL_GRACE = 1.0
ROUTES_FRESH = 1.0  # seconds before a name missing from the published routes is looked up again

# Strict JSON: NaN and Infinity are not, and no other client (nor the dashboard) reads them.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


class TaskFailed(Exception):
    """The task ended FAILURE; `.exc_type` is the error's type name ("ValueError",
    "WorkerLost", "TimeLimitExceeded", "NotRegistered", ...)."""

    def __init__(self, task_id: str, exc_type: str, message: str, traceback: str | None) -> None:
        super().__init__(f"{exc_type}: {message}")
        self.task_id = task_id
        self.exc_type = exc_type
        self.message = message
        self.traceback = traceback


class TaskRevoked(Exception):
    """The task was revoked and will not run."""


class TaskTooLarge(ValueError):
    """The task's JSON is over protocol.MAX_TASK_SIZE: it was not submitted."""


def encode_body(
    task_id: str, name: str, args: Sequence[Any], kwargs: dict[str, Any], retries: int = 0
) -> str:
    """The JSON text a task travels as; arguments must be JSON-serialisable."""
    return _encode(
        {"id": task_id, "name": name, "args": list(args), "kwargs": kwargs, "retries": retries}
    )


def new_task_id() -> str:
    """A random (version 4) UUID as text, as `str(uuid.uuid4())` writes it, made in a
    third of its time: one per task submitted, a batch's largest cost after its JSON."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def check_call(name: Any, args: Any, kwargs: Any, task_id: Any) -> None:
    """TypeError naming what is wrong with a call to submit, before anything is sent: else
    a worker would fail it as a BadMessage (a name that is no text), or run it with other
    arguments than meant (a string's letters as its args)."""
    check_text("task name", name)
    check_text("task id", task_id)
    check_args(name, args)
    if not isinstance(kwargs, dict):
        raise TypeError(f"{name}: kwargs must be a dict, not {type(kwargs).__name__}")
    for key in kwargs:  # JSON would make 1 of "1": the task would get another keyword
        if not isinstance(key, str):
            raise TypeError(f"{name}: keyword names must be strings, not {key!r:.80}")


def check_text(what: str, value: Any) -> None:
    """TypeError unless `value` is a non-empty string, ValueError unless it is UTF-8."""
    if not isinstance(value, str) or not value:
        raise TypeError(f"a {what} must be a non-empty string, not {value!r:.80}")
    if surrogate := lone_surrogate(value):
        raise ValueError(f"a {what} must be UTF-8 text: {value!r:.80} holds {surrogate}")


def check_ids(ids: Any, calls: int) -> None:
    """TypeError or ValueError for `submit_many(ids=...)` that is no sequence of one id per
    call: a string's letters were taken as ids, a list too short raised an IndexError and
    one too long was cut short. Each id is checked with its call (check_call)."""
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Sequence):
        raise TypeError(f"ids must be a list of task ids, one per call, not {ids!r:.80}")
    if len(ids) != calls:
        raise ValueError(f"ids must hold one task id per call: {len(ids)} for {calls} calls")


def id_list(ids: Any) -> list[str]:
    """Task ids as a list: one string is one id; else an iterable of ids, each checked
    (check_text), so that no broker stores what no task could be (a string's letters,
    None)."""
    if isinstance(ids, str):
        ids = [ids]
    elif isinstance(ids, (bytes, bytearray)) or not isinstance(ids, Iterable):
        raise TypeError(f"give a task id or a list of task ids, not {ids!r:.80}")
    found = list(ids)
    for task_id in found:
        check_text("task id", task_id)
    return found


def check_limit(limit: Any) -> None:
    """TypeError or ValueError unless `limit` is None (no limit) or a whole number >= 0."""
    if limit is None:
        return
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise TypeError(f"limit must be a whole number or None, not {limit!r:.80}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (None: no limit), not {limit}")


def check_queue(queue: Any) -> None:
    """TypeError or ValueError for a `queue=` that no worker could consume from: not text
    (the SQLite broker stored 5 as a number no worker's "5" matched), or no UTF-8."""
    if queue is None:
        return
    if not isinstance(queue, str) or not queue:  # "": the task's own queue, or a typo?
        raise TypeError(f"a queue must be a non-empty string, not {queue!r:.80}")
    if surrogate := lone_surrogate(queue):
        raise ValueError(f"a queue must be UTF-8 text: {queue!r:.80} holds {surrogate}")


def lone_surrogate(text: str) -> str | None:
    """The lone surrogate in `text` (one Python holds for a byte that was no UTF-8, as
    in a command line's arguments), which no broker can store, as its repr; or None."""
    if text.isascii():
        return None
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return f"a lone surrogate, {text[exc.start]!r}"
    return None


def check_body(name: str, body: str) -> None:
    """ValueError if a task's arguments hold text that is no UTF-8 (lone_surrogate)."""
    if surrogate := lone_surrogate(body):
        raise ValueError(f"{name}: the arguments must be UTF-8 text: they hold {surrogate}")


def check_args(name: str, args: Any) -> None:
    """TypeError if `args` is no list or tuple (a string would be spread into its letters)."""
    if not isinstance(args, (list, tuple)):
        raise TypeError(f"{name}: args must be a list or tuple, not {type(args).__name__}")


def retry_problem(letter: DeadLetter | None) -> str | None:
    """Why a dead letter cannot go back on its queue as a task, if it cannot."""
    if letter is None:
        return NOT_DEAD
    if body_problem(letter.body, letter.id, letter.name) is not None:
        return NOT_A_TASK
    return None


class Handle:
    """A submitted task, by id."""

    def __init__(self, client: Client, task_id: str) -> None:
        self.client = client
        self.id = task_id

    def __repr__(self) -> str:
        return f"<Handle {self.id}>"

    def info(self) -> dict[str, Any]:
        """id, name, state, result, exc_type, exc_message, traceback, deliveries, node."""
        return self.client.find(self.id) or unknown_task(self.id)

    @staticmethod
    def _left(deadline: float | None) -> float:
        return math.inf if deadline is None else deadline - time.monotonic()

    @property
    def state(self) -> str:
        return str(self.info()["state"])

    def get(self, timeout: float | None = None) -> Any:
        """Wait for the outcome: the result, or TaskFailed / TaskRevoked / TimeoutError (also
        where the broker hangs or cannot be reached: within CALL_GRACE of the timeout)."""
        if timeout is not None:
            seconds(timeout, "timeout")  # nan or inf: ValueError; no number: TypeError
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with self.client.calls_end_by(None if deadline is None else deadline + CALL_GRACE):
                info = self._wait(deadline, timeout)
        except BrokerUnavailable as exc:
            if deadline is None or self._left(deadline) > 0:
                raise
            raise TimeoutError(f"task {self.id} not done after {timeout}s: {exc}") from exc
        if info["state"] == FAILURE:
            raise TaskFailed(
                self.id,
                info.get("exc_type") or "Error",
                info.get("exc_message") or "",
                info.get("traceback"),
            )
        if info["state"] == REVOKED:
            raise TaskRevoked(self.id)
        return info["result"]

    def _wait(self, deadline: float | None, timeout: float | None) -> dict[str, Any]:
        """The task's info once it has ended; TimeoutError at `deadline`."""
        pause = 0.0002
        # A broker that announces ends reads the record after its wait, in the same round
        # trip, and wakes at once for a task that has ended: no read of our own before it.
        info = None if self.client.waits_on_broker(self._left(deadline)) else self.info()
        while info is None or info["state"] not in FINAL_STATES:
            left = self._left(deadline)
            if info is not None and left <= 0:
                raise TimeoutError(
                    f"task {self.id} not done after {timeout}s (state {info['state']})"
                )
            info = self.client.wait_for_end(self.id, left, pause) or self.info()
            pause = min(pause * 1.25, 0.05)
        return info


def unknown_task(task_id: str) -> dict[str, Any]:
    """The info of a task the broker holds no record of (not yet, or no longer): every key
    of a known task's (Broker.get_result), PENDING."""
    info: dict[str, Any] = dict.fromkeys(TEXT_FIELDS)
    info.update(id=task_id, state=PENDING, result=None, deliveries=0, runtime=None)
    return info


class Client:
    """A producer and result reader on one broker.

    `Client("redis://...")`, `Client("sqlite:///queue.db")` or `Client.from_config(path)`.
    A broker that cannot be reached or opened raises BrokerUnavailable, whose message names
    it and says why. `fail_fast`: give up on an unreachable broker within seconds (a command
    line) instead of riding out a Redis restart (a program that lives on).
    """

    def __init__(
        self,
        url: str,
        durability: str = "default",
        result_ttl: int = 86400,
        fail_fast: bool = False,
    ) -> None:
        if not isinstance(url, str):
            raise TypeError(f"a broker URL must be a string, not {url!r:.80}")
        self.url = url
        self._durability = durability
        self._result_ttl = result_ttl
        self._fail_fast = fail_fast
        self._broker: Broker | None = None
        self._routes: dict[str, str] = {}  # task name -> queue, as the workers published them
        self._routes_read = -ROUTES_FRESH  # monotonic: when they were read
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, path: str) -> Client:
        from supervisor.config import load

        config = load(path, check_imports=False)
        return cls(config.broker, durability=config.durability, result_ttl=config.result_ttl)

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            with self._lock:
                if self._broker is None:
                    self._broker = open_broker(
                        self.url,
                        durability=self._durability,
                        result_ttl=self._result_ttl,
                        fail_fast=self._fail_fast,
                        connect_timeout=FAIL_FAST_CONNECT_TIMEOUT if self._fail_fast else None,
                    )
        return self._broker

    @contextlib.contextmanager
    def calls_end_by(self, deadline: float | None) -> Iterator[None]:
        """This thread's broker calls, inside the block, give up at `deadline`
        (time.monotonic(); None: at their own timeouts) as BrokerUnavailable."""
        if deadline is None:
            yield
            return
        broker = self.broker
        broker.give_up_at(deadline)
        try:
            yield
        finally:
            broker.give_up_at(None)

    def _reach(self, call: Callable[[Broker], T]) -> T:
        """`call(broker)`, its "cannot reach the broker" errors raised as BrokerUnavailable."""
        broker = self.broker
        try:
            return call(broker)
        except Exception as exc:
            if not broker.unavailable_now(exc):
                raise
            raise unavailable_error(self.url, exc) from exc

    def submit(
        self,
        name: str,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        queue: str | None = None,
        countdown: float | None = None,
        eta: datetime.datetime | float | None = None,
        task_id: str | None = None,
    ) -> Handle:
        """Submit one task by name; its queue defaults to the task's own (if imported here)."""
        return self.submit_many(  # a kwargs or task_id that is given but false: TypeError
            [(name, args, {} if kwargs is None else kwargs)],
            queue=queue,
            countdown=countdown,
            eta=eta,
            ids=None if task_id is None else [task_id],
        )[0]

    def submit_many(
        self,
        calls: Iterable[tuple[str, Sequence[Any], dict[str, Any]]],
        queue: str | None = None,
        countdown: float | None = None,
        eta: datetime.datetime | float | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[Handle]:
        """Submit many `(name, args, kwargs)` calls in one broker transaction (none of
        them if one is over the size limit: TaskTooLarge); `ids`, if given, one per call."""
        when = eta_seconds(eta, countdown)
        check_queue(queue)
        if ids is not None:
            calls = list(calls)  # counted, before anything is sent
            check_ids(ids, len(calls))
        envelopes = []
        for index, call in enumerate(calls):
            try:
                name, args, kwargs = call
            except (TypeError, ValueError):
                raise TypeError(
                    f"each call must be a (name, args, kwargs) triple, not {call!r:.80}"
                ) from None
            task_id = new_task_id() if ids is None else ids[index]
            check_call(name, args, kwargs, task_id)
            target = queue or self.queue_of(name)
            try:
                body = encode_body(task_id, name, args, kwargs)
            except ValueError as exc:  # NaN or infinity (TypeError names any other value)
                raise ValueError(f"{name}: the arguments must be JSON: {exc}") from None
            except RecursionError:
                raise ValueError(f"{name}: the arguments are nested too deep for JSON") from None
            check_body(name, body)
            if too_large := oversize(body):
                raise TaskTooLarge(f"{name}: {too_large}")
            envelopes.append(Envelope(task_id, target, name, body, when))
        self._reach(lambda broker: broker.enqueue(envelopes))
        return [Handle(self, e.id) for e in envelopes]

    def queue_of(self, name: str) -> str:
        """The queue a task goes to when the caller names none: its @task's, from the task
        itself where it is imported here, else as the workers published it in the broker
        (read again for a name not seen, at most every ROUTES_FRESH s), else "default"."""
        registered = REGISTRY.get(name)
        if registered is not None:
            return registered.queue
        if name not in self._routes and time.monotonic() - self._routes_read >= ROUTES_FRESH:
            self._routes = self._reach(lambda broker: broker.routes())
            self._routes_read = time.monotonic()
        return self._routes.get(name, DEFAULT_QUEUE)

    def waits_on_broker(self, left: float) -> bool:
        """Whether a wait of `left` seconds for a task's end blocks in the broker, which then
        announces the end: else it is a poll (a broker that announces none, or a wait too
        short for its timer)."""
        broker = self.broker
        return broker.announces_ends and left > 2 * broker.end_wait_late

    def wait_for_end(self, task_id: str, left: float, pause: float) -> dict[str, Any] | None:
        """Wait until the task may have ended, at most `left` seconds: up to END_WAIT where
        the broker announces ends (then an end it did not announce, as a result that
        expired, is still seen), else for `pause`, the poll's step. The task's info as the
        broker read it after its wait, or None where it read none (a poll)."""
        if self.waits_on_broker(left):
            wait = min(left - self.broker.end_wait_late, END_WAIT)
            found = self._reach(lambda broker: broker.wait_for_end(task_id, wait))
            return found or unknown_task(task_id)
        time.sleep(min(left, pause))
        return None

    def handle(self, task_id: str) -> Handle:
        if not isinstance(task_id, str) or not task_id:
            raise TypeError(f"a task id must be a non-empty string, not {task_id!r:.80}")
        return Handle(self, task_id)

    def find(self, task_id: str) -> dict[str, Any] | None:
        """The task's info dict (as `Handle.info`), or None if the broker never saw the id
        (or its record expired)."""
        return self._reach(lambda broker: broker.get_result(task_id))

    def revoke(self, ids: str | Iterable[str]) -> None:
        """Mark tasks revoked in the broker: queued and scheduled ones end REVOKED now, and so
        does one submitted later under a revoked id. A worker holding one (reserved, or in a
        child's pipe) is woken to read the revoke, and skips it; one already running runs on
        (`fleetctl revoke --terminate` stops it).

        `ids`: a list (any iterable) of task ids, or one id as a string; an id that is no
        non-empty string raises TypeError before anything is revoked."""
        wanted = id_list(ids)
        if wanted:
            self._reach(lambda broker: broker.revoke(wanted))

    def depths(self) -> list[QueueDepth]:
        """Ready, scheduled and reserved tasks per queue."""
        return self._reach(lambda broker: broker.depths())

    def dead_letters(
        self, limit: int | None = 100, ids: Sequence[str] | None = None
    ) -> list[DeadLetter]:
        """Dead letters, newest first: the `limit` newest (None: all; 0: none), of `ids` only
        if given. A limit that is no whole number >= 0 raises TypeError or ValueError."""
        check_limit(limit)
        return self._reach(lambda broker: broker.dead_letters(limit, ids))

    def retry_dead(self, ids: Sequence[str] | None = None) -> dict[str, str | None]:
        """Put dead letters (all of them if `ids` is None) back on their queue as new tasks:
        state PENDING, no deliveries, off the dead-letter list.

        Returns, for each id, None if it went back, else why not: it is not a dead letter,
        or its body is not a task (an undecodable BadMessage), which stays a dead letter.
        """
        letters: dict[str, DeadLetter] = {}
        for letter in self.dead_letters(limit=None, ids=ids):
            letters.setdefault(letter.id, letter)  # the newest, if an id has several
        wanted = list(dict.fromkeys(ids)) if ids is not None else list(reversed(letters))
        problems = {i: retry_problem(letters.get(i)) for i in wanted}
        runnable = [i for i, problem in problems.items() if problem is None]
        retried = set(self._reach(lambda broker: broker.retry_dead(runnable)))
        # One that someone else retried or purged meanwhile is no dead letter any more.
        return {i: p or (None if i in retried else NOT_DEAD) for i, p in problems.items()}

    def purge_dead(self) -> int:
        """Delete every dead letter; returns how many. Their tasks' records stay until they
        expire."""
        return self._reach(lambda broker: broker.purge_dead())

    def ping(self) -> None:
        """Raise BrokerUnavailable unless the broker answers."""
        self._reach(lambda broker: broker.ping())

    def close(self) -> None:
        if self._broker is not None:
            self._broker.close()
            self._broker = None


_default: Client | None = None


def default_client() -> Client:
    """The client `.delay()` uses: from $FLEET_CONFIG (a config path) or $FLEET_BROKER (a URL)."""
    global _default
    if _default is None:
        source = env_broker_source()
        if source is None:
            raise RuntimeError(
                "set FLEET_CONFIG (a config file) or FLEET_BROKER (a broker URL) to submit tasks"
            )
        kind, value = source
        _default = Client.from_config(value) if kind == "config" else Client(value)
    return _default

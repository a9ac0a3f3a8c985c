"""The `@task` decorator, the task registry of a process, and the exceptions tasks see."""

from __future__ import annotations

import datetime
import inspect
import json
import math
import os
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .spec import parse_rate

if TYPE_CHECKING:
    from .client import Client, Handle

DEFAULT_QUEUE = "default"


class SoftTimeLimitExceeded(Exception):
    """Raised inside a task when its soft time limit passes; the task may clean up."""


class RetryTask(Exception):
    """Raised by `Task.retry`: the child sends the task back with an ETA.

    A countdown below 0 retries at once; one that is no finite number of seconds, or an
    `exc` that is no exception, raises TypeError or ValueError here (in the task, which
    fails with it)."""

    def __init__(self, countdown: float, exc: BaseException | None = None) -> None:
        if exc is not None and not isinstance(exc, BaseException):
            raise TypeError(f"retry(exc=...) takes an exception, not {type(exc).__name__}")
        self.countdown = max(0.0, seconds(countdown, "retry countdown"))
        super().__init__(f"retry in {self.countdown}s")
        self.exc = exc


@dataclass
class Request:
    """What a bound task knows of the current delivery."""

    id: str
    retries: int
    deliveries: int


# The delivery the running task serves. A context variable, not an attribute of the task:
# an event-loop child runs many deliveries of one `async def` task at once, each in its own
# context, and `self.request` must be its own in each.
CURRENT_REQUEST: ContextVar[Request | None] = ContextVar("fleetd_request", default=None)


class Task:
    """A registered task function with its options; call `.delay()` to run it in the fleet."""

    def __init__(
        self,
        fn: Callable[..., Any],
        name: str,
        queue: str,
        bind: bool,
        rate_limit: str | None,
        time_limit: float | None,
        soft_time_limit: float | None,
        max_retries: int,
        default_retry_delay: float,
    ) -> None:
        self.fn = fn
        self.name = name
        self.queue = queue
        self.bind = bind
        self.rate_limit = rate_limit
        self.time_limit = time_limit
        self.soft_time_limit = soft_time_limit
        self.max_retries = max_retries
        self.default_retry_delay = default_retry_delay
        self.is_async = inspect.iscoroutinefunction(fn)  # runs on its child's event loop
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)

    @property
    def request(self) -> Request | None:
        """The delivery being run, in the child while the task runs."""
        return CURRENT_REQUEST.get()

    @request.setter
    def request(self, request: Request | None) -> None:
        CURRENT_REQUEST.set(request)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.bind:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<task {self.name} queue={self.queue}>"

    def delay(self, *args: Any, **kwargs: Any) -> Handle:
        return self.apply_async(args=args, kwargs=kwargs)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        countdown: float | None = None,
        eta: datetime.datetime | float | None = None,
        queue: str | None = None,
        task_id: str | None = None,
        client: Client | None = None,
    ) -> Handle:
        from .client import check_args, default_client

        check_args(self.name, args)  # before they are spread into submit's
        return (client or default_client()).submit(
            self.name,
            *args,
            kwargs=kwargs,
            countdown=countdown,
            eta=eta,
            queue=self.queue if queue is None else queue,  # "": TypeError, as submit's
            task_id=task_id,
        )

    def retry(
        self,
        countdown: float | None = None,
        max_retries: int | None = None,
        exc: BaseException | None = None,
        eta: datetime.datetime | float | None = None,
    ) -> RetryTask:
        """Send the running task back after `countdown` seconds or at `eta` (a datetime or
        epoch seconds; one in the past retries at once); raise what this returns (or it
        raises).

        Past `max_retries` it re-raises `exc` (or a RuntimeError) so the task fails.
        """
        limit = self.max_retries if max_retries is None else max_retries
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise TypeError(f"max_retries must be a whole number, not {limit!r:.80}")
        retries = self.request.retries if self.request else 0
        if retries >= limit:
            if isinstance(exc, BaseException):
                raise exc
            raise RuntimeError(f"{self.name}: gave up after {retries} retries")
        if eta is not None:
            if countdown is not None:
                raise TypeError("retry takes a countdown or an eta, not both")
            countdown = seconds(eta_seconds(eta, None), "retry eta") - time.time()
        elif countdown is not None:
            due = time.time() + seconds(countdown, "retry countdown")
            within_calendar(due, "retry countdown")
        raise RetryTask(self.default_retry_delay if countdown is None else countdown, exc)


REGISTRY: dict[str, Task] = {}


def task(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    queue: str = DEFAULT_QUEUE,
    bind: bool = False,
    rate_limit: str | None = None,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    max_retries: int = 3,
    default_retry_delay: float = 3.0,
) -> Any:
    """Register a function as a task: `@task` or `@task(queue="images", time_limit=120)`."""

    def register(f: Callable[..., Any]) -> Task:
        task_name = f"{f.__module__}.{f.__qualname__}" if name is None else name
        # What a worker could not honour fails at import, naming it, not at the first run.
        for what, text in (("name", task_name), ("queue", queue)):
            if not isinstance(text, str) or not text:
                raise TypeError(f"@task {what} must be a non-empty string, not {text!r:.80}")
        if rate_limit is not None:
            parse_rate(rate_limit)
        for what, value in (
            ("time_limit", time_limit),
            ("soft_time_limit", soft_time_limit),
            ("default_retry_delay", default_retry_delay),
        ):
            if value is not None and seconds(value, f"{task_name}: {what}") < 0:
                raise ValueError(f"{task_name}: {what} must be >= 0, not {value!r}")
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
            raise TypeError(f"{task_name}: max_retries must be a whole number >= 0")
        t = Task(
            f,
            task_name,
            queue,
            bind,
            rate_limit,
            time_limit,
            soft_time_limit,
            max_retries,
            default_retry_delay,
        )
        REGISTRY[task_name] = t
        return t

    return register(fn) if fn is not None else register


def seconds(value: Any, what: str) -> float:
    """`value` as a finite number of seconds; TypeError or ValueError naming `what` if it
    is not one."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{what} must be a number of seconds, not {value!r:.80}")
    try:
        number = float(value)  # an int past a float's range: OverflowError
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number of seconds, not {value!r:.80}")
    return number


# The last second that a calendar date holds (9999-12-31 23:59:59 UTC): an ETA past it can
# be neither shown nor meant.
LAST_ETA = 253402300799.0


def eta_seconds(eta: datetime.datetime | float | None, countdown: float | None) -> float | None:
    """Epoch seconds for an ETA given as a datetime (a naive one is local time), epoch
    seconds, or a countdown; ValueError for one past the year 9999."""
    if countdown is not None and seconds(countdown, "countdown"):  # 0: now, unless `eta` says
        return within_calendar(time.time() + seconds(countdown, "countdown"), "countdown")
    if eta is None:
        return None
    if isinstance(eta, datetime.datetime):
        try:  # a naive one is local time, as `datetime.now()` gives it
            epoch = eta.timestamp()
        except (OverflowError, ValueError, OSError) as exc:  # its local time, as UTC, is no date
            if eta.year == datetime.MAXYEAR:  # datetime.max east of UTC
                raise ValueError("eta reaches past the year 9999") from None
            raise ValueError(f"eta {eta} is out of range: {exc}") from None
        return within_calendar(epoch, "eta")
    return within_calendar(seconds(eta, "eta"), "eta")


def within_calendar(epoch: float, what: str) -> float:
    if epoch > LAST_ETA:
        raise ValueError(f"{what} reaches past the year 9999")
    return epoch


def body_problem(text: str, task_id: str, name: str) -> str | None:
    """Why a message body is not a task a child can run, or None if it is one: the JSON
    object `{"id", "name", "args", "kwargs", "retries"}` that `encode_body` writes for the
    task `task_id` named `name`. A worker dead-letters one that is not (BadMessage), and a
    dead letter whose body is not one cannot be retried."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return "the body is not UTF-8"
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as exc:  # its text names no part of the body
        return f"the body is not JSON: {exc}"
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    if body.get("id") != task_id or body.get("name") != name:
        return "the body's id or name is not the task's"
    if not isinstance(body.get("args"), list) or not isinstance(body.get("kwargs"), dict):
        return "the body's args are not a list or its kwargs not an object"
    retries = body.get("retries")
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        return "the body's retries are not a count"
    return None


def env_broker_source() -> tuple[str, str] | None:
    """Where `.delay()` finds its broker, from the environment: ("config", path) or
    ("broker", url)."""
    if os.environ.get("FLEET_CONFIG"):
        return ("config", os.environ["FLEET_CONFIG"])
    if os.environ.get("FLEET_BROKER"):
        return ("broker", os.environ["FLEET_BROKER"])
    return None

"""Periodic tasks: when each `[[schedule]]` ticks, and the duty that enqueues each tick once.

Every worker of every host runs the duty (`Scheduler.step` on each turn of its loop), but only
the holder of the broker's leader lease acts: it takes the lease when it is free or has run
out, renews it every lease/3 seconds, and enqueues the ticks that came due. A tick is
enqueued by `Broker.fire_schedule`, which in one transaction moves the schedule's last fired
tick forward and enqueues the task only if the tick is later than the one stored, so two
schedulers that both believe they lead (a stalled leader whose lease ran out) still enqueue a
tick at most once. Ticks that fell while nobody led (the leader died, the fleet was down) are
missed; the schedule's `misfire` says whether they are skipped or run once, late.

Cron expressions are evaluated by cronsim in the schedule's time zone (zoneinfo), so that a
daily job runs once a day across DST changes; `every = N` ticks at the multiples of N seconds
since the epoch, so that every host computes the same ticks.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .brokers.base import Broker, Envelope
from .control import Arg, CommandError, Effect, register
from .logs import shortened
from .spec import WorkerSpec
from .task import DEFAULT_QUEUE, REGISTRY

log = logging.getLogger("fleetd.scheduler")

MISFIRE_POLICIES = ("skip", "run_once")
LEAD_KEY = "scheduler"  # the broker's lease that says which scheduler of the fleet leads
# A tick is missed only if it came due longer before a scheduler took the lead than a
# takeover takes: the dead leader's lease running out, the next try for it (lease/3 later at
# most), and this many seconds more for the loop. A tick late only by a takeover or a
# handover (a reload, a restart) runs, late.
MISFIRE_GRACE = 1.0
MAX_FIRES_PER_STEP = 100  # ticks of one schedule enqueued per step: a long stall never holds a turn
RETRY_AFTER_CONFLICT = 0.1  # seconds before reading the states again after a tick fired elsewhere
RETRY_AFTER_FAILURE = 60.0  # seconds before a schedule whose ticks failed to compute is tried again
LEAD_RETRY_SLACK = 0.05  # seconds after the holder's lease runs out before we try to take it
SCHEDULE_KEYS = ("name", "task", "cron", "every", "timezone", "args", "kwargs", "queue", "misfire")


class ScheduleError(ValueError):
    """A bad `[[schedule]]` entry: `key` is the key at fault, the message says why."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key


@dataclass(frozen=True)
class Schedule:
    """One `[[schedule]]` entry, checked."""

    name: str
    task: str
    cron: str | None = None
    every: int | None = None
    timezone: str = "UTC"
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None
    misfire: str = "skip"

    def next_after(self, moment: float) -> float:
        """Epoch seconds of the first tick strictly after `moment`."""
        if self.every is not None:
            return (moment // self.every + 1) * self.every
        assert self.cron is not None
        start = datetime.fromtimestamp(moment, zone(self.timezone))
        # cronsim walks wall-clock time and ignores the fold: in the hour a clock goes back,
        # its first tick can lie before `moment` (02:30 CEST seen from 02:10 CET).
        for tick in cron_sim()(self.cron, start):
            if tick.timestamp() > moment:
                return float(tick.timestamp())
        raise AssertionError("unreachable: cronsim yields ticks without end")

    def last_until(self, moment: float) -> float:
        """Epoch seconds of the last tick at or before `moment`."""
        if self.every is not None:
            return float(moment // self.every * self.every)
        assert self.cron is not None
        # Half a second past the whole second: cronsim's reverse walk then yields that second
        # itself first if it is a tick (cron ticks are whole minutes).
        start = datetime.fromtimestamp(int(moment) + 0.5, zone(self.timezone))
        last = float(next(cron_sim()(self.cron, start, reverse=True)).timestamp())
        # In the hour a clock goes back, the reverse walk can pass over the first pass's tick.
        while (later := self.next_after(last)) <= moment:
            last = later
        return last

    @property
    def when(self) -> str:
        """The schedule as an operator wrote it: the cron line or `every Ns`."""
        return self.cron if self.cron is not None else f"every {self.every}s"

    def to_json(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in SCHEDULE_KEYS}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Schedule:
        return cls(**data)


def parse_schedule(data: Any) -> Schedule:
    """A `[[schedule]]` table as a Schedule; ScheduleError naming the key at fault."""
    if not isinstance(data, dict):
        raise ScheduleError("-", "must be a table")
    for key in data:
        if key not in SCHEDULE_KEYS:
            raise ScheduleError(f"{key:.80}", f"unknown key (known: {', '.join(SCHEDULE_KEYS)})")
    for key in ("name", "task"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ScheduleError(key, "is required: a non-empty string")
    has_cron, has_every = "cron" in data, "every" in data
    if has_cron == has_every:
        raise ScheduleError("cron", "give one of cron (five fields) or every (seconds), not both")
    schedule = Schedule(
        name=data["name"],
        task=data["task"],
        cron=check_cron(data["cron"]) if has_cron else None,
        every=check_every(data["every"]) if has_every else None,
        timezone=check_timezone(data.get("timezone", "UTC")),
        args=checked(data, "args", list, [], "a list"),
        kwargs=checked(data, "kwargs", dict, {}, "a table"),
        queue=queue_name(data),
        misfire=data.get("misfire", "skip"),
    )
    if schedule.misfire not in MISFIRE_POLICIES:
        raise ScheduleError(
            "misfire", f'must be "skip" or "run_once", got {schedule.misfire!r:.80}'
        )
    for key, value in (("args", schedule.args), ("kwargs", schedule.kwargs)):
        # TOML holds dates, times, NaN and infinity, which a task's JSON cannot: refused
        # here, with the config, not at the spawn (a worker's spec travels as JSON: a date
        # ended `fleetd start` in a traceback) nor at a tick (NaN went out as no JSON).
        problem = json_problem(value)
        if problem:
            raise ScheduleError(key, f"must hold JSON values only: {problem}")
    return schedule


def json_problem(value: Any) -> str | None:
    """What in `value` strict JSON cannot hold (a date, NaN, infinity), if anything."""
    import json

    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def queue_name(data: dict[str, Any]) -> str | None:
    """The schedule's `queue`: a queue's name, or none (the task's own); "" is no name."""
    queue = checked(data, "queue", str, None, "a queue name")
    if queue == "":
        raise ScheduleError("queue", "must be a queue name, got ''")
    return queue


def checked(data: dict[str, Any], key: str, kind: type, default: Any, expected: str) -> Any:
    value = data.get(key, default)
    if value is not default and not isinstance(value, kind):
        raise ScheduleError(key, f"must be {expected}, got {value!r:.80}")
    return value


# cronsim and zoneinfo are imported where a schedule is evaluated, not with this module:
# the arbiter and fleetctl import it (config checks, the command table) and most fleets
# have no [[schedule]].
def cron_sim() -> Any:
    from cronsim import CronSim

    return CronSim


def zone(name: Any) -> Any:
    import zoneinfo

    return zoneinfo.ZoneInfo(name)


def check_cron(value: Any) -> str:
    if not isinstance(value, str) or len(value.split()) != 5:
        raise ScheduleError("cron", f"must be a cron line of five fields, got {value!r:.80}")
    from cronsim import CronSimError

    try:
        cron_sim()(value, datetime.now(timezone.utc))
    except CronSimError as exc:
        raise ScheduleError("cron", f"{value!r:.80} is not a valid cron line: {exc}") from None
    return value


def check_every(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ScheduleError("every", f"must be a whole number of seconds >= 1, got {value!r:.80}")
    return value


def check_timezone(value: Any) -> str:
    try:
        zone(value)
    except (LookupError, ValueError, TypeError):  # zoneinfo.ZoneInfoNotFoundError is a KeyError
        raise ScheduleError("timezone", f"unknown time zone {value!r:.80} (an IANA name)") from None
    return str(value)


def tick_task_id(name: str, tick: float) -> str:
    """The id of the task a tick enqueues: the same on every host, so a tick is one task."""
    return f"schedule:{name}:{tick:.0f}"


def leading_node(holder: str) -> str:
    """The node (name@host) in a lease holder's owner string (`node:pid:started_ms`)."""
    return holder.partition(":")[0]


@dataclass
class Scheduler:
    """The scheduler duty of one worker process (see the module docstring). Times are epoch
    seconds: ticks are wall-clock times, and the lease is measured on the same clock."""

    broker: Broker
    schedules: list[Schedule]
    holder: str  # who we are in the lease: the worker's owner string
    lease: float  # seconds the lead lasts without renewal
    queue_of: Callable[[str], str]  # a task name's own queue
    leading_since: float | None = None  # when we took the lead; None while we do not lead
    lead_until: float = 0.0  # when our lead runs out unless renewed
    next_claim: float = 0.0  # when we next take or renew the lead
    due_at: float = 0.0  # when a tick may next be due (while we lead)
    counts: dict[str, int] = field(default_factory=lambda: {"fired": 0, "skipped": 0})
    emit: Callable[..., None] = lambda kind, **fields: None  # the worker's event (metrics) sink

    def step(self, now: float) -> None:
        """Take or renew the lead when it is time to, and enqueue the ticks due if we lead."""
        if not self.schedules:
            return
        # Before a claim: one that finds our lease run out (this worker stalled: stopped, a
        # broker outage) gets it back as a new lead, whose ticks missed meanwhile follow
        # `misfire`, as another worker's takeover would, never a burst of all of them.
        if self.leading_since is not None and now >= self.lead_until:
            self.step_down("our lease ran out before we could renew it")
        if now >= self.next_claim:
            self.claim(now)
        if self.leading_since is not None and now >= self.due_at:
            self.fire_due(now)

    def timeout(self, now: float) -> float:
        """Seconds until the next step has something to do."""
        if not self.schedules:
            return float("inf")
        deadline = self.next_claim
        if self.leading_since is not None:
            deadline = min(deadline, self.due_at)
        return max(0.0, deadline - now)

    def claim(self, now: float) -> None:
        holder, left = self.broker.claim_lead(LEAD_KEY, self.holder, self.lease)
        if holder == self.holder:
            if self.leading_since is None:
                self.leading_since, self.due_at = now, now
                log.info("leading the fleet's schedules", extra={"node": leading_node(holder)})
            self.lead_until = now + left
            self.next_claim = now + self.lease / 3
            return
        if self.leading_since is not None:
            self.step_down(f"{leading_node(holder)} holds the lead")
        self.next_claim = now + min(self.lease / 3, left + LEAD_RETRY_SLACK)

    @property
    def takeover_time(self) -> float:
        """Seconds a takeover may take: how late a tick may be without being missed."""
        return self.lease + self.lease / 3 + MISFIRE_GRACE

    def resign(self) -> None:
        """Hand the lead back (this worker is stopping): another takes it at its next try."""
        if self.leading_since is not None:
            self.leading_since = None
            self.broker.release_lead(LEAD_KEY, self.holder)
            log.info("handed the schedules' lead back", extra={"node": leading_node(self.holder)})

    def step_down(self, why: str) -> None:
        log.warning("no longer leading the schedules: %s", why)
        self.leading_since = None

    def fire_due(self, now: float) -> None:
        states = self.broker.schedule_states()
        due_at = [self.fire_guarded(s, states.get(s.name, {}), now) for s in self.schedules]
        self.due_at = min(due_at)

    def fire_guarded(self, schedule: Schedule, state: dict[str, Any], now: float) -> float:
        """`fire_schedule`, but a schedule it fails on (a state that the arithmetic cannot
        take) is skipped for this round, in one line, not the death of the worker: that
        killed the tasks it ran, and its successor's, as each took the lead."""
        try:
            return self.fire_schedule(schedule, state, now)
        except Exception as exc:
            if self.broker.unavailable_now(exc):
                raise  # the worker's loop waits the broker out
            log.error(
                "schedule %s skipped for %.0fs: %s: %s",
                schedule.name,
                RETRY_AFTER_FAILURE,
                type(exc).__name__,
                exc,
            )
            return now + RETRY_AFTER_FAILURE

    def fire_schedule(self, schedule: Schedule, state: dict[str, Any], now: float) -> float:
        """Enqueue the schedule's due ticks; returns when its next tick is due."""
        last = state.get("last_tick")
        if last is None:  # a new schedule: it starts now, nothing before counts as missed
            self.broker.fire_schedule(schedule.name, now, None)
            return schedule.next_after(now)
        if state.get("paused"):
            if schedule.last_until(now) > last:
                self.skip_to(schedule, schedule.last_until(now))
            return schedule.next_after(now)
        assert self.leading_since is not None
        missed = schedule.last_until(min(now, self.leading_since - self.takeover_time))
        if missed > last:
            run_once = schedule.misfire == "run_once"
            acted = self.fire(schedule, missed, now) if run_once else self.skip_to(schedule, missed)
            if acted:
                log.warning(
                    "schedule %s missed its ticks up to %.0f while no scheduler led: %s",
                    schedule.name,
                    missed,
                    "ran the last one once" if run_once else "skipped them",
                )
            last = missed
        tick = schedule.next_after(last)
        for _ in range(MAX_FIRES_PER_STEP):
            if tick > now:
                return tick
            if not self.fire(schedule, tick, now):
                return now + RETRY_AFTER_CONFLICT  # another scheduler fired it: read anew
            tick = schedule.next_after(tick)
        return now  # more ticks are due: the next step goes on

    def fire(self, schedule: Schedule, tick: float, now: float) -> bool:
        task_id = tick_task_id(schedule.name, tick)
        fired = self.broker.fire_schedule(schedule.name, tick, self.envelope(schedule, task_id))
        if fired:
            self.counts["fired"] += 1
            self.emit("schedule-fired", schedule=schedule.name, late=max(0.0, now - tick))
            log.info(
                "fired schedule %s: task %s, %.3fs late",
                schedule.name,
                task_id,
                now - tick,
                extra={"node": leading_node(self.holder), "task": schedule.task},
            )
        return fired

    def skip_to(self, schedule: Schedule, tick: float) -> bool:
        """Move the schedule's last tick to `tick` without running it."""
        skipped = self.broker.fire_schedule(schedule.name, tick, None)
        if skipped:
            self.counts["skipped"] += 1
            self.emit("schedule-skipped", schedule=schedule.name)
        return skipped

    def envelope(self, schedule: Schedule, task_id: str) -> Envelope:
        return schedule_envelope(schedule, task_id, self.queue_of)


def schedule_envelope(schedule: Schedule, task_id: str, queue_of: Callable[[str], str]) -> Envelope:
    """The task message one run of the schedule enqueues."""
    from .client import encode_body  # the client side: only where a schedule fires

    body = encode_body(task_id, schedule.task, schedule.args, schedule.kwargs)
    return Envelope(task_id, schedule.queue or queue_of(schedule.task), schedule.task, body)


def trigger(broker: Broker, schedule: Schedule, queue_of: Callable[[str], str]) -> str:
    """Enqueue one run of the schedule now, outside its ticks; returns the task's id."""
    task_id = f"schedule:{schedule.name}:manual-{os.urandom(6).hex()}"
    broker.fire_schedule(schedule.name, None, schedule_envelope(schedule, task_id, queue_of))
    return task_id


def describe(schedule: Schedule, state: dict[str, Any], now: float) -> dict[str, Any]:
    """One schedule as `fleetctl schedule list` shows it."""
    return {
        "name": schedule.name,
        "task": schedule.task,
        "when": schedule.when,
        "timezone": schedule.timezone,
        "next_run": schedule.next_after(now),
        "last_run": state.get("last_at"),
        "last_id": state.get("last_id"),
        "paused": bool(state.get("paused")),
    }


def worker_scheduler(
    broker: Broker, spec: WorkerSpec, holder: str, emit: Callable[..., None]
) -> Scheduler:
    """The scheduler duty of a worker process: its spec's schedules, its lease, its tasks;
    `emit(kind, **fields)` takes its events (runs fired, how late, ticks skipped)."""
    schedules = [Schedule.from_json(s) for s in spec.schedules]
    return Scheduler(
        broker, schedules, holder, spec.lease, lambda task: task_queue(broker, task), emit=emit
    )


def task_queue(broker: Broker, task: str) -> str:
    """A task's own queue: as registered here, else as the workers published it."""
    if task in REGISTRY:
        return REGISTRY[task].queue
    return broker.routes().get(task, DEFAULT_QUEUE)


# --- fleetctl schedule ...: straight to the broker, fleet-wide (scope "broker") -----------
SCHEDULE_NAME = Arg((str,), help="the schedule's name (its [[schedule]] name)")


def named(schedules: list[Schedule], name: str) -> Schedule:
    for schedule in schedules:
        if schedule.name == name:
            return schedule
    known = shortened(", ".join(s.name for s in schedules) or "none", 200)
    raise CommandError(f"no schedule {name!r:.80} in the config (known: {known})")


def schedule_command(
    verb: str, help: str, args: dict[str, Arg] | None = None
) -> Callable[[Effect], Effect]:
    """Register `fleetctl schedule VERB`, run by fleetctl itself on the broker."""
    return register(
        f"schedule_{verb}", help, args, scope="broker", lines={f"schedule {verb}": {}}, envelope=()
    )


@schedule_command(
    "list", "The schedules: when they run next, their last run, whether paused, who leads."
)
def schedule_list(broker: Broker, schedules: list[Schedule]) -> dict[str, Any]:
    states, now = broker.schedule_states(), time.time()
    holder = broker.lead_holder(LEAD_KEY)
    return {
        "schedules": [describe(s, states.get(s.name, {}), now) for s in schedules],
        "leader": None if holder is None else leading_node(holder),
    }


@schedule_command(
    "pause",
    "Pause a schedule fleet-wide (kept across restarts): its ticks are skipped.",
    {"name": SCHEDULE_NAME},
)
def schedule_pause(broker: Broker, schedules: list[Schedule], name: str) -> dict[str, Any]:
    return set_paused(broker, named(schedules, name), True)


@schedule_command(
    "resume",
    "Resume a paused schedule from its next tick (the paused ones are not run).",
    {"name": SCHEDULE_NAME},
)
def schedule_resume(broker: Broker, schedules: list[Schedule], name: str) -> dict[str, Any]:
    return set_paused(broker, named(schedules, name), False)


def set_paused(broker: Broker, schedule: Schedule, paused: bool) -> dict[str, Any]:
    """Pause or resume a schedule fleet-wide (its flag lives in the broker)."""
    broker.pause_schedule(schedule.name, paused)
    return {"ok": f"schedule {schedule.name} {'paused' if paused else 'resumed'}"}


@schedule_command(
    "trigger",
    "Enqueue one run of a schedule now, besides its ticks (paused or not).",
    {"name": SCHEDULE_NAME},
)
def schedule_trigger(broker: Broker, schedules: list[Schedule], name: str) -> dict[str, Any]:
    schedule = named(schedules, name)
    task_id = trigger(broker, schedule, lambda task: task_queue(broker, task))
    return {"ok": f"schedule {name}: task {task_id} enqueued", "id": task_id}

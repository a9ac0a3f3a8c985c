"""Schedules: the tick arithmetic (DST included), the config checks, the broker's schedule verbs
on both brokers, and the scheduler duty's leadership and misfire rules, driven by a clock of
the test's own."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from supervisor.config import ConfigError, from_dict
from supervisor.metrics import Metrics
from tests.brokers.conftest import BrokerFactory
from tests.brokers.conftest import connect as connect  # the fixture: both brokers
from tests.fleet import FLEETCTL, fleetd
from tests.test_metrics import samples
from worker.brokers.base import SUCCESS, Broker, Outcome, Turn
from worker.brokers.redis import RedisBroker
from worker.brokers.sqlite import SQLiteBroker
from worker.scheduler import (
    LEAD_KEY,
    Schedule,
    Scheduler,
    parse_schedule,
    schedule_envelope,
    tick_task_id,
)
from worker.task import LAST_ETA

BERLIN = ZoneInfo("Europe/Berlin")
LEASE = 3.0


def local_dates(schedule: Schedule, start: datetime, days: int) -> list[str]:
    """The local date and time of each tick from `start` over `days` days."""
    moment, end = start.timestamp(), start.timestamp() + days * 86400
    ticks = []
    while (moment := schedule.next_after(moment)) < end:
        ticks.append(datetime.fromtimestamp(moment, BERLIN).strftime("%Y-%m-%d %H:%M"))
    return ticks


@pytest.mark.parametrize(
    "day", [datetime(2026, 3, 28, 12, tzinfo=BERLIN), datetime(2026, 10, 24, 12, tzinfo=BERLIN)]
)
@pytest.mark.parametrize("cron", ["30 2 * * *", "0 3 * * *"])
def test_daily_cron_runs_once_each_day_across_dst_changes(day: datetime, cron: str) -> None:
    schedule = Schedule("daily", "t", cron=cron, timezone="Europe/Berlin")
    ticks = local_dates(schedule, day, 3)
    assert [t[:10] for t in ticks] == [
        datetime.fromtimestamp(day.timestamp() + d * 86400, BERLIN).strftime("%Y-%m-%d")
        for d in (1, 2, 3)
    ][: len(ticks)]
    assert (
        len(ticks) == 3
    )  # one a day: none lost in the missing hour, none doubled in the repeated one
    if cron == "30 2 * * *" and day.month == 3:
        assert ticks[0] == "2026-03-29 03:00"  # 02:30 does not exist that day: it runs at 03:00


def test_last_until_is_the_tick_at_or_before() -> None:
    cron = Schedule("c", "t", cron="0 3 * * *", timezone="Europe/Berlin")
    tick = datetime(2026, 3, 29, 3, 0, tzinfo=BERLIN).timestamp()
    assert cron.last_until(tick) == tick
    assert cron.last_until(tick + 0.5) == tick
    assert cron.last_until(tick - 1) == tick - 86400 + 3600  # the day before was still CET
    every = Schedule("e", "t", every=30)
    assert every.last_until(90.0) == 90.0 and every.next_after(90.0) == 120.0


@pytest.mark.parametrize("cron", ["30 2 * * *", "15,45 1-3 * * *", "0 */2 * * *"])
def test_in_the_hour_a_clock_goes_back_the_next_tick_is_ahead_and_the_last_behind(
    cron: str,
) -> None:
    """cronsim ignores the fold: seen from 02:00-02:30 CET (the second pass), 02:30 CEST was
    the next tick though it had passed, and the last one was the day before's; a paused
    schedule then spun its worker's loop for half an hour, and a takeover ran a tick that
    misfire said to skip."""
    schedule = Schedule("c", "t", cron=cron, timezone="Europe/Berlin")
    second_pass = datetime(2026, 10, 25, 2, 0, tzinfo=BERLIN, fold=1).timestamp()
    ticks, moment = [], second_pass - 26 * 3600
    while (moment := schedule.next_after(moment)) < second_pass + 26 * 3600:
        ticks.append(moment)
    for seconds in range(0, 3600, 97):
        now = second_pass + seconds + 0.3
        after, last = schedule.next_after(now), schedule.last_until(now)
        assert last <= now < after
        assert [t for t in ticks if last < t <= now] == []  # none skipped by last_until
        assert after == min(t for t in ticks if t > now)


CONFIG = {"fleet": {"broker": "sqlite:///q.db"}, "worker": [{"name": "w"}]}


def config_with(*schedules: dict[str, Any]) -> Any:
    return from_dict(
        {**CONFIG, "schedule": list(schedules)}, "/tmp/fleet.toml", check_imports=False
    )


@pytest.mark.parametrize(
    ("entry", "key", "words"),
    [
        ({"cron": "61 * * * *"}, "schedule[0].cron", "not a valid cron"),
        ({"cron": "0 * * * * *"}, "schedule[0].cron", "five fields"),
        ({"every": 5, "timezone": "Mars/Olympus"}, "schedule[0].timezone", "unknown time zone"),
        ({"cron": "* * * * *", "every": 5}, "schedule[0].cron", "not both"),
        ({}, "schedule[0].cron", "one of cron"),
        ({"every": 0}, "schedule[0].every", ">= 1"),
        ({"every": 5, "misfire": "later"}, "schedule[0].misfire", "run_once"),
        ({"every": 5, "args": {"a": 1}}, "schedule[0].args", "a list"),
        ({"every": 5, "color": "red"}, "schedule[0].color", "unknown key"),
        ({"every": 5, "queue": ""}, "schedule[0].queue", "a queue name"),  # was: the task's
    ],
)
def test_check_refuses_a_bad_schedule_naming_its_key(
    entry: dict[str, Any], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config_with({"name": "s", "task": "t", **entry})
    assert caught.value.key == key
    assert words in caught.value.problem


def test_check_refuses_a_duplicate_schedule_name() -> None:
    with pytest.raises(ConfigError) as caught:
        config_with({"name": "s", "task": "t", "every": 5}, {"name": "s", "task": "u", "every": 9})
    assert caught.value.key == "schedule[1].name"


def test_schedules_reach_every_worker_spec() -> None:
    config = config_with(
        {"name": "s", "task": "t", "cron": "0 3 * * *", "timezone": "Europe/Berlin"}
    )
    assert config.schedules == [
        parse_schedule({"name": "s", "task": "t", "cron": "0 3 * * *", "timezone": "Europe/Berlin"})
    ]
    assert [Schedule.from_json(s) for s in config.workers[0].schedules] == config.schedules


# --- the broker's verbs, on both brokers ------------------------------------------------


EVERY = Schedule("tick", "tasks.tick", every=10, queue="q")


def envelope(tick: float) -> Any:
    return schedule_envelope(EVERY, tick_task_id(EVERY.name, tick), lambda name: "default")


def test_a_tick_fires_once_and_never_an_earlier_one(connect: BrokerFactory) -> None:
    one, two = connect(), connect()
    assert one.fire_schedule("tick", 100.0, envelope(100.0))
    assert not two.fire_schedule("tick", 100.0, envelope(100.0))
    assert not two.fire_schedule("tick", 90.0, envelope(90.0))
    assert two.fire_schedule("tick", 110.0, envelope(110.0))
    ids = [d.id for d in one.reserve(["q"], 10, "me", 30)]
    assert sorted(ids) == ["schedule:tick:100", "schedule:tick:110"]
    state = one.schedule_states()["tick"]
    assert state["last_tick"] == 110.0 and state["last_id"] == "schedule:tick:110"
    assert not state["paused"]


def test_a_manual_run_leaves_the_ticks_alone(connect: BrokerFactory) -> None:
    broker = connect()
    broker.fire_schedule("tick", 100.0, envelope(100.0))
    assert broker.fire_schedule("tick", None, envelope(555.0))
    assert broker.schedule_states()["tick"]["last_tick"] == 100.0
    assert broker.schedule_states()["tick"]["last_id"] == "schedule:tick:555"


def test_pause_is_stored_in_the_broker(connect: BrokerFactory) -> None:
    connect().pause_schedule("tick", True)
    assert connect().schedule_states()["tick"]["paused"]
    connect().pause_schedule("tick", False)
    assert not connect().schedule_states()["tick"]["paused"]


def test_the_lead_is_one_holder_until_it_runs_out(connect: BrokerFactory) -> None:
    one, two = connect(), connect()
    assert one.claim_lead(LEAD_KEY, "a:1:1", 0.3)[0] == "a:1:1"
    holder, left = two.claim_lead(LEAD_KEY, "b:2:2", 0.3)
    assert holder == "a:1:1" and 0 < left <= 0.3
    assert one.claim_lead(LEAD_KEY, "a:1:1", 0.3)[0] == "a:1:1"  # renewed
    assert two.lead_holder(LEAD_KEY) == "a:1:1"
    deadline = datetime.now().timestamp() + 5
    while two.claim_lead(LEAD_KEY, "b:2:2", 0.3)[0] != "b:2:2":
        assert datetime.now().timestamp() < deadline, "the lead never ran out"
    assert one.claim_lead(LEAD_KEY, "a:1:1", 0.3)[0] == "b:2:2"
    one.release_lead(LEAD_KEY, "a:1:1")  # not its lease: nothing happens
    assert one.lead_holder(LEAD_KEY) == "b:2:2"
    two.release_lead(LEAD_KEY, "b:2:2")  # handed back: free for the next one at once
    assert one.claim_lead(LEAD_KEY, "a:1:1", 30)[0] == "a:1:1"


def write_junk(
    broker: Broker,
    schedule: str,
    until: str,
    fields: dict[str, str],
    lease: bool = True,
    name: str = "tick",
) -> None:
    """Other hands' values where the state of schedule `name` and the leader lease are kept:
    on SQLite, `schedule` (an SQL SET list) and a lease `until` (SQL); on Redis, the
    schedule's `fields` and, with `lease`, a lease that never runs out."""
    if isinstance(broker, SQLiteBroker):
        with contextlib.closing(sqlite3.connect(broker.path)) as db, db:
            db.execute(f"UPDATE schedules SET {schedule} WHERE name = ?", (name,))
            db.execute(
                f"INSERT OR REPLACE INTO leases (key, holder, until) VALUES (?, 'other', {until})",
                (LEAD_KEY,),
            )
    else:
        assert isinstance(broker, RedisBroker)
        broker.redis.hset(f"{broker.prefix}:schedule:{name}", mapping=fields)
        if lease:
            broker.redis.set(f"{broker.prefix}:lead:{LEAD_KEY}", "other")  # no expiry


def test_a_schedules_state_and_lease_that_other_hands_wrote_read_as_none(
    connect: BrokerFactory,
) -> None:
    """The leading worker died on them at every lead (float('x'), 'x' > a number), or the
    schedule never fired again (a text tick is above every number), or the lead was held for
    ever (a lease that never runs out)."""
    broker = connect()
    assert broker.fire_schedule("tick", 100.0, envelope(100.0))
    assert broker.claim_lead(LEAD_KEY, "a:1:1", 5)[0] == "a:1:1"
    broker.release_lead(LEAD_KEY, "a:1:1")
    write_junk(
        broker, "last_tick = 'x', last_at = x'ff'", "'never'", {"last_tick": "x", "last_at": "y"}
    )

    state = broker.schedule_states()["tick"]
    assert (state["last_tick"], state["last_at"]) == (None, None)
    assert broker.fire_schedule("tick", 110.0, envelope(110.0))
    assert broker.schedule_states()["tick"]["last_tick"] == 110.0
    assert broker.claim_lead(LEAD_KEY, "a:1:1", 5) == ("a:1:1", pytest.approx(5.0))


def test_an_infinite_tick_or_lease_and_a_paused_flag_that_is_no_flag_read_as_none(
    connect: BrokerFactory,
) -> None:
    """A tick or lease of 1e999 (inf) read as none in Python but stood in the broker: the
    schedule never fired again (every tick was below it), the lead was never free (and the
    workers tried for it 20 times a second); 'no' in `paused` (SQLite) read as paused."""
    broker = connect()
    assert broker.fire_schedule("tick", 100.0, envelope(100.0))
    # Redis's lease runs out by its expiry (PTTL), which another hand's 1e999 cannot hold off.
    junk = {"last_tick": "1e999", "paused": "no"}
    write_junk(broker, "last_tick = 9e999, paused = 'no'", "9e999", junk, lease=False)
    state = broker.schedule_states()["tick"]
    assert (state["last_tick"], state["paused"]) == (None, False)
    assert broker.fire_schedule("tick", 110.0, envelope(110.0))
    assert broker.schedule_states()["tick"]["last_tick"] == 110.0
    assert broker.claim_lead(LEAD_KEY, "a:1:1", 5) == ("a:1:1", pytest.approx(5.0))
    if isinstance(broker, RedisBroker):
        broker.redis.hset(f"{broker.prefix}:schedule:tick", "last_tick", "inf")
        assert broker.fire_schedule("tick", 120.0, envelope(120.0))


@pytest.mark.parametrize("junk", ["1e17", "1e300", "-1e17", "-1"])
def test_a_tick_outside_the_calendar_reads_as_none(connect: BrokerFactory, junk: str) -> None:
    """A finite tick past the year 9999 (or before 1970) read as a tick: the leading worker
    died on it at every lead (datetime.fromtimestamp overflowed), or the schedule never fired
    again (every tick was below it)."""
    broker = connect()
    assert broker.fire_schedule("tick", 100.0, envelope(100.0))
    write_junk(broker, f"last_tick = {junk}", "0", {"last_tick": junk}, lease=False)
    assert broker.schedule_states()["tick"]["last_tick"] is None
    assert broker.fire_schedule("tick", 110.0, envelope(110.0))
    assert broker.schedule_states()["tick"]["last_tick"] == 110.0


# --- the duty, on a clock of the test's own -------------------------------------------


class Clock:
    """Epoch seconds the test moves; the broker's lease still runs on the real clock, so the
    tests keep their clock near it."""

    def __init__(self) -> None:
        self.now = datetime.now().timestamp()


def scheduler(broker: Broker, name: str, schedules: list[Schedule]) -> Scheduler:
    return Scheduler(broker, schedules, f"{name}@host:1:1", LEASE, lambda task: "default")


def fired_ticks(broker: Broker) -> list[str]:
    return sorted(d.id for d in broker.reserve(["q"], 1000, "test", 30))


def test_two_schedulers_that_both_lead_fire_each_tick_once(connect: BrokerFactory) -> None:
    schedule = Schedule("tick", "tasks.tick", every=1, queue="q")
    one, two = scheduler(connect(), "one", [schedule]), scheduler(connect(), "two", [schedule])
    consumer = connect()
    start = datetime.now().timestamp()
    two.leading_since = start  # a stalled leader whose lease ran out, still acting
    ran: list[str] = []

    def run_all() -> None:
        """Each task runs and ends at once: a tick enqueued again would start over, run twice."""
        done = consumer.reserve(["q"], 100, "test", 30)
        consumer.turn(Turn(outcomes=[Outcome(d.id, SUCCESS) for d in done]))
        ran.extend(d.id for d in done)

    for offset in range(50):
        now = start + offset / 10
        stale = two.broker.schedule_states().get("tick", {})  # read before one fires
        one.step(now)
        run_all()
        two.fire_schedule(schedule, stale, now)  # acts on what it read: the same ticks
        run_all()
        one.due_at = 0.0
    assert len(ran) == len(set(ran)) >= 4, ran
    ticks = sorted(int(i.rsplit(":", 1)[1]) for i in ran)
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))  # none missed


@pytest.mark.parametrize("misfire", ["skip", "run_once"])
def test_ticks_missed_longer_than_a_takeover_follow_the_misfire_policy(
    connect: BrokerFactory, misfire: str
) -> None:
    schedule = Schedule("tick", "tasks.tick", every=1, queue="q", misfire=misfire)
    broker = connect()
    last = float(int(datetime.now().timestamp())) - 10  # the last tick fired, 10 s ago
    broker.fire_schedule("tick", last, None)
    duty = scheduler(broker, "one", [schedule])
    now = last + 10.2
    duty.step(now)  # takes the lead now
    missed = int(now - duty.takeover_time)  # the last tick older than a takeover
    late = range(missed + 1, int(now) + 1)  # late only by what a takeover takes: they run
    expected = ([missed] if misfire == "run_once" else []) + list(late)
    assert fired_ticks(connect()) == sorted(tick_task_id("tick", t) for t in expected)
    assert duty.counts == {"fired": len(expected), "skipped": int(misfire == "skip")}


def test_a_leader_that_stalled_past_its_lease_follows_the_misfire_policy_on_resuming(
    connect: BrokerFactory,
) -> None:
    """Stopped (SIGSTOP, a broker outage) past its lease while nobody else led, it got the
    lease back at its first claim as if it had led all along, and fired every tick of the
    stall in one burst."""
    schedule = Schedule("tick", "tasks.tick", every=1, queue="q", misfire="skip")
    broker = connect()
    duty = scheduler(broker, "one", [schedule])
    start = float(int(datetime.now().timestamp()))
    duty.step(start + 0.5)  # leads: a new schedule, due from now on
    resumed = start + 30.5  # its lease (LEASE s) long run out
    duty.step(resumed)
    missed = int(resumed - duty.takeover_time)  # older than a takeover: skipped
    expected = range(missed + 1, int(resumed) + 1)
    assert fired_ticks(connect()) == sorted(tick_task_id("tick", t) for t in expected)
    assert duty.counts == {"fired": len(expected), "skipped": 1}


def test_a_paused_schedule_skips_its_ticks_and_resumes_without_catching_up(
    connect: BrokerFactory,
) -> None:
    schedule = Schedule("tick", "tasks.tick", every=1, queue="q", misfire="run_once")
    broker = connect()
    duty = scheduler(broker, "one", [schedule])
    start = float(int(datetime.now().timestamp()))
    duty.step(start + 0.1)  # a new schedule starts now
    broker.pause_schedule("tick", True)
    duty.step(start + 3.1)
    assert fired_ticks(connect()) == []
    broker.pause_schedule("tick", False)
    duty.step(start + 4.1)
    assert fired_ticks(connect()) == [tick_task_id("tick", start + 4)]


@pytest.mark.parametrize("junk", ["1e17", "1e300"])
def test_the_duty_runs_on_over_a_tick_outside_the_calendar(
    connect: BrokerFactory, junk: str
) -> None:
    """The leader died on a cron schedule's tick of 1e300 (and its successor, every 30 s,
    killing the tasks they ran); an `every` schedule never fired again."""
    cron = Schedule("tick", "tasks.tick", cron="* * * * *", queue="q")
    every = Schedule("every", "tasks.tick", every=1, queue="q")
    broker = connect()
    for name in ("tick", "every"):
        broker.fire_schedule(name, 100.0, None)
        write_junk(broker, f"last_tick = {junk}", "0", {"last_tick": junk}, lease=False, name=name)
    duty = scheduler(broker, "one", [cron, every])
    start = float(int(datetime.now().timestamp()))
    duty.step(start + 0.1)  # both start anew from now
    assert broker.schedule_states()["tick"]["last_tick"] == start + 0.1
    duty.step(start + 1.1)
    fired = [tick_task_id("every", start + 1)]
    if (start + 1) % 60 == 0:  # the cron's first tick too, once a minute of runs
        fired.append(tick_task_id("tick", start + 1))
    assert fired_ticks(connect()) == sorted(fired)


def test_a_schedule_whose_ticks_cannot_be_computed_is_skipped_not_the_worker(
    connect: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A tick in the last minute of the year 9999 is a tick, but a cron schedule's next one
    is past the calendar: the schedule is skipped for a while, in one line, and the others
    run on."""
    cron = Schedule("tick", "tasks.tick", cron="* * * * *", queue="q")
    every = Schedule("every", "tasks.tick", every=1, queue="q")
    broker = connect()
    broker.fire_schedule("tick", LAST_ETA, None)
    duty = scheduler(broker, "one", [cron, every])
    start = float(int(datetime.now().timestamp()))
    with caplog.at_level(logging.ERROR, logger="fleetd.scheduler"):
        duty.step(start + 0.1)
    skipped = [r.getMessage() for r in caplog.records if r.name == "fleetd.scheduler"]
    assert len(skipped) == 1 and skipped[0].startswith("schedule tick skipped"), skipped
    assert "\n" not in skipped[0]
    duty.step(start + 1.1)
    assert fired_ticks(connect()) == [tick_task_id("every", start + 1)]


# --- fleetd check, the command line -------------------------------------------------------
TASKS_MODULE = "from worker import task\n\n@task\ndef nightly():\n    return 1\n"


def schedule_config(folder: Path, schedule: str) -> Path:
    """A config in `folder` of one worker and the `[[schedule]]` table of `schedule`."""
    (folder / "tasks.py").write_text(TASKS_MODULE)
    config = f'[fleet]\nimports = ["tasks"]\n\n[[worker]]\nname = "w"\n\n[[schedule]]\n{schedule}'
    (folder / "fleet.toml").write_text(config)
    return folder / "fleet.toml"


def fleetd_check(folder: Path, schedule: str) -> subprocess.CompletedProcess[str]:
    return fleetd("check", "-c", str(schedule_config(folder, schedule)))


@pytest.mark.parametrize(
    ("schedule", "key"),
    [
        ('name = "n"\ntask = "tasks.nightly"\ncron = "61 * * * *"\n', "schedule[0].cron"),
        (
            'name = "n"\ntask = "tasks.nightly"\nevery = 5\ntimezone = "Nowhere/Land"\n',
            "schedule[0].timezone",
        ),
        ('name = "n"\ntask = "tasks.nightly"\n', "schedule[0].cron"),
        ('name = "n"\ntask = "tasks.other"\nevery = 5\n', "schedule[0].task"),
    ],
)
def test_fleetd_check_refuses_a_bad_schedule_with_exit_2(
    tmp_path: Path, schedule: str, key: str
) -> None:
    done = fleetd_check(tmp_path, schedule)
    assert done.returncode == 2, done.stdout
    [message] = done.stderr.strip().splitlines()
    assert message.startswith(f"fleetd: {tmp_path / 'fleet.toml'}: {key}: ")


LONG = "x" * 5000
NIGHTLY = 'name = "n"\ntask = "tasks.nightly"\n'


@pytest.mark.parametrize(
    ("schedule", "key"),
    [
        (f'{NIGHTLY}cron = "{LONG}"\n', "cron"),
        (f'{NIGHTLY}cron = "* * * * {LONG}"\n', "cron"),
        (f'{NIGHTLY}every = "{LONG}"\n', "every"),
        (f'{NIGHTLY}every = 5\ntimezone = "{LONG}"\n', "timezone"),
        (f'{NIGHTLY}every = 5\nmisfire = "{LONG}"\n', "misfire"),
        (f'{NIGHTLY}every = 5\nqueue = ["{LONG}"]\n', "queue"),
        (f"{NIGHTLY}every = 5\n{LONG} = 1\n", "xxxxxxxxxx"),
    ],
)
def test_fleetd_check_quotes_an_oversized_schedule_value_short(
    tmp_path: Path, schedule: str, key: str
) -> None:
    """The error line held all 5,000 characters of the value (or of the unknown key)."""
    done = fleetd_check(tmp_path, schedule)
    assert (done.returncode, done.stdout) == (2, "")
    [message] = done.stderr.splitlines()
    assert message.startswith(f"fleetd: {tmp_path / 'fleet.toml'}: schedule[0].{key}")
    assert len(message) < 300, message[:300]


@pytest.mark.parametrize(("configured", "asked"), [("n", LONG), (LONG, "n")])
@pytest.mark.parametrize("verb", ["pause", "resume", "trigger"])
def test_fleetctl_schedule_of_no_such_name_quotes_the_names_short(
    tmp_path: Path, configured: str, asked: str, verb: str
) -> None:
    """`fleetctl schedule pause NAME` repeated a 5,000-character NAME whole, and so the
    names of the config's schedules it listed."""
    config = schedule_config(
        tmp_path, f'name = "{configured}"\ntask = "tasks.nightly"\nevery = 5\n'
    )
    done = subprocess.run(
        [FLEETCTL, "-c", str(config), "schedule", verb, asked],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (1, "")
    [message] = done.stderr.splitlines()
    assert message.startswith(f"fleetctl: no schedule '{asked[:10]}") and len(message) < 300


def test_fleetd_check_takes_a_good_schedule(tmp_path: Path) -> None:
    done = fleetd_check(
        tmp_path,
        'name = "n"\ntask = "tasks.nightly"\ncron = "0 3 * * *"\ntimezone = "Europe/Berlin"\n',
    )
    assert done.returncode == 0, done.stderr


def test_the_duty_reports_runs_how_late_and_skips_to_the_metrics(connect: BrokerFactory) -> None:
    schedule = Schedule("tick", "tasks.tick", every=1, queue="q", misfire="skip")
    broker = connect()
    last = float(int(datetime.now().timestamp())) - 10
    broker.fire_schedule("tick", last, None)
    events: list[dict[str, Any]] = []
    duty = scheduler(broker, "one", [schedule])
    duty.emit = lambda kind, **fields: events.append({"type": kind, **fields})
    duty.step(last + 10.25)
    metrics = Metrics()
    assert all(metrics.apply(event) for event in events)
    got = samples(metrics.render())
    runs = len(fired_ticks(connect()))
    assert got['fleetd_schedule_runs_total{schedule="tick"}'] == runs >= 1
    assert got['fleetd_schedule_skips_total{schedule="tick"}'] == 1
    assert got['fleetd_schedule_late_seconds_count{schedule="tick"}'] == runs
    assert got['fleetd_schedule_late_seconds_bucket{schedule="tick",le="0.01"}'] == 0
    assert got['fleetd_schedule_late_seconds_bucket{schedule="tick",le="5.0"}'] == runs

"""The public import name `fleetd` works beside a project's own `worker.py`; `worker` too."""

from __future__ import annotations

import datetime
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ctl.render import iso_time
from tests.fleet import FLEETCTL, FLEETD, TASKS, Fleet
from worker import Client, task
from worker.brokers.base import FAILURE, PENDING, REVOKED, SUCCESS, Outcome, Turn
from worker.task import REGISTRY, RetryTask

Call = tuple[str, tuple[int, ...], dict[str, object]]
# The offset furthest west: its 9999-12-31 23:59 is past the calendar's last second in UTC.
WEST_MOST = datetime.timezone(-datetime.timedelta(hours=23, minutes=59))


def test_from_fleetd_import_the_public_api() -> None:
    import fleetd
    import worker

    assert fleetd.task is worker.task
    assert fleetd.Client is worker.Client
    assert fleetd.SoftTimeLimitExceeded is worker.SoftTimeLimitExceeded
    assert {"task", "Client", "SoftTimeLimitExceeded", "TaskFailed"} <= set(fleetd.__all__)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda c: c.submit(42), "a task name must be a non-empty string, not 42"),
        (lambda c: c.submit(""), "a task name must be a non-empty string, not ''"),
        (lambda c: c.submit("tasks.add", task_id=7), "a task id must be a non-empty string"),
        # Given but false, these were taken as none given: a fresh id, no kwargs.
        (lambda c: c.submit("tasks.add", task_id=""), "a task id must be a non-empty string"),
        (lambda c: c.submit("tasks.add", task_id=0), "a task id must be a non-empty string"),
        (lambda c: c.submit("tasks.add", kwargs=[]), "kwargs must be a dict, not list"),
        (lambda c: c.submit("tasks.add", kwargs=0), "kwargs must be a dict, not int"),
        (lambda c: c.submit("tasks.add", kwargs=""), "kwargs must be a dict, not str"),
        # A string's letters were taken as the ids:
        (
            lambda c: c.submit_many([("tasks.add", (), {})] * 2, ids="ab"),
            "ids must be a list of task ids, one per call, not 'ab'",
        ),
        (
            lambda c: c.submit_many([("tasks.add", (), {})], ids=[None]),
            "a task id must be a non-empty string, not None",
        ),
        (lambda c: c.submit_many([("tasks.add", "12", {})]), "args must be a list or tuple"),
        (lambda c: c.submit_many([("tasks.add", (), [1])]), "kwargs must be a dict, not list"),
        (lambda c: c.submit("tasks.add", kwargs=[1]), "kwargs must be a dict, not list"),  # type: ignore[arg-type]
        (lambda c: c.submit("tasks.add", kwargs={1: 2}), "keyword names must be strings, not 1"),  # type: ignore[dict-item]
        # Taken for "no countdown", and sent for now:
        (lambda c: c.submit("tasks.add", countdown=""), "countdown must be a number of seconds"),
        (lambda c: c.submit("tasks.add", countdown=[]), "countdown must be a number of seconds"),
        (lambda c: c.handle(None), "a task id must be a non-empty string, not None"),  # type: ignore[arg-type]
        # Taken for the task's own queue, as no name; as @task(queue="") is refused:
        (lambda c: c.submit("tasks.add", queue=""), "a queue must be a non-empty string"),
    ],
    ids=[
        "name-int",
        "name-empty",
        "id-int",
        "id-empty",
        "id-zero",
        "kwargs-empty-list",
        "kwargs-zero",
        "kwargs-empty-str",
        "ids-str",
        "ids-none",
        "args-str",
        "kwargs-list",
        "submit-kwargs-list",
        "kwargs-int-key",
        "countdown-empty-str",
        "countdown-empty-list",
        "handle-none",
        "queue-empty",
    ],
)
def test_a_submit_that_makes_no_sense_fails_at_once_and_sends_nothing(
    tmp_path: Path, call: Callable[[Client], object], words: str
) -> None:
    """A name that is no text reached a worker, which failed it as a BadMessage; a string
    given as args ran the task with its letters. The client says what is wrong instead."""
    client = Client(f"sqlite:///{tmp_path / 'queue.db'}")
    with pytest.raises(TypeError, match=words.replace("(", r"\(")):
        call(client)
    assert sum(d.ready + d.scheduled for d in client.broker.depths()) == 0
    client.close()


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda c: c.submit("tasks.add", task_id="\udcff"), "task id must be UTF-8 text"),
        (lambda c: c.submit("tasks.\ud800"), "task name must be UTF-8 text"),
        (lambda c: c.submit("tasks.add", "a\udcffb", 1), "arguments must be UTF-8 text"),
        (lambda c: c.submit("tasks.add", kwargs={"\ud800": 1}), "arguments must be UTF-8 text"),
    ],
    ids=["id", "name", "args", "kwargs"],
)
def test_a_submit_of_text_that_is_no_utf8_fails_at_once_and_sends_nothing(
    broker_url: str, tmp_path: Path, call: Callable[[Client], object], words: str
) -> None:
    """A lone surrogate (what Python makes of a command line's bytes that are no UTF-8):
    SQLite refused it with a codec's error naming a position; Redis stored such an id
    byte for byte, and its worker then failed the task as a BadMessage."""
    url = broker_url.replace("sqlite:///", f"sqlite:///{tmp_path}/")
    client = Client(url)
    with pytest.raises(ValueError, match=f"{words}: .* holds? a lone surrogate"):
        call(client)
    assert sum(d.ready + d.scheduled for d in client.broker.depths()) == 0
    client.close()


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda c: c.submit("tasks.add", float("nan"), 1), ValueError, "must be JSON"),
        (lambda c: c.submit("tasks.add", kwargs={"a": float("inf")}), ValueError, "must be JSON"),
        (lambda c: c.submit("tasks.add", 1, 2, queue=5), TypeError, "queue must be a non-empty"),
        (lambda c: c.submit("tasks.add", queue="q\udcff"), ValueError, "queue must be UTF-8"),
        (
            lambda c: c.submit_many([("tasks.add", (1, 2), {}), ("tasks.add",)]),
            TypeError,
            r"each call must be a \(name, args, kwargs\) triple, not \('tasks.add',\)",
        ),
    ],
    ids=["nan", "infinity", "queue-number", "queue-no-utf8", "call-not-a-triple"],
)
def test_a_submit_no_worker_could_take_as_sent_fails_at_once_and_sends_nothing(
    broker_url: str,
    tmp_path: Path,
    call: Callable[[Client], object],
    error: type[Exception],
    words: str,
) -> None:
    """NaN and infinity are no JSON (results refuse them; other clients and the dashboard
    cannot read them); a queue of 5 was stored on SQLite as a number no worker's "5" took."""
    url = broker_url.replace("sqlite:///", f"sqlite:///{tmp_path}/")
    client = Client(url)
    with pytest.raises(error, match=words):
        call(client)
    assert sum(d.ready + d.scheduled for d in client.broker.depths()) == 0
    client.close()


@pytest.mark.parametrize(
    ("when", "words"),
    [
        ({"countdown": 1e300}, "countdown reaches past"),
        ({"eta": 1e17}, "eta reaches past"),
        ({"eta": datetime.datetime.max}, "eta reaches past"),
        ({"eta": datetime.datetime(9999, 12, 31, 23, 59, tzinfo=WEST_MOST)}, "eta reaches past"),
    ],
    ids=["countdown", "eta-number", "eta-datetime-max", "eta-datetime-aware"],
)
def test_a_submit_due_past_the_calendar_fails_at_once_and_sends_nothing(
    tmp_path: Path, when: dict[str, object], words: str
) -> None:
    """Such an ETA was stored, and `fleetctl inspect scheduled` then ended in a traceback:
    no date shows it. One given as a datetime was stored too, and its worker then failed
    the task as a BadMessage."""
    client = Client(f"sqlite:///{tmp_path / 'queue.db'}")
    with pytest.raises(ValueError, match=words):
        client.submit("tasks.add", 1, 2, **when)  # type: ignore[arg-type]
    assert sum(d.ready + d.scheduled for d in client.broker.depths()) == 0
    client.close()


def test_a_time_that_no_date_holds_is_shown_as_its_number() -> None:
    """Another producer's ETA (they are read as they were stored) in the year 33,000."""
    assert iso_time(1e12) == "1e+12"
    assert iso_time(0.0).startswith("1970-01-01T") or iso_time(0.0).startswith("1969-12-31T")


@pytest.mark.parametrize(
    ("timeout", "error"),
    [
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("1", TypeError),
        (10**400, ValueError),
    ],
)
def test_a_get_with_a_timeout_that_is_no_finite_number_says_so(
    tmp_path: Path, timeout: object, error: type[Exception]
) -> None:
    client = Client(f"sqlite:///{tmp_path / 'queue.db'}")
    handle = client.submit("tasks.add", 1, 2)
    with pytest.raises(error, match="timeout must be a"):
        handle.get(timeout=timeout)  # type: ignore[arg-type]
    client.close()


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"queue": ""}, TypeError, "queue must be a non-empty string"),
        ({"name": 5}, TypeError, "name must be a non-empty string"),
        ({"time_limit": -1}, ValueError, "time_limit must be >= 0"),
        ({"soft_time_limit": float("nan")}, ValueError, "soft_time_limit must be a finite"),
        ({"time_limit": "10"}, TypeError, "time_limit must be a number of seconds"),
        ({"default_retry_delay": -3}, ValueError, "default_retry_delay must be >= 0"),
        ({"max_retries": None}, TypeError, "max_retries must be a whole number"),
    ],
    ids=["queue", "name", "time-limit", "soft-nan", "time-limit-str", "delay", "max-retries"],
)
def test_a_task_declared_with_options_a_worker_cannot_honour_fails_at_import(
    options: dict[str, object], error: type[Exception], words: str
) -> None:
    """A queue of "" took the task to a queue no worker reads; a time limit of -1 killed
    every run at once, one of nan never; a name of 5 made messages no worker could read."""

    def probe() -> None: ...

    with pytest.raises(error, match=words):
        task(**options)(probe)  # type: ignore[arg-type]
    assert not any(t.fn is probe for t in REGISTRY.values())


def test_apply_async_with_args_that_are_no_list_fails_at_once(tmp_path: Path) -> None:
    @task
    def echo(*args: object) -> object:
        return args

    client = Client(f"sqlite:///{tmp_path / 'queue.db'}")
    with pytest.raises(TypeError, match="args must be a list or tuple, not str"):
        echo.apply_async(args="12", client=client)
    assert sum(d.ready for d in client.broker.depths()) == 0
    client.close()


def test_a_projects_own_worker_py_does_not_shadow_fleetd(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    folder = tmp_path / "host"
    folder.mkdir()
    (folder / "worker.py").write_text("raise RuntimeError('the project worker.py was imported')\n")
    (folder / "tasks.py").write_text(TASKS.replace("from worker import", "from fleetd import"))
    fleet = make_fleet().start()
    assert fleet.client.submit("tasks.add", 2, 3).get(timeout=10) == 5
    client = subprocess.run(
        [sys.executable, "-c", "from fleetd import Client; print(Client.__module__)"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert client.returncode == 0, client.stderr
    assert client.stdout.strip() == "worker.client"


def test_both_commands_print_their_version() -> None:
    for command in (FLEETD, FLEETCTL):
        out = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0
        assert out.stdout.split()[0] == Path(command).name and out.stdout.split()[1][0].isdigit()


def test_the_info_of_a_task_the_broker_never_saw_has_every_key_of_a_known_ones(
    tmp_path: Path,
) -> None:
    """It had id, state and result alone: a caller reading info()["deliveries"] of a task
    not yet stored (or whose record expired) got a KeyError."""
    client = Client(f"sqlite:///{tmp_path / 'queue.db'}")
    try:
        known = client.submit("tasks.add", 1, 2).info()
        unknown = client.handle("no-such-task").info()
    finally:
        client.close()
    assert set(unknown) == set(known), set(known) ^ set(unknown)
    assert (unknown["id"], unknown["state"], unknown["deliveries"]) == (
        "no-such-task",
        "PENDING",
        0,
    )


def test_log_levels_are_taken_in_any_case() -> None:
    """`fleetd start --log-level INFO` was refused: logging's own names are upper case."""
    from supervisor.cli import build_parser

    args = build_parser().parse_args(["start", "-c", "fleet.toml", "--log-level", "WARNING"])
    assert args.log_level == "warning"


def test_a_task_id_the_client_makes_is_a_random_uuid_as_str_writes_it() -> None:
    import uuid

    from worker.client import new_task_id

    ids = [new_task_id() for _ in range(10_000)]

    assert len(set(ids)) == len(ids)
    for task_id in ids:
        parsed = uuid.UUID(task_id)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert str(parsed) == task_id


def local_client(broker_url: str, tmp_path: Path) -> Client:
    return Client(broker_url.replace("sqlite:///", f"sqlite:///{tmp_path}/"))


def test_a_retry_due_past_the_calendar_given_as_a_datetime_fails_in_the_task() -> None:
    @task(bind=True)
    def again(self: object) -> None: ...

    with pytest.raises(ValueError, match="eta reaches past the year 9999"):
        again.retry(eta=datetime.datetime.max)
    with pytest.raises(RetryTask):  # one that a date holds goes back
        again.retry(eta=datetime.datetime(9999, 12, 31, tzinfo=datetime.timezone.utc))


def test_a_naive_eta_is_local_time() -> None:
    """As README says: a naive datetime, as `datetime.now()` gives it, is read as local time."""
    from worker.task import eta_seconds

    naive = datetime.datetime(2100, 1, 2, 3, 4, 5)
    assert eta_seconds(naive, None) == naive.astimezone().timestamp()


def test_apply_async_with_an_empty_queue_fails_as_submit_does(tmp_path: Path) -> None:
    """`queue=""` sent the task to its own queue; `submit(queue="")` refused it."""

    @task(queue="own")
    def nothing() -> None: ...

    client = Client(f"sqlite:///{tmp_path / 'queue.db'}")
    with pytest.raises(TypeError, match="a queue must be a non-empty string, not ''"):
        nothing.apply_async(queue="", client=client)
    assert sum(d.ready for d in client.broker.depths()) == 0
    client.close()


@pytest.mark.parametrize(
    ("given", "calls"), [(1, 2), (3, 2), (0, 1)], ids=["short", "long", "none"]
)
def test_submit_many_with_ids_that_are_not_one_per_call_fails_and_sends_nothing(
    broker_url: str, tmp_path: Path, given: int, calls: int
) -> None:
    """Too few raised a bare IndexError; too many were dropped without a word."""
    client = local_client(broker_url, tmp_path)
    batch: Iterator[Call] = (("tasks.add", (1, 2), {}) for _ in range(calls))  # any iterable
    with pytest.raises(ValueError, match=f"one task id per call: {given} for {calls} calls"):
        client.submit_many(batch, ids=[f"id-{i}" for i in range(given)])
    assert sum(d.ready + d.scheduled for d in client.broker.depths()) == 0
    client.close()


def test_submit_many_with_one_id_per_call_takes_any_iterable_of_calls(
    broker_url: str, tmp_path: Path
) -> None:
    client = local_client(broker_url, tmp_path)
    batch: Iterator[Call] = (("tasks.add", (i, i), {}) for i in range(2))
    handles = client.submit_many(batch, ids=("id-0", "id-1"))
    assert [h.id for h in handles] == ["id-0", "id-1"]
    assert sum(d.ready for d in client.broker.depths()) == 2
    client.close()


@pytest.mark.parametrize(
    ("ids", "words"),
    [
        (None, "give a task id or a list of task ids, not None"),
        (5, "give a task id or a list of task ids, not 5"),
        (b"ab", "give a task id or a list of task ids, not b'ab'"),
        ([None], "a task id must be a non-empty string, not None"),
        (["ok", ""], "a task id must be a non-empty string, not ''"),
    ],
    ids=["none", "int", "bytes", "none-in-list", "empty-in-list"],
)
def test_a_revoke_of_what_is_no_task_id_fails_alike_on_both_brokers(
    broker_url: str, tmp_path: Path, ids: object, words: str
) -> None:
    """SQLite stored [None] as a NULL row and took None for nothing; Redis raised its own
    ResponseError. The client refuses them before either is asked."""
    client = local_client(broker_url, tmp_path)
    with pytest.raises(TypeError, match=words):
        client.revoke(ids)  # type: ignore[arg-type]
    assert client.broker.revoked() == set()
    client.close()


def test_a_revoke_of_one_string_revokes_that_id(broker_url: str, tmp_path: Path) -> None:
    """It revoked "a" and "b" on SQLite, and raised a ResponseError on Redis."""
    client = local_client(broker_url, tmp_path)
    handle = client.submit("tasks.add", 1, 2, task_id="ab")
    client.revoke("ab")
    client.revoke([])  # nothing
    assert client.broker.revoked() == {"ab"}
    assert handle.state == REVOKED
    client.close()


@pytest.mark.parametrize(
    ("limit", "error", "words"),
    [
        (-1, ValueError, r"limit must be >= 0 \(None: no limit\), not -1"),
        ("5", TypeError, "limit must be a whole number or None, not '5'"),
        (True, TypeError, "limit must be a whole number or None, not True"),
        (2.0, TypeError, "limit must be a whole number or None, not 2.0"),
    ],
    ids=["negative", "str", "bool", "float"],
)
def test_dead_letters_with_a_limit_that_is_no_count_fails_alike_on_both_brokers(
    broker_url: str, tmp_path: Path, limit: object, error: type[Exception], words: str
) -> None:
    """-1 gave every letter on SQLite and none on Redis; "5" failed on Redis only."""
    client = local_client(broker_url, tmp_path)
    with pytest.raises(error, match=words):
        client.dead_letters(limit=limit)  # type: ignore[arg-type]
    client.close()


def test_dead_letters_with_a_limit_of_0_gives_none(broker_url: str, tmp_path: Path) -> None:
    client = local_client(broker_url, tmp_path)
    handle = client.submit("tasks.add", 1, 2, queue="q1")
    [delivery] = client.broker.reserve(["q1"], 1, "w1", 30)
    outcome = Outcome(delivery.id, FAILURE, exc_type="WorkerLost", dead_letter=True)
    client.broker.turn(Turn(outcomes=[outcome]))
    assert [d.id for d in client.dead_letters(limit=None)] == [handle.id]
    assert client.dead_letters(limit=0) == []
    client.close()


@pytest.mark.parametrize("url", [None, 5, b"sqlite:///q.db"])
def test_a_client_of_no_url_says_so(url: object) -> None:
    """`Client(None)` raised an AttributeError (its first call, `None.startswith`)."""
    with pytest.raises(TypeError, match="a broker URL must be a string, not"):
        Client(url)  # type: ignore[arg-type]


def test_a_submit_under_an_id_not_ended_is_a_no_op_and_an_ended_one_starts_over(
    broker_url: str, tmp_path: Path
) -> None:
    """As README says: queued, scheduled or running, the task stays as it is and the
    handle is the first's; once it has ended, the id is a new task."""
    client = local_client(broker_url, tmp_path)
    broker = client.broker

    def bodies() -> list[str]:
        held = broker.reserve(["q1"], 10, "w1", 30)
        return [d.body for d in held]

    queued = client.submit("tasks.add", 1, 1, queue="q1", task_id="queued")
    assert client.submit("tasks.add", 2, 2, queue="q1", task_id="queued").id == queued.id
    [first] = bodies()
    assert '"args":[1,1]' in first

    client.submit("tasks.add", 1, 1, queue="q1", countdown=3600, task_id="scheduled")
    client.submit("tasks.add", 2, 2, queue="q1", task_id="scheduled")  # no-op: not due now
    assert bodies() == []
    assert sum(d.scheduled for d in broker.depths()) == 1

    broker.turn(Turn(node="w1@host", started=["queued"]))  # running
    client.submit("tasks.add", 3, 3, queue="q1", task_id="queued")
    assert queued.state == "STARTED" and bodies() == []

    broker.turn(Turn(outcomes=[Outcome("queued", SUCCESS, result=2)]))
    assert queued.get(timeout=5) == 2
    again = client.submit("tasks.add", 4, 4, queue="q1", task_id="queued")
    assert again.state == PENDING
    [second] = bodies()
    assert '"args":[4,4]' in second
    client.close()

"""`fleetctl dead list|retry|purge` against real fleets, on SQLite and on Redis.

The story of each test: a fleet dead-letters tasks it cannot run (a task name its code
lacks, a body that is not JSON); the code is deployed; the operator lists the dead
letters, retries them and purges what is left, with fleetctl as a subprocess.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fleet import Fleet
from worker import TaskFailed
from worker.brokers.base import Envelope

LATER = """

@task
def later(n):
    return n * 2
"""


def dead_letter_unknown_tasks(fleet: Fleet, count: int) -> list[str]:
    """Submit `count` tasks.later (not in the fleet's code yet): each ends NotRegistered."""
    ids = [fleet.client.submit("tasks.later", n).id for n in range(count)]
    for task_id in ids:
        with pytest.raises(TaskFailed) as failed:
            fleet.client.handle(task_id).get(timeout=10)
        assert failed.value.exc_type == "NotRegistered"
    return ids


def dead_letter_undecodable(fleet: Fleet) -> str:
    fleet.client.broker.enqueue([Envelope("bad-1", "default", "tasks.add", "{not json")])
    with pytest.raises(TaskFailed) as failed:
        fleet.client.handle("bad-1").get(timeout=10)
    assert failed.value.exc_type == "BadMessage"
    return "bad-1"


def deploy_later(fleet: Fleet) -> None:
    with open(fleet.folder / "tasks.py", "a") as tasks:
        tasks.write(LATER)


def dead_ids(fleet: Fleet) -> list[str]:
    out = fleet.ctl("--json", "dead", "list")
    return [letter["id"] for letter in json.loads(out.stdout)["dead_letters"]]


def test_dead_letters_are_listed_retried_after_a_deploy_and_purged(
    make_fleet: Callable[..., Fleet], broker_url: str
) -> None:
    fleet = make_fleet(fleet={"broker": broker_url}).start()
    [unknown] = dead_letter_unknown_tasks(fleet, 1)
    bad = dead_letter_undecodable(fleet)
    fleet.stop()
    deploy_later(fleet)

    table = fleet.ctl("dead", "list").stdout
    for words in (unknown, "tasks.later", "NotRegistered: no task named", bad, "BadMessage"):
        assert words in table, words
    listed = json.loads(fleet.ctl("dead", "list", "--json").stdout)["dead_letters"]
    assert [(d["id"], d["name"], d["reason"], d["queue"]) for d in listed] == [
        (bad, "tasks.add", "BadMessage", "default"),
        (unknown, "tasks.later", "NotRegistered", "default"),
    ]
    assert listed[0]["body"] == "{not json"
    assert datetime.datetime.fromisoformat(listed[0]["at_iso"]).timestamp() == pytest.approx(
        listed[0]["at"], abs=1
    )

    retry = fleet.ctl("dead", "retry", unknown, bad, "never-seen", check=False)

    assert retry.returncode == 1
    assert retry.stdout.strip() == f"{unknown}: back on its queue, PENDING"
    assert sorted(retry.stderr.splitlines()) == [
        f"fleetctl: {bad}: its body is not a JSON task, so it cannot run; it stays a dead letter",
        "fleetctl: never-seen: not a dead letter",
    ]
    assert dead_ids(fleet) == [bad]
    info = json.loads(fleet.ctl("--json", "result", unknown).stdout)
    assert (info["state"], info["deliveries"], info["exc_type"]) == ("PENDING", 0, None)

    fleet.start()  # with the new code: the retried task runs, once
    assert fleet.client.handle(unknown).get(timeout=10) == 0
    assert fleet.client.handle(unknown).info()["deliveries"] == 1

    refused = fleet.ctl("dead", "purge", check=False)
    assert (refused.returncode, refused.stdout) == (2, "")
    assert "--yes" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert dead_ids(fleet) == [bad]
    assert fleet.ctl("dead", "purge", "--yes").stdout.strip() == "purged 1 dead letters"
    assert dead_ids(fleet) == []


def test_retry_all_gives_back_every_runnable_letter_and_names_the_others(
    make_fleet: Callable[..., Fleet], broker_url: str
) -> None:
    fleet = make_fleet(fleet={"broker": broker_url}).start()
    unknown = dead_letter_unknown_tasks(fleet, 3)
    bad = dead_letter_undecodable(fleet)
    fleet.stop()
    deploy_later(fleet)
    fleet.start()

    retry = fleet.ctl("--json", "dead", "retry", "--all", check=False)

    assert retry.returncode == 1
    report = json.loads(retry.stdout)
    assert sorted(report["retried"]) == sorted(unknown)
    assert list(report["failed"]) == [bad]
    assert [fleet.client.handle(i).get(timeout=10) for i in unknown] == [0, 2, 4]
    assert dead_ids(fleet) == [bad]


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["dead", "retry"], "give the IDs to retry, or --all"),
        (["dead", "retry", "x", "--all"], "give the IDs to retry, or --all"),
        (["dead", "purge"], "add --yes"),
        (["dead"], "required"),
        (["dead", "nonsense"], "invalid choice"),
    ],
)
def test_dead_command_lines_that_make_no_sense_exit_2(
    make_fleet: Callable[..., Fleet], argv: list[str], problem: str
) -> None:
    fleet = make_fleet()  # not started: nothing is asked of the broker

    out = fleet.ctl(*argv, check=False)

    assert out.returncode == 2
    assert problem in out.stderr and "Traceback" not in out.stderr


def test_dead_list_of_an_empty_list_is_an_empty_table(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    fleet = make_fleet()

    assert "dead letters (0)" in fleet.ctl("dead", "list").stdout
    assert json.loads(fleet.ctl("dead", "list", "--json").stdout) == {"dead_letters": []}
    assert fleet.ctl("dead", "retry", "--all").stdout.strip() == "no dead letters"

"""The broker contract: every test runs against SQLite and against Redis.

A worker writes to its broker with one verb, `turn` (`reserve` is a turn that only
reserves), so that is what these tests write with."""

from __future__ import annotations

import json
import multiprocessing
import select
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.poison import RawTask, overwrite_fields, write_raw
from worker.brokers.base import (
    FAILURE,
    PENDING,
    RETRY,
    REVOKED,
    STARTED,
    SUCCESS,
    Broker,
    Delivery,
    Envelope,
    Outcome,
    QueueDepth,
    Retry,
    Turn,
    Wakeup,
)

if TYPE_CHECKING:
    from .conftest import BrokerFactory

INFO_KEYS = {
    "id",
    "name",
    "queue",
    "state",
    "result",
    "exc_type",
    "exc_message",
    "traceback",
    "deliveries",
    "node",
    "runtime",
}


def envelope(queue: str = "q1", eta: float | None = None, body: str | None = None) -> Envelope:
    task_id = str(uuid.uuid4())
    return Envelope(task_id, queue, "tasks.add", body or json.dumps({"id": task_id}), eta)


def ids(items: Sequence[Envelope | Delivery]) -> list[str]:
    return [item.id for item in items]


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {timeout} s")
        time.sleep(0.02)


def sleep_until(epoch: float) -> None:
    time.sleep(max(0.0, epoch - time.time()) + 0.02)


def readable(wake: Wakeup, timeout: float) -> bool:
    return bool(select.select([wake.fileno()], [], [], timeout)[0])


# --- reserving -------------------------------------------------------------------
def test_a_turn_that_only_reserves_hands_out_tasks_oldest_first_with_their_message(
    broker: Broker,
) -> None:
    tasks = [envelope() for _ in range(5)]
    broker.enqueue(tasks)

    first = broker.turn(Turn(queues=["q1"], n=2, owner="w1", lease=30))

    assert first[0] == Delivery(tasks[0].id, "q1", "tasks.add", tasks[0].body, 1)
    assert ids(first) == ids(tasks[:2])
    assert ids(broker.reserve(["q1"], 10, "w1", 30)) == ids(tasks[2:])
    assert broker.reserve(["q1"], 10, "w1", 30) == []


def test_a_delivery_says_since_when_its_task_was_ready_to_run(broker: Broker) -> None:
    before = time.time()
    now_task, due_task = envelope(), envelope(eta=before + 0.3)
    broker.enqueue([now_task, due_task])
    sleep_until(before + 0.3)

    first, second = broker.reserve(["q1"], 2, "w1", 30)

    assert before - 0.01 <= first.ready_at <= second.ready_at
    assert due_task.eta - 0.01 <= second.ready_at <= time.time()  # type: ignore[operator]


def test_reserve_takes_at_most_n_from_the_given_queues_oldest_first(broker: Broker) -> None:
    a, b, c, d, e = (envelope(q) for q in ("q1", "q2", "q3", "q1", "q2"))
    broker.enqueue([a, b, c, d, e])

    assert broker.reserve(["q2", "q1"], 0, "w1", 30) == []
    assert ids(broker.reserve(["q2", "q1"], 3, "w1", 30)) == [a.id, b.id, d.id]
    assert ids(broker.reserve(["q3"], 5, "w1", 30)) == [c.id]
    assert ids(broker.reserve(["q1", "q2", "q3"], 5, "w1", 30)) == [e.id]


def test_each_task_is_claimed_by_exactly_one_of_many_concurrent_consumers(
    connect: BrokerFactory, tmp_path: Path
) -> None:
    tasks = [envelope() for _ in range(2000)]
    connect().enqueue(tasks)
    fork = multiprocessing.get_context("fork")
    go = fork.Event()

    def consume(index: int) -> None:
        mine = connect()
        go.wait(10)
        claimed: list[str] = []
        while batch := mine.reserve(["q1"], 1 + 5 * index, f"w{index}", 60):
            claimed += ids(batch)
        (tmp_path / f"claimed-{index}.json").write_text(json.dumps(claimed))
        mine.close()

    consumers = [fork.Process(target=consume, args=(i,)) for i in range(4)]
    try:
        for process in consumers:
            process.start()
        go.set()
        for process in consumers:
            process.join(60)
            assert process.exitcode == 0
    finally:
        for process in consumers:
            if process.is_alive():
                process.kill()
                process.join()

    claimed = [json.loads((tmp_path / f"claimed-{i}.json").read_text()) for i in range(4)]
    everything = [task_id for part in claimed for task_id in part]
    assert len(everything) == len(set(everything)) == 2000
    assert set(everything) == set(ids(tasks))


# --- giving back -----------------------------------------------------------------
def test_release_unstarted_gives_the_task_back_with_its_count_unchanged(broker: Broker) -> None:
    task = envelope()
    broker.enqueue([task])
    [first] = broker.reserve(["q1"], 1, "w1", 30)

    broker.release([task.id], died=False)

    [again] = broker.reserve(["q1"], 1, "w2", 30)
    assert (first.deliveries, again.id, again.deliveries) == (1, task.id, 1)


def test_a_release_by_an_owner_leaves_a_task_someone_else_holds_now(broker: Broker) -> None:
    """A worker that gives back late (its broker was unreachable) finds the task's lease ran
    out and another worker holds it: that one keeps it, and runs it once."""
    task = envelope()
    broker.enqueue([task])
    broker.reserve(["q1"], 1, "w1", 30)
    broker.release([task.id], died=False)  # as the lease's end gives it back
    [again] = broker.reserve(["q1"], 1, "w2", 30)

    broker.release([task.id], died=False, owner="w1")

    assert broker.reserve(["q1"], 1, "w3", 30) == []
    broker.release([again.id], died=False, owner="w2")
    [third] = broker.reserve(["q1"], 1, "w3", 30)
    assert (again.id, third.id) == (task.id, task.id)


def test_release_of_a_task_the_operator_stopped_takes_its_delivery_back_every_time(
    broker: Broker,
) -> None:
    """A cold stop kills the child of a started task, but it is no death: no strike."""
    task = envelope()
    broker.enqueue([task])
    for _ in range(4):
        [delivery] = broker.reserve(["q1"], 1, "w1", 30)
        broker.turn(Turn(node="w1@host", started=[task.id]))

        broker.release([task.id], died=False)

        info = broker.get_result(task.id)
        assert info is not None
        assert (delivery.deliveries, info["state"], info["deliveries"]) == (1, PENDING, 0)


def test_release_after_a_death_gives_the_task_back_with_its_count_raised(broker: Broker) -> None:
    task = envelope()
    broker.enqueue([task])
    broker.reserve(["q1"], 1, "w1", 30)
    broker.turn(Turn(node="w1@host", started=[task.id]))

    broker.release([task.id], died=True)

    info = broker.get_result(task.id)
    assert info is not None and info["state"] == PENDING
    [again] = broker.reserve(["q1"], 1, "w2", 30)
    assert (again.id, again.deliveries) == (task.id, 2)


def test_expired_lease_is_taken_over_by_another_owner(broker: Broker) -> None:
    task = envelope()
    broker.enqueue([task])
    broker.reserve(["q1"], 1, "w1", 0.3)
    broker.turn(Turn(node="w1@host", started=[task.id]))
    assert broker.recover_expired(["q1"]) == 0
    assert broker.reserve(["q1"], 1, "w2", 30) == []

    wait_for(lambda: broker.recover_expired(["q1"]) == 1)

    [again] = broker.reserve(["q1"], 1, "w2", 30)
    assert (again.id, again.deliveries) == (task.id, 2)


def test_recover_expired_looks_only_at_the_given_queues(broker: Broker) -> None:
    broker.enqueue([envelope("q2")])
    broker.reserve(["q2"], 1, "w1", 0.1)
    time.sleep(0.3)

    assert broker.recover_expired(["q1"]) == 0
    assert broker.recover_expired(["q2"]) == 1


def test_extend_renews_the_lease_for_its_owner_only(broker: Broker) -> None:
    kept, lost = envelope(), envelope()
    broker.enqueue([kept, lost])
    broker.reserve(["q1"], 2, "w1", 1.5)
    time.sleep(0.9)

    assert broker.extend([kept.id], "w1", 1.5) == []
    assert broker.extend([lost.id], "w2", 1.5) == [lost.id]  # not its owner: no effect
    time.sleep(0.9)

    assert broker.recover_expired(["q1"]) == 1
    assert ids(broker.reserve(["q1"], 10, "w3", 30)) == [lost.id]
    assert broker.extend([lost.id, kept.id], "w1", 1.5) == [lost.id]  # w3's now


def test_extend_returns_the_ids_its_owner_no_longer_holds_in_the_order_given(
    broker: Broker,
) -> None:
    """A worker stopped past its lease learns at its next renew which tasks it lost: gone
    back to the queue, taken by another owner, ended, or never known to the broker."""
    tasks = [envelope() for _ in range(4)]
    broker.enqueue(tasks)
    kept, ended, *back = ids(broker.reserve(["q1"], 4, "w1", 30))
    broker.turn(Turn(outcomes=[Outcome(ended, SUCCESS, result=1)]))
    broker.release(back, died=False, owner="w1")  # as its lease running out gives them back
    [taken] = ids(broker.reserve(["q1"], 1, "w2", 30))
    [queued] = [i for i in back if i != taken]
    unknown = str(uuid.uuid4())

    lost = broker.extend([queued, kept, unknown, ended, taken], "w1", 30)

    assert lost == [queued, unknown, ended, taken]
    assert broker.extend([taken], "w2", 30) == []


def test_recover_gives_back_only_that_owners_tasks(broker: Broker) -> None:
    broker.enqueue([envelope() for _ in range(4)])
    mine = broker.reserve(["q1"], 2, "w1", 30)
    broker.reserve(["q1"], 2, "w2", 30)
    broker.turn(Turn(node="w1@host", started=[mine[0].id]))

    assert broker.recover("w1") == 2

    back = broker.reserve(["q1"], 10, "w3", 30)
    assert ids(back) == ids(mine)
    # The one that started there counts the death; the other only waited: no strike.
    assert [d.deliveries for d in back] == [2, 1]
    assert broker.recover("w1") == 0
    assert broker.depths() == [QueueDepth("q1", ready=0, scheduled=0, reserved=4)]


def test_delivery_count_rises_with_each_redelivery(broker: Broker) -> None:
    task = envelope()
    broker.enqueue([task])
    counts = [broker.reserve(["q1"], 1, "w1", 30)[0].deliveries]
    broker.release([task.id], died=True)
    counts.append(broker.reserve(["q1"], 1, "w2", 30)[0].deliveries)
    broker.turn(Turn(node="w2@host", started=[task.id]))
    broker.recover("w2")
    counts.append(broker.reserve(["q1"], 1, "w3", 0.2)[0].deliveries)
    broker.turn(Turn(node="w3@host", started=[task.id]))
    wait_for(lambda: broker.recover_expired(["q1"]) == 1)
    counts.append(broker.reserve(["q1"], 1, "w4", 30)[0].deliveries)
    # Not started: a gone owner's, or an expired lease's, gives the delivery back.
    wait_for(lambda: broker.recover("w4") == 1)
    counts.append(broker.reserve(["q1"], 1, "w5", 0.2)[0].deliveries)
    wait_for(lambda: broker.recover_expired(["q1"]) == 1)
    counts.append(broker.reserve(["q1"], 1, "w6", 30)[0].deliveries)

    assert counts == [1, 2, 3, 4, 4, 4]
    info = broker.get_result(task.id)
    assert info is not None and info["deliveries"] == 4


# --- ETA -------------------------------------------------------------------------
def test_eta_task_waits_until_due_and_the_earliest_due_goes_first(broker: Broker) -> None:
    now = time.time()
    later, sooner, ready = envelope(eta=now + 0.8), envelope(eta=now + 0.4), envelope()
    broker.enqueue([later, sooner, ready])

    assert ids(broker.reserve(["q1"], 10, "w1", 30)) == [ready.id]
    assert broker.next_due(["q1"]) == pytest.approx(sooner.eta)
    assert broker.next_due(["q2"]) is None
    sleep_until(later.eta or 0)

    assert ids(broker.reserve(["q1"], 1, "w1", 30)) == [sooner.id]
    assert ids(broker.reserve(["q1"], 1, "w1", 30)) == [later.id]
    assert broker.next_due(["q1"]) is None


def test_due_eta_tasks_reserved_together_come_in_eta_order(
    broker: Broker, connect: BrokerFactory, request: pytest.FixtureRequest
) -> None:
    now = time.time()
    later, sooner = envelope(eta=now + 0.5), envelope(eta=now + 0.3)
    broker.enqueue([later, sooner])
    sleep_until(later.eta or 0)

    assert ids(broker.reserve(["q1"], 10, "w1", 30)) == [sooner.id, later.id]


# --- results ---------------------------------------------------------------------
def test_a_turn_that_acks_stores_the_results_and_acks_for_good(broker: Broker) -> None:
    ok, bad = envelope(), envelope()
    broker.enqueue([ok, bad])
    broker.reserve(["q1"], 2, "w1", 0.2)

    failed = Outcome(
        bad.id, FAILURE, exc_type="ValueError", exc_message="no", traceback="Tb", node="w1@host"
    )
    ok_outcome = Outcome(ok.id, SUCCESS, result={"sum": 3}, node="w1@host", runtime=0.25)
    assert broker.turn(Turn(outcomes=[ok_outcome, failed])) == []

    assert broker.get_result(ok.id) == {
        "id": ok.id,
        "name": "tasks.add",
        "queue": "q1",
        "state": SUCCESS,
        "result": {"sum": 3},
        "exc_type": None,
        "exc_message": None,
        "traceback": None,
        "deliveries": 1,
        "node": "w1@host",
        "runtime": 0.25,
    }
    info = broker.get_result(bad.id)
    assert info is not None
    assert (
        info["state"],
        info["exc_type"],
        info["exc_message"],
        info["traceback"],
        info["result"],
    ) == (FAILURE, "ValueError", "no", "Tb", None)
    time.sleep(0.4)  # past the lease: an acked task must not come back
    assert broker.recover_expired(["q1"]) == 0
    assert broker.reserve(["q1"], 10, "w2", 30) == []
    assert broker.depths() == []


def test_an_ack_after_the_task_was_given_back_keeps_it_from_running_again(broker: Broker) -> None:
    task = envelope()
    broker.enqueue([task])
    broker.reserve(["q1"], 1, "w1", 0.1)
    wait_for(lambda: broker.recover_expired(["q1"]) == 1)

    broker.turn(Turn(outcomes=[Outcome(task.id, SUCCESS, result=1)]))

    assert broker.reserve(["q1"], 10, "w2", 30) == []
    info = broker.get_result(task.id)
    assert info is not None and info["state"] == SUCCESS


def test_queued_task_reports_pending_with_every_info_key(broker: Broker) -> None:
    task = envelope()
    broker.enqueue([task])

    info = broker.get_result(task.id)

    assert info is not None and set(info) == INFO_KEYS
    assert (info["id"], info["state"], info["deliveries"]) == (task.id, PENDING, 0)
    assert info["result"] is None
    assert broker.get_result("never-seen") is None


def test_a_turn_that_starts_tasks_sets_state_started_for_held_ones(broker: Broker) -> None:
    held, queued = envelope(), envelope()
    broker.enqueue([held])
    broker.reserve(["q1"], 1, "w1", 30)
    broker.enqueue([queued])

    assert broker.turn(Turn(node="w1@host", started=[held.id, queued.id])) == []

    info = broker.get_result(held.id)
    assert info is not None and (info["state"], info["node"]) == (STARTED, "w1@host")
    info = broker.get_result(queued.id)
    assert info is not None and info["state"] == PENDING
    assert broker.depths() == [QueueDepth("q1", ready=1, scheduled=0, reserved=1)]


def test_a_task_started_and_ended_in_one_turn_keeps_its_outcome_s_node_and_runtime(
    broker: Broker,
) -> None:
    named, unnamed = envelope(), envelope()
    broker.enqueue([named, unnamed])
    broker.reserve(["q1"], 2, "w1", 30)

    broker.turn(
        Turn(
            node="w1@host",
            started=[named.id, unnamed.id],
            outcomes=[
                Outcome(named.id, SUCCESS, node="w1@other", runtime=0.5),
                Outcome(unnamed.id, FAILURE, exc_type="ValueError", runtime=0.25),
            ],
        )
    )

    infos = [broker.get_result(t.id) or {} for t in (named, unnamed)]
    assert [(i["state"], i["node"], i["runtime"]) for i in infos] == [
        (SUCCESS, "w1@other", 0.5),
        (FAILURE, "w1@host", 0.25),  # no node of its own: the one it started on
    ]


def test_a_turn_that_acks_and_reserves_never_hands_out_what_it_acked(broker: Broker) -> None:
    given_back, fresh = envelope(), envelope()
    broker.enqueue([given_back])
    broker.reserve(["q1"], 1, "w1", 0.1)
    wait_for(lambda: broker.recover_expired(["q1"]) == 1)  # queued again, first in line
    broker.enqueue([fresh])

    new = broker.turn(
        Turn(
            node="w1@host",
            started=[given_back.id],
            outcomes=[Outcome(given_back.id, SUCCESS, result=1, node="w1@host")],
            queues=["q1"],
            n=10,
            owner="w1",
            lease=30,
        )
    )

    assert ids(new) == [fresh.id]
    info = broker.get_result(given_back.id)
    assert info is not None and (info["state"], info["result"]) == (SUCCESS, 1)
    assert broker.reserve(["q1"], 10, "w2", 30) == []
    assert broker.depths() == [QueueDepth("q1", ready=0, scheduled=0, reserved=1)]


def test_an_empty_turn_does_nothing(broker: Broker) -> None:
    task = envelope()
    broker.enqueue([task])

    assert broker.turn(Turn()) == []
    assert broker.turn(Turn(node="w1@host", queues=["q1"], n=0, owner="w1", lease=30)) == []
    assert broker.turn(Turn(node="w1@host", queues=[], n=5, owner="w1", lease=30)) == []

    assert broker.depths() == [QueueDepth("q1", ready=1, scheduled=0, reserved=0)]
    info = broker.get_result(task.id)
    assert info is not None and (info["state"], info["deliveries"]) == (PENDING, 0)


def test_retry_goes_back_with_its_eta_and_state_retry(broker: Broker) -> None:
    task = envelope()
    broker.enqueue([task])
    broker.reserve(["q1"], 1, "w1", 30)
    eta = time.time() + 0.4

    broker.turn(Turn(retries=[Retry(task.id, '{"retries": 1}', eta, "IOError", "flaky")]))

    info = broker.get_result(task.id)
    assert info is not None
    assert (info["state"], info["exc_type"], info["exc_message"]) == (RETRY, "IOError", "flaky")
    assert broker.reserve(["q1"], 1, "w1", 30) == []
    assert broker.next_due(["q1"]) == pytest.approx(eta)
    assert broker.depths() == [QueueDepth("q1", ready=0, scheduled=1, reserved=0)]
    sleep_until(eta)
    [again] = broker.reserve(["q1"], 1, "w1", 30)
    assert (again.id, again.body, again.deliveries) == (task.id, '{"retries": 1}', 1)


def test_dead_letters_keep_the_raw_body_newest_first(broker: Broker) -> None:
    first, second = envelope(body="not json {"), envelope()
    broker.enqueue([first, second])
    broker.reserve(["q1"], 2, "w1", 30)

    for task, reason, message in (
        (first, "BadMessage", "not JSON"),
        (second, "WorkerLost", "lost"),
    ):
        outcome = Outcome(task.id, FAILURE, exc_type=reason, exc_message=message, dead_letter=True)
        broker.turn(Turn(outcomes=[outcome]))

    newest, oldest = broker.dead_letters()
    assert (oldest.id, oldest.queue, oldest.name, oldest.body, oldest.reason, oldest.extra) == (
        first.id,
        "q1",
        "tasks.add",
        "not json {",
        "BadMessage",
        {"message": "not JSON"},
    )
    assert oldest.at == pytest.approx(time.time(), abs=60)
    assert newest.id == second.id
    assert [letter.id for letter in broker.dead_letters(limit=1)] == [second.id]
    info = broker.get_result(first.id)
    assert info is not None and (info["state"], info["exc_type"]) == (FAILURE, "BadMessage")


def test_outcome_for_an_id_the_broker_never_held_is_stored(
    broker: Broker, connect: BrokerFactory, request: pytest.FixtureRequest
) -> None:
    made_up = Outcome("made-up", FAILURE, exc_type="BadMessage", exc_message="?", name="?")
    broker.turn(Turn(outcomes=[made_up]))

    info = broker.get_result("made-up")
    assert info is not None and (info["state"], info["exc_type"]) == (FAILURE, "BadMessage")


def test_a_result_given_as_json_text_is_stored_as_it_is(broker: Broker) -> None:
    task = envelope()
    broker.enqueue([task])
    broker.reserve(["q1"], 1, "w1", 30)

    outcome = Outcome(task.id, SUCCESS, result_json='{"a": [1, 2.5, "\\udce9"]}')
    broker.turn(Turn(outcomes=[outcome]))

    info = broker.get_result(task.id)
    assert info is not None and info["result"] == {"a": [1, 2.5, "\udce9"]}


# --- records a producer wrote by hand ----------------------------------------------
def raw(text: str) -> bytes:
    """The bytes a broker stored, from the text it read them back as."""
    return text.encode("utf-8", "surrogateescape")


def test_a_body_that_is_not_utf8_is_handed_out_with_its_bytes_kept(broker: Broker) -> None:
    write_raw(broker, [RawTask(b"t-1", b'{"x": "\xff"}', queue=b"q1")])

    [delivery] = broker.reserve(["q1"], 1, "w1", 30)
    assert (delivery.id, raw(delivery.body)) == ("t-1", b'{"x": "\xff"}')
    outcome = Outcome("t-1", FAILURE, exc_type="BadMessage", exc_message="?", dead_letter=True)
    broker.turn(Turn(outcomes=[outcome]))
    [letter] = broker.dead_letters()
    assert (letter.id, raw(letter.body)) == ("t-1", b'{"x": "\xff"}')


def test_a_record_whose_id_or_name_is_not_text_ends_bad_message_and_the_others_go_out(
    broker: Broker,
) -> None:
    before, after = envelope(), envelope()
    broker.enqueue([before])
    write_raw(
        broker,
        [
            RawTask(b"t-\xff", b'{"x": "\xfe"}', queue=b"q1"),
            RawTask(b"t-2", b"{}", name=b"tasks.\xfd", queue=b"q1"),
        ],
    )
    broker.enqueue([after])

    assert ids(broker.reserve(["q1"], 4, "w1", 30)) == [before.id, after.id]
    assert broker.reserve(["q1"], 4, "w2", 30) == []
    letters = sorted(broker.dead_letters(), key=lambda d: d.id)
    assert [(raw(d.id), raw(d.name), raw(d.body), d.reason) for d in letters] == [
        (b"t-2", b"tasks.\xfd", b"{}", "BadMessage"),
        (b"t-\xff", b"tasks.add", b'{"x": "\xfe"}', "BadMessage"),
    ]
    for letter in letters:
        info = broker.get_result(letter.id)
        assert info is not None and (info["state"], info["exc_type"]) == (FAILURE, "BadMessage")
    assert broker.depths() == [QueueDepth("q1", ready=0, scheduled=0, reserved=2)]


def test_stored_values_that_do_not_decode_read_as_what_they_are_never_raise(
    broker: Broker,
) -> None:
    task = envelope()
    broker.enqueue([task])
    broker.reserve(["q1"], 1, "w1", 30)
    broker.turn(Turn(outcomes=[Outcome(task.id, SUCCESS, result=1, runtime=0.5)]))

    overwrite_fields(
        broker,
        task.id,
        {"result": b"[\xff", "deliveries": b"x", "runtime": b"soon", "node": b"n\xfe"},
    )

    info = broker.get_result(task.id)
    assert info is not None
    assert (info["state"], info["exc_type"], info["deliveries"], info["runtime"]) == (
        FAILURE,
        "BadResult",
        0,
        None,
    )
    assert raw(info["node"]) == b"n\xfe"


def test_a_stored_result_past_a_floats_range_reads_as_bad_result(broker: Broker) -> None:
    """It read as infinity, which `fleetctl --json result` then wrote as no JSON."""
    task = envelope()
    broker.enqueue([task])
    broker.reserve(["q1"], 1, "w1", 30)
    broker.turn(Turn(outcomes=[Outcome(task.id, SUCCESS, result=1, runtime=0.5)]))

    overwrite_fields(broker, task.id, {"result": b"[1, 1e400]"})

    info = broker.get_result(task.id)
    assert info is not None and (info["state"], info["exc_type"]) == (FAILURE, "BadResult")
    assert "1e400 is past the range of a float" in info["exc_message"]


# --- revokes, depths, wake-ups ---------------------------------------------------
def test_revoke_ends_queued_and_scheduled_tasks_and_is_remembered(
    broker: Broker, connect: BrokerFactory
) -> None:
    held, queued, scheduled = envelope(), envelope(), envelope(eta=time.time() + 60)
    broker.enqueue([held])
    broker.reserve(["q1"], 1, "w1", 30)
    broker.enqueue([queued, scheduled])

    broker.revoke([held.id, queued.id, scheduled.id, "never-seen"])

    states = [(broker.get_result(t.id) or {}).get("state") for t in (held, queued, scheduled)]
    assert states == [PENDING, REVOKED, REVOKED]  # the worker holding one skips it itself
    assert broker.reserve(["q1"], 10, "w2", 30) == []
    assert broker.next_due(["q1"]) is None
    assert broker.depths() == [QueueDepth("q1", ready=0, scheduled=0, reserved=1)]
    broker.close()
    assert connect().revoked() == {held.id, queued.id, scheduled.id, "never-seen"}
    other = connect()
    asked = [queued.id, "other", held.id, "never-seen"]
    assert other.revoked_among(asked) == {held.id, queued.id, "never-seen"}
    assert other.revoked_among([]) == set()
    # More ids than one query takes (SQLite's IN_BATCH), the revoked ones anywhere among them.
    many = [f"id-{n}" for n in range(1200)]
    other.revoke([many[0], many[700], many[-1]])
    assert other.revoked_among(many) == {many[0], many[700], many[-1]}
    other.close()


def test_a_task_submitted_after_its_revoke_ends_revoked_and_is_never_handed_out(
    broker: Broker,
) -> None:
    # A worker reads the revoked set now and then: one that has not read this revoke yet
    # must not be handed the task (Client.revoke writes the broker only).
    ahead, later, other = envelope(), envelope(eta=time.time() + 60), envelope()
    broker.revoke([ahead.id, later.id])

    broker.enqueue([ahead, later, other])

    assert [(broker.get_result(t.id) or {}).get("state") for t in (ahead, later, other)] == [
        REVOKED,
        REVOKED,
        PENDING,
    ]
    assert [d.id for d in broker.reserve(["q1"], 10, "w1", 30)] == [other.id]
    assert broker.next_due(["q1"]) is None
    assert broker.depths() == [QueueDepth("q1", reserved=1)]


def test_a_held_task_revoked_ends_revoked_when_given_back_retried_or_recovered(
    broker: Broker,
) -> None:
    # Its worker may not have read the revoke: whichever way it leaves the worker, it must
    # not go back to the queue for another worker to run.
    released, retried, recovered, expired = (envelope() for _ in range(4))
    broker.enqueue([released, retried, recovered])
    broker.reserve(["q1"], 3, "w1", 30)
    broker.enqueue([expired])
    broker.reserve(["q1"], 1, "w2", 0.05)
    ids = [t.id for t in (released, retried, recovered, expired)]
    broker.revoke(ids)

    broker.release([released.id], died=False)
    broker.turn(Turn(retries=[Retry(retried.id, retried.body, time.time())]))
    assert broker.recover("w1") == 0  # none of them went back
    time.sleep(0.1)  # the 50 ms lease runs out
    assert broker.recover_expired(["q1"]) == 0

    assert [(broker.get_result(i) or {}).get("state") for i in ids] == [REVOKED] * 4
    assert broker.reserve(["q1"], 10, "w3", 30) == []
    assert broker.depths() in ([], [QueueDepth("q1")])


def test_a_dead_letter_retried_after_its_revoke_ends_revoked(broker: Broker) -> None:
    task = envelope("q2")
    dead_lettered(broker, task)
    broker.revoke([task.id])

    assert broker.retry_dead([task.id]) == [task.id]  # off the list: it went back, and ended

    assert (broker.get_result(task.id) or {}).get("state") == REVOKED
    assert broker.dead_letters() == []
    assert broker.reserve(["q2"], 1, "w2", 30) == []


def test_routes_published_by_workers_are_read_back_and_replaced(
    broker: Broker, connect: BrokerFactory
) -> None:
    assert broker.routes() == {}
    broker.set_routes({"tasks.resize": "images", "tasks.add": "default"})
    broker.set_routes({"tasks.resize": "thumbnails"})  # a deploy moved it
    broker.close()
    assert connect().routes() == {"tasks.resize": "thumbnails", "tasks.add": "default"}


def test_depths_count_ready_scheduled_and_reserved_per_queue(broker: Broker) -> None:
    later = time.time() + 60
    broker.enqueue(
        [envelope("q1") for _ in range(3)]
        + [envelope("q1", eta=later)]
        + [envelope("q2") for _ in range(2)]
    )

    broker.reserve(["q1"], 1, "w1", 30)

    assert broker.depths() == [
        QueueDepth("q1", ready=2, scheduled=1, reserved=1),
        QueueDepth("q2", ready=2, scheduled=0, reserved=0),
    ]


def test_wakeup_becomes_readable_on_enqueue_from_another_connection(
    broker: Broker, connect: BrokerFactory
) -> None:
    wake = broker.wakeup(["q1"])
    try:
        assert broker.reserve(["q1"], 1, "w1", 30) == []  # short: w1 waits to be woken
        wake.clear()
        wake.arm()
        assert not readable(wake, 0.2)

        connect().enqueue([envelope("q1")])

        assert readable(wake, 5)
        started = time.monotonic()
        wake.clear()
        wake.clear()  # nothing left: returns at once
        assert time.monotonic() - started < 0.5
        wake.arm()
        assert not readable(wake, 0.1)
    finally:
        wake.close()


def test_a_wakeup_for_ready_tasks_alone_does_not_send_the_worker_to_read_etas(
    broker: Broker, connect: BrokerFactory
) -> None:
    """Every submit wakes the idle workers; reading the ETAs on each would cost a query
    (on Redis a round trip) per task."""
    wake, producer = broker.wakeup(["q1"]), connect()
    try:
        assert broker.reserve(["q1"], 1, "w1", 30) == []  # short: w1 waits to be woken
        wake.clear()
        wake.arm()
        producer.enqueue([envelope("q1"), envelope("q1")])
        assert readable(wake, 5)
        assert wake.clear() is False
    finally:
        wake.close()


def test_a_wakeup_for_a_task_scheduled_later_says_so(
    broker: Broker, connect: BrokerFactory
) -> None:
    """The worker reads the queues' ETAs again only when a wake-up may announce one: a
    broker may say so of any wake-up, but never stay silent about a scheduled task,
    whether a producer scheduled it or a worker's turn retried it with an ETA."""
    wake, producer = broker.wakeup(["q1"]), connect()
    producer.enqueue([envelope("q1")])
    [held] = producer.reserve(["q1"], 1, "w1", 30)
    assert broker.reserve(["q1"], 1, "w2", 30) == []  # short: w2 waits to be woken
    try:
        wake.clear()
        wake.arm()
        producer.enqueue([envelope("q1", eta=time.time() + 60)])
        assert readable(wake, 5)
        assert wake.clear() is True

        wake.arm()
        producer.turn(Turn(retries=[Retry(held.id, held.body, time.time() + 60)]))
        assert readable(wake, 5)
        assert wake.clear() is True
    finally:
        wake.close()


def test_a_wakeup_for_a_task_no_reserve_read_yet_is_news(
    broker: Broker, connect: BrokerFactory
) -> None:
    """A broker may tell the worker that a wake-up announces only tasks its last reserve
    took (Wakeup.news), but never of a task that is still to be read: after a reserve that
    took as many as it asked for (more may wait), nor after one that came back short."""
    wake, producer = broker.wakeup(["q1"]), connect()
    try:
        assert broker.reserve(["q1"], 1, "w1", 30) == []  # short: w1 waits to be woken
        wake.clear()
        wake.arm()
        producer.enqueue([envelope("q1") for _ in range(3)])
        assert len(broker.reserve(["q1"], 2, "w1", 30)) == 2
        assert readable(wake, 5)
        wake.clear()
        assert wake.news()

        assert len(broker.reserve(["q1"], 5, "w1", 30)) == 1
        wake.arm()
        producer.enqueue([envelope("q1")])
        assert readable(wake, 5)
        wake.clear()
        assert wake.news()
        assert len(broker.reserve(["q1"], 5, "w1", 30)) == 1
    finally:
        wake.close()


# --- acting on dead letters --------------------------------------------------------
def dead_lettered(broker: Broker, *tasks: Envelope) -> None:
    """Deliver each task, then end it as a dead letter, one after the other (oldest first)."""
    broker.enqueue(list(tasks))
    for task in tasks:
        [delivery] = broker.reserve([task.queue], 1, "w1", 30)
        outcome = Outcome(
            delivery.id, FAILURE, exc_type="WorkerLost", exc_message="died", dead_letter=True
        )
        broker.turn(Turn(outcomes=[outcome]))
        time.sleep(0.002)  # each its own `at`: newest first is then an order


def test_an_outcome_written_twice_leaves_one_dead_letter(broker: Broker) -> None:
    """A worker whose turn got no reply (a timeout) sends its outcomes again in its next
    turn, though the first may have run: the task is in the dead-letter list once."""
    task = envelope()
    dead_lettered(broker, task)
    again = Outcome(task.id, FAILURE, exc_type="WorkerLost", exc_message="died", dead_letter=True)

    broker.turn(Turn(outcomes=[again]))

    assert [letter.id for letter in broker.dead_letters()] == [task.id]


def test_retry_dead_puts_the_task_back_pending_with_no_deliveries_and_off_the_list(
    broker: Broker,
) -> None:
    task = envelope("q2")
    dead_lettered(broker, task)

    assert broker.retry_dead([task.id, "never-dead"]) == [task.id]

    assert broker.dead_letters() == []
    info = broker.get_result(task.id)
    assert info is not None
    assert (info["state"], info["deliveries"], info["queue"], info["exc_type"]) == (
        PENDING,
        0,
        "q2",
        None,
    )
    assert broker.depths() == [QueueDepth("q2", ready=1)]
    [again] = broker.reserve(["q2"], 1, "w2", 30)
    assert (again.id, again.body, again.deliveries) == (task.id, task.body, 1)
    assert broker.retry_dead([task.id]) == []  # not a dead letter any more


def test_retry_dead_keeps_the_other_letters_in_their_order(broker: Broker) -> None:
    first, second, third = envelope(), envelope(), envelope()
    dead_lettered(broker, first, second, third)

    assert broker.retry_dead([second.id]) == [second.id]

    assert [d.id for d in broker.dead_letters()] == [third.id, first.id]
    assert [d.id for d in broker.reserve(["q1"], 10, "w2", 30)] == [second.id]


def test_retry_dead_of_many_gives_back_each_once(broker: Broker) -> None:
    tasks = [envelope() for _ in range(5)]
    dead_lettered(broker, *tasks)

    retried = broker.retry_dead([t.id for t in tasks] + [tasks[0].id])

    assert sorted(retried) == sorted(ids(tasks))
    assert broker.dead_letters() == []
    assert sorted(ids(broker.reserve(["q1"], 10, "w2", 30))) == sorted(ids(tasks))


def test_dead_letters_of_given_ids_and_without_a_limit(broker: Broker) -> None:
    tasks = [envelope() for _ in range(3)]
    dead_lettered(broker, *tasks)

    assert [d.id for d in broker.dead_letters(ids=[tasks[0].id, "x", tasks[2].id])] == [
        tasks[2].id,
        tasks[0].id,
    ]
    assert [d.id for d in broker.dead_letters(limit=None)] == [t.id for t in reversed(tasks)]
    assert broker.dead_letters(limit=1, ids=[tasks[0].id, tasks[1].id]) == broker.dead_letters(
        ids=[tasks[1].id]
    )


def test_purge_dead_deletes_every_letter_and_says_how_many(broker: Broker) -> None:
    tasks = [envelope(), envelope()]
    dead_lettered(broker, *tasks)

    assert broker.purge_dead() == 2

    assert broker.dead_letters() == []
    assert broker.purge_dead() == 0
    info = broker.get_result(tasks[0].id)
    assert info is not None and info["exc_type"] == "WorkerLost"  # the record stays
    assert broker.retry_dead(ids(tasks)) == []


def test_ping_answers(broker: Broker) -> None:
    broker.ping()


def test_retry_dead_of_a_task_submitted_again_leaves_the_new_one_as_it_is(broker: Broker) -> None:
    task = envelope()
    dead_lettered(broker, task)
    broker.enqueue([Envelope(task.id, "q1", task.name, '{"new": true}')])

    assert broker.retry_dead([task.id]) == [task.id]

    assert broker.dead_letters() == []
    assert [(d.id, d.body) for d in broker.reserve(["q1"], 10, "w2", 30)] == [
        (task.id, '{"new": true}')
    ]

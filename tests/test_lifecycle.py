"""Lifecycle guarantees end to end (DESIGN sections 1-3): real fleets, real signals, real outcomes.

Each test starts a real `fleetd`, acts on its processes by pid (SIGKILL, TERM, HUP, ...)
and asserts what became of every task: nothing lost, nothing run twice unless it was
interrupted mid-run, and no process left behind.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from tests.brokers.conftest import REDIS_URL
from tests.fleet import TASKS, Fleet, executions, holds, wait_for
from worker import TaskFailed, TaskRevoked, task
from worker.brokers.base import Envelope


# --- helpers ------------------------------------------------------------------------------
def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def started_pids(marker: Path) -> list[int]:
    """Child pids from a `tasks.sleep` marker file, one per start."""
    return [int(line.split()[1]) for line in lines(marker)]


def inspect(fleet: Fleet, what: str) -> dict[str, Any]:
    """`fleetctl inspect WHAT`: the reply of each node."""
    out = fleet.ctl("--json", "--timeout", "2", "inspect", what)
    return json.loads(out.stdout)["replies"]


def pool_sizes(fleet: Fleet) -> dict[str, int]:
    return {node: len(s["children"]) for node, s in inspect(fleet, "stats").items()}


def logged_json(log: str, prefix: str) -> Any:
    """The JSON object logged right after the first `prefix` in `log`."""
    return json.JSONDecoder().raw_decode(log.split(prefix, 1)[1])[0]


def wait_reloads(fleet: Fleet, n: int) -> None:
    """Wait until the arbiter logged `n` completed reloads."""
    wait_for(lambda: fleet.log().count("reload complete") >= n, 15, message=f"reload {n}")


def submit_journal(fleet: Fleet, journal: Path, n: int, seconds: float = 0.0) -> list[str]:
    handles = fleet.client.submit_many(
        [("tasks.journal", (str(journal), seconds), {}) for _ in range(n)]
    )
    return [h.id for h in handles]


def assert_each_ran_once(fleet: Fleet, ids: list[str], journal: Path) -> None:
    infos = fleet.wait_all_final(ids, 60)
    assert collections.Counter(i["state"] for i in infos) == {"SUCCESS": len(ids)}
    runs = executions(journal)
    assert {i: runs[i] for i in ids if runs[i] != 1} == {}, "tasks lost or run twice"


# --- DESIGN section 3: what happens to a task ------------------------------------------------
def test_retry_goes_back_to_the_broker_with_its_countdown_then_succeeds(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet().start()
    runs = tmp_path / "runs.txt"
    handle = fleet.client.submit("tasks.retry_once", str(runs), 1.0)
    wait_for(lambda: handle.state == "RETRY", 10, message="the RETRY state")
    assert [d.scheduled for d in fleet.client.broker.depths()] == [1], (
        "the retry is held by the broker"
    )
    assert handle.get(timeout=10) == 1
    first, second = (float(t) for t in lines(runs))
    assert second - first >= 1.0


def test_retry_past_max_retries_fails_the_task(make_fleet, tmp_path: Path) -> None:
    fleet = make_fleet().start()
    runs = tmp_path / "runs.txt"
    with pytest.raises(TaskFailed) as err:
        fleet.client.submit("tasks.always_retry", str(runs)).get(timeout=10)
    assert err.value.exc_type == "RuntimeError" and "gave up after 2 retries" in err.value.message
    assert len(lines(runs)) == 3


def test_countdown_and_eta_are_held_by_the_broker_across_a_restart(make_fleet) -> None:
    fleet = make_fleet().start()
    add = task(name="tasks.add")(lambda a, b: a + b)
    submitted = time.time()
    by_countdown = add.apply_async(args=(1, 2), countdown=2.5, client=fleet.client)
    at = datetime.datetime.now() + datetime.timedelta(seconds=2.5)
    by_eta = add.apply_async(args=(3, 4), eta=at, client=fleet.client)
    assert [d.scheduled for d in fleet.client.broker.depths()] == [2]
    fleet.signal(signal.SIGTERM)
    assert fleet.wait_exit(20) == 0
    assert by_countdown.state == by_eta.state == "PENDING"
    fleet.start()
    assert by_countdown.get(timeout=15) == 3 and by_eta.get(timeout=15) == 7
    conn = fleet.client.broker.db
    finished = [
        conn.execute("SELECT finished FROM tasks WHERE id = ?", (h.id,)).fetchone()[0]
        for h in (by_countdown, by_eta)
    ]
    assert min(finished) >= submitted + 2.5, "an ETA task ran before it was due"


def test_child_killed_mid_task_is_redelivered_at_once_and_completes(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet().start()  # lease 30 s: a redelivery in seconds did not wait for it
    marker = tmp_path / "started.txt"
    handle = fleet.client.submit("tasks.sleep", 0.5, str(marker))
    wait_for(marker.exists, 10, message="the task to start")
    [victim] = started_pids(marker)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(lines(marker)) == 2, 5, message="the task to be redelivered")
    assert handle.get(timeout=10) == started_pids(marker)[1] != victim
    assert fleet.client.handle(handle.id).info()["deliveries"] == 2
    wait_for(lambda: list(pool_sizes(fleet).values()) == [2], 10, message="a replacement child")
    assert victim not in fleet.child_pids()


def test_poison_task_ends_worker_lost_after_exactly_max_deliveries_while_the_fleet_serves(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet(defaults={"concurrency": 2, "max_deliveries": 3}).start()
    marker = tmp_path / "poison.txt"
    poison = fleet.client.submit("tasks.poison", str(marker))
    others = fleet.client.submit_many([("tasks.add", (i, i), {}) for i in range(40)])
    with pytest.raises(TaskFailed) as err:
        poison.get(timeout=20)
    assert err.value.exc_type == "WorkerLost"
    assert len(lines(marker)) == 3, "delivered exactly max_deliveries times"
    assert poison.info()["deliveries"] == 3
    assert [(d.id, d.reason) for d in fleet.client.broker.dead_letters()] == [
        (poison.id, "WorkerLost")
    ]
    assert [h.get(timeout=20) for h in others] == [2 * i for i in range(40)]
    assert holds(lambda: len(lines(marker)) == 3), "delivered a fourth time"


def test_a_task_exiting_with_the_clean_stop_code_counts_as_lost_not_as_never_started(
    make_fleet, tmp_path: Path
) -> None:
    """A child stops cleanly only after saying so: exit code 86 alone would hand the task
    back as never started, over and over."""
    fleet = make_fleet(defaults={"max_deliveries": 2}).start()
    marker = tmp_path / "ran.txt"
    handle = fleet.client.submit("tasks.exit_like_a_clean_stop", str(marker))
    with pytest.raises(TaskFailed) as err:
        handle.get(timeout=20)
    assert err.value.exc_type == "WorkerLost"
    assert len(lines(marker)) == 2 and handle.info()["deliveries"] == 2


def test_hard_time_limit_kills_the_childs_group_with_its_grandchild_and_is_not_redelivered(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet().start()
    pidfile = tmp_path / "grandchild.pid"
    handle = fleet.client.submit("tasks.spawn_and_hang", str(pidfile))
    wait_for(
        lambda: pidfile.exists() and pidfile.read_text(), 10, message="the grandchild to start"
    )
    grandchild = int(pidfile.read_text())
    child = psutil.Process(grandchild).ppid()
    with pytest.raises(TaskFailed) as err:
        handle.get(timeout=10)
    assert err.value.exc_type == "TimeLimitExceeded"
    wait_for(
        lambda: not alive(grandchild) and not alive(child), 5, message="the child's group to die"
    )
    assert handle.info()["deliveries"] == 1
    assert fleet.client.submit("tasks.add", 1, 1).get(timeout=10) == 2
    wait_for(lambda: list(pool_sizes(fleet).values()) == [2], 10, message="a fresh child")
    assert holds(lambda: handle.info()["deliveries"] == 1 and handle.state == "FAILURE"), (
        "redelivered"
    )


def test_task_waiting_behind_a_time_limit_kill_is_not_charged_a_delivery(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet(defaults={"concurrency": 1, "prefetch": 4}).start()
    killed = fleet.client.submit("tasks.spawn_and_hang", str(tmp_path / "grandchild.pid"))
    waiting = fleet.client.submit_many([("tasks.add", (i, 1), {}) for i in range(4)])
    assert [h.get(timeout=10) for h in waiting] == [1, 2, 3, 4]
    assert killed.state == "FAILURE"
    assert [h.info()["deliveries"] for h in waiting] == [1, 1, 1, 1]


def test_worker_time_limits_apply_to_every_task(make_fleet) -> None:
    fleet = make_fleet(defaults={"concurrency": 2, "soft_time_limit": 0.3, "time_limit": 1}).start()
    soft = fleet.client.submit("tasks.catch_soft", 5)
    hard = fleet.client.submit("tasks.catch_soft", 5, 5)  # cleans up for too long
    assert soft.get(timeout=10) == "cleaned up"
    with pytest.raises(TaskFailed) as err:
        hard.get(timeout=10)
    assert err.value.exc_type == "TimeLimitExceeded"
    assert fleet.client.submit("tasks.add", 2, 2).get(timeout=10) == 4


def test_soft_time_limit_raises_inside_the_task(make_fleet) -> None:
    fleet = make_fleet().start()
    assert fleet.client.submit("tasks.soft_limited").get(timeout=10) == "cleaned up"


# An id is anybody's text: one with a newline was two lines on the child's revoke pipe (and
# one with "\x1fcancel " the start of another), and the revoked task ran.
@pytest.mark.parametrize("task_id", [None, "r\nx", "a\x1fcancel b"])
def test_revoked_before_start_is_skipped_and_never_runs(
    make_fleet, tmp_path: Path, task_id: str | None
) -> None:
    fleet = make_fleet(defaults={"concurrency": 1, "prefetch": 2}).start()
    marker = tmp_path / "started.txt"
    blocker = fleet.client.submit("tasks.sleep", 3.0, str(marker))  # long enough for two fleetctl
    wait_for(marker.exists, 10, message="the blocker to start")
    # held by the worker (in the child's pipe), not started
    reserved = fleet.client.submit("tasks.sleep", 0, str(marker), task_id=task_id)
    wait_for(lambda: any(inspect(fleet, "reserved").values()), 5, message="the task to be reserved")
    fleet.ctl("revoke", reserved.id)
    queued = fleet.client.submit("tasks.sleep", 0, str(marker), countdown=0.5)
    fleet.client.revoke([queued.id])
    assert blocker.get(timeout=10)
    wait_for(
        lambda: reserved.state == "REVOKED" and queued.state == "REVOKED", 10, message="REVOKED"
    )
    assert holds(lambda: len(lines(marker)) == 1), "a revoked task started"


# Client.revoke writes the broker only: the workers read its revoked set now and then
# (every lease/3 seconds), not at every turn. A task submitted after its revoke, or one held
# in a child's pipe when the revoke is read, still must never start.
def test_a_task_revoked_ahead_by_the_client_never_runs_when_submitted(
    make_fleet, broker_url: str, tmp_path: Path
) -> None:
    fleet = make_fleet(fleet={"broker": broker_url}).start()
    journal = tmp_path / "journal"
    fleet.client.revoke(["ahead"])  # the workers read the revoked set at their boot: before

    handle = fleet.client.submit("tasks.journal", str(journal), task_id="ahead")

    with pytest.raises(TaskRevoked):
        handle.get(timeout=10)
    assert fleet.client.submit("tasks.journal", str(journal)).get(timeout=10)
    assert "ahead" not in executions(journal)


def revoke_quietly(fleet: Fleet, broker_url: str, task_id: str) -> None:
    """Add the id to the broker's revoked set as an older client would: no wake-up."""
    if broker_url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(fleet.folder / "queue.db")) as db, db:
            db.execute("INSERT INTO revoked (id, at) VALUES (?, ?)", (task_id, time.time()))
    else:
        prefix = broker_url.rsplit("=", 1)[1]
        with contextlib.closing(redis.Redis.from_url(REDIS_URL)) as direct:
            direct.sadd(f"{prefix}:revoked", task_id)


@pytest.mark.parametrize("how", ["client", "quietly"])
def test_a_task_waiting_in_a_child_pipe_is_not_started_after_a_revoke_in_the_broker(
    make_fleet, broker_url: str, tmp_path: Path, how: str
) -> None:
    # The revoke's wake-up has the worker read the revoked set at once; one written without
    # (an older client's) is read at the next lease renewal: every half second at lease 1.5.
    lease = 30 if how == "client" else 1.5
    fleet = make_fleet(
        fleet={"broker": broker_url, "lease": lease}, defaults={"concurrency": 1, "prefetch": 2}
    ).start()
    journal = tmp_path / "journal"
    blocker = fleet.client.submit("tasks.journal", str(journal), 3.0)
    wait_for(lambda: executions(journal), 10, message="the blocker to start")
    waiting = fleet.client.submit("tasks.journal", str(journal))
    wait_for(lambda: any(inspect(fleet, "reserved").values()), 5, message="it to be reserved")

    if how == "client":
        fleet.client.revoke([waiting.id])
    else:
        revoke_quietly(fleet, broker_url, waiting.id)

    assert blocker.get(timeout=10)
    wait_for(lambda: waiting.state == "REVOKED", 10, message="REVOKED")
    assert holds(lambda: set(executions(journal)) == {blocker.id}), "a revoked task started"


def test_revoke_with_terminate_signals_the_child_and_is_not_redelivered(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet().start()
    marker = tmp_path / "started.txt"
    handle = fleet.client.submit("tasks.sleep", 30, str(marker))
    wait_for(marker.exists, 10, message="the task to start")
    [victim] = started_pids(marker)
    fleet.ctl("revoke", handle.id, "--terminate", "--signal", "KILL")
    wait_for(lambda: handle.state == "REVOKED", 5, message="REVOKED")
    wait_for(lambda: not alive(victim), 5, message="the child to die")
    assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == 3
    assert holds(lambda: len(lines(marker)) == 1 and handle.info()["deliveries"] == 1), (
        "redelivered"
    )


def test_undecodable_message_is_dead_lettered_with_its_raw_body(make_fleet) -> None:
    fleet = make_fleet().start()
    raw = "{not json"
    fleet.client.broker.enqueue([Envelope("bad-1", "default", "tasks.add", raw)])
    with pytest.raises(TaskFailed) as err:
        fleet.client.handle("bad-1").get(timeout=10)
    assert err.value.exc_type == "BadMessage"
    assert [(d.id, d.body, d.reason) for d in fleet.client.broker.dead_letters()] == [
        ("bad-1", raw, "BadMessage")
    ]
    assert fleet.client.submit("tasks.add", 1, 1).get(timeout=10) == 2


def test_lease_gives_back_a_vanished_hosts_tasks_and_renewal_keeps_a_long_task_owned(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet(
        fleet={"lease": 1},
        workers=[{"name": "a", "queues": ["default"]}, {"name": "b", "queues": ["default"]}],
    )
    # a consumer on a host that lost power: it reserved a task and is never heard from again
    ghost = fleet.client.submit("tasks.add", 5, 5)
    assert [d.id for d in fleet.client.broker.reserve(["default"], 1, "ghost@h9:1:1", 2.0)] == [
        ghost.id
    ]
    lapses = time.time() + 2.0
    fleet.start()
    marker = tmp_path / "started.txt"
    long = fleet.client.submit("tasks.sleep", 3, str(marker))  # three leases long
    assert ghost.get(timeout=10) == 10
    assert ghost.info()["deliveries"] == 1  # it never started where it was held: no strike
    conn = fleet.client.broker.db
    assert (
        conn.execute("SELECT finished FROM tasks WHERE id = ?", (ghost.id,)).fetchone()[0] >= lapses
    )
    assert long.get(timeout=10)
    assert len(lines(marker)) == 1 and long.info()["deliveries"] == 1, (
        "a running task's lease lapsed"
    )


# --- DESIGN section 2: signals to the arbiter ------------------------------------------------
def test_arbiter_quit_is_a_cold_shutdown_whose_running_tasks_are_redelivered(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet().start()
    marker = tmp_path / "started.txt"
    handles = fleet.client.submit_many([("tasks.sleep", (30, str(marker)), {}) for _ in range(2)])
    wait_for(lambda: len(lines(marker)) == 2, 10, message="2 tasks to start")
    fleet.signal(signal.SIGQUIT)
    assert fleet.wait_exit(10) == 0
    assert fleet.leftovers() == []
    assert [h.info()["state"] for h in handles] == ["PENDING", "PENDING"], "back in the broker"
    assert [h.info()["deliveries"] for h in handles] == [0, 0], "an operator's stop is no strike"


def test_arbiter_int_is_warm_then_cold_on_the_second(make_fleet, tmp_path: Path) -> None:
    fleet = make_fleet(defaults={"concurrency": 1, "prefetch": 1}).start()
    marker = tmp_path / "started.txt"
    first = fleet.client.submit("tasks.sleep", 1.0, str(marker))
    slow = fleet.client.submit("tasks.sleep", 30, str(marker))
    wait_for(marker.exists, 10, message="the first task to start")
    fleet.signal(signal.SIGINT)  # warm: the running task finishes, the reserved one goes back
    assert first.get(timeout=10)
    wait_for(
        lambda: len(lines(marker)) == 1 and slow.state == "PENDING",
        5,
        message="the reserved task back",
    )
    assert fleet.proc is not None and fleet.wait_exit(10) == 0
    fleet.start()
    wait_for(lambda: len(lines(marker)) == 2, 10, message="the slow task to start")
    fleet.signal(signal.SIGINT)
    assert holds(lambda: fleet.proc.poll() is None), "the first INT waits for the running task"
    fleet.signal(signal.SIGINT)
    assert fleet.wait_exit(10) == 0
    assert slow.info()["state"] == "PENDING" and slow.info()["deliveries"] == 0  # no strike


def test_arbiter_hup_starts_fresh_code_before_stopping_the_old_generation(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet(defaults={"concurrency": 1, "prefetch": 0}).start()
    marker = tmp_path / "started.txt"
    long = fleet.client.submit("tasks.sleep", 4, str(marker))
    wait_for(marker.exists, 10, message="the long task to start")
    [old_worker] = fleet.worker_pids()
    (fleet.folder / "tasks.py").write_text(
        TASKS.replace(
            "def add(a, b):\n    return a + b", "def add(a, b):\n    return f'new {a + b}'"
        )
    )
    fleet.signal(signal.SIGHUP)
    # the new generation consumes while the old one still finishes its task
    assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == "new 3"
    assert alive(old_worker) and long.state == "STARTED"
    assert long.get(timeout=10) and long.info()["deliveries"] == 1
    wait_for(lambda: not alive(old_worker), 10, message="the old generation to exit")
    assert len(fleet.worker_pids()) == 1
    log = fleet.log()
    assert log.index("generation 1 is up, stopping generation 0") < log.index("reload complete")


def test_arbiter_hup_boots_the_new_generation_at_idle_priority_then_restores_it(
    make_fleet,
) -> None:
    """The serving generation keeps the CPU while the next one imports; nothing stays idle."""
    from supervisor.arbiter import may_leave_idle_priority

    fleet = make_fleet().start()
    [old_worker] = fleet.worker_pids()
    gate = fleet.folder / "gate"
    # the new generation's import waits for the gate: long enough to look at its priority
    (fleet.folder / "tasks.py").write_text(
        f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n    time.sleep(0.01)\n" + TASKS
    )
    fleet.signal(signal.SIGHUP)
    new_worker = wait_for(
        lambda: [p for p in fleet.worker_pids() if p != old_worker], 10, message="generation 1"
    )[0]
    booting = os.SCHED_IDLE if may_leave_idle_priority() else os.SCHED_OTHER
    wait_for(lambda: os.sched_getscheduler(new_worker) == booting, 5, message="its boot policy")
    assert os.sched_getscheduler(old_worker) == os.SCHED_OTHER
    gate.touch()
    wait_for(lambda: "reload complete: generation 1" in fleet.log(), 15, message="the reload")
    children = fleet.child_pids(new_worker)
    assert len(children) == 2
    assert [os.sched_getscheduler(p) for p in [new_worker, *children]] == [os.SCHED_OTHER] * 3
    assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == 3


def test_arbiter_hup_applies_added_removed_and_changed_workers(make_fleet) -> None:
    fleet = make_fleet(
        workers=[{"name": "a", "queues": ["default"]}, {"name": "b", "queues": ["default"]}]
    ).start()
    assert pool_sizes(fleet) == {"a@h1": 2, "b@h1": 2}
    text = fleet.config.read_text()
    text = text.replace(
        'name = "b"\nqueues = ["default"]', 'name = "c"\nqueues = ["other"]\nconcurrency = 1'
    )
    text = text.replace(
        'name = "a"\nqueues = ["default"]', 'name = "a"\nqueues = ["default"]\nconcurrency = 3'
    )
    fleet.config.write_text(text)
    fleet.signal(signal.SIGHUP)
    wait_for(lambda: pool_sizes(fleet) == {"a@h1": 3, "c@h1": 1}, 15, message="the new fleet")
    assert fleet.client.submit("tasks.add", 1, 1, queue="other").get(timeout=10) == 2
    wait_for(lambda: len(fleet.worker_pids()) == 2, 10, message="b to be stopped")


def test_arbiter_hup_with_a_bad_config_keeps_the_old_one_running(make_fleet) -> None:
    fleet = make_fleet().start()
    workers = fleet.worker_pids()
    good = fleet.config.read_text()
    fleet.config.write_text(good + '\n[[worker]]\nname = "w"\nconcurrency = -1\n')
    fleet.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in fleet.log(), 5, message="the refusal in the log")
    fleet.config.write_text(good + '\n[control]\nbind = ["ipc:///tmp/elsewhere.sock"]\n')
    fleet.signal(signal.SIGHUP)
    wait_for(
        lambda: "control.bind cannot change without a restart" in fleet.log(),
        5,
        message="the refusal",
    )
    fleet.config.write_text(good.replace("queue.db", "other.db"))
    fleet.signal(signal.SIGHUP)
    wait_for(
        lambda: "fleet.broker cannot change without a restart" in fleet.log(),
        5,
        message="the refusal of another broker",
    )
    fleet.config.write_text(good)  # for the client
    assert fleet.client.submit("tasks.add", 2, 2).get(timeout=10) == 4
    assert fleet.worker_pids() == workers


def test_arbiter_hup_to_code_that_cannot_start_keeps_the_old_generation_serving(make_fleet) -> None:
    fleet = make_fleet().start()
    [old_worker] = fleet.worker_pids()
    (fleet.folder / "tasks.py").write_text(TASKS + "\nthis is not python\n")
    fleet.signal(signal.SIGHUP)
    wait_for(lambda: "restarting in" in fleet.log(), 10, message="the new generation to fail")
    assert fleet.client.submit("tasks.add", 1, 1).get(timeout=10) == 2
    assert alive(old_worker)
    (fleet.folder / "tasks.py").write_text(TASKS)
    fleet.signal(signal.SIGHUP)
    wait_for(lambda: "reload complete: generation 2" in fleet.log(), 15, message="the fixed reload")
    wait_for(
        lambda: not alive(old_worker) and len(fleet.worker_pids()) == 1,
        10,
        message="generations 0 and 1 to stop",
    )
    assert fleet.client.submit("tasks.add", 2, 2).get(timeout=10) == 4


def test_arbiter_hup_under_steady_load_loses_nothing_and_runs_nothing_twice(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet(
        workers=[{"name": "a", "queues": ["default"]}, {"name": "b", "queues": ["default"]}],
        defaults={"concurrency": 2, "prefetch": 2},
    ).start()
    journal = tmp_path / "journal.txt"
    ids: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        while not stop.is_set():
            ids.extend(submit_journal(fleet, journal, 10, 0.01))
            time.sleep(0.02)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        for reloads in range(1, 4):
            time.sleep(0.7)  # tasks flow through each generation before the next reload
            fleet.signal(signal.SIGHUP)
            wait_reloads(fleet, reloads)
        time.sleep(0.5)  # and through the last one
    finally:
        stop.set()
        producer.join()
    assert len(ids) >= 300
    assert_each_ran_once(fleet, ids, journal)


HELD_BOOT = """
import os, time
gate = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hold-boot")
deadline = time.monotonic() + 30
while os.path.exists(gate) and time.monotonic() < deadline:
    time.sleep(0.01)
"""


def test_a_burst_of_hups_boots_one_generation_after_another_on_the_last_config(
    make_fleet, tmp_path: Path
) -> None:
    """HUPs that come while a reload's generation still boots (a deploy script that reloads
    each host twice, a loop gone wrong) booted a generation each, side by side: thirty HUPs,
    thirty workers and their pools at once. Now they ask for one more reload, which follows
    the booting generation and reads the config as it is then."""
    fleet = make_fleet(fleet={"imports": ["tasks", "heldboot"]}, defaults={"concurrency": 1})
    (fleet.folder / "heldboot.py").write_text(HELD_BOOT)
    fleet.start()
    journal = tmp_path / "journal.txt"
    ids = submit_journal(fleet, journal, 20, 0.02)
    gate = fleet.folder / "hold-boot"
    gate.touch()  # generation 1 boots until the gate is gone
    fleet.signal(signal.SIGHUP)
    wait_for(lambda: len(fleet.worker_pids()) == 2, 10, message="generation 1 to boot")
    for _ in range(10):
        fleet.signal(signal.SIGHUP)
        time.sleep(0.01)
    assert holds(lambda: len(fleet.worker_pids()) == 2), "a HUP booted a generation beside"
    assert fleet.log().count("another reload follows it") == 1
    fleet.config.write_text(fleet.config.read_text().replace("concurrency = 1", "concurrency = 3"))
    ids += submit_journal(fleet, journal, 20, 0.02)
    gate.unlink()
    wait_for(lambda: "reload complete: generation 2" in fleet.log(), 15, message="generation 2")
    wait_for(lambda: len(fleet.worker_pids()) == 1, 15, message="generations 0 and 1 to exit")
    assert pool_sizes(fleet) == {"w@h1": 3}  # the config written after the HUPs
    assert "generation 3" not in fleet.log()
    assert_each_ran_once(fleet, ids, journal)


def node_states(fleet: Fleet) -> dict[str, str]:
    """`fleetctl status`: the state of each node the host supervises (a booting one does not
    answer, which fails the command: its state is in the reply all the same)."""
    out = fleet.ctl("--json", "--timeout", "2", "status", check=False)
    return {node: reply["state"] for node, reply in json.loads(out.stdout)["replies"].items()}


def held_boot_fleet(make_fleet: Callable[..., Fleet]) -> tuple[Fleet, int, Path]:
    """A started fleet of one worker, w, whose next generations boot until the gate file
    (made here) is removed; its worker's pid, and the gate."""
    fleet = make_fleet(fleet={"imports": ["tasks", "heldboot"]}, defaults={"concurrency": 1})
    (fleet.folder / "heldboot.py").write_text(HELD_BOOT)
    fleet.start()
    [worker] = fleet.worker_pids()
    gate = fleet.folder / "hold-boot"
    gate.touch()
    return fleet, worker, gate


def worker_of_a_task(fleet: Fleet, timeout: float) -> int:
    """The pid of the worker whose child runs a task submitted now."""
    return psutil.Process(fleet.client.submit("tasks.pid").get(timeout=timeout)).ppid()


def reload_renaming(fleet: Fleet, old: str, new: str) -> None:
    """HUP with worker `old` renamed `new` in the config."""
    text = fleet.config.read_text()
    assert f'name = "{old}"' in text
    fleet.config.write_text(text.replace(f'name = "{old}"', f'name = "{new}"'))
    fleet.signal(signal.SIGHUP)


def test_a_hup_that_renames_a_worker_keeps_the_old_one_consuming_until_the_new_one_is_up(
    make_fleet, tmp_path: Path
) -> None:
    """A worker that the new config drops (renamed here, same queue) was stopped at the HUP,
    not once its successor was up: its queue had no consumer for as long as the new
    generation booted (6 s for a slow import). Now it serves on, then stops warm."""
    fleet, old_worker, gate = held_boot_fleet(make_fleet)
    release, marker = tmp_path / "release", tmp_path / "started"
    try:
        reload_renaming(fleet, "w", "renamed")
        wait_for(lambda: set(fleet.worker_pids()) - {old_worker}, 10, message="generation 1")
        # Taken at once by the old worker, while its successor boots.
        assert worker_of_a_task(fleet, 5) == old_worker
        assert node_states(fleet) == {"w@h1": "RUNNING", "renamed@h1": "STARTING"}
        held = fleet.client.submit("tasks.hold", str(release), str(marker))
        [child] = wait_for(lambda: started_pids(marker), 10, message="a task to start")
        assert psutil.Process(child).ppid() == old_worker
    finally:
        gate.unlink(missing_ok=True)
    wait_for(lambda: "reload complete: generation 1" in fleet.log(), 15, message="the reload")
    assert "w@h1 is not in the config: it stops once generation 1 is up" in fleet.log()
    assert "removed from the config, generation 1 is up" in fleet.log()
    # A warm stop: its running task finishes and is acked, in the old worker.
    assert alive(old_worker) and held.state == "STARTED"
    release.touch()
    assert held.get(timeout=10) == child and held.info()["deliveries"] == 1
    wait_for(lambda: not alive(old_worker), 10, message="the old worker to exit")
    wait_for(lambda: node_states(fleet) == {"renamed@h1": "RUNNING"}, 10, message="w to be gone")
    [new_worker] = fleet.worker_pids()
    assert worker_of_a_task(fleet, 10) == new_worker


def test_a_second_hup_while_a_renaming_reload_boots_keeps_a_consumer_throughout(
    make_fleet,
) -> None:
    """w -> a (held in its boot), then a HUP to w -> b: generation 0 serves until generation
    1 is up, generation 1 until generation 2 is; then only b is left."""
    fleet, old_worker, gate = held_boot_fleet(make_fleet)
    try:
        reload_renaming(fleet, "w", "a")
        wait_for(lambda: set(fleet.worker_pids()) - {old_worker}, 10, message="generation 1")
        reload_renaming(fleet, "a", "b")
        wait_for(lambda: "another reload follows it" in fleet.log(), 5, message="the second HUP")
        assert worker_of_a_task(fleet, 5) == old_worker
    finally:
        gate.unlink(missing_ok=True)
    wait_for(lambda: "reload complete: generation 2" in fleet.log(), 15, message="generation 2")
    wait_for(lambda: len(fleet.worker_pids()) == 1, 15, message="generations 0 and 1 to exit")
    wait_for(lambda: node_states(fleet) == {"b@h1": "RUNNING"}, 10, message="only b")
    [new_worker] = fleet.worker_pids()
    assert worker_of_a_task(fleet, 10) == new_worker


def test_a_renaming_hup_to_code_that_cannot_start_leaves_the_old_worker_serving(
    make_fleet,
) -> None:
    fleet = make_fleet(defaults={"concurrency": 1}).start()
    [old_worker] = fleet.worker_pids()
    (fleet.folder / "tasks.py").write_text(TASKS + "\nthis is not python\n")
    reload_renaming(fleet, "w", "renamed")
    wait_for(lambda: "reload to generation 1 failed" in fleet.log(), 20, message="the failure")
    assert node_states(fleet) == {"w@h1": "RUNNING", "renamed@h1": "FATAL"}
    assert worker_of_a_task(fleet, 10) == old_worker
    (fleet.folder / "tasks.py").write_text(TASKS)
    fleet.signal(signal.SIGHUP)  # the next reload retires it
    wait_for(lambda: "reload complete: generation 2" in fleet.log(), 15, message="the fixed reload")
    wait_for(lambda: not alive(old_worker), 10, message="the old worker to exit")
    wait_for(lambda: node_states(fleet) == {"renamed@h1": "RUNNING"}, 10, message="w to be gone")
    assert len(fleet.worker_pids()) == 1


def test_arbiter_ttin_and_ttou_grow_and_shrink_every_pool_by_one(make_fleet) -> None:
    fleet = make_fleet(
        workers=[{"name": "a", "queues": ["default"]}, {"name": "b", "queues": ["default"]}]
    ).start()
    fleet.signal(signal.SIGTTIN)
    wait_for(lambda: pool_sizes(fleet) == {"a@h1": 3, "b@h1": 3}, 10, message="pools of 3")
    fleet.signal(signal.SIGTTOU)
    wait_for(lambda: pool_sizes(fleet) == {"a@h1": 2, "b@h1": 2}, 10, message="pools of 2")
    # one at a time: two signals of a kind in flight may merge into one
    fleet.signal(signal.SIGTTOU)
    wait_for(lambda: pool_sizes(fleet) == {"a@h1": 1, "b@h1": 1}, 10, message="pools of 1")
    assert fleet.client.submit("tasks.add", 1, 1).get(timeout=10) == 2


def test_arbiter_usr1_logs_a_status_dump_of_every_worker_and_child(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet().start()
    marker = tmp_path / "started.txt"
    fleet.client.submit("tasks.sleep", 1.0, str(marker))
    wait_for(marker.exists, 10, message="the task to start")
    fleet.signal(signal.SIGUSR1)
    [worker_pid] = fleet.worker_pids()
    wait_for(
        lambda: "status: {" in fleet.log() and "status {" in fleet.log(),
        5,
        message="the status dumps",
    )
    arbiter_status = logged_json(fleet.log(), "status: ")
    assert [(w["node"], w["pid"], w["state"]) for w in arbiter_status["workers"]] == [
        ("w@h1", worker_pid, "RUNNING")
    ]
    worker_status = logged_json(fleet.log(), "status ")
    assert worker_status["node"] == "w@h1" and len(worker_status["children"]) == 2
    assert "tasks.sleep" in [c["task_name"] for c in worker_status["children"]]


def test_arbiter_killed_its_workers_warm_shut_down_by_themselves(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet(defaults={"concurrency": 2, "prefetch": 2}).start()
    marker = tmp_path / "started.txt"
    handles = fleet.client.submit_many([("tasks.sleep", (1.0, str(marker)), {}) for _ in range(6)])
    wait_for(lambda: len(lines(marker)) == 2, 10, message="2 tasks to start")
    fleet.remember_pids()
    processes = [p.pid for p in fleet.descendants()]
    fleet.signal(signal.SIGKILL)
    fleet.wait_exit(5)
    wait_for(
        lambda: not any(alive(p) for p in processes), 10, message="the workers and children to exit"
    )
    # the running tasks finished, the reserved ones went back
    states = collections.Counter(h.state for h in handles)
    assert states == {"SUCCESS": 2, "PENDING": 4}, states
    assert len(lines(marker)) == 2


def test_new_start_after_arbiter_kill_ends_every_process_of_the_old_run(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet().start()
    pidfile = tmp_path / "grandchild.pid"
    marker = tmp_path / "started.txt"
    hanging = fleet.client.submit("tasks.spawn_and_wait", str(pidfile), 60)
    slow = fleet.client.submit("tasks.sleep", 60, str(marker))
    wait_for(
        lambda: pidfile.exists() and pidfile.read_text() and marker.exists(),
        10,
        message="both tasks to start",
    )
    fleet.remember_pids()
    old_run = [p.pid for p in fleet.descendants()]
    grandchild = int(pidfile.read_text())
    assert grandchild in old_run and len(old_run) == 4  # worker, 2 children, 1 grandchild
    # The record names the worker's consumer within RECORD_EVERY of its start: the next
    # run gives its tasks back by that name (a kill before it falls back on their lease).
    record = fleet.folder / "state" / "run.json"
    wait_for(lambda: json.loads(record.read_text())["owners"], 5, message="the run record")
    # STARTED in the broker: the deaths are ones they may have caused (a strike each)
    wait_for(lambda: hanging.state == slow.state == "STARTED", 5, message="the starts")
    fleet.signal(signal.SIGKILL)
    fleet.wait_exit(5)
    assert holds(lambda: [p for p in old_run if alive(p)] != []), (
        "warm shutdown waits for the running tasks"
    )
    fleet.start()
    assert [p for p in old_run if alive(p)] == [], "a process of the old run survived the new start"
    assert "ending 4 processes left by a previous run" in fleet.log()
    # the old run's tasks were interrupted: they are redelivered to the new run
    wait_for(
        lambda: len(lines(marker)) == 2 and hanging.info()["deliveries"] == 2,
        10,
        message="redelivery",
    )
    assert slow.info()["deliveries"] == 2
    fleet.signal(signal.SIGQUIT)  # no need to wait a minute for them
    assert fleet.wait_exit(10) == 0


def test_worker_killed_during_a_warm_shutdown_has_its_tasks_back_at_the_next_start(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet().start()  # lease 30 s
    marker = tmp_path / "started.txt"
    handle = fleet.client.submit("tasks.sleep", 30, str(marker))
    wait_for(marker.exists, 10, message="the task to start")
    # Its start reaches the broker with the worker's next turn: wait for it, or the kill
    # below may come first (make test saw PENDING once).
    wait_for(lambda: handle.state == "STARTED", 10, message="the start in the broker")
    [worker_pid] = fleet.worker_pids()
    fleet.signal(signal.SIGTERM)  # waits for the task
    wait_for(lambda: "warm shutdown" in fleet.log(), 5, message="the warm shutdown")
    os.kill(worker_pid, signal.SIGKILL)
    assert fleet.wait_exit(10) == 0
    assert handle.info()["state"] == "STARTED"  # held by a dead consumer
    fleet.start()
    wait_for(
        lambda: len(lines(marker)) == 2, 10, message="the task to be given back and redelivered"
    )
    assert handle.info()["deliveries"] == 2
    fleet.signal(signal.SIGQUIT)
    assert fleet.wait_exit(10) == 0


def test_two_arbiters_never_share_a_state_dir(make_fleet) -> None:
    fleet = make_fleet().start()
    second = make_fleet("host")  # the same folder and config
    second.start(wait=False)
    assert second.wait_exit(10) == 1
    assert "already runs on state_dir" in second.log()
    assert fleet.proc is not None and fleet.proc.poll() is None
    assert fleet.client.submit("tasks.add", 1, 1).get(timeout=10) == 2


# --- DESIGN section 2: signals to a worker ---------------------------------------------------
def test_worker_killed_loses_its_children_and_their_subprocesses_and_its_tasks_come_back_at_once(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet(defaults={"concurrency": 2, "prefetch": 2}).start()  # lease 30 s
    pidfile = tmp_path / "grandchild.pid"
    marker = tmp_path / "started.txt"
    hanging = fleet.client.submit("tasks.spawn_and_wait", str(pidfile), 0.5)
    slow = fleet.client.submit_many([("tasks.sleep", (0.5, str(marker)), {}) for _ in range(4)])
    wait_for(
        lambda: pidfile.exists() and pidfile.read_text() and marker.exists(),
        10,
        message="tasks to start",
    )
    [worker_pid] = fleet.worker_pids()
    fleet.remember_pids()
    old = fleet.child_pids(worker_pid) + [int(pidfile.read_text())]
    wait_for(lambda: hanging.state == "STARTED", 5, message="its start in the broker")
    os.kill(worker_pid, signal.SIGKILL)
    wait_for(
        lambda: not any(alive(p) for p in old),
        5,
        message="its children and their subprocesses to die",
    )
    wait_for(
        lambda: fleet.worker_pids() and fleet.worker_pids() != [worker_pid],
        10,
        message="a new worker",
    )
    infos = fleet.wait_all_final([hanging.id] + [h.id for h in slow], 20)
    assert [i["state"] for i in infos] == ["SUCCESS"] * 5
    assert hanging.info()["deliveries"] == 2


def test_worker_term_finishes_its_running_task_returns_the_rest_and_is_restarted(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet(defaults={"concurrency": 1, "prefetch": 3}).start()
    journal = tmp_path / "journal.txt"
    ids = submit_journal(fleet, journal, 4, 0.5)
    wait_for(lambda: executions(journal), 10, message="the first task to start")
    [worker_pid] = fleet.worker_pids()
    os.kill(worker_pid, signal.SIGTERM)
    wait_for(
        lambda: fleet.worker_pids() and fleet.worker_pids() != [worker_pid],
        10,
        message="a new worker",
    )
    assert_each_ran_once(fleet, ids, journal)
    assert [i["deliveries"] for i in fleet.infos(ids)] == [1, 1, 1, 1]


def test_worker_quit_kills_its_children_and_their_tasks_are_redelivered(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet().start()
    marker = tmp_path / "started.txt"
    handles = fleet.client.submit_many([("tasks.sleep", (0.5, str(marker)), {}) for _ in range(2)])
    wait_for(lambda: len(lines(marker)) == 2, 10, message="2 tasks to start")
    [worker_pid] = fleet.worker_pids()
    children = fleet.child_pids(worker_pid)
    os.kill(worker_pid, signal.SIGQUIT)
    wait_for(lambda: not any(alive(p) for p in children), 5, message="the children to be killed")
    infos = fleet.wait_all_final([h.id for h in handles], 20)
    assert [(i["state"], i["deliveries"]) for i in infos] == [("SUCCESS", 1)] * 2  # no strike
    assert len(lines(marker)) == 4


@pytest.mark.parametrize("via", ["task", "subprocess"])
def test_a_quit_that_a_task_sends_its_own_worker_is_ignored(make_fleet, via: str) -> None:
    """A task's QUIT to its worker was a cold stop: the task went back without a delivery
    strike, the arbiter restarted the worker, which ran it again and stopped again, five
    times, and then left the worker down (FATAL) with its queues standing still. The worker
    reads who sent a QUIT: one from below it is ignored; an operator's still stops it (the
    test above)."""
    fleet = make_fleet().start()
    [worker_pid] = fleet.worker_pids()
    handle = fleet.client.submit("tasks.quit_worker", via)
    assert handle.get(timeout=10) == worker_pid
    assert handle.info()["deliveries"] == 1
    assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == 3
    assert fleet.worker_pids() == [worker_pid]
    assert "a process of a task of ours: ignored" in fleet.log()
    assert "cold shutdown" not in fleet.log()


def test_a_quit_that_a_task_sends_the_arbiter_is_ignored(make_fleet) -> None:
    """A task's QUIT to the arbiter stopped the fleet cold: its task went back without a
    delivery strike, to run and stop the fleet again at the next start. The arbiter reads who
    sent a QUIT, as its workers do; an operator's still stops it cold (fleet.stop's)."""
    fleet = make_fleet().start()
    workers = fleet.worker_pids()
    handle = fleet.client.submit("tasks.quit_arbiter")
    assert fleet.proc is not None and handle.get(timeout=10) == fleet.proc.pid
    assert handle.info()["deliveries"] == 1
    assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == 3
    assert fleet.proc.poll() is None and fleet.worker_pids() == workers
    assert "a task cannot stop the fleet" in fleet.log()
    fleet.signal(signal.SIGTERM)
    assert fleet.wait_exit(15) == 0


def test_a_warm_shutdown_continues_a_child_that_its_task_stopped(make_fleet) -> None:
    """A task that SIGSTOPs its own child (a debugger's habit, a shell's job control) held a
    warm shutdown for good: the TERM waited in the stopped child. The worker sends CONT after
    TERM, as systemd does: the task runs on, finishes once, and the fleet stops."""
    fleet = make_fleet().start()
    [worker_pid] = fleet.worker_pids()
    handle = fleet.client.submit("tasks.stop_self")
    wait_for(
        lambda: any(
            psutil.Process(c).status() == psutil.STATUS_STOPPED
            for c in fleet.child_pids(worker_pid)
        ),
        10,
        message="the task to stop its child",
    )
    fleet.signal(signal.SIGTERM)
    assert fleet.wait_exit(15) == 0
    assert handle.info()["state"] == "SUCCESS" and handle.get(timeout=1) == "resumed"


def test_worker_ttin_ttou_resize_its_own_pool_and_usr1_logs_its_status(make_fleet) -> None:
    fleet = make_fleet(
        workers=[{"name": "a", "queues": ["default"]}, {"name": "b", "queues": ["default"]}]
    ).start()
    a_pid = inspect(fleet, "stats")["a@h1"]["pid"]
    os.kill(a_pid, signal.SIGTTIN)
    wait_for(lambda: pool_sizes(fleet) == {"a@h1": 3, "b@h1": 2}, 10, message="a pool of 3")
    os.kill(a_pid, signal.SIGTTIN)
    wait_for(lambda: pool_sizes(fleet) == {"a@h1": 4, "b@h1": 2}, 10, message="a pool of 4")
    os.kill(a_pid, signal.SIGTTOU)
    wait_for(lambda: pool_sizes(fleet) == {"a@h1": 3, "b@h1": 2}, 10, message="a pool of 3")
    os.kill(a_pid, signal.SIGUSR1)
    wait_for(lambda: "status {" in fleet.log(), 5, message="the status line")
    assert logged_json(fleet.log(), "status ")["concurrency"] == 3


# --- DESIGN section 2: signals to a child ----------------------------------------------------
def test_child_term_finishes_its_task_then_exits_and_is_replaced(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet(defaults={"concurrency": 1, "prefetch": 3}).start()
    journal = tmp_path / "journal.txt"
    ids = submit_journal(fleet, journal, 4, 0.3)
    wait_for(lambda: executions(journal), 10, message="the first task to start")
    [child] = fleet.child_pids()
    os.kill(child, signal.SIGTERM)
    assert_each_ran_once(fleet, ids, journal)
    assert [i["deliveries"] for i in fleet.infos(ids)] == [1, 1, 1, 1]
    wait_for(lambda: not alive(child) and len(fleet.child_pids()) == 1, 5, message="a replacement")


@pytest.mark.parametrize("how", ["ignore", "handle", "block"])
def test_a_task_that_takes_term_for_itself_holds_no_warm_shutdown(
    make_fleet, tmp_path: Path, how: str
) -> None:
    """A task ignores, handles or blocks TERM (and USR1), and the fleet's TERM comes while
    it runs: it finishes, and the tasks behind it in its child's pipe go back (the child
    has its own handlers again after each task, and the worker sends its TERM again), at
    most one of them starting meanwhile; none of them is lost. A soft time limit raises in
    the next task as before."""
    fleet = make_fleet(defaults={"concurrency": 1, "prefetch": 3}).start()
    gate, marker = tmp_path / "gate", tmp_path / "started.txt"
    taker = fleet.client.submit("tasks.take_signals", how, str(gate), str(marker))
    behind = fleet.client.submit_many([("tasks.sleep", (0.3, str(marker)), {})] * 3)
    wait_for(marker.exists, 10, message="the task to start")
    [child] = fleet.child_pids()
    fleet.signal(signal.SIGTERM)
    wait_for(lambda: "warm shutdown" in fleet.log(), 5, message="the warm shutdown")
    gate.touch()
    assert fleet.wait_exit(15) == 0
    assert taker.get(timeout=5) == child
    states = [h.info()["state"] for h in behind]
    assert states.count("SUCCESS") + states.count("PENDING") == 3
    assert states.count("SUCCESS") <= 1, "the child ran the tasks its pipe held"
    fleet.start()
    for handle in behind:
        handle.get(timeout=15)
    assert len(lines(marker)) == 4  # the taker once, and each task behind it once
    [child] = fleet.child_pids()
    assert fleet.client.submit("tasks.take_signals", how).get(timeout=10) == child
    assert fleet.client.submit("tasks.soft_limited").get(timeout=10) == "cleaned up"


def test_child_ignores_int_and_usr1_raises_soft_time_limit_in_its_task(
    make_fleet, tmp_path: Path
) -> None:
    fleet = make_fleet(defaults={"concurrency": 1}).start()
    [child] = fleet.child_pids()
    marker = tmp_path / "started.txt"
    survivor = fleet.client.submit("tasks.sleep", 0.5, str(marker))
    wait_for(marker.exists, 10, message="the task to start")
    os.kill(child, signal.SIGINT)
    assert survivor.get(timeout=10) == child
    soft = fleet.client.submit("tasks.catch_soft", 30, 0, str(marker))
    wait_for(lambda: len(lines(marker)) == 2, 10, message="the task to start")
    os.kill(child, signal.SIGUSR1)
    assert soft.get(timeout=10) == "cleaned up"
    assert fleet.child_pids() == [child]


# --- DESIGN section 1: the process tree --------------------------------------------------------
def test_every_child_leads_its_own_process_group(make_fleet) -> None:
    fleet = make_fleet(
        workers=[{"name": "a", "queues": ["default"]}, {"name": "b", "queues": ["default"]}]
    ).start()
    children = fleet.child_pids()
    assert len(children) == 4
    assert all(os.getpgid(c) == c for c in children)


# --- recycling -----------------------------------------------------------------------------------
def test_max_tasks_per_child_spreads_tasks_over_fresh_children(make_fleet) -> None:
    fleet = make_fleet(defaults={"concurrency": 1, "max_tasks_per_child": 5}).start()
    handles = fleet.client.submit_many([("tasks.pid", (), {}) for _ in range(20)])
    pids = collections.Counter(h.get(timeout=20) for h in handles)
    assert len(pids) >= 4 and max(pids.values()) <= 5, pids
    wait_for(lambda: len(fleet.child_pids()) == 1, 5, message="the last retiring child to go")


def child_states(fleet: Fleet) -> list[str]:
    """The states of the node's children (busy, idle, spare, ...), sorted."""
    [stats] = inspect(fleet, "stats").values()
    return sorted(c["state"] for c in stats["children"])


def test_a_child_on_its_last_task_has_a_spare_forked_ahead_that_takes_over(
    make_fleet, tmp_path: Path
) -> None:
    """max_tasks_per_child = 1 forks a spare when a child is handed its last task, not after
    it finished: one spare per retiring child, and the spare runs the next task."""
    fleet = make_fleet(defaults={"concurrency": 2, "max_tasks_per_child": 1}).start()
    gates = [tmp_path / "gate-1", tmp_path / "gate-2"]
    held = [fleet.client.submit("tasks.hold", str(gate)) for gate in gates]
    two_spares = ["busy", "busy", "spare", "spare"]
    wait_for(lambda: child_states(fleet) == two_spares, 10, message="two spares")
    assert holds(lambda: child_states(fleet) == two_spares), "more than one each"
    [stats] = inspect(fleet, "stats").values()
    spares = {c["pid"] for c in stats["children"] if c["state"] == "spare"}
    gates[0].touch()
    first = held[0].get(timeout=10)
    after = fleet.client.submit("tasks.pid").get(timeout=10)
    assert after in spares and after != first
    gates[1].touch()
    assert held[1].get(timeout=10) not in spares


def test_max_tasks_per_child_1_runs_each_task_once_in_a_fresh_child_and_reaps_every_one(
    make_fleet, tmp_path: Path
) -> None:
    """Each child runs one task and its spare takes over: over a run of many (3 prefetched per
    child), every task runs once, each in a child of its own, and every child that ran one is
    reaped (none is left under the worker, not even as a zombie) while the pool stays whole."""
    fleet = make_fleet(defaults={"concurrency": 2, "prefetch": 3, "max_tasks_per_child": 1})
    fleet.start()
    [worker] = fleet.worker_pids()
    journal = tmp_path / "journal.txt"
    handles = fleet.client.submit_many([("tasks.journal", (str(journal),), {})] * 40)
    ids = [h.id for h in handles]
    infos = fleet.wait_all_final(ids, 60)
    assert [i["state"] for i in infos] == ["SUCCESS"] * len(ids)
    assert executions(journal) == {i: 1 for i in ids}
    ran_in = [int(line.split()[2]) for line in lines(journal) if line.startswith("S ")]
    assert len(set(ran_in)) == len(ids), "a child ran more than one task"
    wait_for(
        lambda: not set(ran_in) & set(fleet.child_pids(worker)),
        10,
        message="every child that ran a task to be reaped",
    )
    assert len(fleet.child_pids(worker)) == 2, "the pool is not back at its size"


def test_a_child_leaves_by_itself_after_its_last_task_without_waiting_for_the_worker(
    make_fleet, tmp_path: Path
) -> None:
    """A child told its last task at its fork exits with that task's reply: with its worker
    stopped (it reads nothing, closes no pipe), the child is gone all the same, and once the
    worker goes on the outcome is there and the spare has taken its place."""
    fleet = make_fleet(defaults={"concurrency": 1, "max_tasks_per_child": 1}).start()
    gate = tmp_path / "gate"
    held = fleet.client.submit("tasks.hold", str(gate))
    wait_for(lambda: child_states(fleet) == ["busy", "spare"], 10, message="a busy child")
    [stats] = inspect(fleet, "stats").values()
    [busy] = [c["pid"] for c in stats["children"] if c["state"] == "busy"]
    [worker] = fleet.worker_pids()
    os.kill(worker, signal.SIGSTOP)
    try:
        gate.touch()

        def exited() -> bool:
            try:
                return psutil.Process(busy).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(exited, 10, message="the child to exit while its worker is stopped")
    finally:
        os.kill(worker, signal.SIGCONT)
    assert held.get(timeout=10) == busy
    wait_for(lambda: busy not in fleet.child_pids(worker), 10, message="the child reaped")
    assert fleet.client.submit("tasks.pid").get(timeout=10) not in (busy, worker)


def test_spares_go_with_a_pool_shrink_and_a_warm_shutdown(make_fleet, tmp_path: Path) -> None:
    """A spare belongs to a child on its last task: a shrink of the pool under them lets the
    extra spare go, and a warm shutdown waits for the tasks, not for the spares."""
    fleet = make_fleet(defaults={"concurrency": 2, "max_tasks_per_child": 1}).start()
    gates = [tmp_path / "gate-1", tmp_path / "gate-2"]
    held = [fleet.client.submit("tasks.hold", str(gate)) for gate in gates]
    two_spares = ["busy", "busy", "spare", "spare"]
    wait_for(lambda: child_states(fleet) == two_spares, 10, message="two spares")
    fleet.ctl("pool", "shrink", "1")
    gates[0].touch()
    held[0].get(timeout=10)
    # The pool is 1: the held child runs on, its spare stays; the other spare went.
    wait_for(lambda: child_states(fleet) == ["busy", "spare"], 10, message="one spare left")
    fleet.signal(signal.SIGTERM)
    gates[1].touch()
    assert fleet.wait_exit(10) == 0
    assert held[1].get(timeout=5)
    assert not fleet.leftovers()


def test_the_run_record_drops_recycled_children_as_soon_as_they_are_gone(make_fleet) -> None:
    """The arbiter rewrites its run record at each fork: it must not carry every child of the
    last seconds (200 tasks/s made that a rewrite of hundreds of records per task)."""
    fleet = make_fleet(defaults={"concurrency": 2, "max_tasks_per_child": 1}).start()
    handles = fleet.client.submit_many([("tasks.noop", (), {}) for _ in range(60)])
    for handle in handles:
        handle.get(timeout=30)
    record = json.loads((fleet.folder / "state" / "run.json").read_text())
    # The worker, its 2 children and their 2 spares, and a child or two on its way out.
    assert len(record["processes"]) <= 8, len(record["processes"])


def test_max_memory_per_child_recycles_a_child_that_grew_past_it(make_fleet) -> None:
    fleet = make_fleet(defaults={"concurrency": 1, "max_memory_per_child": "150MB"}).start()
    small = [fleet.client.submit("tasks.hog", 1).get(timeout=10) for _ in range(3)]
    assert len(set(small)) == 1, "recycled below the limit"
    big = fleet.client.submit("tasks.hog", 200).get(timeout=10)
    after = fleet.client.submit("tasks.pid").get(timeout=10)
    assert big == small[0] and after != big
    wait_for(lambda: not alive(big), 5, message="the grown child to exit")

"""`async def` tasks end to end (issue 19): real fleets whose children run many async tasks at
once on their event loop, and every per-task guarantee held per async task: time limits,
revoke with terminate, a child's death, warm shutdown, recycling, retries, mixed queues."""

from __future__ import annotations

import collections
import json
import os
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fleet import TASKS, Fleet, holds, wait_for
from worker import TaskFailed, TaskRevoked
from worker.brokers.base import Envelope

ASYNC_TASKS = '''
import asyncio, sys

@task
async def asleep(seconds):
    await asyncio.sleep(seconds)
    return os.getpid()

@task
async def ahold(gate, marker, limit=60):
    """Run until the test creates `gate`, yielding to the loop all along."""
    with open(marker, "a") as f:
        f.write(f"start {os.getpid()}\\n")
    deadline = time.monotonic() + limit
    while not os.path.exists(gate) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return os.getpid()

@task(soft_time_limit=0.5, time_limit=20)
async def asoft_limited(marker):
    try:
        await asyncio.sleep(30)
    except SoftTimeLimitExceeded:
        with open(marker, "a") as f:
            f.write("soft\\n")
        return "cleaned up"

SHARED = {}

def shared_future():
    """One future of the child's loop that every task awaiting it shares."""
    if "f" not in SHARED:
        SHARED["f"] = asyncio.get_running_loop().create_future()
    return SHARED["f"]

@task(soft_time_limit=0.5, time_limit=20)
async def aimpatient():
    try:
        await shared_future()
    except SoftTimeLimitExceeded:
        return "cleaned up"

@task
async def apatient(seconds):
    future = shared_future()
    loop = asyncio.get_running_loop()
    loop.call_later(seconds, lambda: future.done() or future.set_result("open"))
    return await future

@task(time_limit=0.5)
async def ahard():
    await asyncio.sleep(30)

@task(time_limit=0.5)
async def ablock(marker, seconds):
    """Block the child's loop: no await for `seconds`."""
    with open(marker, "a") as f:
        f.write(f"start {os.getpid()}\\n")
    time.sleep(seconds)

@task(bind=True)
async def ajournal(self, path, seconds):
    """As tasks.journal: "S id pid" when it starts, "E id pid" when it ends."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"S {self.request.id} {os.getpid()}\\n".encode())
        await asyncio.sleep(seconds)
        os.write(fd, f"E {self.request.id} {os.getpid()}\\n".encode())
    finally:
        os.close(fd)
    return os.getpid()

@task(bind=True)
async def akill_child(self, path, beside, limit=1.0):
    """Journal its start as ajournal does, then SIGKILL its own child, as a task that
    segfaults or runs out of memory does: once `beside` tasks have started on that child,
    or `limit` seconds on."""
    pid = str(os.getpid())
    with open(path, "a") as f:
        f.write(f"S {self.request.id} {pid}\\n")
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with open(path) as f:
            here = [line for line in f if line.startswith("S ") and line.split()[2] == pid]
        if len(here) > beside:
            break
        await asyncio.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)

@task
async def aloop():
    return type(asyncio.get_running_loop()).__module__.split(".")[0]

@task
async def astop_loop(marker):
    """Stop the loop it runs on, as a task that calls loop.stop() by mistake does."""
    with open(marker, "a") as f:
        f.write(f"start {os.getpid()}\\n")
    asyncio.get_running_loop().stop()
    await asyncio.sleep(0.05)
    return os.getpid()

@task
async def aexit_later(marker, how):
    """Leave a callback on its loop that raises what ends a program, then answer."""
    with open(marker, "a") as f:
        f.write(f"start {os.getpid()}\\n")
    if how == "exit":
        asyncio.get_running_loop().call_soon(sys.exit, 3)
    else:
        asyncio.get_running_loop().call_soon(interrupt)
    return os.getpid()

def interrupt():
    raise KeyboardInterrupt

@task
async def ablock_for(seconds, die=False):
    """Block the child's loop for `seconds` (frames handed meanwhile wait unread), then
    SIGKILL the child if `die`."""
    time.sleep(seconds)
    if die:
        os.kill(os.getpid(), signal.SIGKILL)

@task
def own_loop():
    """A sync task that runs an event loop of its own, as a sync child lets it: the current
    loop, as legacy code does, and a new one."""
    async def answer():
        await asyncio.sleep(0)
        return 42
    first = asyncio.get_event_loop().run_until_complete(answer())
    loop = asyncio.new_event_loop()
    try:
        return first + loop.run_until_complete(answer())
    finally:
        loop.close()

@task
def own_run():
    async def answer():
        await asyncio.sleep(0)
        return 42
    return asyncio.run(answer())

@task(bind=True)
async def aretry(self, path):
    with open(path, "a") as f:
        f.write(f"{self.request.retries}\\n")
    await asyncio.sleep(0.01)
    if self.request.retries < 2:
        raise self.retry(countdown=0.1)
    return self.request.retries
'''


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def async_fleet(
    make_fleet: Any, tmp_path: Path, without_uvloop: bool = False, **kwargs: Any
) -> Fleet:
    """A fleet whose task module holds the sync test tasks and the async ones above;
    `without_uvloop`: its workers cannot import uvloop (a module of that name on their path
    raises ImportError), as where the `async` extra is not installed."""
    folder = tmp_path / "host"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks.py").write_text(textwrap.dedent(TASKS) + textwrap.dedent(ASYNC_TASKS))
    if without_uvloop:
        (folder / "uvloop.py").write_text('raise ImportError("uvloop is not installed")\n')
    return make_fleet("host", **kwargs)


def inspect(fleet: Fleet, what: str) -> dict[str, Any]:
    out = fleet.ctl("--json", "--timeout", "2", "inspect", what)
    return json.loads(out.stdout)["replies"]


def test_async_tasks_run_at_once_on_each_child(make_fleet, tmp_path: Path, broker_url) -> None:
    fleet = async_fleet(
        make_fleet, tmp_path, fleet={"broker": broker_url}, defaults={"async_concurrency": 50}
    ).start()
    began = time.monotonic()
    handles = fleet.client.submit_many([("tasks.asleep", (0.5,), {}) for _ in range(100)])
    infos = fleet.wait_all_final([h.id for h in handles], 30)
    took = time.monotonic() - began
    assert collections.Counter(i["state"] for i in infos) == {"SUCCESS": 100}
    assert len({json.loads(json.dumps(i["result"])) for i in infos}) == 2, "both children ran some"
    assert took < 5, f"100 x 0.5 s on 2 x 50 took {took:.1f}s: not concurrent"


def final(fleet: Fleet, ids: list[str], timeout: float = 30) -> list[dict[str, Any]]:
    return fleet.wait_all_final(ids, timeout)


def start_pids(marker: Path) -> list[int]:
    return [int(line.split()[1]) for line in lines(marker)]


def ahold_many(fleet: Fleet, tmp_path: Path, n: int) -> tuple[list[str], Path, Path]:
    """`n` async tasks that run until the test opens their gate; their ids, gate, marker."""
    gate, marker = tmp_path / "gate", tmp_path / "started.txt"
    handles = fleet.client.submit_many(
        [("tasks.ahold", (str(gate), str(marker)), {}) for _ in range(n)]
    )
    return [h.id for h in handles], gate, marker


def ahold_in_flight(
    fleet: Fleet, tmp_path: Path, n: int, running: int | None = None
) -> tuple[list[str], Path, Path]:
    """`ahold_many`, once `running` of them (all, by default) have started."""
    ids, gate, marker = ahold_many(fleet, tmp_path, n)
    expected = n if running is None else running
    wait_for(lambda: len(lines(marker)) == expected, 10, message=f"{expected} tasks in flight")
    return ids, gate, marker


def done_when_queue_empty(fleet: Fleet, timeout: float) -> float:
    """Poll the broker until nothing is ready, scheduled or reserved; when that was."""

    def empty() -> bool:
        return all(d.ready + d.scheduled + d.reserved == 0 for d in fleet.client.broker.depths())

    wait_for(empty, timeout, 0.02, "the queue to drain")
    return time.monotonic()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_child_loop_is_uvloop_where_installed_else_asyncio(
    make_fleet, tmp_path: Path, loop: str
) -> None:
    pytest.importorskip("uvloop")
    fleet = async_fleet(make_fleet, tmp_path, without_uvloop=loop == "asyncio").start()
    assert fleet.client.submit("tasks.aloop").get(timeout=10) == loop
    assert fleet.client.submit("tasks.asleep", 0.01).get(timeout=10)


# --- the targets of issue 19 ---------------------------------------------------------------
def test_ten_thousand_async_sleeps_on_two_children_of_500(make_fleet, tmp_path: Path) -> None:
    """10,000 x `await asyncio.sleep(0.1)` on 2 children x 500: 10 rounds of 0.1 s at best. A
    pool that ran them one at a time per child would take 500 s; the bound leaves room for a
    loaded 2-core machine (the measured figure is printed: see the issue's target of 2 s)."""
    fleet = async_fleet(
        make_fleet, tmp_path, defaults={"async_concurrency": 500, "prefetch": 1}
    ).start()
    calls = [("tasks.asleep", (0.1,), {}) for _ in range(10_000)]
    handles = fleet.client.submit_many(calls)
    submitted = time.monotonic()
    took = done_when_queue_empty(fleet, 60) - submitted
    print(f"10,000 x sleep(0.1) on 2 x 500: {took:.2f}s after the last submit")
    states = collections.Counter(h.state for h in handles[::50])
    assert states == {"SUCCESS": 200}
    assert took < 10, f"took {took:.1f}s"


def test_four_hundred_half_second_tasks_on_two_children_of_200(
    make_fleet, tmp_path: Path, broker_url
) -> None:
    fleet = async_fleet(
        make_fleet, tmp_path, fleet={"broker": broker_url}, defaults={"async_concurrency": 200}
    ).start()
    handles = fleet.client.submit_many([("tasks.asleep", (0.5,), {}) for _ in range(400)])
    submitted = time.monotonic()
    took = done_when_queue_empty(fleet, 30) - submitted
    print(f"400 x sleep(0.5) on 2 x 200: {took:.2f}s")
    infos = final(fleet, [h.id for h in handles])
    assert collections.Counter(i["state"] for i in infos) == {"SUCCESS": 400}
    assert took < 4, f"took {took:.1f}s"


# --- every per-task guarantee, per async task ----------------------------------------------
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_soft_limit_raises_inside_that_coroutine_only(
    make_fleet, tmp_path: Path, loop: str
) -> None:
    fleet = async_fleet(
        make_fleet, tmp_path, without_uvloop=loop == "asyncio", defaults={"concurrency": 1}
    ).start()
    marker = tmp_path / "soft.txt"
    soft = fleet.client.submit("tasks.asoft_limited", str(marker))
    others = fleet.client.submit_many([("tasks.asleep", (1.5,), {}) for _ in range(3)])
    assert soft.get(timeout=10) == "cleaned up"
    assert lines(marker) == ["soft"]
    pids = {h.get(timeout=10) for h in others}
    assert len(pids) == 1, "the others ran on, on the same child"


def test_a_soft_limit_on_a_future_that_others_await_too_fails_none_of_them(
    make_fleet, tmp_path: Path
) -> None:
    """The exception was set on the future the task awaited: every other task awaiting it
    failed SoftTimeLimitExceeded, and so did every later one, for the child's life."""
    fleet = async_fleet(make_fleet, tmp_path, defaults={"concurrency": 1}).start()
    impatient = fleet.client.submit("tasks.aimpatient")
    patient = fleet.client.submit("tasks.apatient", 1.5)
    assert impatient.get(timeout=10) == "cleaned up"
    assert patient.get(timeout=10) == "open"
    assert fleet.client.submit("tasks.apatient", 0).get(timeout=10) == "open"


def test_hard_limit_cancels_that_coroutine_and_the_others_finish(
    make_fleet, tmp_path: Path, broker_url
) -> None:
    fleet = async_fleet(
        make_fleet, tmp_path, fleet={"broker": broker_url}, defaults={"concurrency": 1}
    ).start()
    hard = fleet.client.submit("tasks.ahard")
    others = fleet.client.submit_many([("tasks.asleep", (1.5,), {}) for _ in range(3)])
    with pytest.raises(TaskFailed) as err:
        hard.get(timeout=10)
    assert err.value.exc_type == "TimeLimitExceeded"
    assert len({h.get(timeout=10) for h in others}) == 1, "no child was killed"
    assert [h.info()["deliveries"] for h in others] == [1, 1, 1]


def test_a_task_blocking_the_loop_gets_its_child_killed_and_the_others_redelivered(
    make_fleet, tmp_path: Path, broker_url
) -> None:
    fleet = async_fleet(
        make_fleet, tmp_path, fleet={"broker": broker_url}, defaults={"concurrency": 1}
    ).start()
    ids, gate, marker = ahold_in_flight(fleet, tmp_path, 3)
    blocker_marker = tmp_path / "blocker.txt"
    blocker = fleet.client.submit("tasks.ablock", str(blocker_marker), 30)
    with pytest.raises(TaskFailed) as err:
        blocker.get(timeout=10)
    assert err.value.exc_type == "TimeLimitExceeded"
    wait_for(lambda: len(lines(marker)) == 6, 10, message="the others to be redelivered")
    first, again = start_pids(marker)[:3], start_pids(marker)[3:]
    assert len(set(first)) == len(set(again)) == 1 and first[0] != again[0]
    gate.touch()
    infos = final(fleet, ids)
    assert [i["state"] for i in infos] == ["SUCCESS"] * 3, "redelivered, not failed"
    assert len(lines(blocker_marker)) == 1, "the blocker ran once"
    assert "blocks its loop" in fleet.log()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_task_that_stops_its_childs_loop_runs_once_and_the_loop_goes_on(
    make_fleet, tmp_path: Path, loop: str
) -> None:
    """loop.stop() in a task ended the child's loop, and the child left as if asked to stop
    between tasks: every task it ran went back to the queue as never started, no delivery
    counted, and the next child ran them again, a fork and a stop every few ms for good.
    The loop goes on instead; the task and those beside it finish once, on that child."""
    fleet = async_fleet(
        make_fleet, tmp_path, without_uvloop=loop == "asyncio", defaults={"concurrency": 1}
    ).start()
    ids, gate, marker = ahold_in_flight(fleet, tmp_path, 2)
    stopper = fleet.client.submit("tasks.astop_loop", str(marker))
    assert stopper.get(timeout=10) == start_pids(marker)[0]
    gate.touch()
    infos = final(fleet, [*ids, stopper.id])
    assert [(i["state"], i["deliveries"]) for i in infos] == [("SUCCESS", 1)] * 3
    assert len(set(start_pids(marker))) == 1 and len(lines(marker)) == 3, "each ran once"
    assert "a task stopped its child's event loop" in fleet.log()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("how", ["exit", "interrupt"])
def test_a_task_whose_callback_exits_ends_neither_its_child_nor_the_tasks_beside_it(
    make_fleet, tmp_path: Path, how: str, loop: str
) -> None:
    """`loop.call_soon(sys.exit)` in a task (or a KeyboardInterrupt out of a callback):
    asyncio lets both out of the loop, and the child died with every task in flight on it,
    which ran again for another task's doing. The loop goes on instead."""
    fleet = async_fleet(
        make_fleet, tmp_path, without_uvloop=loop == "asyncio", defaults={"concurrency": 1}
    ).start()
    ids, gate, marker = ahold_in_flight(fleet, tmp_path, 2)
    leaver = fleet.client.submit("tasks.aexit_later", str(marker), how)
    assert leaver.get(timeout=10) == start_pids(marker)[0]
    gate.touch()
    infos = final(fleet, [*ids, leaver.id])
    assert [(i["state"], i["deliveries"]) for i in infos] == [("SUCCESS", 1)] * 3
    assert len(set(start_pids(marker))) == 1 and len(lines(marker)) == 3, "each ran once"
    assert "out of a task's callback; the loop goes on" in fleet.log()


def test_revoke_terminate_cancels_only_that_task(make_fleet, tmp_path: Path) -> None:
    fleet = async_fleet(make_fleet, tmp_path, defaults={"concurrency": 1}).start()
    ids, gate, marker = ahold_in_flight(fleet, tmp_path, 3)
    out = fleet.ctl("--json", "revoke", ids[0], "--terminate")
    assert ids[0] in json.dumps(json.loads(out.stdout))
    wait_for(lambda: fleet.client.handle(ids[0]).state == "REVOKED", 10, message="REVOKED")
    gate.touch()
    infos = final(fleet, ids)
    assert [i["state"] for i in infos] == ["REVOKED", "SUCCESS", "SUCCESS"]
    results = {i["result"] for i in infos[1:]}
    assert results == {start_pids(marker)[0]}, "the others finished on the same child"
    assert len(lines(marker)) == 3


def test_child_killed_redelivers_every_task_in_flight_at_once(
    make_fleet, tmp_path: Path, broker_url
) -> None:
    fleet = async_fleet(
        make_fleet, tmp_path, fleet={"broker": broker_url}, defaults={"concurrency": 1}
    ).start()
    ids, gate, marker = ahold_in_flight(fleet, tmp_path, 4)
    [victim] = set(start_pids(marker))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(lines(marker)) == 8, 5, message="every task redelivered")
    gate.touch()
    infos = final(fleet, ids)
    assert [i["state"] for i in infos] == ["SUCCESS"] * 4
    assert [i["deliveries"] for i in infos] == [2] * 4, "each counted one delivery"
    assert victim not in {i["result"] for i in infos}


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_warm_shutdown_lets_every_task_in_flight_finish(
    make_fleet, tmp_path: Path, loop: str
) -> None:
    fleet = async_fleet(
        make_fleet,
        tmp_path,
        without_uvloop=loop == "asyncio",
        defaults={"concurrency": 1, "async_concurrency": 3},
    ).start()
    ids, gate, marker = ahold_in_flight(fleet, tmp_path, 6, running=3)
    fleet.signal(signal.SIGTERM)
    time.sleep(0.3)  # the TERM reached the child, which must wait for its tasks
    assert fleet.proc is not None and fleet.proc.poll() is None
    gate.touch()
    assert fleet.wait_exit(20) == 0
    states = [fleet.client.handle(i).state for i in ids]
    assert states.count("SUCCESS") == 3 and states.count("PENDING") == 3, states
    assert len(lines(marker)) == 3, "the reserved ones never started"


def test_max_tasks_per_child_retires_the_child_once_its_tasks_are_done(
    make_fleet, tmp_path: Path
) -> None:
    fleet = async_fleet(
        make_fleet,
        tmp_path,
        defaults={"concurrency": 1, "async_concurrency": 10, "max_tasks_per_child": 3},
    ).start()
    ids, gate, marker = ahold_in_flight(fleet, tmp_path, 6, running=3)
    time.sleep(0.3)
    assert len(lines(marker)) == 3, "the child took more than its last three tasks"
    gate.touch()
    infos = final(fleet, ids)
    assert [i["state"] for i in infos] == ["SUCCESS"] * 6
    pids = start_pids(marker)
    assert len(set(pids[:3])) == 1 and len(set(pids[3:])) == 1 and pids[0] != pids[3]


def test_max_memory_per_child_retires_the_child_once_its_tasks_are_done(
    make_fleet, tmp_path: Path
) -> None:
    fleet = async_fleet(
        make_fleet, tmp_path, defaults={"concurrency": 1, "max_memory_per_child": "1KB"}
    ).start()
    ids, gate, marker = ahold_in_flight(fleet, tmp_path, 3)
    [first] = set(start_pids(marker))
    gate.touch()
    infos = final(fleet, ids)
    assert [(i["state"], i["result"], i["deliveries"]) for i in infos] == [
        ("SUCCESS", first, 1)
    ] * 3, "each finished on the child, none redelivered"
    later = fleet.client.submit("tasks.asleep", 0.01).get(timeout=10)
    assert later != first


def test_retry_from_an_async_task(make_fleet, tmp_path: Path, broker_url) -> None:
    fleet = async_fleet(make_fleet, tmp_path, fleet={"broker": broker_url}).start()
    runs = tmp_path / "runs.txt"
    assert fleet.client.submit("tasks.aretry", str(runs)).get(timeout=15) == 2
    assert lines(runs) == ["0", "1", "2"]


def test_inspect_active_lists_each_async_task(make_fleet, tmp_path: Path) -> None:
    fleet = async_fleet(
        make_fleet, tmp_path, defaults={"concurrency": 1, "async_concurrency": 7}
    ).start()
    ids, gate, marker = ahold_in_flight(fleet, tmp_path, 3)
    [active] = inspect(fleet, "active").values()
    assert sorted(a["id"] for a in active) == sorted(ids)
    [stats] = inspect(fleet, "stats").values()
    assert stats["active"] == 3 and stats["children"][0]["async_tasks"] == 3
    [conf] = inspect(fleet, "conf").values()
    assert conf["async_concurrency"] == 7
    gate.touch()
    final(fleet, ids)


def test_fleetctl_submits_an_async_task_like_any_other(make_fleet, tmp_path: Path) -> None:
    fleet = async_fleet(make_fleet, tmp_path).start()
    out = fleet.ctl("--json", "submit", "tasks.asleep", "0.01", "--wait", "10")
    info = json.loads(out.stdout)
    assert info["state"] == "SUCCESS" and info["result"] in fleet.child_pids()


def test_a_queue_mixing_sync_and_async_tasks_never_runs_both_on_one_child(
    make_fleet, tmp_path: Path, broker_url
) -> None:
    fleet = async_fleet(
        make_fleet, tmp_path, fleet={"broker": broker_url}, defaults={"async_concurrency": 20}
    ).start()
    journal = tmp_path / "journal.txt"
    calls = []
    for n in range(60):
        calls.append(("tasks.ajournal", (str(journal), 0.3), {}))
        if n % 6 == 0:
            calls.append(("tasks.journal", (str(journal), 0.1), {}))
    began = time.monotonic()
    handles = fleet.client.submit_many(calls)
    infos = final(fleet, [h.id for h in handles])
    took = time.monotonic() - began
    assert collections.Counter(i["state"] for i in infos) == {"SUCCESS": 70}
    sync_ids = {
        h.id for h, (name, _, _) in zip(handles, calls, strict=True) if name == "tasks.journal"
    }
    running: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    most_async = 0
    for line in lines(journal):  # appended in the order it happened
        kind, task_id, pid = line.split()[:3]  # tasks.journal's lines also name the worker
        what = "sync" if task_id in sync_ids else "async"
        running[pid][what] += 1 if kind == "S" else -1
        assert not (running[pid]["sync"] and running[pid]["async"]), f"both on child {pid}"
        most_async = max(most_async, running[pid]["async"])
    assert most_async > 1, "async tasks ran one at a time"
    assert took < 10, f"took {took:.1f}s"


def test_workers_whose_module_has_async_tasks_share_sync_ones_as_sync_pools_do(
    make_fleet, tmp_path: Path, broker_url
) -> None:
    """Two workers on one queue, their module holding async tasks, are handed only sync
    ones: each holds what a sync pool would (one running, `prefetch` waiting), not
    `async_concurrency` times that, so neither takes the whole burst from the other."""
    workers = [{"name": name, "queues": ["default"], "concurrency": 1} for name in "ab"]
    fleet = async_fleet(make_fleet, tmp_path, fleet={"broker": broker_url}, workers=workers)
    fleet.start()
    handles = fleet.client.submit_many([("tasks.sleep", (0.1,), {})] * 24)
    infos = final(fleet, [h.id for h in handles])
    by_node = collections.Counter(i["node"] for i in infos)
    assert set(by_node) == {f"a@{fleet.node}", f"b@{fleet.node}"}, by_node
    assert min(by_node.values()) >= 6, by_node


def test_a_burst_of_async_tasks_starts_at_once_though_a_sync_pool_holds_fewer(
    make_fleet, tmp_path: Path
) -> None:
    """Idle, a worker holds what a sync pool would (2 tasks here); the reserve that brings
    the first async tasks widens that to every async slot and reserves the rest at once:
    all 30 run together, none waiting for the first ones to end."""
    defaults = {"concurrency": 1, "prefetch": 1, "async_concurrency": 40}
    fleet = async_fleet(make_fleet, tmp_path, defaults=defaults).start()
    ids, gate, marker = ahold_in_flight(fleet, tmp_path, 30)
    gate.touch()
    assert collections.Counter(i["state"] for i in final(fleet, ids)) == {"SUCCESS": 30}


def test_a_sync_task_behind_async_ones_drains_a_child_instead_of_waiting_for_all(
    make_fleet, tmp_path: Path
) -> None:
    fleet = async_fleet(
        make_fleet, tmp_path, defaults={"concurrency": 1, "async_concurrency": 5}
    ).start()
    journal = tmp_path / "journal.txt"
    # Staggered ends: the child is never empty of async tasks unless it is drained.
    calls = [("tasks.ajournal", (str(journal), 0.1 + n % 5 * 0.07), {}) for n in range(31)]
    calls[10] = ("tasks.journal", (str(journal), 0.05), {})  # reserved with the async after it
    handles = fleet.client.submit_many(calls)
    final(fleet, [h.id for h in handles])
    starts = [line.split()[1] for line in lines(journal) if line.startswith("S ")]
    assert starts.index(handles[10].id) <= 16, "the sync task waited for the async ones"


def test_an_async_task_its_child_cannot_read_fails_and_hangs_nowhere(
    make_fleet, tmp_path: Path
) -> None:
    """Arguments nested about as deep as JSON decoding allows: whether the worker dead-letters
    the body or its child cannot read the frame (one level deeper), or the task runs, every
    one ends. (A frame the child cannot read has no id to answer by: it names its number.)"""
    fleet = async_fleet(make_fleet, tmp_path, defaults={"concurrency": 1}).start()
    ids = [f"deep-{depth}" for depth in range(850, 1000)]
    fleet.client.broker.enqueue(
        [
            Envelope(
                task_id,
                "default",
                "tasks.asleep",
                json.dumps(
                    {"id": task_id, "name": "tasks.asleep", "args": [], "kwargs": {}, "retries": 0}
                ).replace("[]", "[" * depth + "]" * depth, 1),
            )
            for task_id, depth in zip(ids, range(850, 1000), strict=True)
        ]
    )
    infos = final(fleet, ids, 60)
    assert {i["state"] for i in infos} == {"FAILURE"}
    unread = [i for i in infos if (i["exc_message"] or "").startswith("frame is not JSON")]
    assert unread and {i["exc_type"] for i in unread} == {"BadMessage"}, (
        "none its child could not read"
    )


def test_autoscale_grows_for_waiting_async_tasks_and_counts_a_child_running_them_busy(
    make_fleet, tmp_path: Path
) -> None:
    scaling = {
        "autoscale": "1,2",
        "autoscale_wait": 0.2,
        "autoscale_idle": 0.3,
        "async_concurrency": 3,
    }
    fleet = async_fleet(make_fleet, tmp_path, defaults=scaling).start()
    ids, gate, marker = ahold_many(fleet, tmp_path, 6)  # 3 fit in the one child: 3 wait
    wait_for(
        lambda: len(lines(marker)) == 6 and len(set(start_pids(marker))) == 2,
        15,
        message="the pool to grow and each child to run three",
    )

    def pool_size() -> int:
        return int(inspect(fleet, "stats")["w@h1"]["pool_size"])

    # Children whose tasks all await are busy, however long they run: no shrink below them.
    assert holds(lambda: pool_size() == 2, 1.5), "shrank while both children ran tasks"
    gate.touch()
    assert {i["state"] for i in final(fleet, ids)} == {"SUCCESS"}
    wait_for(lambda: pool_size() == 1, 10, message="the idle pool to shrink back to MIN")


def test_a_sync_task_runs_its_own_event_loop_on_an_event_loop_child(make_fleet, tmp_path) -> None:
    """It ran inside the child's running loop: asyncio.run() there raised, where a sync
    child ran it; the same task failed or not by the child it landed on."""
    fleet = async_fleet(make_fleet, tmp_path, defaults={"concurrency": 1}).start()
    assert fleet.client.submit("tasks.own_loop").get(timeout=10) == 84  # a sync child
    fleet.client.submit("tasks.asleep", 0.01).get(timeout=10)  # now an event-loop child
    for _ in range(2):  # the second time too, on the loop the first one left current
        assert fleet.client.submit("tasks.own_loop").get(timeout=10) == 84
    assert fleet.client.submit("tasks.own_run").get(timeout=10) == 42
    assert fleet.client.submit("tasks.asleep", 0.01).get(timeout=10) > 0  # its loop goes on


def test_a_revoke_reaches_an_async_task_whose_frame_waits_unread(
    make_fleet, tmp_path, broker_url
) -> None:
    """The child's loop was blocked when the task was handed over: a revoke (plain, or with
    --terminate) did not stop it, and with --terminate the child was killed, once its loop
    was free, for a task that did not answer a cancel it never got (the others ran again)."""
    fleet = async_fleet(
        make_fleet, tmp_path, fleet={"broker": broker_url}, defaults={"concurrency": 1}
    ).start()
    journal = tmp_path / "journal"
    fleet.client.submit("tasks.asleep", 0.01).get(timeout=10)  # an event-loop child
    others = [fleet.client.submit("tasks.ajournal", str(journal), 4) for _ in range(2)]
    wait_for(lambda: len(lines(journal)) == 2, 10, message="the others to start")
    fleet.client.submit("tasks.ablock_for", 3)  # past the cancel's grace (TERMINATE_GRACE)
    time.sleep(0.3)  # the loop is blocked now
    plain = fleet.client.submit("tasks.ajournal", str(journal), 0)
    terminated = fleet.client.submit("tasks.ajournal", str(journal), 0)
    time.sleep(0.3)  # both handed over, unread
    assert fleet.ctl("revoke", plain.id).returncode == 0
    assert fleet.ctl("revoke", terminated.id, "--terminate").returncode == 0
    for handle in (plain, terminated):
        with pytest.raises(TaskRevoked):
            handle.get(timeout=15)
    assert [h.get(timeout=15) for h in others] == [others[0].get(timeout=1)] * 2
    starts = [line.split()[1] for line in lines(journal) if line.startswith("S ")]
    assert sorted(starts) == sorted(h.id for h in others), lines(journal)  # once each
    assert "killing it" not in fleet.log()


def one_strike_event_loop_child(make_fleet: Any, tmp_path: Path, broker_url: str) -> Fleet:
    """A fleet of one child, made an event-loop child, where one death dead-letters a task
    (max_deliveries = 1) and frames wait in its pipe (prefetch 4)."""
    fleet = async_fleet(
        make_fleet,
        tmp_path,
        fleet={"broker": broker_url},
        defaults={"concurrency": 1, "prefetch": 4, "max_deliveries": 1},
    ).start()
    fleet.client.submit("tasks.asleep", 0.01).get(timeout=10)
    return fleet


def test_async_tasks_a_dying_child_never_read_take_no_strike(
    make_fleet, tmp_path, broker_url
) -> None:
    """Handed to a child whose loop another task blocked, and that then died: they never
    started, yet each took a strike, and with max_deliveries = 1 ended WorkerLost."""
    fleet = one_strike_event_loop_child(make_fleet, tmp_path, broker_url)
    poison = fleet.client.submit("tasks.ablock_for", 1.5, True)
    time.sleep(0.5)  # its loop is blocked
    innocents = [fleet.client.submit("tasks.asleep", 0.01) for _ in range(3)]
    infos = fleet.wait_all_final([poison.id, *(h.id for h in innocents)], 30)
    states = {i["id"]: (i["state"], i.get("exc_type")) for i in infos}
    assert states[poison.id] == ("FAILURE", "WorkerLost")
    assert [states[h.id][0] for h in innocents] == ["SUCCESS"] * 3, states


def test_async_tasks_a_killed_worker_had_handed_unread_take_no_strike(
    make_fleet, tmp_path, broker_url
) -> None:
    """Their STARTED mark was written at the hand-over: a worker SIGKILLed while its child's
    loop was blocked charged them its death, and with max_deliveries = 1 they ended
    WorkerLost without ever running. Now marked once the child has read them."""
    fleet = one_strike_event_loop_child(make_fleet, tmp_path, broker_url)
    blocker = fleet.client.submit("tasks.ablock_for", 3)
    wait_for(lambda: blocker.state == "STARTED", 10, message="the blocker to start")
    innocents = [fleet.client.submit("tasks.asleep", 0.01) for _ in range(3)]
    wait_for(lambda: inspect(fleet, "stats")["w@h1"]["active"] == 4, 10, message="all handed over")
    time.sleep(0.3)  # a STARTED mark would be written by now
    assert [h.state for h in innocents] == ["PENDING"] * 3
    [worker] = fleet.worker_pids()
    os.kill(worker, signal.SIGKILL)
    infos = fleet.wait_all_final([h.id for h in innocents], 30)
    assert [i["state"] for i in infos] == ["SUCCESS"] * 3, infos


def alone_on_last_chance(journal: Path, max_deliveries: int) -> None:
    """From a journal of ajournal and akill_child lines: each task started for the
    `max_deliveries`-th time with no other task in flight on its child, and none started
    there until it ended."""
    in_flight: dict[str, set[str]] = collections.defaultdict(set)
    starts: collections.Counter[str] = collections.Counter()
    for line in lines(journal):  # appended in the order it happened
        kind, task_id, pid = line.split()
        beside = in_flight[pid]
        if kind == "E":
            beside.remove(task_id)
            continue
        starts[task_id] += 1
        assert not (starts[task_id] == max_deliveries and beside), f"{task_id} beside {beside}"
        last = [t for t in beside if starts[t] == max_deliveries]
        assert not last, f"{task_id} started beside {last} on its last chance"
        beside.add(task_id)


def test_a_task_that_kills_its_child_dead_letters_none_of_the_tasks_beside_it(
    make_fleet, tmp_path: Path, broker_url
) -> None:
    """Every task in flight on a child that dies takes a strike: none can be told from the
    one that killed it. So a task that SIGKILLs its child took every task beside it to
    WorkerLost after max_deliveries (3) deaths. On its last chance a task runs alone: the
    poison alone ends WorkerLost; the others succeed on their third delivery."""
    fleet = async_fleet(
        make_fleet,
        tmp_path,
        fleet={"broker": broker_url},
        defaults={"concurrency": 1, "async_concurrency": 10},
    ).start()
    journal = tmp_path / "journal"
    calls = [("tasks.ajournal", (str(journal), 0.5), {}) for _ in range(4)]
    handles = fleet.client.submit_many([*calls, ("tasks.akill_child", (str(journal), 4), {})])
    *innocents, poison = [h.id for h in handles]
    infos = {i["id"]: i for i in final(fleet, [*innocents, poison])}
    assert [(infos[i]["state"], infos[i]["deliveries"]) for i in innocents] == [
        ("SUCCESS", 3)
    ] * 4, "struck twice beside the poison, then run alone"
    assert (infos[poison]["state"], infos[poison]["exc_type"]) == ("FAILURE", "WorkerLost")
    assert [d.id for d in fleet.client.dead_letters()] == [poison]
    alone_on_last_chance(journal, 3)


def test_a_task_on_its_last_chance_runs_alone_and_its_child_takes_no_other(
    make_fleet, tmp_path: Path
) -> None:
    """max_deliveries = 2: after one death each task is on its last chance. They run one at
    a time, and a new task waits for the child rather than join one of them."""
    fleet = async_fleet(
        make_fleet,
        tmp_path,
        defaults={"concurrency": 1, "async_concurrency": 10, "max_deliveries": 2},
    ).start()
    ids, gate, marker = ahold_in_flight(fleet, tmp_path, 3)
    [victim] = set(start_pids(marker))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(lines(marker)) == 4, 10, message="one task on its last chance")
    journal = tmp_path / "journal"
    fresh = fleet.client.submit("tasks.ajournal", str(journal), 0)
    assert holds(lambda: len(lines(marker)) == 4 and not journal.exists()), "another joined it"
    gate.touch()
    infos = final(fleet, [*ids, fresh.id])
    assert [(i["state"], i["deliveries"]) for i in infos] == [("SUCCESS", 2)] * 3 + [("SUCCESS", 1)]
    assert len(lines(marker)) == 6 and len(set(start_pids(marker)[3:])) == 1


def test_with_max_deliveries_1_async_tasks_still_run_together(make_fleet, tmp_path: Path) -> None:
    """Where every death dead-letters, every delivery is the last: none runs alone (they
    would all run one at a time), as before."""
    fleet = async_fleet(
        make_fleet,
        tmp_path,
        defaults={"concurrency": 1, "async_concurrency": 10, "max_deliveries": 1},
    ).start()
    ids, gate, marker = ahold_in_flight(fleet, tmp_path, 3)
    gate.touch()
    assert [i["state"] for i in final(fleet, ids)] == ["SUCCESS"] * 3

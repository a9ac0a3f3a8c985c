"""Big tasks and busy children: the worker's loop never blocks writing to a child.

A task goes to a child that still runs another one (prefetch): its frame waits in the
child's pipe, or, past the pipe's buffer, in the worker. These tests hand big tasks to a
busy child and check that the worker keeps answering, enforces time limits on time, runs
nothing twice, and refuses a task over the size limit cleanly.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from ctl.client import ControlClient
from tests.fleet import Fleet, executions, free_port, wait_for
from worker import protocol
from worker.brokers.base import FINAL_STATES, Envelope
from worker.child import encode_reply
from worker.client import TaskTooLarge, encode_body
from worker.protocol import MAX_TASK_SIZE, FrameReader

pytestmark = pytest.mark.timeout(120)

HARD_LIMIT = 4.0  # seconds: the time limit of the task the big ones wait behind
LIMIT_SLACK = 1.0  # how much later its kill may be seen (the test polls; the host is loaded)
PING_WITHIN = 0.1  # seconds: a worker that never blocks on a child answers ping at once,
PING_WORST = 0.5  # but for a ping behind a broker call that moves the big body (an SQLite
# checkpoint of the WAL it filled: ~7 ms a MiB, more on a loaded test host)
PING_STOP = 0.5  # seconds before the hard limit: pings then end, before the kill and the
# redelivery of the big task, whose intake (reading it from the broker) takes its time

BIG_TASKS = f"""
import os, time
from worker import task

def note_start(path, task_id):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"S {{task_id}} {{os.getpid()}}\\n".encode())
    finally:
        os.close(fd)

@task(bind=True)
def size(self, journal, blob):
    note_start(journal, self.request.id)
    return len(blob)

@task(bind=True, time_limit={HARD_LIMIT})
def overrun(self, journal):
    note_start(journal, self.request.id)
    time.sleep(60)

@task(bind=True)
def slow(self, journal, seconds):
    note_start(journal, self.request.id)
    time.sleep(seconds)
    return seconds
"""


def big_fleet(make_fleet: Callable[..., Fleet]) -> Fleet:
    """One worker, one child, one task waiting in its pipe."""
    fleet = make_fleet(
        fleet={"imports": ["tasks", "bigtasks"]},
        defaults={"concurrency": 1, "prefetch": 1},
    )
    (fleet.folder / "bigtasks.py").write_text(BIG_TASKS)
    return fleet.start()


def blob(total: int) -> str:
    """An argument that makes a `size` task's body about `total` bytes."""
    return "x" * (total - 512)


def endpoint(fleet: Fleet) -> str:
    return f"ipc://{fleet.folder}/state/control.sock"


def handed_to_child(fleet: Fleet, task_id: str) -> bool:
    """Whether the worker gave the task to a child that runs another one (it waits in the
    child's pipe, or in the worker's outbox for that pipe): it is not STARTED yet."""
    control = ControlClient([endpoint(fleet)], 5)
    with control:
        waiting = control.call("reserved").replies.get("w@h1") or []
    return any(r["id"] == task_id and r["child"] is not None for r in waiting)


def test_a_write_cut_short_by_a_signal_strands_no_task(make_fleet: Callable[..., Fleet]) -> None:
    """A signal that lands while a big task goes into a busy child's pipe (USR1, or the
    SIGCHLD of any child) must not cut the frame short: the tasks behind it still run."""
    fleet = big_fleet(make_fleet)
    journal = fleet.folder / "journal"
    slow = fleet.client.submit("bigtasks.slow", str(journal), 2)
    wait_for(lambda: slow.id in executions(journal), 10, message="the slow task to start")
    big = fleet.client.submit("bigtasks.size", str(journal), blob(10 << 20))
    wait_for(
        lambda: handed_to_child(fleet, big.id),
        10,
        message="the big task to be handed to the busy child",
    )
    (worker,) = fleet.worker_pids()
    os.kill(worker, signal.SIGUSR1)
    small = fleet.client.submit("tasks.add", 1, 2)
    infos = fleet.wait_all_final([slow.id, big.id, small.id], timeout=20)
    assert [i["state"] for i in infos] == ["SUCCESS"] * 3, infos
    assert [i["result"] for i in infos] == [2, len(blob(10 << 20)), 3]


@pytest.mark.parametrize(
    "body_size", [200 << 10, 10 << 20, MAX_TASK_SIZE], ids=["200KiB", "10MiB", "largest"]
)
def test_a_big_task_behind_a_running_one_never_blocks_the_worker(
    make_fleet: Callable[..., Fleet], body_size: int
) -> None:
    """The big task waits (in the pipe, and past its buffer in the worker) while the
    worker answers ping at once, kills the running task at its hard limit, and then runs
    the big one once, in the child that replaces the killed one."""
    fleet = big_fleet(make_fleet)
    journal = fleet.folder / "journal"
    control = ControlClient([endpoint(fleet)], 5)
    overrun = fleet.client.submit("bigtasks.overrun", str(journal))
    wait_for(lambda: overrun.id in executions(journal), 10, message="the overrun to start")
    seen_start = time.monotonic()  # after its real start: elapsed times below are short
    assert control.call("ping").replies  # connected: the pings below time the worker only
    big = fleet.client.submit("bigtasks.size", str(journal), blob(body_size))
    wait_for(lambda: handed_to_child(fleet, big.id), 10, message="the big task handed over")
    pings = []
    with control:
        while time.monotonic() < seen_start + HARD_LIMIT - PING_STOP:
            result = control.call("ping")
            assert result.replies == {"w@h1": {"ok": "pong"}}, result
            pings.append(result.elapsed)
            time.sleep(0.02)
    assert pings and statistics.median(pings) < PING_WITHIN and max(pings) < PING_WORST, pings
    wait_for(lambda: overrun.state in FINAL_STATES, HARD_LIMIT + 10, 0.02, "the hard limit")
    assert time.monotonic() - seen_start < HARD_LIMIT + LIMIT_SLACK
    ended, done = fleet.wait_all_final([overrun.id, big.id], timeout=30)
    assert ended["state"] == "FAILURE" and ended["exc_type"] == "TimeLimitExceeded"
    assert done["state"] == "SUCCESS" and done["result"] == len(blob(body_size))
    assert executions(journal) == {overrun.id: 1, big.id: 1}


def test_a_task_over_the_size_limit_fails_cleanly_and_the_queue_goes_on(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = big_fleet(make_fleet)
    journal = str(fleet.folder / "journal")
    with pytest.raises(TaskTooLarge, match=f"over the {MAX_TASK_SIZE}-byte limit"):
        fleet.client.submit("bigtasks.size", journal, blob(MAX_TASK_SIZE + 1024))
    # A producer that does not check (another language, an older client) reaches the worker.
    task_id = str(uuid.uuid4())
    body = encode_body(task_id, "bigtasks.size", [journal, blob(MAX_TASK_SIZE + 1024)], {})
    fleet.client.broker.enqueue([Envelope(task_id, "default", "bigtasks.size", body)])
    after = fleet.client.submit("tasks.add", 1, 2)
    too_big, added = fleet.wait_all_final([task_id, after.id], timeout=30)
    assert too_big["state"] == "FAILURE" and too_big["exc_type"] == "TaskTooLarge"
    assert f"over the {MAX_TASK_SIZE}-byte limit" in too_big["exc_message"]
    assert [d.id for d in fleet.client.broker.dead_letters()] == [task_id]
    assert added["state"] == "SUCCESS" and added["result"] == 3
    assert not executions(Path(journal))
    assert "Traceback" not in fleet.log(), fleet.log()[-2000:]


def test_a_stopped_arbiter_does_not_stop_its_workers(make_fleet: Callable[..., Fleet]) -> None:
    """The worker's messages to its arbiter (events, with metrics on) wait in the worker
    while the arbiter reads nothing: tasks still run to the end, and the arbiter gets every
    event once it reads again (below ARBITER_BACKLOG_MAX nothing is dropped)."""
    port = free_port()
    fleet = make_fleet(extra=f'\n[metrics]\nbind = "127.0.0.1:{port}"\n').start()
    count = 2000  # ~1 MB of events: past the socket's buffer, which the old worker blocked on
    os.kill(fleet.pid, signal.SIGSTOP)
    try:
        handles = fleet.client.submit_many([("tasks.noop", (), {})] * count)
        infos = fleet.wait_all_final([h.id for h in handles], timeout=60)
    finally:
        os.kill(fleet.pid, signal.SIGCONT)
    assert {i["state"] for i in infos} == {"SUCCESS"}

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()

    counted = f'fleetd_tasks_total{{name="tasks.noop",state="SUCCESS"}} {count}'
    wait_for(lambda: counted in scrape(), 10, message="every success counted")
    fleet.wait_ready()


def test_a_result_too_large_for_a_frame_fails_its_task_not_its_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(protocol, "MAX_FRAME_SIZE", 1000)
    frame = encode_reply({"id": "t", "s": "SUCCESS", "r": "x" * 990, "rt": 0.5})
    (reply,) = FrameReader().feed(frame)
    assert reply["s"] == "FAILURE" and reply["t"] == "EncodeError" and reply["rt"] == 0.5
    assert "over the 1000 limit" in reply["m"] and "r" not in reply


def test_a_result_json_cannot_hold_fails_its_task() -> None:
    (reply,) = FrameReader().feed(encode_reply({"id": "t", "s": "SUCCESS", "r": {1, 2}}))
    assert reply == {
        "id": "t",
        "s": "FAILURE",
        "t": "EncodeError",
        "m": "its outcome cannot be sent: Object of type set is not JSON serializable",
    }

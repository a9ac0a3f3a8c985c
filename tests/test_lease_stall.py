"""A worker stopped past its lease (SIGSTOP: a swap storm, a VM pause, a debugger) while
another host takes its tasks back: once it runs again, it starts none of the tasks it held
and had not started. Two hosts on one broker, real fleetd processes, a journal of every
execution with the worker that ran it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fleet import QUIET, Fleet, holds, wait_for

pytestmark = pytest.mark.timeout(120)

LEASE = 2.0  # seconds
STALL = 3 * LEASE  # how long the worker stays stopped, at least (the other host boots meanwhile)
# How each host holds tasks: three in its child's pipe (one running, two waiting), or one
# running and one in the worker's own buffer (its child may run one task: max_tasks_per_child).
HOLDING: dict[str, dict[str, Any]] = {
    "pipe": {"prefetch": 2},
    "buffer": {"prefetch": 1, "max_tasks_per_child": 1},
}
# Seconds each task runs: the first one runs on the stopped host when it stops; in the pipe
# case it runs past the stall (the others wait behind it in the pipe, the child starts them
# as it ends), in the buffer case it ends during the stall (the child retires, and its
# spare takes the next task from the buffer as the worker comes back).
DURATIONS = {"pipe": [12.0, 0.5, 0.5], "buffer": [3.0, 3.0]}
# What the stopped worker says it let go of: the first task runs on in the pipe case (its
# reply had come in the buffer case); the others are left to the other host.
LET_GO = {"pipe": "1 running run on", "buffer": "0 running run on"}


def started_by(journal: Path, worker: int) -> list[str]:
    """The tasks whose execution started in a child of `worker` (tasks.journal's lines:
    kind, task, pid, parent pid), in the order they started."""
    lines = journal.read_text().splitlines() if journal.exists() else []
    return [
        words[1] for words in map(str.split, lines) if words[0] == "S" and int(words[3]) == worker
    ]


@pytest.mark.parametrize("holding", sorted(HOLDING))
def test_tasks_a_worker_stopped_past_its_lease_had_not_started_never_start_there(
    make_fleet: Callable[..., Fleet], broker_url: str, tmp_path: Path, holding: str
) -> None:
    if broker_url.startswith("sqlite"):  # one queue file for both hosts
        broker_url = f"sqlite:///{tmp_path / 'queue.db'}"
    # worker_timeout 0: the lease alone decides (with one, a SQLite host keeps the tasks of a
    # stopped worker whose process still runs: Broker.recover_expired).
    config = {
        "fleet": {"broker": broker_url, "lease": LEASE},
        "workers": [{"name": "w", "queues": ["q"]}],
        "defaults": {"concurrency": 1, "worker_timeout": 0, **HOLDING[holding]},
    }
    stopped_host = make_fleet("h2", node="h2", **config).start()
    other_host = make_fleet("h1", node="h1", **config)  # started once the first one is stopped
    journal = tmp_path / "journal.txt"
    handles = stopped_host.client.submit_many(
        [("tasks.journal", (str(journal), seconds), {}) for seconds in DURATIONS[holding]],
        queue="q",
    )
    ids = [h.id for h in handles]
    [stopped] = stopped_host.worker_pids()
    wait_for(lambda: started_by(journal, stopped) == ids[:1], 10, message="the first task to start")

    os.kill(stopped, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        [depth] = stopped_host.client.depths()
        assert (depth.ready, depth.reserved) == (0, len(ids))  # all held by the stopped host
        [other] = other_host.start().worker_pids()
        wait_for(
            lambda: ids[0] in started_by(journal, other),
            30,
            message="the other host to take the stopped one's tasks back",
        )
        time.sleep(max(0.0, stopped_at + STALL - time.monotonic()))
        assert started_by(journal, stopped) == ids[:1]  # nothing else started meanwhile
    finally:
        os.kill(stopped, signal.SIGCONT)

    infos = other_host.wait_all_final(ids, timeout=60)
    assert [i["state"] for i in infos] == ["SUCCESS"] * len(ids)
    # Only the task that was running when the host stopped ran there; the ones it held and
    # had not started ran on the other host alone, once each.
    assert holds(lambda: started_by(journal, stopped) == ids[:1], QUIET)
    assert sorted(started_by(journal, other)) == sorted(ids)
    [warning] = [line for line in stopped_host.log().splitlines() if "lost the lease" in line]
    assert LET_GO[holding] in warning and f"{len(ids) - 1} not started" in warning, warning

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

from tests.fleet import TASKS, Fleet, wait_for
from worker import TaskFailed

ASYNC_TASKS = '''
import asyncio

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

@task
async def asoft(marker):
    try:
        await asyncio.sleep(30)
    except SoftTimeLimitExceeded:
        with open(marker, "a") as f:
            f.write("soft\\n")
        return "cleaned up"

@task
async def ablock(marker, seconds):
    """Block the child's loop: no await for `seconds`."""
    with open(marker, "a") as f:
        f.write(f"start {os.getpid()}\\n")
    time.sleep(seconds)

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


def async_fleet(make_fleet: Any, tmp_path: Path, **kwargs: Any) -> Fleet:
    """A fleet whose task module holds the sync test tasks and the async ones above."""
    folder = tmp_path / "host"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks.py").write_text(textwrap.dedent(TASKS) + textwrap.dedent(ASYNC_TASKS))
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

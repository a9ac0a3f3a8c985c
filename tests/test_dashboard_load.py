"""The dashboard's API stays fast over a broker holding 100,000 finished tasks."""

from __future__ import annotations

import statistics
import time
import uuid

import pytest

from tests import test_dashboard
from tests.fleet import Fleet
from tests.test_dashboard import Dashboard
from worker.brokers.sqlite import DONE, SQLiteBroker

TASKS = 100_000
FAILED_EVERY = 1000  # one task in this many ended FAILURE: a filter that finds few
# Seconds an answer may take on the shared 2-core test machine; on an idle one they take
# a few ms to tens of ms (the test prints them).
FAST = 1.0
start_dashboard = test_dashboard.start_dashboard  # the fixture, shared
pytestmark = pytest.mark.timeout(180)


def fill(broker_path: str) -> str:
    """TASKS finished tasks written straight into the queue file; returns the newest id."""
    broker = SQLiteBroker(f"sqlite:///{broker_path}")
    now = time.time()
    rows = []
    for i in range(TASKS):
        failed = i % FAILED_EVERY == 0
        task_id = str(uuid.uuid4())
        rows.append(
            (
                task_id,
                "default",
                "tasks.fail" if failed else "tasks.add",
                f'{{"id":"{task_id}","args":[{i},1],"kwargs":{{}}}}',
                DONE,
                "FAILURE" if failed else "SUCCESS",
                None if failed else str(i + 1),
                "ValueError" if failed else None,
                "w@h1",
                0.001,
                now - TASKS + i,
                now - TASKS + i + 0.5,
            )
        )
    broker.db.execute("BEGIN")
    broker.db.executemany(
        "INSERT INTO tasks (id, queue, name, body, status, state, result, exc_type, node,"
        " runtime, created, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    broker.db.execute("COMMIT")
    broker.close()
    return rows[-1][0]


def timed(dashboard: Dashboard, path: str, tries: int = 5) -> tuple[float, float]:
    """Median and worst seconds of `tries` GETs of `path`, each answered 200."""
    took = []
    for _ in range(tries):
        started = time.perf_counter()
        status, _ = dashboard.get(path)
        took.append(time.perf_counter() - started)
        assert status == 200, path
    return statistics.median(took), max(took)


def test_the_api_answers_fast_over_100k_finished_tasks(tmp_path, start_dashboard) -> None:
    fleet = Fleet(tmp_path / "host")  # its config only: no fleet runs, the broker is full
    newest = fill(str(fleet.folder / "queue.db"))
    dashboard = start_dashboard(fleet)
    _, body = dashboard.get("/api/tasks?limit=100")
    assert len(body["tasks"]) == 100 and body["tasks"][0]["id"] == newest
    _, body = dashboard.get("/api/tasks?state=FAILURE&limit=1000")
    assert len(body["tasks"]) == TASKS // FAILED_EVERY
    figures = {
        path: timed(dashboard, path)
        for path in (
            "/api/tasks?limit=100",
            "/api/tasks?limit=1000",
            "/api/tasks?state=FAILURE&limit=100",
            "/api/tasks?name=tasks.add&limit=100",
            f"/api/tasks/{newest}",
            "/api/queues",
            "/api/history",
        )
    }
    for path, (median, worst) in figures.items():
        print(f"{path}: median {median * 1000:.1f} ms, worst {worst * 1000:.1f} ms")
        assert worst < FAST, f"{path} took {worst:.2f}s"

"""`fleetctl dashboard`: its JSON API over a real fleet, its token, its bind, its history."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ctl.dashboard import REQUEST_WITHIN
from ctl.dashboard.history import History, percentile
from ctl.dashboard.records import Records
from tests.brokers.conftest import REDIS_URL, delete_prefix, require_redis
from tests.conftest import fill
from tests.fleet import FLEETCTL, Fleet, free_port, wait_for
from tests.redisserver import start_redis
from tests.test_fleetctl_cli import silent_host
from worker import Client
from worker.brokers.sqlite import DONE, SQLiteBroker

TOKEN = "s3cret-token"
pytestmark = pytest.mark.timeout(90)


class Dashboard:
    """A `fleetctl dashboard` process of a fleet's config, ended by its pid."""

    def __init__(self, fleet: Fleet, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = fleet.folder / "dashboard.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [FLEETCTL, "-c", str(fleet.config), "dashboard", "--bind", f"127.0.0.1:{self.port}"]
                + list(args),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=fleet.folder,
            )
        wait_for(self.up, 15, 0.05, f"the dashboard to answer:\n{self.log.read_text()}")

    def up(self) -> bool:
        assert self.proc.poll() is None, f"the dashboard exited:\n{self.log.read_text()}"
        with contextlib.suppress(OSError):
            return self.get("/api/info")[0] == 200
        return False

    def request(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        return self.request("POST", path, body if body is not None else {}, token)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"the dashboard ignored signal {signum}") from None
        return self.proc.returncode


@pytest.fixture
def start_dashboard() -> Iterator[Callable[..., Dashboard]]:
    """`start_dashboard(fleet, *args)` -> a running Dashboard, stopped at teardown."""
    started: list[Dashboard] = []

    def start(fleet: Fleet, *args: str) -> Dashboard:
        started.append(Dashboard(fleet, *args))
        return started[-1]

    yield start
    for dashboard in started:
        if dashboard.proc.poll() is None:
            dashboard.proc.kill()
            dashboard.proc.wait(5)


def with_token(folder: Path) -> str:
    """The config lines of a dashboard whose actions need TOKEN."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "token").write_text(TOKEN + "\n")
    return '\n[dashboard]\ntoken_file = "token"\n'


def test_api_shows_the_nodes_their_children_and_the_queues(make_fleet, start_dashboard) -> None:
    fleet = make_fleet().start()
    fleet.client.submit("tasks.add", 1, 2).get(10)
    dashboard = start_dashboard(fleet)
    status, body = dashboard.get("/api/nodes")
    assert status == 200 and body["missing"] == []
    node = body["nodes"]["w@h1"]
    assert node["state"] == "RUNNING" and not node["silent"]
    assert len(node["children"]) == 2 and all(c["pid"] > 0 for c in node["children"])
    assert sum(c["tasks_done"] for c in node["children"]) == 1
    fleet.client.submit("tasks.noop", queue="elsewhere")  # no worker consumes it
    status, body = dashboard.get("/api/queues")
    (queue,) = [q for q in body["queues"] if q["queue"] == "elsewhere"]
    assert status == 200 and queue["ready"] == 1 and queue["oldest_wait"] >= 0


def test_api_lists_recent_tasks_filters_them_and_gives_a_tasks_page(
    make_fleet, start_dashboard
) -> None:
    fleet = make_fleet().start()
    done = fleet.client.submit("tasks.add", 2, 3)
    failed = fleet.client.submit("tasks.fail", "boom")
    fleet.wait_all_final([done.id, failed.id])
    dashboard = start_dashboard(fleet)
    status, body = dashboard.get("/api/tasks")
    assert status == 200 and [t["id"] for t in body["tasks"]] == [failed.id, done.id]
    _, body = dashboard.get("/api/tasks?state=failure")
    assert [t["id"] for t in body["tasks"]] == [failed.id]
    _, body = dashboard.get("/api/tasks?name=tasks.add&limit=1")
    assert [t["id"] for t in body["tasks"]] == [done.id]
    status, task = dashboard.get(f"/api/tasks/{done.id}")
    assert status == 200 and task["result"] == 5 and task["args"] == [2, 3]
    assert task["node"] == "w@h1" and task["deliveries"] == 1 and task["finished"]
    _, task = dashboard.get(f"/api/tasks/{failed.id}")
    assert task["exc_type"] == "ValueError" and "raise ValueError" in task["traceback"]
    status, body = dashboard.get("/api/tasks/no-such-task")
    assert status == 404 and "no task no-such-task" in body["error"]
    status, body = dashboard.get("/api/tasks?limit=0.5")  # int() of it: none listed, 200
    assert status == 400 and "whole number" in body["error"]
    status, body = dashboard.get("/api/tasks?limit=zero")
    assert status == 400 and "limit" in body["error"]


def test_without_a_token_file_every_action_is_refused(make_fleet, start_dashboard) -> None:
    fleet = make_fleet().start()
    dashboard = start_dashboard(fleet)
    for path, body in [
        ("/api/tasks/some-id/revoke", {}),
        ("/api/dead/retry", {"all": True}),
        ("/api/dead/purge", {}),
        ("/api/nodes/w@h1/pool", {"action": "grow"}),
        ("/api/rate-limit", {"task": "tasks.add", "rate": "1/s"}),
    ]:
        status, answer = dashboard.post(path, body, token=TOKEN)
        assert status == 403 and "read-only" in answer["error"], path
    assert len(dashboard.get("/api/nodes")[1]["nodes"]["w@h1"]["children"]) == 2


def test_revoke_needs_the_bearer_token_and_terminates_the_task(
    make_fleet, start_dashboard, tmp_path
) -> None:
    fleet = make_fleet(extra=with_token(tmp_path / "host")).start()
    gate = tmp_path / "gate"
    handle = fleet.client.submit("tasks.hold", str(gate))
    wait_for(lambda: handle.state == "STARTED", message="the task to start")
    dashboard = start_dashboard(fleet)
    path = f"/api/tasks/{handle.id}/revoke?terminate=1"
    for token in (None, "wrong"):
        status, answer = dashboard.post(path, token=token)
        assert status == 401 and "Bearer" in answer["error"]
    assert handle.state == "STARTED"
    status, answer = dashboard.post(path, token=TOKEN)
    assert status == 200 and answer["replies"]["w@h1"]["ok"] == "revoked 1"
    wait_for(lambda: handle.state == "REVOKED", message="the task to end REVOKED")


def test_pool_and_rate_limit_through_the_api(make_fleet, start_dashboard, tmp_path) -> None:
    fleet = make_fleet(extra=with_token(tmp_path / "host")).start()
    dashboard = start_dashboard(fleet)
    status, answer = dashboard.post("/api/nodes/w@h1/pool", {"action": "grow"}, TOKEN)
    assert status == 200 and answer["replies"]["w@h1"] == {"ok": "pool is 3"}
    wait_for(lambda: len(fleet.child_pids()) == 3, message="a third child")
    status, answer = dashboard.post("/api/nodes/w@h1/pool", {"action": "jump"}, TOKEN)
    assert status == 400 and "grow" in answer["error"]
    status, answer = dashboard.post("/api/nodes/w@h1/pool", {"action": "grow", "n": 0}, TOKEN)
    assert status == 400 and "pool_grow: n" in answer["error"]
    status, answer = dashboard.post("/api/nodes/nobody@h1/pool", {"action": "grow"}, TOKEN)
    assert status in (404, 502) and "nobody@h1" in answer["error"]
    status, answer = dashboard.post("/api/rate-limit", {"task": "tasks.add", "rate": "5/s"}, TOKEN)
    assert status == 200 and "set to 5/s" in answer["replies"]["w@h1"]["ok"]
    status, answer = dashboard.post("/api/rate-limit", {"task": "tasks.add", "rate": "x"}, TOKEN)
    assert status == 400 and answer["error"]
    body = {"task": "tasks.add", "rate": "5/s", "dest": []}  # nobody, or everyone?
    status, answer = dashboard.post("/api/rate-limit", body, TOKEN)
    assert status == 400 and "non-empty" in answer["error"]


def test_dead_letters_are_retried_and_purged(make_fleet, start_dashboard, tmp_path) -> None:
    fleet = make_fleet(extra=with_token(tmp_path / "host")).start()
    lost = fleet.client.submit("tasks.nobody_knows")  # NotRegistered: dead-lettered
    wait_for(lambda: fleet.client.dead_letters(), message="a dead letter")
    dashboard = start_dashboard(fleet)
    _, body = dashboard.get("/api/queues")
    assert [d["id"] for d in body["dead_letters"]] == [lost.id]
    status, answer = dashboard.post("/api/dead/retry", {"ids": [lost.id, "nope"]}, TOKEN)
    assert status == 200 and answer["retried"] == [lost.id]
    assert answer["failed"] == {"nope": "not a dead letter"}
    status, answer = dashboard.post("/api/dead/retry", {}, TOKEN)
    assert status == 400 and "ids" in answer["error"]
    wait_for(lambda: fleet.client.dead_letters(), message="the letter back in the list")
    status, answer = dashboard.post("/api/dead/purge", {}, TOKEN)
    assert status == 200 and answer["purged"] == 1 and not fleet.client.dead_letters()


def test_a_bind_beyond_loopback_needs_a_token_file(make_fleet) -> None:
    fleet = make_fleet()  # never started: refused before it asks any host
    port = free_port()
    out = fleet.ctl("dashboard", "--bind", f"0.0.0.0:{port}", check=False, timeout=20)
    assert out.returncode == 2, out
    assert out.stderr.count("\n") == 1 and "token_file" in out.stderr
    out = fleet.ctl("dashboard", "--bind", "nowhere", check=False, timeout=20)
    assert out.returncode == 2 and "HOST:PORT" in out.stderr


@pytest.mark.parametrize(
    ("bind", "error"),
    [
        ("x" * 5000, "give HOST:PORT"),
        ("x" * 5000 + ":9810", "needs [dashboard] token_file"),
        ("x" * 5000 + ":9810", "cannot listen on 'xxxxxxxxxx"),  # given a token file
        ("a\nb:9810", "needs [dashboard] token_file"),
    ],
)
def test_a_bind_it_refuses_is_quoted_short_in_one_line(make_fleet, tmp_path, bind, error) -> None:
    """The error line held all of the --bind given, and its newline: 5,000 characters, or two
    lines; socket's own error added the address whole once more."""
    token = with_token(tmp_path / "host") if error.startswith("cannot listen") else ""
    out = make_fleet(extra=token).ctl("dashboard", "--bind", bind, check=False, timeout=20)
    assert (out.returncode, out.stdout) == (2, "")
    [line] = out.stderr.splitlines()
    assert line.startswith("fleetctl: ") and error in line and len(line) < 300, line[:300]


def test_a_port_in_use_is_one_line_and_exit_2(make_fleet, start_dashboard) -> None:
    fleet = make_fleet().start()
    dashboard = start_dashboard(fleet)
    out = fleet.ctl("dashboard", "--bind", f"127.0.0.1:{dashboard.port}", check=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "cannot listen on" in out.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_dashboard_ends_on_term_and_int_with_a_page_open(
    make_fleet, start_dashboard, signum
) -> None:
    fleet = make_fleet().start()
    dashboard = start_dashboard(fleet)
    with urllib.request.urlopen(dashboard.url + "/api/events", timeout=10) as stream:
        assert stream.readline().startswith(b"data: ")  # a live page, held open
        started = time.monotonic()
        assert dashboard.stop(signum) == 0
        # Its stream ends at once: it was cancelled at the end of the grace, in a traceback.
        assert time.monotonic() - started < 1.5
    assert "Exception in ASGI application" not in dashboard.log.read_text()


def test_the_charts_history_survives_a_restart(make_fleet, start_dashboard) -> None:
    fleet = make_fleet().start()
    dashboard = start_dashboard(fleet)
    fleet.client.submit_many([("tasks.add", (i, i), {}) for i in range(20)])

    def samples() -> list[dict[str, Any]]:
        return dashboard.get("/api/history")[1]["samples"]

    wait_for(lambda: sum(s["done"] for s in samples()) > 0, 20, 0.2, "a sample with tasks")
    before = samples()
    assert dashboard.stop() == 0
    assert (fleet.folder / "state" / "dashboard.db").exists()
    dashboard = start_dashboard(fleet)
    assert samples()[: len(before)] == before


def test_dashboard_config_keys(make_fleet, start_dashboard) -> None:
    port = free_port()
    fleet = make_fleet(extra=f'\n[dashboard]\nbind = "127.0.0.1:{port}"\n')
    from supervisor.config import load

    config = load(str(fleet.config), check_imports=False)
    assert config.dashboard.bind == f"127.0.0.1:{port}" and config.dashboard.token_file == ""
    (fleet.folder / "fleet.toml").write_text(fleet.config.read_text() + 'token_file = "missing"\n')
    out = fleet.ctl("dashboard", check=False, timeout=20)
    assert out.returncode == 2 and "missing: cannot read it" in out.stderr


def test_a_stopped_worker_shows_as_silent(make_fleet, start_dashboard) -> None:
    fleet = make_fleet().start()
    dashboard = start_dashboard(fleet)
    (worker,) = fleet.worker_pids()
    os.kill(worker, signal.SIGSTOP)
    try:
        node = dashboard.get("/api/nodes")[1]["nodes"]["w@h1"]
        assert node["state"] == "RUNNING" and node["silent"]
        assert not isinstance(node.get("children"), list)  # the arbiter's count, no pool
    finally:
        os.kill(worker, signal.SIGCONT)
    wait_for(lambda: not dashboard.get("/api/nodes")[1]["nodes"]["w@h1"]["silent"])


def test_on_redis_the_tasks_list_reads_the_records(make_fleet, start_dashboard) -> None:
    require_redis(REDIS_URL)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    try:
        fleet = make_fleet(fleet={"broker": f"{REDIS_URL}?prefix={prefix}"}).start()
        done = fleet.client.submit("tasks.add", 2, 3)
        failed = fleet.client.submit("tasks.fail", "boom")
        waiting = fleet.client.submit("tasks.add", 1, 1, countdown=600)
        fleet.wait_all_final([done.id, failed.id])
        dashboard = start_dashboard(fleet)
        _, body = dashboard.get("/api/tasks")
        assert not body["partial"]
        ids = [t["id"] for t in body["tasks"]]  # unfinished first, then by end (any order here)
        assert ids[0] == waiting.id and set(ids[1:]) == {failed.id, done.id}
        _, body = dashboard.get("/api/tasks?state=FAILURE")
        assert [t["id"] for t in body["tasks"]] == [failed.id]
        _, task = dashboard.get(f"/api/tasks/{done.id}")
        assert task["result"] == 5 and task["finished"] and task["args"] is None  # body dropped
        _, task = dashboard.get(f"/api/tasks/{waiting.id}")
        assert task["args"] == [1, 1] and task["eta"] > time.time()
    finally:
        delete_prefix(REDIS_URL, prefix)


def test_the_dashboard_follows_a_queue_file_replaced_under_it(make_fleet, start_dashboard) -> None:
    fleet = make_fleet().start()
    old = fleet.client.submit("tasks.add", 1, 1)
    old.get(10)
    dashboard = start_dashboard(fleet)
    assert [t["id"] for t in dashboard.get("/api/tasks")[1]["tasks"]] == [old.id]
    for suffix in ("", "-wal", "-shm"):
        (fleet.folder / f"queue.db{suffix}").unlink(missing_ok=True)
    client = Client.from_config(str(fleet.config))  # one that opens the new file
    try:
        new = client.submit("tasks.add", 2, 2)
        assert new.get(10) == 4
    finally:
        client.close()

    def listed() -> list[str]:
        return [t["id"] for t in dashboard.get("/api/tasks")[1]["tasks"]]

    wait_for(lambda: listed() == [new.id], message="the new file's task, and only it")
    assert dashboard.get(f"/api/tasks/{new.id}")[1]["result"] == 4


EVERY_SECOND = """
[[schedule]]
name = "tick"
task = "tasks.noop"
every = 1
"""


def test_schedules_are_listed_paused_resumed_and_triggered(
    make_fleet, start_dashboard, tmp_path
) -> None:
    fleet = make_fleet(extra=with_token(tmp_path / "host") + EVERY_SECOND).start()
    dashboard = start_dashboard(fleet)

    def listing() -> dict[str, Any]:
        status, body = dashboard.get("/api/schedules")
        assert status == 200, body
        return dict(body)

    fired = wait_for(lambda: listing()["schedules"][0]["last_id"], 15, 0.1, "a tick fired")
    body = listing()
    (entry,) = body["schedules"]
    assert body["leader"] == "w@h1" and fired.startswith("schedule:tick:")
    assert entry["task"] == "tasks.noop" and entry["when"] == "every 1s" and not entry["paused"]
    assert entry["next_run"] > time.time() - 1 and entry["last_run"] is not None
    assert dashboard.post("/api/schedules/tick/pause")[0] == 401
    status, answer = dashboard.post("/api/schedules/tick/pause", token=TOKEN)
    assert status == 200 and answer == {"ok": "schedule tick paused"}
    # One code path with `fleetctl schedule list`: the same listing, bar the times to come.
    ctl = json.loads(fleet.ctl("--json", "schedule", "list").stdout)
    for s in ctl["schedules"]:  # --json adds ISO twins to the times; the API keeps epochs
        twins = {key: s.pop(key) for key in list(s) if key.endswith("_iso")}
        assert set(twins) == {"next_run_iso", "last_run_iso"}, twins
    ours = listing()
    for listed in (ctl, ours):
        for s in listed["schedules"]:
            del s["next_run"]
    assert ours == ctl and ours["schedules"][0]["paused"]
    status, answer = dashboard.post("/api/schedules/tick/trigger", token=TOKEN)
    assert status == 200 and answer["id"].startswith("schedule:tick:manual-")
    assert fleet.client.handle(answer["id"]).get(10) is None  # tasks.noop ran
    status, answer = dashboard.post("/api/schedules/tick/resume", token=TOKEN)
    assert status == 200 and not listing()["schedules"][0]["paused"]
    wait_for(
        lambda: listing()["schedules"][0]["last_id"] not in (fired, None), 15, 0.1, "a new tick"
    )
    status, answer = dashboard.post("/api/schedules/nope/pause", token=TOKEN)
    assert status == 404 and "no schedule 'nope'" in answer["error"]
    status, answer = dashboard.post("/api/schedules/tick/explode", token=TOKEN)
    assert status == 404 and "pause" in answer["error"]


def test_queue_waits_are_read_from_due_to_start_of_the_tasks_ended_in_a_window(
    tmp_path,
) -> None:
    broker = SQLiteBroker(f"sqlite:///{tmp_path / 'queue.db'}")
    rows = [  # id, created, eta, finished, runtime: waits 1..100 s, started at 1000 + wait
        (f"t{w}", 1000.0, 0.0, 1000.0 + w + 0.5, 0.5) for w in range(1, 101)
    ]
    rows.append(("delayed", 0.0, 990.0, 1000.5, 0.5))  # due at 990 (its eta): waited 10 s
    rows.append(("never-ran", 1000.0, 0.0, 1050.0, None))  # revoked before it started
    broker.db.executemany(
        "INSERT INTO tasks (id, queue, name, body, status, state, created, eta, finished,"
        f" runtime) VALUES (?, 'q', 'tasks.add', '{{}}', {DONE}, 'SUCCESS', ?, ?, ?, ?)",
        rows,
    )
    records = Records(broker)
    waits = records.waits(1000.0, 1101.0)
    assert waits is not None and sorted(waits) == sorted([10.0, *map(float, range(1, 101))])
    assert percentile(waits, 0.5) == 50.0 and percentile(waits, 0.99) == 99.0
    assert sorted(records.waits(1000.0, 1002.0) or []) == [1.0, 10.0]
    assert records.waits(2000.0, 3000.0) == [] and percentile([], 0.5) is None
    broker.close()


def test_a_charts_file_from_before_the_waits_keeps_its_samples(tmp_path) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "dashboard.db")) as old:
        old.execute(
            "CREATE TABLE samples (at REAL PRIMARY KEY, done REAL NOT NULL,"
            " failed REAL NOT NULL, ready INTEGER NOT NULL, dead INTEGER NOT NULL)"
        )
        old.execute("INSERT INTO samples VALUES (?, 2.0, 1.0, 3, 0)", (time.time() - 60,))
        old.commit()
    history = History(str(tmp_path))
    (kept,) = history.since(3600)
    assert kept["done"] == 2.0 and kept["wait_p50"] is None and kept["wait_p99"] is None
    history.close()


HELD_FOR = 1.5  # seconds the first task holds the only child: the wait of those behind it


def test_the_queues_charts_get_the_wait_of_tasks_behind_a_busy_child(
    make_fleet, start_dashboard, tmp_path
) -> None:
    fleet = make_fleet(defaults={"concurrency": 1}).start()
    dashboard = start_dashboard(fleet)
    assert dashboard.get("/api/info")[1]["queue_waits"] is True
    gate = tmp_path / "gate"
    first = fleet.client.submit("tasks.hold", str(gate))
    wait_for(lambda: first.state == "STARTED", message="the first task to start")
    behind = [fleet.client.submit("tasks.add", i, 1) for i in range(3)]
    time.sleep(HELD_FOR)
    gate.touch()
    fleet.wait_all_final([h.id for h in behind])

    def waits() -> list[tuple[float, float]]:
        samples = dashboard.get("/api/history")[1]["samples"]
        return [(s["wait_p50"], s["wait_p99"]) for s in samples if s["wait_p99"] is not None]

    measured = wait_for(waits, 10, 0.2, "a sample with the waits")
    assert max(p99 for _, p99 in measured) >= HELD_FOR
    assert all(p50 <= p99 for p50, p99 in measured)


def test_a_result_or_arguments_holding_nan_show_on_the_page_and_in_json(
    make_fleet, start_dashboard
) -> None:
    """NaN and infinity are no JSON, but Python's json.dumps writes them: a record that
    another producer wrote so ended the task list and the task's page in HTTP 500, and
    `fleetctl --json result` printed what no JSON reader takes."""
    fleet = make_fleet().start()
    done = fleet.client.submit("tasks.add", 2, 3)
    fleet.wait_all_final([done.id])
    with contextlib.closing(sqlite3.connect(fleet.folder / "queue.db")) as db, db:
        db.execute(
            "UPDATE tasks SET result = 'NaN', body = ? WHERE id = ?",
            ('{"args": [Infinity, 1], "kwargs": {}}', done.id),
        )
    dashboard = start_dashboard(fleet)
    status, body = dashboard.get("/api/tasks")
    assert status == 200 and [t["id"] for t in body["tasks"]] == [done.id]
    status, task = dashboard.get(f"/api/tasks/{done.id}")
    assert status == 200 and task["args"] == ["Infinity", 1]
    assert task["state"] == "FAILURE" and task["exc_type"] == "BadResult"
    shown = subprocess.run(
        [FLEETCTL, "-c", str(fleet.config), "--json", "result", done.id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    info = json.loads(shown.stdout, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert info["exc_type"] == "BadResult" and "NaN" in info["exc_message"]
    assert shown.returncode == 1


def test_the_live_view_goes_on_while_the_charts_file_cannot_be_written(
    small_disk: Path, make_fleet, start_dashboard
) -> None:
    """A full disk under state_dir stopped the snapshots (the sample's write raised before
    them): the page said live and showed the fleet as it was."""
    fleet = make_fleet().start()
    assert fleet.folder / "state" == small_disk
    dashboard = start_dashboard(fleet)
    with urllib.request.urlopen(dashboard.url + "/api/events", timeout=15) as stream:
        assert stream.readline().startswith(b"data: ")
        fill(small_disk)
        fresh = 0
        while fresh < 3:  # a sample every SAMPLE_EVERY s; each read waits 15 s at most
            fresh += stream.readline().startswith(b"data: ")
    assert "cannot keep the charts' sample" in dashboard.log.read_text()


def test_the_dashboard_starts_on_a_full_disk_with_its_charts_in_memory(
    small_disk: Path, make_fleet, start_dashboard
) -> None:
    """No room for the charts file: it was taken for a corrupt one, set aside (an empty file
    left behind), and the dashboard ended, exit 2, as for a usage error."""
    fleet = make_fleet().start()
    fill(small_disk)
    dashboard = start_dashboard(fleet)
    assert dashboard.get("/api/history")[0] == 200
    assert "kept in memory" in dashboard.log.read_text()
    assert not list(small_disk.glob("dashboard.db.unreadable-*"))


@pytest.mark.parametrize("content", [b"not a database at all" * 100, None])
def test_a_charts_file_that_cannot_serve_is_set_aside_and_the_dashboard_starts(
    make_fleet, start_dashboard, content: bytes | None
) -> None:
    """A corrupt file, or a folder where it goes: the dashboard did not start, and said the
    broker refused."""
    fleet = make_fleet().start()
    charts = fleet.folder / "state" / "dashboard.db"
    if content is None:
        charts.mkdir(parents=True)
    else:
        charts.write_bytes(content)
    dashboard = start_dashboard(fleet)
    assert dashboard.get("/api/history")[0] == 200
    [aside] = (fleet.folder / "state").glob("dashboard.db.unreadable-*")
    assert aside.is_dir() if content is None else aside.read_bytes() == content
    assert "moved it to" in dashboard.log.read_text()


def test_a_token_or_body_of_anybodys_text_gets_a_json_answer(
    make_fleet, start_dashboard, tmp_path: Path
) -> None:
    """A bearer token that is no ASCII, or a body holding a lone surrogate, ended in HTTP
    500 with a traceback; a token file that is no ASCII made every action a 500."""
    folder = tmp_path / "host"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "token").write_text("tök\n", encoding="utf-8")
    fleet = make_fleet(extra='\n[dashboard]\ntoken_file = "token"\n').start()
    dashboard = start_dashboard(fleet)
    url = dashboard.url + "/api/dead/purge"
    for given in ("tök".encode(), b"\xff", b"tok"):
        headers: Any = {"Authorization": b"Bearer " + given}  # the bytes as they go
        request = urllib.request.Request(url, b"{}", headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                status, body = answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            status, body = exc.code, json.loads(exc.read())
        assert (status, given) in ((200, "tök".encode()), (401, b"\xff"), (401, b"tok")), body
    raw = b'{"ids": ["\\ud800"]}'
    headers = {"Authorization": "Bearer tök".encode()}
    request = urllib.request.Request(dashboard.url + "/api/dead/retry", raw, headers, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 400 and "surrogate" in json.loads(refused.value.read())["error"]


def test_pages_polling_a_hung_host_wait_out_its_timeout_together(
    make_fleet, start_dashboard
) -> None:
    """Each /api/nodes asked the hosts in turn, one after the other: eight pages polling a
    hung arbiter waited 1, 2, ... 8 timeouts, and filled the server's threads meanwhile."""
    fleet = make_fleet().start()
    dashboard = start_dashboard(fleet, "--timeout", "1")
    assert fleet.proc is not None
    os.kill(fleet.proc.pid, signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:

            def timed(_: int) -> tuple[float, int]:
                started = time.monotonic()
                status, _body = dashboard.get("/api/nodes")
                return time.monotonic() - started, status

            answers = list(pool.map(timed, range(8)))
    finally:
        os.kill(fleet.proc.pid, signal.SIGCONT)
    assert {status for _, status in answers} == {200}
    assert max(seconds for seconds, _ in answers) < 4, answers


def test_a_broker_error_or_an_oversized_action_is_a_json_answer_not_a_500(
    make_fleet, start_dashboard, tmp_path
) -> None:
    """The tasks list and the schedules on a Redis that is gone, and a rate limit whose name
    is over the protocol's 1 MiB, answered 500 in plain text with a traceback in the log."""
    server = start_redis(tmp_path, appendonly=False)
    try:
        folder = tmp_path / "host"
        fleet = make_fleet(fleet={"broker": server.url}, extra=with_token(folder)).start()
        dashboard = start_dashboard(fleet)
        status, body = dashboard.post(
            "/api/rate-limit", {"task": "t" * (1 << 20), "rate": "1/s"}, TOKEN
        )
        assert status == 413 and "1 MiB" in body["error"], (status, body)
        server.kill()
        for path in ("/api/tasks", "/api/schedules", "/api/queues"):
            status, body = dashboard.get(path)
            assert status == 503 and "\n" not in body["error"], (path, status, body)
    finally:
        server.kill()


def test_a_client_that_never_finishes_its_request_is_cut_off(make_fleet, start_dashboard) -> None:
    """uvicorn waits for a request's headers as long as they take: connections that sent a
    part of theirs held the dashboard's descriptors until none was left for a page."""
    fleet = make_fleet().start()
    dashboard = start_dashboard(fleet)
    slow = socket.create_connection(("127.0.0.1", dashboard.port), timeout=5)
    # A live page behind an HTTP/1.0 proxy (nginx's default): its stream outlives the cut.
    stream = socket.create_connection(("127.0.0.1", dashboard.port), timeout=5)
    try:
        stream.sendall(b"GET /api/events HTTP/1.0\r\n\r\n")
        slow.sendall(b"GET /api/info HTTP/1.1\r\nHost: x\r\n")  # and never the end
        assert dashboard.get("/api/info")[0] == 200  # the others are answered meanwhile
        slow.settimeout(REQUEST_WITHIN + 5)
        started = time.monotonic()
        assert slow.recv(1024) == b""  # closed by the dashboard
        assert time.monotonic() - started < REQUEST_WITHIN + 5
        time.sleep(2)  # past the cut, for the stream too
        stream.settimeout(0.1)
        received = b""
        with contextlib.suppress(TimeoutError):
            while chunk := stream.recv(65536):
                received += chunk
        assert received.startswith(b"HTTP/1.1 200") and chunk != b"", received[-200:]
    finally:
        slow.close()
        stream.close()
    # A client that leaves before its body's end is no error for the log.
    with socket.create_connection(("127.0.0.1", dashboard.port), timeout=5) as leaving:
        leaving.sendall(b"POST /api/dead/purge HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    assert dashboard.get("/api/info")[0] == 200
    time.sleep(0.5)
    assert "Traceback" not in dashboard.log.read_text(), dashboard.log.read_text()


def test_an_action_that_some_hosts_carried_out_says_so_and_names_the_silent_one(
    make_fleet, start_dashboard, tmp_path
) -> None:
    """A revoke that the live host carried out answered 502 "no answer from h9" while another
    host was silent, and the page said it had failed. One that no node carried out is a 502."""
    with silent_host(tmp_path) as control:
        fleet = make_fleet(extra=with_token(tmp_path / "host") + control).start()
        dashboard = start_dashboard(fleet, "--timeout", "1")
        waiting = fleet.client.submit("tasks.add", 1, 1, countdown=600)
        status, answer = dashboard.post(f"/api/tasks/{waiting.id}/revoke", token=TOKEN)
        assert status == 200 and answer["replies"]["w@h1"]["ok"] == "revoked 1", answer
        assert answer["missing"] == ["h9"] and answer["problem"] == "no answer from h9"
        wait_for(lambda: waiting.state == "REVOKED", message="the task to end REVOKED")
        status, answer = dashboard.post("/api/nodes/w@h9/pool", {"action": "grow"}, TOKEN)
        assert (status, answer) == (502, {"error": "no answer from h9"})


def test_an_action_waits_out_a_hung_host_once_not_behind_the_samplers_poll(
    make_fleet, start_dashboard, tmp_path
) -> None:
    """An action took the control client after the sampler's poll, which waits out the hung
    host too: two timeouts."""
    timeout = 2.0
    with silent_host(tmp_path) as control:
        fleet = make_fleet(extra=with_token(tmp_path / "host") + control).start()
        dashboard = start_dashboard(fleet, "--timeout", str(timeout))
        with urllib.request.urlopen(dashboard.url + "/api/events", timeout=15) as stream:
            # The first snapshot may be one the stream found; the second is a poll that just
            # ended, and the sampler's next one (a timeout long) has begun.
            for _ in range(2):
                while not stream.readline().startswith(b"data: "):
                    pass
            started = time.monotonic()
            status, answer = dashboard.post(
                "/api/rate-limit", {"task": "tasks.add", "rate": "5/s"}, TOKEN
            )
            took = time.monotonic() - started
        assert status == 200 and answer["missing"] == ["h9"], answer
        assert timeout <= took < timeout * 1.5, took


def test_a_body_that_breaks_off_is_one_log_line_with_or_without_the_token(
    make_fleet, start_dashboard, tmp_path
) -> None:
    """uvicorn answers 400 to a chunked body that breaks off; the 401 that the action without
    the token gave after it, for nobody, put a traceback of 58 lines in the log."""
    fleet = make_fleet(extra=with_token(tmp_path / "host")).start()
    dashboard = start_dashboard(fleet)
    for auth in ("", "Authorization: Bearer wrong\r\n", f"Authorization: Bearer {TOKEN}\r\n"):
        with socket.create_connection(("127.0.0.1", dashboard.port), timeout=10) as sock:
            sock.sendall(
                f"POST /api/dead/purge HTTP/1.1\r\nHost: x\r\n{auth}"
                "Transfer-Encoding: chunked\r\n\r\nzz\r\n".encode()
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 "), (auth, answer)
    assert dashboard.get("/api/info")[0] == 200
    log = dashboard.log.read_text()
    assert "Traceback" not in log and log.count("Invalid HTTP request") == 3, log

"""The control plane end to end: every fleetctl command against real fleetd processes.

Each test starts its own fleet (a real arbiter with real workers and children), acts
through `fleetctl` as a user types it, and checks the outcome in the replies, the
processes and the broker. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

from ctl.client import ControlClient
from supervisor.control import BAD_REQUEST_LOG_INTERVAL
from tests.fleet import (
    FLEETCTL,
    FLEETD,
    QUIET,
    Fleet,
    executions,
    fleetd,
    free_port,
    holds,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)

# Task and command helpers of these tests, beside the shared tests.fleet TASKS module.
CTL_TASKS = """
import os, sys, time
from worker import task, control_command

@task
def stamp(path):
    with open(path, "a") as f:
        f.write(f"{time.time()}\\n")

@control_command
def boom(worker):
    raise RuntimeError("boom")

@control_command
def not_json(worker):
    return {"pids": {1, 2}}

@control_command
def nan(worker):
    return {"x": float("nan")}

@control_command
def leave(worker, how="exit"):
    if how == "exit":
        sys.exit(0)
    raise KeyboardInterrupt

@control_command
def hang(worker):
    time.sleep(600)

@control_command
def slow(worker, seconds=1.0):
    time.sleep(float(seconds))

@control_command
def deep(worker):
    x = []
    for _ in range(100000):
        x = [x]
    return x

@control_command
def huge(worker):
    return "x" * (2 << 20)

@control_command
def forks(worker):
    return os.fork()  # and both copies return
"""

TWO_NODES = [{"name": "a", "queues": ["a"]}, {"name": "b", "queues": ["b"]}]


def fleet_with_ctltasks(make_fleet: Callable[..., Fleet], **kwargs: Any) -> Fleet:
    fleet = make_fleet(
        fleet={"imports": ["tasks", "ctltasks"], **kwargs.pop("fleet", {})}, **kwargs
    )
    (fleet.folder / "ctltasks.py").write_text(CTL_TASKS)
    return fleet


def ctl_json(fleet: Fleet, *args: str) -> tuple[int, dict[str, Any]]:
    """Run `fleetctl --json ARGS` against the fleet; its exit code and output."""
    out = fleet.ctl("--json", *args, check=False)
    try:
        return out.returncode, json.loads(out.stdout)
    except ValueError:
        raise AssertionError(f"fleetctl {args} printed no JSON: {out.stdout}{out.stderr}") from None


def fleetctl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """fleetctl without a config: the test names the endpoints."""
    env = {k: v for k, v in os.environ.items() if k not in ("FLEET_CONFIG", "FLEETCTL_KEY")}
    return subprocess.run(
        [FLEETCTL, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def connected_dealer(ctx: zmq.Context[zmq.Socket[bytes]], address: str) -> zmq.Socket[bytes]:
    """A DEALER connected to `address` that drops what it holds when it is closed."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    return sock


def endpoint(fleet: Fleet) -> str:
    return f"ipc://{fleet.folder}/state/control.sock"


def node_pids(fleet: Fleet) -> dict[str, int]:
    _, data = ctl_json(fleet, "inspect", "stats")
    # A node that did not answer in time (a worker still booting, during a reload) says so
    # with an error instead of its stats: not there yet.
    return {node: stats["pid"] for node, stats in data["replies"].items() if "pid" in stats}


def concurrency(fleet: Fleet) -> dict[str, int]:
    _, data = ctl_json(fleet, "inspect", "conf")
    return {node: conf["concurrency"] for node, conf in data["replies"].items()}


def gone(pid: int) -> bool:
    """Whether a process has exited (a zombie has); it may do so while we look."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP a process for the block: as hung as a process gets."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class Lines:
    """The stdout lines of a process, read in a thread, so that waits on them stay bounded."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        assert proc.stdout is not None
        self.thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait(self, condition: Callable[[list[str]], Any], timeout: float, message: str) -> Any:
        return wait_for(lambda: condition(list(self.lines)), timeout, 0.05, message)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        self.thread.join(5)
        return code


def popen_ctl(fleet: Fleet, *args: str, stderr: int = subprocess.STDOUT) -> subprocess.Popen[str]:
    """fleetctl on the fleet's config, its stdout a pipe (stderr too, unless told)."""
    return subprocess.Popen(
        [FLEETCTL, "-c", str(fleet.config), *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        cwd=fleet.folder,
    )


@contextlib.contextmanager
def running_ctl(fleet: Fleet, *args: str) -> Iterator[Lines]:
    lines = Lines(popen_ctl(fleet, *args))
    try:
        yield lines
    finally:
        lines.stop()


# --- ping, --dest, --limit, deadlines -------------------------------------------------------
def test_ping_over_two_nodes_returns_well_before_a_5s_timeout(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet(workers=TWO_NODES).start()
    started = time.monotonic()
    code, data = ctl_json(fleet, "--timeout", "5", "ping")
    wall = time.monotonic() - started
    assert code == 0
    assert data == {
        "replies": {"a@h1": {"ok": "pong"}, "b@h1": {"ok": "pong"}},
        "missing": [],
        "elapsed": data["elapsed"],
    }
    assert data["elapsed"] < 0.5 and wall < 3  # wall: fleetctl's Python start-up included
    with ControlClient([endpoint(fleet)], 5) as client:
        result = client.call("ping")
    assert set(result.replies) == {"a@h1", "b@h1"} and result.elapsed < 0.5
    text = fleet.ctl("ping").stdout
    assert "a@h1" in text and "b@h1" in text and "pong" in text


def test_a_command_that_got_no_answer_is_not_carried_out_once_the_host_is_back(
    make_fleet: Callable[..., Fleet],
) -> None:
    """A long-lived client (the dashboard) asks a host that is down: the caller is told it
    did not answer, and that is the end of it. ZeroMQ kept the request queued and handed it
    over once the host was back: the pool grew by the grows that had failed."""
    fleet = make_fleet().start()
    with ControlClient([endpoint(fleet)], 1.0) as client:
        fleet.stop()
        for _ in range(3):
            result = client.call("pool_grow", {"n": 1})
            assert result.replies == {} and result.missing == [endpoint(fleet)]
        fleet.start()
        assert set(client.call("ping").replies) == {"w@h1"}
        assert client.call("conf").replies["w@h1"]["concurrency"] == 2
    assert concurrency(fleet) == {"w@h1": 2}


def test_dest_reaches_only_the_named_node_or_host(make_fleet: Callable[..., Fleet]) -> None:
    h1 = make_fleet("h1", workers=TWO_NODES, node="h1").start()
    h2 = make_fleet("h2", workers=[{"name": "c"}], node="h2").start()
    both = ["--endpoint", endpoint(h1), "--endpoint", endpoint(h2)]

    def ping(*dest: str) -> dict[str, Any]:
        args = [a for d in dest for a in ("--dest", d)]
        out = fleetctl(*both, "--json", "--timeout", "5", "ping", *args)
        return {"code": out.returncode, **json.loads(out.stdout)}

    assert set(ping()["replies"]) == {"a@h1", "b@h1", "c@h2"}
    assert set(ping("b@h1")["replies"]) == {"b@h1"}
    assert set(ping("h2")["replies"]) == {"c@h2"}
    assert set(ping("h1")["replies"]) == {"a@h1", "b@h1"}
    assert set(ping("a@h1", "h2")["replies"]) == {"a@h1", "c@h2"}
    unknown = ping("x@h1", "h9")
    assert (
        unknown["code"] == 1 and unknown["replies"] == {} and unknown["missing"] == ["x@h1", "h9"]
    )
    # The effect lands only where it was sent.
    out = fleetctl(*both, "pool", "grow", "2", "--dest", "b@h1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert concurrency(h1) == {"a@h1": 2, "b@h1": 4} and concurrency(h2) == {"c@h2": 2}
    # A silent host costs the timeout, once, and is named; the other answers.
    with stopped(h2.pid):
        started = time.monotonic()
        out = fleetctl(*both, "--json", "--timeout", "1", "ping")
        wall = time.monotonic() - started
        # status asks twice (the arbiters, then the pools): the silent host, once.
        status = fleetctl(*both, "--json", "--timeout", "1", "status")
    data = json.loads(out.stdout)
    assert out.returncode == 1 and set(data["replies"]) == {"a@h1", "b@h1"}
    assert data["missing"] == [endpoint(h2)] and 1 <= data["elapsed"] < 1.5 and wall < 4
    data = json.loads(status.stdout)
    assert status.returncode == 1 and set(data["replies"]) == {"a@h1", "b@h1"}
    assert data["replies"]["a@h1"]["children"], data  # the pools' answers are there
    assert data["missing"] == [endpoint(h2)] and 1 <= data["elapsed"] < 1.5


def test_a_hung_worker_is_reported_and_never_delays_the_others(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet(workers=TWO_NODES).start()
    pids = node_pids(fleet)
    with stopped(pids["b@h1"]):
        code, data = ctl_json(fleet, "--timeout", "2", "ping")
        assert code == 1 and data["missing"] == [] and data["elapsed"] < 2
        assert data["replies"]["a@h1"] == {"ok": "pong"}
        assert "deadline" in data["replies"]["b@h1"]["error"]
        # --limit: back after the first reply, without waiting for the hung node.
        code, data = ctl_json(fleet, "--timeout", "5", "ping", "--limit", "1")
        assert code == 0 and data["replies"] == {"a@h1": {"ok": "pong"}} and data["elapsed"] < 1
        # Thousands of commands for the hung node fill its channel: the arbiter stops
        # writing to it (it never blocks) and says so at once.
        request = {"cmd": "ping", "dest": ["b@h1"], "timeout": 0.02}
        errors = flood(endpoint(fleet), request, until="does not read")
        assert any("does not read" in e for e in errors), set(errors)
        code, data = ctl_json(fleet, "--timeout", "2", "ping", "--dest", "a@h1")
        assert code == 0 and data["elapsed"] < 0.5
    wait_for(lambda: ctl_json(fleet, "ping")[0] == 0, 20, 0.2, "the woken node to answer again")


def test_a_requests_timeout_and_limit_hold_at_the_host(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet(workers=TWO_NODES).start()
    pids = node_pids(fleet)
    ctx = zmq.Context()
    try:
        dealer = connected_dealer(ctx, endpoint(fleet))

        def ask(**fields: Any) -> tuple[dict[str, Any], float]:
            started = time.monotonic()
            dealer.send(json.dumps({"v": 1, "id": "r", "cmd": "ping", **fields}).encode())
            assert dealer.poll(10_000), f"no answer to {fields}"
            return json.loads(dealer.recv()), time.monotonic() - started

        with stopped(pids["b@h1"]):
            # Longer than the default second: the hung node's error comes at 2.5 s, not 1 s.
            answer, elapsed = ask(timeout=2.5)
            assert "deadline" in answer["replies"]["b@h1"]["error"] and elapsed >= 2.5
            answer, elapsed = ask(timeout=5, limit=1)
            assert answer["replies"] == {"a@h1": {"ok": "pong"}} and elapsed < 2
        answer, _ = ask(args={"_timeout": 5})
        assert "unknown argument '_timeout'" in answer["error"]
    finally:
        ctx.destroy(linger=0)


def flood(address: str, request: dict[str, Any], until: str, most: int = 20_000) -> list[str]:
    """Send copies of a request, 200 at a time, until a node error contains `until`; the
    node errors of the replies. (Batches: a ROUTER drops replies a slow reader lets pile up.)"""
    ctx = zmq.Context()
    try:
        dealer = connected_dealer(ctx, address)
        errors: list[str] = []
        for batch in range(0, most, 200):
            for i in range(batch, batch + 200):
                dealer.send(json.dumps({"v": 1, "id": str(i), **request}).encode())
            for _ in range(200):
                assert dealer.poll(10_000), "the arbiter stopped answering"
                for reply in json.loads(dealer.recv()).get("replies", {}).values():
                    errors.append(reply.get("error", ""))
            if any(until in e for e in errors):
                break
        return errors
    finally:
        ctx.destroy(linger=0)


# --- rate and time limits -----------------------------------------------------------------
def test_rate_limit_of_5_per_second_holds_over_20_tasks(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    fleet = fleet_with_ctltasks(make_fleet).start()
    stamps = tmp_path / "stamps.txt"
    assert "5/s" in fleet.ctl("rate-limit", "ctltasks.stamp", "5/s").stdout
    handles = fleet.client.submit_many([("ctltasks.stamp", (str(stamps),), {}) for _ in range(20)])
    # Another task type, queued behind all 20, does not wait for their tokens.
    assert fleet.client.submit("tasks.add", 2, 3).get(timeout=10) == 5
    assert len(stamps.read_text().splitlines()) < 15
    fleet.wait_all_final([h.id for h in handles], 30)
    starts = sorted(float(t) for t in stamps.read_text().split())
    assert len(starts) == 20
    assert starts[-1] - starts[0] >= 19 / 5 - 0.25
    assert min(starts[i + 5] - starts[i] for i in range(15)) >= 0.9  # never 6 within a second
    # 0 clears the limit.
    fleet.ctl("rate-limit", "ctltasks.stamp", "0")
    stamps.unlink()
    started = time.monotonic()
    handles = fleet.client.submit_many([("ctltasks.stamp", (str(stamps),), {}) for _ in range(20)])
    fleet.wait_all_final([h.id for h in handles], 30)
    assert time.monotonic() - started < 2.5
    _, data = ctl_json(fleet, "inspect", "conf")
    assert data["replies"]["w@h1"]["rate_limits"] == {}


def test_a_limit_for_a_name_no_task_has_is_kept_and_said_so(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet().start()
    code, data = ctl_json(fleet, "rate-limit", "tasks.ad", "5/s")  # a typo of tasks.add
    assert code == 0
    assert "no task tasks.ad on this node" in data["replies"]["w@h1"]["ok"]
    code, data = ctl_json(fleet, "time-limit", "tasks.ad", "--soft", "1", "--hard", "2")
    assert code == 0 and "no task tasks.ad" in data["replies"]["w@h1"]["ok"]
    _, data = ctl_json(fleet, "rate-limit", "tasks.add", "5/s")
    assert data["replies"]["w@h1"]["ok"] == "rate limit of tasks.add set to 5/s"
    _, data = ctl_json(fleet, "inspect", "conf")
    assert data["replies"]["w@h1"]["rate_limits"] == {"tasks.ad": "5/s", "tasks.add": "5/s"}


def test_time_limit_holds_for_tasks_that_start_afterwards(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet().start()
    before = fleet.client.submit("tasks.sleep", 2.5)
    wait_for(lambda: before.state == "STARTED", 10, message="the first task to start")
    out = fleet.ctl("time-limit", "tasks.sleep", "--soft", "0", "--hard", "1")
    assert "hard=1" in out.stdout
    after = fleet.client.submit("tasks.sleep", 2.5)
    infos = fleet.wait_all_final([before.id, after.id], 20)
    assert infos[0]["state"] == "SUCCESS"  # started before the limit: not held to it
    assert infos[1]["state"] == "FAILURE" and infos[1]["exc_type"] == "TimeLimitExceeded"
    assert (
        fleet.ctl("time-limit", "tasks.sleep", "--soft", "2", "--hard", "1", check=False).returncode
        == 2
    )


def test_limits_set_at_run_time_survive_a_reload_and_a_restart_until_cleared(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet(rate_limits={"tasks.add": "100/m"}).start()
    fleet.ctl("rate-limit", "tasks.add", "7/s")
    fleet.ctl("time-limit", "tasks.sleep", "--soft", "0", "--hard", "1")

    def limits() -> dict[str, Any]:
        _, data = ctl_json(fleet, "inspect", "conf")
        return data["replies"]["w@h1"]

    fleet.signal(signal.SIGHUP)
    wait_for(lambda: "reload complete" in fleet.log(), 15, message="the reload")
    fleet.wait_ready()
    conf = limits()
    assert conf["rate_limits"]["tasks.add"] == "7/s"
    assert conf["time_limits"]["tasks.sleep"] == {"soft": 0, "hard": 1}
    assert conf["limits_from"]["rate_limits"]["tasks.add"] == "fleetctl"
    assert conf["limits_from"]["time_limits"]["tasks.sleep"] == "fleetctl"
    fleet.signal(signal.SIGTERM)
    assert fleet.wait_exit(15) == 0
    fleet.start()
    assert limits()["rate_limits"]["tasks.add"] == "7/s"
    failed = fleet.client.submit("tasks.sleep", 5)
    assert fleet.wait_all_final([failed.id], 15)[0]["exc_type"] == "TimeLimitExceeded"
    assert "cleared" in fleet.ctl("rate-limit", "tasks.add", "0").stdout
    assert "cleared" in fleet.ctl("time-limit", "tasks.sleep", "--clear").stdout
    conf = limits()
    assert conf["rate_limits"]["tasks.add"] == "100/m"  # the config's again
    assert conf["limits_from"]["rate_limits"]["tasks.add"] == "config"
    assert "tasks.sleep" not in conf["time_limits"]
    fleet.signal(signal.SIGTERM)
    assert fleet.wait_exit(15) == 0
    fleet.start()
    assert limits()["rate_limits"] == {"tasks.add": "100/m"}
    assert fleet.ctl("time-limit", "tasks.sleep", check=False).returncode == 2


# --- revoke -----------------------------------------------------------------------------
def test_revoked_eta_task_never_runs_and_ends_revoked(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    fleet = make_fleet().start()
    ran = tmp_path / "ran.txt"
    later = fleet.client.submit("tasks.record", str(ran), "eta", countdown=1.5)
    _, data = ctl_json(fleet, "inspect", "scheduled")
    assert data["replies"]["w@h1"]["scheduled"] == {"default": 1}
    assert fleet.ctl("revoke", later.id).returncode == 0
    assert later.state == "REVOKED"
    time.sleep(2.0)  # past its ETA
    assert later.state == "REVOKED" and not ran.exists()
    _, data = ctl_json(fleet, "inspect", "revoked")
    assert later.id in data["replies"]["w@h1"]


def test_revoked_ids_persist_in_the_broker_across_restarts(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    fleet = make_fleet().start()
    ran = tmp_path / "ran.txt"
    fleet.ctl("revoke", "future-task-1", "future-task-2")
    fleet.stop()
    fleet.start()
    _, data = ctl_json(fleet, "inspect", "revoked")
    assert {"future-task-1", "future-task-2"} <= set(data["replies"]["w@h1"])
    handle = fleet.client.submit("tasks.record", str(ran), "x", task_id="future-task-1")
    assert fleet.client.submit("tasks.add", 1, 1).get(timeout=10) == 2
    assert fleet.wait_all_final([handle.id], 10)[0]["state"] == "REVOKED"
    assert not ran.exists()


@pytest.mark.parametrize("signal_name", ["TERM", "KILL"])
def test_revoke_with_terminate_ends_the_running_task(
    make_fleet: Callable[..., Fleet], tmp_path: Path, signal_name: str
) -> None:
    fleet = make_fleet().start()
    journal = tmp_path / "journal.txt"
    handle = fleet.client.submit("tasks.journal", str(journal), 30)
    wait_for(lambda: journal.exists() and journal.read_text(), 10, message="the task to start")
    child = int(journal.read_text().split()[2])
    code, data = ctl_json(fleet, "revoke", handle.id, "--terminate", "--signal", signal_name)
    assert code == 0 and data["replies"]["w@h1"]["terminated"] == [handle.id]
    assert fleet.wait_all_final([handle.id], 10)[0]["state"] == "REVOKED"
    wait_for(lambda: gone(child), 10, message="the child that ran it to go")
    assert journal.read_text().split()[0] == "S" and "E" not in journal.read_text().split()
    assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == 3  # the pool carries on
    assert fleet.ctl("revoke", "x", "--terminate", "--signal", "NOPE", check=False).returncode == 2


# --- inspect ---------------------------------------------------------------------------------
def test_inspect_lists_active_reserved_registered_stats_and_conf(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    fleet = make_fleet(defaults={"concurrency": 1, "prefetch": 1}).start()
    marker = tmp_path / "started.txt"
    gate = tmp_path / "gate"
    running = fleet.client.submit("tasks.hold", str(gate), str(marker))
    queued = fleet.client.submit("tasks.sleep", 0.1)
    wait_for(marker.exists, 10, message="the first task to start")

    def inspect(what: str) -> Any:
        code, data = ctl_json(fleet, "inspect", what)
        assert code == 0
        return data["replies"]["w@h1"]

    [active] = wait_for(lambda: inspect("active"), 5, message="an active task")
    assert active["id"] == running.id and active["name"] == "tasks.hold"
    assert active["pid"] in fleet.child_pids() and active["runtime"] >= 0
    assert [
        r["id"] for r in wait_for(lambda: inspect("reserved"), 5, message="a reserved task")
    ] == [queued.id]
    assert {"tasks.add", "tasks.sleep"} <= set(inspect("registered"))
    stats = inspect("stats")
    assert stats["pid"] in fleet.worker_pids() and stats["active"] == 1
    assert [c["task"] for c in stats["children"]] == [running.id]
    assert stats["children"][0]["rss"] > 1 << 20
    conf = inspect("conf")
    assert conf["concurrency"] == 1 and conf["queues"] == ["default"]
    text = fleet.ctl("inspect", "active").stdout
    assert running.id in text and "tasks.hold" in text
    gate.touch()
    fleet.wait_all_final([running.id, queued.id], 15)
    assert inspect("active") == [] and inspect("reserved") == []


# --- events ------------------------------------------------------------------------------
def test_a_reload_starts_each_task_once_in_the_events_too(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """A child that took the reload's TERM answered with its last outcome, and the worker
    began the next task in its pipe all the same: a task-started event (and a STARTED mark)
    for a task that child never ran, then another when the new generation ran it."""
    fleet = make_fleet(defaults={"concurrency": 1, "prefetch": 3}).start()
    fleet.ctl("events", "enable")
    journal = tmp_path / "journal.txt"
    with running_ctl(fleet, "--json", "events", "tail") as tail:
        tail.wait(lambda lines: any("heartbeat" in line for line in lines), 10, "a heartbeat")
        handles = [fleet.client.submit("tasks.journal", str(journal), 0.8) for _ in range(4)]
        wait_for(lambda: journal.exists() and journal.read_text(), 10, message="a task to start")
        fleet.signal(signal.SIGHUP)
        fleet.wait_all_final([h.id for h in handles], 30)
        ids = {h.id for h in handles}

        def started(lines: list[str]) -> list[str]:
            events = [json.loads(line) for line in lines if line.startswith("{")]
            return [e["id"] for e in events if e["type"] == "task-started" and e["id"] in ids]

        tail.wait(lambda lines: len(set(started(lines))) == 4, 10, "every start's event")
    assert sorted(started(tail.lines)) == sorted(ids)  # once each
    assert executions(journal) == {h.id: 1 for h in handles}


def test_events_tail_prints_task_and_worker_events_as_they_arrive(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    fleet = make_fleet(workers=TWO_NODES).start()
    code, data = ctl_json(fleet, "events", "enable", "--dest", "a@h1")
    assert code == 0 and set(data["replies"]) == {"a@h1"}
    with running_ctl(fleet, "--json", "events", "tail") as tail:
        tail.wait(
            lambda lines: any("worker-heartbeat" in line for line in lines), 10, "a heartbeat"
        )
        journal = tmp_path / "journal.txt"
        handles = [
            fleet.client.submit("tasks.add", 1, 2, queue="a"),
            fleet.client.submit("tasks.fail", queue="a"),
            fleet.client.submit("tasks.flaky", str(tmp_path / "flaky"), queue="a"),
            fleet.client.submit("tasks.journal", str(journal), 30, queue="a"),
            fleet.client.submit("tasks.add", 1, 2, queue="b"),
        ]  # b has events off
        wait_for(
            lambda: journal.exists() and journal.read_text(), 10, message="the long task to start"
        )
        fleet.ctl("revoke", handles[3].id, "--terminate")
        fleet.wait_all_final([h.id for h in handles], 20)

        def types(lines: list[str]) -> set[str]:
            return {json.loads(line)["type"] for line in lines if line.startswith("{")}

        task_events = {
            "task-received",
            "task-started",
            "task-succeeded",
            "task-failed",
            "task-retried",
            "task-revoked",
        }
        tail.wait(lambda lines: task_events <= types(lines), 10, f"the events {task_events}")
        # The arbiter remembers: a restarted worker comes up with its events on.
        a_pid = node_pids(fleet)["a@h1"]
        os.kill(a_pid, signal.SIGKILL)
        tail.wait(lambda lines: "worker-online" in types(lines), 15, "worker-online")
        fleet.ctl("shutdown", "--dest", "a@h1")
        tail.wait(lambda lines: "worker-offline" in types(lines), 15, "worker-offline")
        events = [json.loads(line) for line in tail.lines if line.startswith("{")]
    assert tail.proc.returncode == 0
    assert {e["node"] for e in events} == {"a@h1"}
    assert all(e["id"] != handles[4].id for e in events if "id" in e)


def test_events_disable_stops_them_and_tail_filters_by_dest(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet(workers=TWO_NODES).start()
    fleet.ctl("events", "enable")
    with running_ctl(fleet, "events", "tail", "--dest", "b@h1") as tail:
        tail.wait(
            lambda lines: any("worker-heartbeat" in line for line in lines), 10, "a heartbeat"
        )
        fleet.client.submit("tasks.add", 1, 2, queue="a").get(timeout=10)
        fleet.client.submit("tasks.add", 1, 2, queue="b").get(timeout=10)
        tail.wait(
            lambda lines: any("task-succeeded tasks.add" in line for line in lines), 10, "b's task"
        )
        fleet.ctl("events", "disable")
        time.sleep(QUIET)  # events published before the disable reach the tail
        seen = len(tail.lines)
        fleet.client.submit("tasks.add", 1, 2, queue="b").get(timeout=10)
        # Longer than a worker's heartbeat interval (1 s): no heartbeat event either.
        assert holds(lambda: len(tail.lines) == seen, 1.0 + QUIET), tail.lines[seen:]
    assert all(" b@h1 " in line for line in tail.lines), tail.lines


# --- pool, shutdown, reload, signals -------------------------------------------------------
def test_pool_grow_adds_children_and_shrink_retires_only_idle_ones(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    fleet = make_fleet().start()
    [worker_pid] = fleet.worker_pids()
    assert "pool is 4" in fleet.ctl("pool", "grow", "2").stdout
    wait_for(lambda: len(fleet.child_pids(worker_pid)) == 4, 10, message="4 children")
    marker = tmp_path / "started.txt"
    handles = fleet.client.submit_many([("tasks.sleep", (1.5, str(marker)), {}) for _ in range(4)])
    wait_for(
        lambda: marker.exists() and len(marker.read_text().splitlines()) == 4,
        10,
        message="4 tasks running",
    )
    busy = set(fleet.child_pids(worker_pid))
    assert "pool is 1" in fleet.ctl("pool", "shrink", "3").stdout
    assert holds(lambda: set(fleet.child_pids(worker_pid)) == busy), "a busy child retired"
    infos = fleet.wait_all_final([h.id for h in handles], 15)
    assert {i["state"] for i in infos} == {"SUCCESS"}
    wait_for(lambda: len(fleet.child_pids(worker_pid)) == 1, 10, message="the pool to shrink to 1")
    # SIGTTIN on the arbiter takes the same path as `pool grow`. Each change by hand is
    # logged, as autoscale's are: a signal has no other answer.
    fleet.signal(signal.SIGTTIN)
    wait_for(lambda: concurrency(fleet) == {"w@h1": 2}, 10, message="SIGTTIN to grow the pool")
    wait_for(lambda: "resized by hand: pool is 2" in fleet.log(), 10, message="the grow logged")
    assert "resized by hand: pool is 1" in fleet.log()  # the `pool shrink` above
    for _ in range(2):
        fleet.signal(signal.SIGTTOU)
    wait_for(
        lambda: "not resized: pool is 1: at the pool's min (1)" in fleet.log(),
        10,
        message="the TTOU past the pool's min logged",
    )
    assert fleet.ctl("pool", "shrink", "0", check=False).returncode == 2


def test_shutdown_of_one_node_leaves_the_others_and_of_the_host_is_a_warm_stop(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet(workers=TWO_NODES).start()
    code, data = ctl_json(fleet, "shutdown", "--dest", "a@h1")
    assert code == 0 and data["replies"] == {"a@h1": {"ok": "shutting down"}}
    wait_for(
        lambda: set(ctl_json(fleet, "ping")[1]["replies"]) == {"b@h1"}, 10, message="a to stop"
    )
    # Left out of the other commands, a node shut down on purpose is in status, STOPPED.
    code, data = ctl_json(fleet, "status")
    assert code == 0 and data["replies"]["a@h1"]["state"] == "STOPPED", data
    code, data = ctl_json(fleet, "status", "--dest", "a@h1")
    assert code == 0 and data["replies"]["a@h1"]["state"] == "STOPPED", data
    code, data = ctl_json(fleet, "shutdown")
    assert code == 0 and set(data["replies"]) == {"b@h1"}
    assert fleet.wait_exit(20) == 0


def test_dest_reaches_a_host_started_under_another_node_name(
    make_fleet: Callable[..., Fleet],
) -> None:
    """`fleetd start --node real`: fleetctl -c took the host for the config's `node` and
    sent it nothing that --dest named with its real name."""
    fleet = make_fleet(workers=TWO_NODES).start("--node", "real")
    code, data = ctl_json(fleet, "ping", "--dest", "real")
    assert code == 0 and set(data["replies"]) == {"a@real", "b@real"}, data
    code, data = ctl_json(fleet, "ping", "--dest", "b@real")
    assert code == 0 and set(data["replies"]) == {"b@real"}, data
    # Global options after the command, as before it: --endpoint (and --key, --server-key).
    out = fleetctl("ping", "--json", "--endpoint", endpoint(fleet))
    assert out.returncode == 0 and set(json.loads(out.stdout)["replies"]) == {"a@real", "b@real"}
    nowhere = f"ipc://{fleet.folder}/nowhere.sock"  # before the command, and kept
    out = fleetctl(
        "--endpoint", nowhere, "--timeout", "0.5", "ping", "--json", "--endpoint", endpoint(fleet)
    )
    data = json.loads(out.stdout)
    assert out.returncode == 1 and data["missing"] == [nowhere] and len(data["replies"]) == 2


def test_reload_starts_fresh_workers_and_refuses_a_broken_config(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet(workers=TWO_NODES).start()
    before = node_pids(fleet)
    code, data = ctl_json(fleet, "reload", "--dest", "a@h1")
    assert code == 1 and "whole host" in data["replies"]["a@h1"]["error"]
    code, data = ctl_json(fleet, "reload")
    assert code == 0 and data["replies"] == {
        "a@h1": {"ok": "reloading"},
        "b@h1": {"ok": "reloading"},
    }
    wait_for(
        lambda: (
            (p := node_pids(fleet)) and len(p) == 2 and not set(p.values()) & set(before.values())
        ),
        20,
        0.2,
        "a new generation of both workers",
    )
    good = fleet.config.read_text()
    fleet.config.write_text(
        good.replace('imports = ["tasks"]', 'imports = ["tasks", "no_such_module"]')
    )
    code, data = ctl_json(fleet, "reload")
    assert code == 1 and "no_such_module" in data["replies"]["a@h1"]["error"]
    # A FIFO where the config was held the reload in open() until something wrote into it,
    # and with it every signal and request of the host.
    fleet.config.unlink()
    os.mkfifo(fleet.config)
    fleet.signal(signal.SIGHUP)
    answer = fleetctl("--endpoint", endpoint(fleet), "--json", "ping", timeout=15)
    assert answer.returncode == 0 and len(json.loads(answer.stdout)["replies"]) == 2
    wait_for(lambda: "not a regular file" in fleet.log(), 10, message="the refused reload")
    fleet.config.unlink()
    fleet.config.write_text(good)
    assert ctl_json(fleet, "ping")[0] == 0


# --- status and top ---------------------------------------------------------------------------
def test_status_shows_hosts_nodes_and_children_with_pid_task_rss_and_uptime(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    fleet = make_fleet(workers=TWO_NODES).start()
    marker = tmp_path / "started.txt"
    fleet.client.submit("tasks.sleep", 3, str(marker), queue="a")
    wait_for(marker.exists, 10, message="a task to start")
    code, data = ctl_json(fleet, "status")
    assert code == 0 and set(data["replies"]) == {"a@h1", "b@h1"}
    a = data["replies"]["a@h1"]
    assert a["state"] == "RUNNING" and a["pid"] in fleet.worker_pids() and a["rss"] > 1 << 20
    busy = [c for c in a["children"] if c["state"] == "busy"]
    assert len(busy) == 1 and busy[0]["task_name"] == "tasks.sleep" and busy[0]["rss"] > 1 << 20
    assert all(c["pid"] in fleet.child_pids() for c in a["children"])
    text = fleet.ctl("status").stdout
    for word in ("h1", "a@h1", "b@h1", "RUNNING", "tasks.sleep", "MiB", str(busy[0]["pid"])):
        assert word in text, (word, text)


def test_top_shows_the_fleet_until_interrupted(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet().start()
    with running_ctl(fleet, "top") as top:  # into a pipe: a table a second, as `top -b`

        def tables(lines: list[str]) -> int:
            return sum("RUNNING" in line and "w@h1" in line for line in lines)

        top.wait(lambda lines: tables(lines) >= 2, 15, "two tables")
    assert top.proc.returncode == 0
    with running_ctl(fleet, "--json", "top") as top:  # what `--json status` prints, a line each

        def views(lines: list[str]) -> list[dict[str, Any]]:
            return [json.loads(line)["replies"]["w@h1"] for line in lines]

        top.wait(lambda lines: len(lines) >= 2, 15, "two JSON lines")
    assert top.proc.returncode == 0
    assert all(v["state"] == "RUNNING" and v["children"] for v in views(top.lines)), top.lines


@pytest.mark.parametrize(
    ("argv", "code"),
    [(["top"], 0), (["--json", "top"], 0), (["queues"], 1), (["--json", "queues"], 1)],
)
def test_fleetctl_into_a_reader_that_left_ends_quietly(
    make_fleet: Callable[..., Fleet], argv: list[str], code: int
) -> None:
    """`fleetctl top | head`: the reader gone is the end of a stream, as Ctrl-C, where it
    exited 1 (tables) or said "cannot write the output: Broken pipe" (JSON). Any other
    command exits 1, quietly, with its output cut short."""
    fleet = make_fleet().start()
    proc = popen_ctl(fleet, *argv, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        if "top" in argv:
            assert proc.stdout.readline()  # a stream: what head reads before it leaves
        proc.stdout.close()
        _, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert (proc.returncode, stderr) == (code, "")


# --- custom commands -------------------------------------------------------------------------
def test_custom_control_commands_run_in_every_worker(make_fleet: Callable[..., Fleet]) -> None:
    fleet = fleet_with_ctltasks(make_fleet, workers=TWO_NODES).start()
    code, data = ctl_json(fleet, "call", "hello", "who=ops")
    assert code == 0
    assert data["replies"] == {
        "a@h1": {"ok": "hello ops from a@h1"},
        "b@h1": {"ok": "hello ops from b@h1"},
    }
    code, data = ctl_json(fleet, "call", "hello", "nobody=1")
    assert code == 1 and "unknown argument 'nobody'" in data["replies"]["a@h1"]["error"]
    code, data = ctl_json(fleet, "call", "boom", "--dest", "b@h1")
    assert code == 1 and data["replies"] == {"b@h1": {"error": "RuntimeError: boom"}}
    code, data = ctl_json(fleet, "call", "not_json", "--dest", "a@h1")
    assert code == 1 and "not JSON" in data["replies"]["a@h1"]["error"]
    code, data = ctl_json(fleet, "call", "nan", "--dest", "a@h1")  # fleetctl's JSON: strict
    assert code == 1 and "not JSON" in data["replies"]["a@h1"]["error"]
    code, data = ctl_json(fleet, "call", "nonexistent")
    assert code == 1 and data["replies"] == {} and "unknown command" in data["errors"]["h1"]
    assert ctl_json(fleet, "ping")[0] == 0


@pytest.mark.parametrize(
    ("how", "error"), [("exit", "SystemExit: 0"), ("interrupt", "KeyboardInterrupt")]
)
def test_a_custom_command_that_exits_fails_alone_and_the_worker_and_its_task_go_on(
    make_fleet: Callable[..., Fleet], tmp_path: Path, how: str, error: str
) -> None:
    """sys.exit() or KeyboardInterrupt in a custom command, what ends a script, would end the
    worker it runs in, and the task its child runs, to run again: it is that command's
    error instead."""
    fleet = fleet_with_ctltasks(make_fleet).start()
    [worker] = fleet.worker_pids()
    marker = tmp_path / "started.txt"
    handle = fleet.client.submit("tasks.sleep", 1.0, str(marker))
    wait_for(marker.exists, 10, message="the task to start")
    code, data = ctl_json(fleet, "call", "leave", f"how={how}")
    assert code == 1 and data["replies"] == {"w@h1": {"error": error}}
    assert handle.get(timeout=10) in fleet.child_pids()
    assert handle.info()["deliveries"] == 1 and marker.read_text().count("start") == 1
    assert fleet.worker_pids() == [worker]


def test_a_custom_commands_reply_too_deep_too_big_or_from_a_forked_copy_costs_nothing(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """A reply nested past the JSON encoder's depth killed the worker (RecursionError); one of
    50 MiB went through the arbiter's memory and past fleetctl's timeout; a command that
    forked left a second worker running the loop on the same pipes and links (the tasks
    handed to its children hung STARTED). Each is now that command's error, or (the fork) the
    parent's answer alone."""
    fleet = fleet_with_ctltasks(make_fleet).start()
    [worker] = fleet.worker_pids()
    code, data = ctl_json(fleet, "call", "deep")
    assert code == 1 and "is not JSON" in data["replies"]["w@h1"]["error"]
    code, data = ctl_json(fleet, "call", "huge")
    assert code == 1 and "over the 1 MiB" in data["replies"]["w@h1"]["error"]
    code, data = ctl_json(fleet, "call", "forks")
    assert code == 0 and data["replies"]["w@h1"] > 0  # the parent's answer: the copy's pid
    copy = data["replies"]["w@h1"]

    def copy_gone() -> bool:
        try:
            return psutil.Process(copy).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(copy_gone, 10, message="the forked copy to end")
    handles = fleet.client.submit_many([("tasks.add", (i, 1), {}) for i in range(20)])
    assert [h.get(timeout=10) for h in handles] == [i + 1 for i in range(20)]
    assert fleet.worker_pids() == [worker]
    assert len(psutil.Process(worker).children()) == 2  # its pool, and nothing else


def test_custom_commands_one_after_the_other_keep_the_leases_of_the_running_task(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """Commands that came in one read ran back to back, each within its time limit but
    together past the lease: the other worker took the running task, which ran twice."""
    fleet = fleet_with_ctltasks(
        make_fleet,
        fleet={"lease": 2},
        workers=[{"name": "a", "queues": ["q"]}, {"name": "b", "queues": ["q"]}],
        defaults={"concurrency": 1, "prefetch": 0},
    ).start()
    marker = tmp_path / "started.txt"
    handle = fleet.client.submit("tasks.sleep", 7.0, str(marker), queue="q")
    wait_for(marker.exists, 10, message="the task to start")
    _, data = ctl_json(fleet, "inspect", "active")
    [node] = [node for node, active in data["replies"].items() if active]
    calls = [
        subprocess.Popen(
            [FLEETCTL, "-c", str(fleet.config), "--timeout", "30", "call", "slow"]
            + ["seconds=1.5", "--dest", node],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(4)
    ]
    try:
        assert [call.wait(60) for call in calls] == [0] * 4
    finally:
        for call in calls:
            if call.poll() is None:
                call.kill()
                call.wait(5)
    assert handle.get(timeout=20) in fleet.child_pids()
    assert handle.info()["deliveries"] == 1 and marker.read_text().count("start") == 1


def test_a_custom_command_that_hangs_is_interrupted_at_its_time_limit_and_the_worker_goes_on(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """A command holds its worker's loop. One that hangs (a network call without a timeout,
    say) would leave the worker silent until the arbiter killed it, and the task its child
    runs with it, to run again: it is interrupted at COMMAND_TIME_LIMIT (here 0.5 s, set by
    a task module) and answers with that error; the worker and its task go on."""
    fleet = fleet_with_ctltasks(make_fleet, fleet={"imports": ["tasks", "ctltasks", "quick"]})
    (fleet.folder / "quick.py").write_text(
        "import worker.channel\nworker.channel.COMMAND_TIME_LIMIT = 0.5\n"
    )
    fleet.start()
    [worker] = fleet.worker_pids()
    marker = tmp_path / "started.txt"
    handle = fleet.client.submit("tasks.sleep", 1.0, str(marker))
    wait_for(marker.exists, 10, message="the task to start")
    code, data = ctl_json(fleet, "--timeout", "5", "call", "hang")
    reply = data["replies"]["w@h1"]
    assert code == 1 and reply["error"].startswith("CommandTimeLimit: ran past 0.5s"), data
    assert handle.get(timeout=10) in fleet.child_pids()
    assert handle.info()["deliveries"] == 1 and marker.read_text().count("start") == 1
    assert fleet.worker_pids() == [worker]
    assert "took the worker's" not in fleet.log()
    assert ctl_json(fleet, "call", "hello")[1]["replies"]["w@h1"] == {"ok": "hello world from w@h1"}


# --- security -------------------------------------------------------------------------------
def free_port_pair() -> int:
    """A free tcp port whose next one is free too: the control port and its events port."""
    for _ in range(100):
        with socket.socket() as control, socket.socket() as events:
            control.bind(("127.0.0.1", 0))
            port = int(control.getsockname()[1])
            with contextlib.suppress(OSError):
                events.bind(("127.0.0.1", port + 1))
                return port
    raise AssertionError("no two free ports in a row")


def keygen(folder: Path) -> tuple[Path, Path]:
    out = fleetctl("keygen", str(folder))
    assert out.returncode == 0, out.stderr
    return folder / "fleet.key", folder / "fleet.key_secret"


def test_over_tcp_only_a_client_with_an_authorized_key_gets_an_answer(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    server_public, server_secret = keygen(tmp_path / "server")
    client_public, client_secret = keygen(tmp_path / "client")
    _, stranger_secret = keygen(tmp_path / "stranger")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "ops.key").write_text(client_public.read_text())
    for attempt in range(5):  # another process may take the ports between our probe and bind
        tcp = f"tcp://127.0.0.1:{free_port_pair()}"
        fleet = make_fleet(
            f"host{attempt}",
            control={
                "bind": ["ipc://state/control.sock", tcp],
                "curve_secret_key": str(server_secret),
                "authorized_keys": str(authorized),
            },
        ).start(wait=False)
        with contextlib.suppress(AssertionError):
            fleet.wait_ready()
            break
        assert "Address already in use" in fleet.log(), fleet.log()

    def ping(key: Path) -> subprocess.CompletedProcess[str]:
        return fleetctl(
            "--endpoint",
            tcp,
            "--key",
            str(key),
            "--server-key",
            str(server_public),
            "--json",
            "--timeout",
            "1",
            "ping",
        )

    ok = ping(client_secret)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["replies"] == {"w@h1": {"ok": "pong"}}
    refused = ping(stranger_secret)
    assert refused.returncode == 1
    assert json.loads(refused.stdout) == {
        "replies": {},
        "missing": [tcp],
        "elapsed": json.loads(refused.stdout)["elapsed"],
    }
    missing_keys = fleetctl("--endpoint", tcp, "ping")
    assert missing_keys.returncode == 2 and "--key" in missing_keys.stderr
    # The ipc socket lives in a folder only its owner can enter.
    assert (fleet.folder / "state").stat().st_mode & 0o777 == 0o700


def test_tcp_bind_without_keys_is_refused_by_check_and_start(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet(control={"bind": [f"tcp://127.0.0.1:{free_port()}"]})
    for command in ("check", "start"):
        out = fleetd(command, "-c", str(fleet.config))
        assert out.returncode == 2, (command, out.stdout, out.stderr)
        assert "control.bind" in out.stderr and "curve_secret_key" in out.stderr


@pytest.mark.parametrize(
    "wrong",
    [
        "missing-secret",
        "garbage-secret",
        "no-folder",
        "garbage-key",
        "not-z85-secret",
        "fifo-secret",  # check and start waited for someone to write into it
        "fifo-key",
    ],
)
def test_curve_keys_that_cannot_be_read_are_refused_by_check_as_by_start(
    make_fleet: Callable[..., Fleet], tmp_path: Path, wrong: str
) -> None:
    """A secret key file that is not there or holds no key, an authorized_keys folder that is
    not there or holds a *.key file with no key: `fleetd start` refused each (exit 2), but
    `fleetd check`, the command a deploy runs first, said ok."""
    _, server_secret = keygen(tmp_path / "server")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    if wrong == "garbage-secret":
        server_secret = tmp_path / "junk.key_secret"
        server_secret.write_text("junk\n")
    if wrong == "garbage-key":
        (authorized / "junk.key").write_text("junk\n")
    if wrong == "fifo-secret":
        server_secret = tmp_path / "fifo.key_secret"
        os.mkfifo(server_secret)
    if wrong == "fifo-key":
        os.mkfifo(authorized / "fifo.key")
    if wrong == "not-z85-secret":  # 40 characters, one of them no Z85: start's traceback
        text = server_secret.read_text()
        secret = text.split('secret-key = "')[1][:40]
        server_secret = tmp_path / "odd.key_secret"
        server_secret.write_text(text.replace(secret, "~" + secret[1:]))
    fleet = make_fleet(
        control={
            "bind": ["ipc://state/control.sock", f"tcp://127.0.0.1:{free_port()}"],
            "curve_secret_key": str(
                tmp_path / "nothing" if wrong == "missing-secret" else server_secret
            ),
            "authorized_keys": str(tmp_path / "nowhere" if wrong == "no-folder" else authorized),
        }
    )
    lines = []
    for command in ("check", "start"):
        out = fleetd(command, "-c", str(fleet.config))
        assert out.returncode == 2, (command, out.stdout, out.stderr)
        lines.append(out.stderr.splitlines()[-1])
    assert lines[0] == lines[1] and lines[0].startswith(f"fleetd: {fleet.config}: control."), lines


def test_a_control_port_in_use_ends_the_start_and_the_workers_it_spawned(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """The workers are spawned before the control plane binds; a bind that fails stops them."""
    _, server_secret = keygen(tmp_path / "server")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fleet = make_fleet(
            control={
                "bind": ["ipc://state/control.sock", f"tcp://127.0.0.1:{port}"],
                "curve_secret_key": str(server_secret),
                "authorized_keys": str(tmp_path),
            }
        )
        out = subprocess.run(
            [FLEETD, "start", "-c", str(fleet.config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=fleet.folder,
        )
    assert out.returncode == 2, out.stderr
    assert "in use" in out.stderr
    spawned = json.loads((fleet.folder / "state" / "run.json").read_text())["processes"]
    assert spawned, "the worker was spawned before the bind"
    for record in spawned:
        assert gone(record["pid"])
    assert not (fleet.folder / "state" / "fleetd.pid").exists()


def test_keygen_writes_a_pair_and_never_overwrites_it(tmp_path: Path) -> None:
    public, secret = keygen(tmp_path / "keys")
    assert secret.stat().st_mode & 0o777 == 0o600 and "public-key" in public.read_text()
    again = fleetctl("keygen", str(tmp_path / "keys"))
    assert again.returncode == 2 and "exists" in again.stderr
    as_json = fleetctl("--json", "keygen", str(tmp_path / "more"))  # it printed plain text
    assert json.loads(as_json.stdout) == {
        "public": str(tmp_path / "more" / "fleet.key"),
        "secret": str(tmp_path / "more" / "fleet.key_secret"),
    }


# --- bad input --------------------------------------------------------------------------------
def test_a_burst_of_malformed_and_random_messages_leaves_the_arbiter_answering_ping(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet(workers=TWO_NODES).start()
    before = node_pids(fleet)
    rng = random.Random(5)
    valid = {"v": 1, "id": "x", "cmd": "ping"}
    bad_requests: list[list[bytes]] = [
        [b"{not json"],
        [b"[1, 2]"],
        [b"\xff" * 10],
        [b""],
        [b"{}", b"{}"],
        [json.dumps({**valid, "v": 2}).encode()],
        [json.dumps({**valid, "cmd": "no_such_command"}).encode()],
        [json.dumps({**valid, "cmd": "pool_grow", "args": {"n": "lots"}}).encode()],
        [json.dumps({**valid, "cmd": "rate_limit", "args": {"task": 5, "rate": "1/s"}}).encode()],
        [json.dumps({**valid, "cmd": "shutdown", "args": {"now": True}}).encode()],
        [json.dumps({**valid, "cmd": "revoke", "args": {"ids": "not-a-list"}}).encode()],
        # Each ended the arbiter in a traceback, and the host with it:
        [json.dumps({**valid, "cmd": "start", "args": {"nodes": [1]}}).encode()],
        [json.dumps({**valid, "cmd": "revoke", "args": {"ids": ["a"], "signal": "²"}}).encode()],
        [
            json.dumps(
                {**valid, "cmd": "revoke", "args": {"ids": ["a"], "signal": "9" * 5000}}
            ).encode()
        ],
        [json.dumps({**valid, "dest": "h1"}).encode()],
        [b'{"v": 1, "id": "x", "cmd": "ping", "timeout": NaN}'],
        [b'{"v": 1, "id": "x", "cmd": "ping", "timeout": 1' + b"0" * 400 + b"}"],  # no float
        [json.dumps({**valid, "limit": 0}).encode()],
        [b"[" * 100_000],
        [b"a" * 600_000, b"b" * 600_000],
    ]
    ctx = zmq.Context()
    try:
        peer = connected_dealer(ctx, endpoint(fleet))
        sent = 0
        for i in range(600):
            if i % 3:
                frames = rng.choice(bad_requests)
            else:
                frames = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(rng.randrange(1, 4))]
            peer.send_multipart(frames)
            sent += 1
        with contextlib.closing(ctx.socket(zmq.DEALER)) as oversize:  # libzmq drops its connection
            oversize.linger = 0
            oversize.connect(endpoint(fleet))
            oversize.send(b"x" * (2 << 20))
        started = time.monotonic()
        code, data = ctl_json(fleet, "--timeout", "5", "ping")
        assert code == 0 and set(data["replies"]) == {"a@h1", "b@h1"} and data["elapsed"] < 1
        assert time.monotonic() - started < 3
        answers = []
        while len(answers) < sent and peer.poll(5000):
            answers.append(json.loads(peer.recv()))
    finally:
        ctx.destroy(linger=0)
    errors = [a for a in answers if "error" in a]
    assert len(answers) == sent and len(errors) >= sent * 0.6, (len(answers), len(errors))
    assert node_pids(fleet) == before and fleet.proc is not None and fleet.proc.poll() is None
    assert "refused" in fleet.log()


def refusals_in(line: str) -> int:
    """How many refused requests an arbiter's log line stands for: a line of its own, or the
    last of a flood's interval with their count."""
    if "control request refused " not in line:
        return 0
    count = re.search(r"\(the last of (\d+) such lines in ", line)
    return int(count.group(1)) if count else 1


def test_a_flood_of_bad_requests_is_a_few_log_lines_that_count_them_all(
    make_fleet: Callable[..., Fleet],
) -> None:
    """A peer that sent 2.4 million bad requests in 8 s wrote 210,737 warnings: a hostile or
    buggy client could fill the disk with the arbiter's log (journald's, in production).
    Each still gets its error reply, whether the frame or the command is bad; the log gets
    the first of a kind, then one line per BAD_REQUEST_LOG_INTERVAL: the last, with how many
    there were."""
    fleet = make_fleet().start()
    bad = [
        [b"{not json"],
        [b"[1, 2]"],
        [b'{"v": 2, "id": "x", "cmd": "ping"}'],
        [b'{"v": 1, "id": "x", "cmd": "ping", "dest": "h1"}'],
        [b"{}", b"{}"],
        [b'{"v": 1, "id": "x", "cmd": "no-such-command"}'],  # refused by the router
        [b'{"v": 1, "id": "x", "cmd": "pool_grow", "args": {"n": "many"}}'],
    ]
    sent = 20_000
    ctx = zmq.Context()
    try:
        peer = connected_dealer(ctx, endpoint(fleet))
        errors = 0
        started = time.monotonic()
        for batch in range(0, sent, 200):  # a ROUTER drops replies a slow reader lets pile up
            for i in range(batch, batch + 200):
                peer.send_multipart(bad[i % len(bad)])
            for _ in range(200):
                assert peer.poll(10_000), "the arbiter stopped answering"
                errors += "error" in json.loads(peer.recv())
        elapsed = time.monotonic() - started
        assert errors == sent

        def every_refusal_counted() -> bool:  # the last count is said with a later request
            peer.send(json.dumps({"v": 1, "id": "p", "cmd": "ping"}).encode())
            assert peer.poll(10_000), "the arbiter stopped answering"
            assert json.loads(peer.recv())["replies"] == {"w@h1": {"ok": "pong"}}
            return sum(refusals_in(line) for line in fleet.log().splitlines()) == sent

        wait_for(every_refusal_counted, 10, 0.1, "the log to count every refusal")
    finally:
        ctx.destroy(linger=0)
    lines = [line for line in fleet.log().splitlines() if refusals_in(line)]
    kinds = 2  # a request the server refuses, and a command the router refuses
    assert len(lines) <= kinds * (elapsed / BAD_REQUEST_LOG_INTERVAL + 2), (len(lines), elapsed)
    assert "Traceback" not in fleet.log()
    code, data = ctl_json(fleet, "ping")
    assert code == 0 and data["replies"] == {"w@h1": {"ok": "pong"}}


def test_numbers_no_float_holds_are_refused_in_one_line_and_nothing_is_set(
    make_fleet: Callable[..., Fleet],
) -> None:
    """JSON's integers have no bound: one of 400 digits as a request's timeout ended the
    arbiter (OverflowError), as a time limit it came back as that error's text, and as a
    rate (or a rate's digits) it was set, and saved for the next start."""
    fleet = make_fleet().start()
    huge = "1" + "0" * 400
    requests = {
        "timeout": f'{{"v": 1, "id": "t", "cmd": "ping", "timeout": {huge}}}',
        "soft": f'{{"v": 1, "id": "s", "cmd": "time_limit", "args": {{"task": "tasks.add",'
        f' "soft": {huge}, "hard": 1}}}}',
        "rate": f'{{"v": 1, "id": "r", "cmd": "rate_limit", "args": {{"task": "tasks.add",'
        f' "rate": {huge}}}}}',
        "digits": f'{{"v": 1, "id": "d", "cmd": "rate_limit", "args": {{"task": "tasks.add",'
        f' "rate": "{huge}/s"}}}}',
    }
    ctx = zmq.Context()
    answers = {}
    try:
        peer = connected_dealer(ctx, endpoint(fleet))
        for name, request in requests.items():
            peer.send(request.encode())
            assert peer.poll(10_000), f"no answer to the {name} request"
            answers[name] = json.loads(peer.recv())
    finally:
        ctx.destroy(linger=0)
    assert "timeout" in answers["timeout"]["error"]
    assert answers["soft"]["error"] == "time_limit: soft must be a finite number"
    assert answers["rate"]["error"] == "rate_limit: rate must be a finite number"
    assert answers["digits"]["error"].endswith("...' is too large")
    assert all("\n" not in json.dumps(a) for a in answers.values())
    code, data = ctl_json(fleet, "inspect", "conf")
    assert code == 0 and "tasks.add" not in json.dumps(data["replies"]["w@h1"].get("limits_from"))
    assert fleet.proc is not None and fleet.proc.poll() is None


# --- exit codes ------------------------------------------------------------------------------
def test_exit_codes_are_0_ok_1_no_answer_2_usage(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    assert fleetctl("frobnicate").returncode == 2
    assert fleetctl("ping").returncode == 2  # no config, no endpoint
    assert fleetctl("--timeout", "-1", "ping").returncode == 2
    nobody = f"ipc://{tmp_path}/nobody/control.sock"
    started = time.monotonic()
    out = fleetctl("--endpoint", nobody, "--timeout", "0.3", "--json", "ping")
    assert out.returncode == 1 and json.loads(out.stdout)["missing"] == [nobody]
    assert time.monotonic() - started < 3
    fleet = make_fleet().start()
    assert fleet.ctl("ping").returncode == 0
    assert fleet.ctl("rate-limit", "tasks.add", "fast", check=False).returncode == 2
    assert fleet.ctl("call", "hello", "who", check=False).returncode == 2

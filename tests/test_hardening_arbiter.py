"""The arbiter and its workers under hostile conditions: a full disk, a hung worker, a queue
locked by someone else, a worker killed right after a fork, a pool bigger than the open-files
limit.

Real fleets, real signals, a real full filesystem (a small tmpfs, which needs root): each
test asserts that the arbiter keeps serving and that no task is lost, run twice or leaves
a process behind.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

from supervisor.states import FATAL_AFTER
from tests.conftest import fill
from tests.fleet import FLEETD, Fleet, alive, executions, free_port, wait_for
from worker.brokers.base import FAIL_FAST_WAIT
from worker.tree import STRAY_SIGNALS

pytestmark = pytest.mark.timeout(120)

HARD_TASKS = '''
import os, signal, subprocess, sys, time
from worker import task, control_command

HELD = []

def take_signals():
    """What code that is not fleetd's does to the worker it runs in (a task module at its
    import, a custom command): each line alone breaks a warm shutdown or the reaping."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # an app's "graceful" exit
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # a daemon library's habit
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGUSR1})
    signal.set_wakeup_fd(-1)

@control_command
def meddle(worker):
    take_signals()
    return {"ok": "taken"}

@task
def spawn_sleep(pidfile):
    """`sleep 600` in the child's own process group; its pid goes to `pidfile`. A redelivery
    (after the kill that the test makes) has nothing more to show and returns."""
    if os.path.exists(pidfile):
        return "redelivered"
    proc = subprocess.Popen(["sleep", "600"])
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(proc.pid))
    os.rename(pidfile + ".tmp", pidfile)
    time.sleep(600)

@control_command
def size_of(worker, blob=""):
    return {"ok": len(blob)}

@control_command
def hold_fds(worker):
    """Open /dev/null until the worker has no descriptor left."""
    try:
        while True:
            HELD.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    return {"ok": len(HELD)}

@control_command
def release_fds(worker):
    count = len(HELD)
    while HELD:
        os.close(HELD.pop())
    return {"ok": count}
'''

TWO_NODES = [{"name": "a", "queues": ["a"]}, {"name": "b", "queues": ["b"]}]
FD_LIMIT = 128  # the open-files limit the fd tests start fleetd under


def hard_fleet(make_fleet: Callable[..., Fleet], **kwargs: Any) -> Fleet:
    fleet = make_fleet(
        fleet={"imports": ["tasks", "hardtasks"], **kwargs.pop("fleet", {})}, **kwargs
    )
    (fleet.folder / "hardtasks.py").write_text(HARD_TASKS)
    return fleet


def replies(fleet: Fleet, *args: str) -> dict[str, Any]:
    out = fleet.ctl("--json", *args, check=False)
    try:
        return dict(json.loads(out.stdout)["replies"])
    except (ValueError, KeyError):
        raise AssertionError(f"fleetctl {args}: {out.stdout}{out.stderr}") from None


def serving(fleet: Fleet) -> bool:
    assert fleet.proc is not None
    assert fleet.proc.poll() is None, f"fleetd exited with {fleet.proc.returncode}:\n{fleet.log()}"
    return True


# --- a full disk ------------------------------------------------------------------------------
def test_a_full_state_dir_leaves_the_arbiter_serving_and_no_task_lost_or_run_twice(
    small_disk: Path, make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    # The documented layout: the run record and the SQLite queue in one folder.
    fleet = make_fleet(
        fleet={"broker": "sqlite:///state/queue.db", "state_dir": "state"},
        defaults={"concurrency": 2, "max_tasks_per_child": 1},  # a new child (and record) per task
    ).start()
    journal = tmp_path / "journal.txt"
    ids = [
        h.id for h in fleet.client.submit_many([("tasks.journal", (str(journal), 0.2), {})] * 30)
    ]
    wait_for(lambda: len(executions(journal)) >= 2, 10, message="the first tasks to start")
    filler = fill(small_disk)
    fleet.ctl("pool", "grow", "1")  # a new child for the run record, whatever the tasks do
    wait_for(
        lambda: serving(fleet) and "cannot write" in fleet.log(),
        10,
        message="the arbiter to fail to write its run record",
    )
    # Retried every second, logged once.
    wait_for(
        lambda: serving(fleet) and fleet.log().count("still cannot write") >= 2,
        10,
        message="two more tries",
    )
    assert replies(fleet, "--timeout", "2", "ping") == {"w@h1": {"ok": "pong"}}
    assert len(re.findall(r"WARNING.*cannot write .*run\.json", fleet.log())) == 1, fleet.log()
    filler.unlink()
    wait_for(lambda: "written again" in fleet.log(), 10, message="the run record to be written")
    infos = fleet.wait_all_final(ids, 60)
    assert [i["state"] for i in infos] == ["SUCCESS"] * len(ids)
    assert executions(journal) == {i: 1 for i in ids}
    record = json.loads((small_disk / "run.json").read_text())
    assert fleet.worker_pids()[0] in [p["pid"] for p in record["processes"]]
    fleet.signal(signal.SIGTERM)
    assert fleet.wait_exit(20) == 0
    assert not (small_disk / "fleetd.pid").exists() and not (small_disk / "control.sock").exists()


def test_fleetd_stop_of_a_fleet_whose_pidfile_a_full_disk_keeps_out_says_so(
    small_disk: Path, make_fleet: Callable[..., Fleet]
) -> None:
    """It said "no pidfile: is fleetd running?" of a fleet that runs."""
    fleet = make_fleet().start()
    fill(small_disk)
    (small_disk / "fleetd.pid").unlink()  # not put back: no room for it
    stop = subprocess.run(
        [FLEETD, "stop", "-c", str(fleet.config)], capture_output=True, text=True, timeout=30
    )
    assert stop.returncode == 1
    assert "a fleetd runs on state_dir" in stop.stderr and "is missing" in stop.stderr, stop
    assert "fleetctl shutdown" in stop.stderr
    assert replies(fleet, "ping") == {"w@h1": {"ok": "pong"}}


def test_a_state_dir_removed_from_under_the_fleet_is_put_back_within_a_second(
    make_fleet: Callable[..., Fleet],
) -> None:
    """An rm -rf of the state dir (or a /tmp cleaner) while the fleet runs took its lock,
    pidfile and control sockets: fleetctl found no fleet, `fleetd stop` no pidfile, and a
    second `fleetd start` ran a second fleet on the same queue. The arbiter puts them back:
    fleetctl and `fleetd stop` reach it again, and a second start is refused."""
    fleet = make_fleet().start()  # its queue beside the state dir, not in it
    state = fleet.folder / "state"
    shutil.rmtree(state)
    put_back = ["fleetd.lock", "fleetd.pid", "control.sock", "events.sock", "run.json"]
    wait_for(
        lambda: all((state / name).exists() for name in put_back),
        5,
        message="the state dir to be put back",
    )
    record = json.loads((state / "run.json").read_text())  # what the next start would end
    assert fleet.worker_pids()[0] in [p["pid"] for p in record["processes"]]
    assert replies(fleet, "ping") == {"w@h1": {"ok": "pong"}}
    second = subprocess.run(
        [FLEETD, "start", "-c", str(fleet.config)], capture_output=True, text=True, timeout=30
    )
    assert second.returncode == 1 and "already runs on state_dir" in second.stderr, second
    assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == 3
    assert "fleetd.lock was removed: locked again" in fleet.log()
    stop = subprocess.run(
        [FLEETD, "stop", "-c", str(fleet.config)], capture_output=True, text=True, timeout=30
    )
    assert stop.returncode == 0, stop
    assert fleet.wait_exit(20) == 0


# --- stray signals ----------------------------------------------------------------------------
def test_stray_signals_are_logged_and_ignored_by_the_arbiter_and_its_workers(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """USR2 (gunicorn's upgrade, supervisord's log reopening), ALRM, IO, PWR, XFSZ ... mean
    nothing to fleetd, and their default action would end the process: the arbiter and its
    workers log each and go on, nothing restarts, no task is lost or runs twice."""
    fleet = make_fleet().start()
    [worker] = fleet.worker_pids()
    journal = tmp_path / "journal.txt"
    handles = fleet.client.submit_many([("tasks.journal", (str(journal), 0.02), {})] * 40)
    wait_for(lambda: executions(journal), 10, message="the tasks to start")
    for signum in STRAY_SIGNALS:
        fleet.signal(signum)
        os.kill(worker, signum)
    infos = fleet.wait_all_final([h.id for h in handles], 30)
    assert [i["state"] for i in infos] == ["SUCCESS"] * len(handles)
    assert executions(journal) == {h.id: 1 for h in handles}
    wait_for(
        lambda: fleet.log().count("means nothing") == 2 * len(STRAY_SIGNALS),
        5,
        message="a line for each signal",
    )
    assert fleet.worker_pids() == [worker] and serving(fleet)
    fleet.signal(signal.SIGTERM)
    assert fleet.wait_exit(20) == 0


@pytest.mark.parametrize("how", ["import", "command"])
def test_the_signals_that_code_not_ours_takes_from_a_worker_are_taken_back_and_named(
    make_fleet: Callable[..., Fleet], tmp_path: Path, how: str
) -> None:
    """A task module at its import, or a custom command, installs an app's SIGTERM handler
    that exits, ignores SIGCHLD, puts SIGPIPE back to its default, blocks INT and USR1 and
    unsets the signal wake-up descriptor (`take_signals`). The worker takes each back and
    names it in the log: a TERM is still a warm shutdown, whose running tasks finish once
    while the one waiting goes back unstarted, for the next start to run once."""
    imports = ["tasks", "hardtasks", *(["meddler"] if how == "import" else [])]
    fleet = hard_fleet(
        make_fleet,
        fleet={"imports": imports},
        workers=[{"name": "w", "queues": ["default"], "concurrency": 2}],
    )
    (fleet.folder / "meddler.py").write_text("import hardtasks\nhardtasks.take_signals()\n")
    fleet.start()
    if how == "command":
        assert replies(fleet, "call", "meddle")["w@h1"] == {"ok": "taken"}
    what = "importing fleet.imports" if how == "import" else "command meddle"
    taken = (
        f"{what} took the worker's SIGTERM, SIGCHLD, SIGPIPE, SIGINT (blocked), SIGUSR1"
        " (blocked), the signal wake-up descriptor: its own handling is back"
    )
    wait_for(lambda: taken in fleet.log(), 5, message="the line naming what was taken")
    journal = tmp_path / "journal.txt"
    handles = fleet.client.submit_many([("tasks.journal", (str(journal), 1.0), {})] * 3)
    wait_for(lambda: len(executions(journal)) == 2, 10, message="two tasks to start")
    fleet.signal(signal.SIGTERM)
    assert fleet.wait_exit(20) == 0
    assert "warm shutdown" in fleet.log() and "left behind" not in fleet.log(), fleet.log()
    ends = [line.split()[1] for line in journal.read_text().splitlines() if line[0] == "E"]
    assert sorted(ends) == sorted(executions(journal)), journal.read_text()
    assert [h.info()["state"] for h in handles].count("SUCCESS") == 2
    fleet.start()
    infos = fleet.wait_all_final([h.id for h in handles], 20)
    assert [i["state"] for i in infos] == ["SUCCESS"] * 3
    assert executions(journal) == {h.id: 1 for h in handles}


def test_signals_relayed_to_a_booting_worker_wait_for_its_handlers(
    make_fleet: Callable[..., Fleet],
) -> None:
    """USR1, TTIN and TTOU are relayed to every worker, also to one still booting (a
    reload's new generation): their default actions would end it (USR1) or stop it (TTIN,
    TTOU). It starts with them blocked, and takes them once its handlers are in."""
    fleet = make_fleet(workers=[{"name": "w", "queues": ["default"], "concurrency": 1}]).start()
    before = fleet.log().count("reload complete")
    fleet.signal(signal.SIGHUP)
    deadline = time.monotonic() + 1.0  # over the new worker's boot, from exec on
    while time.monotonic() < deadline:
        for signum in (signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU):
            fleet.signal(signum)
        time.sleep(0.005)
    wait_for(lambda: fleet.log().count("reload complete") > before, 30, message="the reload")
    assert "killed by" not in fleet.log(), fleet.log()
    assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == 3
    fleet.signal(signal.SIGTERM)
    assert fleet.wait_exit(20) == 0


def test_sigpipes_sent_to_a_booting_worker_end_nothing(make_fleet: Callable[..., Fleet]) -> None:
    """A worker's interpreter ignores SIGPIPE once it runs, but between its exec and then the
    default action ended it: sent over and over (a script that signals what it finds), every
    new worker died, until the node was FATAL."""
    fleet = make_fleet(workers=[{"name": "w", "queues": ["default"], "concurrency": 1}]).start()
    assert fleet.proc is not None
    arbiter = psutil.Process(fleet.proc.pid)
    [worker] = fleet.worker_pids()
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 1.5  # over the replacement's boot, from exec on
    while time.monotonic() < deadline:
        for proc in arbiter.children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGPIPE)
        time.sleep(0.001)
    assert fleet.client.submit("tasks.add", 1, 2).get(timeout=20) == 3
    assert "killed by SIGPIPE" not in fleet.log(), fleet.log()


def test_signals_during_the_arbiters_last_moments_leave_its_exit_code_alone(
    make_fleet: Callable[..., Fleet],
) -> None:
    """HUPs that keep coming while the arbiter stops (a supervisor that reloads in a loop):
    the interpreter's exit puts back the default actions, which would end it with the
    signal's status instead of 0."""
    for _ in range(3):
        fleet = make_fleet().start()
        assert fleet.proc is not None
        fleet.signal(signal.SIGTERM)
        while fleet.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                fleet.signal(signal.SIGHUP)
            time.sleep(0.0005)
        assert fleet.wait_exit(20) == 0


# --- a queue locked by someone else ------------------------------------------------------------
def test_a_queue_write_lock_held_elsewhere_holds_a_worker_seconds_at_a_time(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """Someone holds the SQLite queue's write lock (a sqlite3 shell mid-transaction, a backup
    tool): a worker's write gives up after FAIL_FAST_WAIT, so its loop still answers the
    control plane and ends a task past its time limit; once the lock is let go, every task
    ends, none twice."""
    limit = 2.0
    fleet = make_fleet(defaults={"time_limit": limit}).start()
    marker, journal = tmp_path / "sleeper", tmp_path / "journal.txt"
    sleeper = fleet.client.submit("tasks.sleep", 60, str(marker))
    handles = fleet.client.submit_many([("tasks.journal", (str(journal), 0.05), {})] * 20)
    wait_for(lambda: marker.exists() and executions(journal), 10, message="the tasks to start")
    started = time.monotonic()
    sleeper_proc = psutil.Process(int(marker.read_text().split()[1]))
    holder = sqlite3.connect(fleet.client.broker.path, isolation_level=None)  # type: ignore[attr-defined]
    try:
        holder.execute("BEGIN IMMEDIATE")
        wait_for(
            lambda: not alive(sleeper_proc),
            started + limit + FAIL_FAST_WAIT + 1.5 - time.monotonic(),
            message="the time limit to end the task while the queue is locked",
        )
        for _ in range(3):  # each answered, however the worker's writes fall
            assert replies(fleet, "--timeout", str(FAIL_FAST_WAIT + 2), "ping") == {
                "w@h1": {"ok": "pong"}
            }
    finally:
        holder.rollback()
        holder.close()
    infos = fleet.wait_all_final([h.id for h in handles], 10)  # none waits for a lease
    assert [i["state"] for i in infos] == ["SUCCESS"] * len(handles)
    assert executions(journal) == {h.id: 1 for h in handles}
    assert sleeper.info()["exc_type"] == "TimeLimitExceeded"
    assert "broker unreachable" in fleet.log() and "broker reachable again" in fleet.log()


# --- a hung worker ---------------------------------------------------------------------------
@contextlib.contextmanager
def dealer(fleet: Fleet) -> Iterator[zmq.Socket[bytes]]:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(f"ipc://{fleet.folder}/state/control.sock")
        yield sock
    finally:
        ctx.destroy(linger=0)


def ask(
    sock: zmq.Socket[bytes], cmd: str, args: dict[str, Any], timeout: float, host_timeout: float
) -> Any:
    """One request through a raw DEALER (fleetctl's arguments cannot carry 900 KB)."""
    request = {"v": 1, "id": cmd, "cmd": cmd, "args": args, "dest": None, "timeout": host_timeout}
    sock.send(json.dumps(request).encode())
    assert sock.poll(timeout * 1000), f"no answer to {cmd} within {timeout}s"
    return json.loads(sock.recv())["replies"]


def test_a_stopped_worker_never_freezes_the_arbiter_on_a_900kb_broadcast(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = hard_fleet(make_fleet, workers=TWO_NODES).start()
    hung = replies(fleet, "inspect", "stats")["b@h1"]["pid"]
    blob = "x" * 900_000
    os.kill(hung, signal.SIGSTOP)
    try:
        with dealer(fleet) as sock:
            sock.send(
                json.dumps(
                    {"v": 1, "id": "big", "cmd": "size_of", "args": {"blob": blob}, "timeout": 2}
                ).encode()
            )
            began = time.monotonic()
            assert replies(fleet, "--timeout", "2", "ping", "--dest", "a@h1") == {
                "a@h1": {"ok": "pong"}
            }
            assert time.monotonic() - began < 1.5, "the arbiter answered ping late"
            assert sock.poll(5000), "no answer to the 900 KB broadcast"
            first = json.loads(sock.recv())["replies"]
            assert first["a@h1"] == {"ok": 900_000} and "deadline" in first["b@h1"]["error"]
            # The stopped node's backlog grows until the arbiter refuses it more, at once.
            for _ in range(5):
                began = time.monotonic()
                answer = ask(sock, "size_of", {"blob": blob}, 5, host_timeout=0.5)
                assert answer["a@h1"] == {"ok": 900_000}
                if "does not read" in answer["b@h1"].get("error", ""):
                    assert time.monotonic() - began < 0.5
                    break
            else:
                raise AssertionError(f"the stopped node's backlog was never refused: {answer}")
        fleet.signal(signal.SIGTERM)
        assert fleet.wait_exit(10) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGCONT)


def test_clients_that_never_read_never_slow_the_arbiter(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet().start()
    fleet.ctl("events", "enable")
    ctx = zmq.Context()
    try:
        deaf = ctx.socket(zmq.DEALER)  # asks and asks, and reads no reply
        deaf.linger = 0
        deaf.connect(f"ipc://{fleet.folder}/state/control.sock")
        mute = ctx.socket(zmq.SUB)  # subscribes to every event, and reads none
        mute.linger = 0
        mute.subscribe(b"")
        mute.connect(f"ipc://{fleet.folder}/state/events.sock")
        request = {"v": 1, "cmd": "ping", "args": {}, "dest": None}
        for i in range(5000):
            deaf.send(json.dumps({**request, "id": str(i)}).encode())
        ids = [h.id for h in fleet.client.submit_many([("tasks.noop", (), {})] * 300)]
        began = time.monotonic()
        assert replies(fleet, "--timeout", "2", "ping") == {"w@h1": {"ok": "pong"}}
        assert time.monotonic() - began < 2
        fleet.wait_all_final(ids, 30)
    finally:
        ctx.destroy(linger=0)


def test_metrics_clients_that_hold_their_connection_never_run_the_arbiter_out_of_files(
    make_fleet: Callable[..., Fleet],
) -> None:
    """Each connection that sent a byte every second or so held a thread and a descriptor of
    the arbiter's for good: past its open-files limit, libzmq aborted the arbiter at the
    next fleetctl. More than MAX_CLIENTS at once are closed at once."""
    port = free_port()
    fleet = make_fleet(extra=f'\n[metrics]\nbind = "127.0.0.1:{port}"\n').start()
    assert fleet.proc is not None
    arbiter = psutil.Process(fleet.proc.pid)
    held: list[socket.socket] = []
    done = threading.Event()

    def trickle() -> None:  # a request line that never ends, a byte at a time
        while not done.wait(0.5):
            for client in list(held):
                with contextlib.suppress(OSError):
                    client.send(b"G")

    trickler = threading.Thread(target=trickle)
    trickler.start()
    try:
        for _ in range(120):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        done.wait(2)
        assert replies(fleet, "--timeout", "5", "ping") == {"w@h1": {"ok": "pong"}}
        assert arbiter.num_threads() < 50 and arbiter.num_fds() < 150  # bounded, not one a client
    finally:
        done.set()
        trickler.join(10)
        for client in held:
            client.close()

    def healthy() -> bool:  # once the closed clients' threads have let their places go
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
                return answer.status == 200
        except (OSError, http.client.HTTPException):
            return False

    wait_for(healthy, 15, 0.2, "the metrics server to answer again")
    assert serving(fleet)


# --- a worker killed right after a fork --------------------------------------------------------
def test_a_worker_killed_right_after_forking_a_child_leaves_none_of_its_subprocesses(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    fleet = hard_fleet(make_fleet, defaults={"concurrency": 1, "max_tasks_per_child": 1}).start()
    # Every kill is a death soon after a start: stay below the count that makes the node FATAL.
    for attempt in range(FATAL_AFTER - 1):
        [worker] = wait_for(fleet.worker_pids, 10, message="the worker")
        pidfile = tmp_path / f"sleep-{attempt}.pid"
        # The first task recycles the pool's child: the second runs in a child forked just now.
        fleet.client.submit_many(
            [("tasks.noop", (), {}), ("hardtasks.spawn_sleep", (str(pidfile),), {})]
        )
        sleeper = psutil.Process(
            int(wait_for(lambda p=pidfile: p.exists() and p.read_text(), 10, message="sleep"))
        )
        fleet.remember_pids()
        os.kill(worker, signal.SIGKILL)
        try:
            wait_for(lambda s=sleeper: not alive(s), 5, message=f"sleep {sleeper.pid} to end")
        finally:
            with contextlib.suppress(psutil.Error):
                sleeper.kill()
        fleet.wait_ready()


def test_a_restart_ends_the_subprocesses_of_a_child_forked_just_before_a_kill_of_everything(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    fleet = hard_fleet(make_fleet, defaults={"concurrency": 1, "max_tasks_per_child": 1}).start()
    [worker] = fleet.worker_pids()
    pidfile = tmp_path / "sleep.pid"
    fleet.client.submit_many(
        [("tasks.noop", (), {}), ("hardtasks.spawn_sleep", (str(pidfile),), {})]
    )
    sleeper = psutil.Process(
        int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 10, message="sleep"))
    )
    try:
        fleet.remember_pids()
        fleet.signal(signal.SIGKILL)
        os.kill(worker, signal.SIGKILL)
        fleet.wait_exit(5)
        assert alive(sleeper)  # no arbiter was left to end it: the next start must
        fleet.start()
        wait_for(lambda: not alive(sleeper), 10, message=f"sleep {sleeper.pid} to end")
    finally:
        with contextlib.suppress(psutil.Error):
            sleeper.kill()


# --- the open-files limit ----------------------------------------------------------------------
def limited(make_fleet: Callable[..., Fleet], **kwargs: Any) -> Fleet:
    """A fleet whose fleetd (and so every worker) starts under an open-files limit of FD_LIMIT."""
    return hard_fleet(
        make_fleet, launcher=("prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--"), **kwargs
    )


def test_pool_grow_past_the_open_files_limit_stops_there_says_so_and_the_worker_lives(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = limited(make_fleet).start()
    [worker] = fleet.worker_pids()
    reply = replies(fleet, "pool", "grow", "400")["w@h1"]
    found = re.fullmatch(
        rf"pool is (\d+): the open-files limit \({FD_LIMIT}\) allows no more",
        reply.get("error", ""),
    )
    assert found, reply
    size = int(found.group(1))
    assert 2 < size < FD_LIMIT // 3
    wait_for(lambda: len(fleet.child_pids(worker)) == size, 20, message=f"a pool of {size}")
    assert replies(fleet, "pool", "grow", "1")["w@h1"] == reply  # full: no more
    handles = fleet.client.submit_many([("tasks.add", (i, i), {}) for i in range(2 * size)])
    assert [h.get(timeout=30) for h in handles] == [2 * i for i in range(2 * size)]
    assert fleet.worker_pids() == [worker]


def test_a_pool_configured_past_the_open_files_limit_boots_with_what_it_can_hold(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = limited(make_fleet, defaults={"concurrency": 100}).start()
    [worker] = fleet.worker_pids()
    size = replies(fleet, "inspect", "conf")["w@h1"]["concurrency"]
    assert 2 < size < FD_LIMIT // 3
    assert f"the open-files limit ({FD_LIMIT}) allows no more" in fleet.log()
    assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == 3
    assert fleet.worker_pids() == [worker]


def test_a_child_that_cannot_be_forked_is_retried_and_never_kills_the_worker(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    fleet = limited(make_fleet, defaults={"concurrency": 2, "max_tasks_per_child": 1}).start()
    [worker] = fleet.worker_pids()
    assert replies(fleet, "call", "hold_fds")["w@h1"]["ok"] > 0  # no descriptor left for a pipe
    journal = tmp_path / "journal.txt"
    ids = [h.id for h in fleet.client.submit_many([("tasks.journal", (str(journal),), {})] * 6)]
    wait_for(lambda: "cannot fork a child" in fleet.log(), 10, message="a failed fork")
    assert fleet.worker_pids() == [worker]
    replies(fleet, "call", "release_fds")
    infos = fleet.wait_all_final(ids, 30)
    assert [i["state"] for i in infos] == ["SUCCESS"] * len(ids)
    assert executions(journal) == {i: 1 for i in ids}
    assert fleet.worker_pids() == [worker]


def test_a_dead_workers_tasks_come_back_at_once_though_the_worker_told_to_give_them_back_hangs(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """The arbiter told a live worker to give the dead one's tasks back, and forgot them: that
    worker was stopped (then killed at worker_timeout, the message unread), and the tasks
    waited out their lease. It is told again through another worker until one says it did."""
    from tests.test_control import node_pids

    fleet = make_fleet(
        workers=[{"name": "a", "queues": ["qa"]}, {"name": "b", "queues": ["qb"]}],
        defaults={"concurrency": 1, "worker_timeout": 3},
        fleet={"lease": 60},
    ).start()
    pids = node_pids(fleet)
    marker, gate = tmp_path / "started.txt", tmp_path / "gate"
    handle = fleet.client.submit("tasks.hold", str(gate), str(marker), 120, queue="qb")
    # STARTED in the broker: the death is one it may have caused (a strike)
    wait_for(lambda: handle.state == "STARTED", 10, message="the task to start")
    os.kill(pids["a@h1"], signal.SIGSTOP)  # the live worker the arbiter will tell
    os.kill(pids["b@h1"], signal.SIGKILL)
    began = time.monotonic()
    wait_for(lambda: marker.read_text().count("start") == 2, 20, 0.1, "the task to start again")
    assert time.monotonic() - began < 15  # not after the 60 s lease
    gate.touch()
    assert handle.get(timeout=20) and handle.info()["deliveries"] == 2


def test_a_message_to_the_arbiter_over_the_frame_limit_is_dropped_not_the_worker(
    make_fleet: Callable[..., Fleet],
) -> None:
    """A turn's events name their tasks' ids, which a producer chooses (a MiB each, say):
    past the frame limit the worker died with a ProtocolError at every start, and the tasks
    ended WorkerLost without running. Here the limit is 4 KiB (set by a task module)."""
    metrics = f'\n[metrics]\nbind = "127.0.0.1:{free_port()}"\n'  # events go to the arbiter
    fleet = make_fleet(fleet={"imports": ["tasks", "small_frames"]}, extra=metrics)
    (fleet.folder / "small_frames.py").write_text(
        "import worker.protocol\nworker.protocol.MAX_FRAME_SIZE = 4096\n"
    )
    fleet.start()
    [worker] = fleet.worker_pids()
    handles = [
        fleet.client.submit("tasks.add", i, 1, task_id=f"{i:04}" + "x" * 2000) for i in range(60)
    ]
    assert [h.get(timeout=20) for h in handles] == [i + 1 for i in range(60)]
    assert fleet.worker_pids() == [worker] and "cannot be sent, dropped" in fleet.log()


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler of its own for `signum` (/proc's SigCgt)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def test_term_while_a_reloads_workers_import_their_tasks_ends_the_fleet_at_once(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """A booting worker held TERM until its imports were done, its pool forked and its
    broker open: `fleetd stop` waited for a slow import (for ever, for one that hangs,
    with worker_timeout = 0). It holds nothing yet: it exits at once."""
    flag = tmp_path / "slow"
    fleet = make_fleet(fleet={"imports": ["tasks", "slow_import"]}, defaults={"worker_timeout": 0})
    (fleet.folder / "slow_import.py").write_text(
        f"import os, time\nif os.path.exists({str(flag)!r}):\n    time.sleep(120)\n"
    )
    fleet.start()
    [old] = fleet.worker_pids()
    flag.touch()
    fleet.signal(signal.SIGHUP)
    wait_for(lambda: set(fleet.worker_pids()) - {old}, 10, message="the new worker to boot")
    [new] = set(fleet.worker_pids()) - {old}
    wait_for(lambda: catches(new, signal.SIGTERM), 10, message="its handlers, then its import")
    began = time.monotonic()
    fleet.signal(signal.SIGTERM)
    assert fleet.wait_exit(20) == 0 and time.monotonic() - began < 10


def test_the_arbiter_takes_the_hard_open_files_limit_and_tasks_keep_the_first_one(
    make_fleet: Callable[..., Fleet],
) -> None:
    """Clients holding connections ran the arbiter out of descriptors under systemd's soft
    1,024 (libzmq then aborts it); a task's code, or what it starts, keeps the limit fleetd
    was started with (select() breaks past 1,024)."""
    fleet = make_fleet(
        fleet={"imports": ["tasks", "fdlimit"]}, launcher=("prlimit", "--nofile=1024:4096", "--")
    )
    (fleet.folder / "fdlimit.py").write_text(
        "import resource\nfrom worker import task\n\n"
        "@task\ndef nofile():\n    return list(resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    fleet.start()
    assert fleet.client.submit("fdlimit.nofile").get(timeout=10) == [1024, 4096]
    assert fleet.proc is not None
    assert psutil.Process(fleet.proc.pid).rlimit(psutil.RLIMIT_NOFILE) == (4096, 4096)
    [worker] = fleet.worker_pids()
    assert psutil.Process(worker).rlimit(psutil.RLIMIT_NOFILE) == (4096, 4096)

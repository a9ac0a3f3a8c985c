"""A worker that cannot boot: at `fleetd start` it ends the fleet with EXIT_BOOT_ERROR and one
line naming it (systemd sees a failed start); on a reload the generation before serves on."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.arbiter import EXIT_BOOT_ERROR
from supervisor.config import load
from supervisor.states import FATAL_AFTER
from tests.fleet import FLEETCTL, TASKS, Fleet, wait_for
from tests.test_control import ctl_json

# The broken node's boot may take 2 s; the good one has the default bound (60 s).
GOOD_AND_BROKEN = [{"name": "good"}, {"name": "broken", "queues": ["other"], "worker_timeout": 2}]
# Task module lines that run only in the worker of the node named "broken".
IN_BROKEN_NODE = """
import json as _json, os as _os, time as _time
if _json.loads(_os.environ.get("FLEETD_WORKER_SPEC", "{{}}")).get("name") == "broken":
    {action}
"""


def fleet_with(make_fleet: Callable[..., Fleet], action: str) -> tuple[Fleet, int]:
    """A fleet whose broken node runs `action` at import; and the line `action` is on."""
    fleet = make_fleet(workers=GOOD_AND_BROKEN)
    tasks = textwrap.dedent(TASKS) + IN_BROKEN_NODE.format(action=action)
    (fleet.folder / "tasks.py").write_text(tasks)
    return fleet, tasks[: tasks.index(action)].count("\n") + 1


@contextlib.contextmanager
def systemd(folder: Path) -> Iterator[tuple[str, Callable[[], list[str]]]]:
    """A socket standing in for systemd's: its path, and a function that returns the
    datagrams received so far."""
    path = str(folder / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    seen: list[str] = []

    def received() -> list[str]:
        with contextlib.suppress(BlockingIOError):
            while True:
                seen.append(sock.recv(4096).decode())
        return seen

    try:
        yield path, received
    finally:
        sock.close()


def ready_after_reload(messages: list[str]) -> str | None:
    """The first READY datagram after a RELOADING one."""
    reloading = [m.startswith("RELOADING=1") for m in messages]
    after = messages[reloading.index(True) :] if any(reloading) else []
    return next((m for m in after if "READY=1" in m.split("\n")), None)


@pytest.mark.parametrize(
    ("action", "reason"),
    [
        (
            'raise RuntimeError("no config for this node")',
            "broken@h1 could not boot: cannot import task modules: module 'tasks' failed to"
            " import ({tasks}:{line}): RuntimeError: no config for this node (exit code 4)",
        ),
        (
            "raise SystemExit(3)",
            "broken@h1 could not boot: cannot import task modules: module 'tasks' failed to"
            " import ({tasks}:{line}): SystemExit: 3 (exit code 4)",
        ),
        ("_os._exit(3)", "broken@h1 exited before it was ready (exit code 3)"),
        (
            "_time.sleep(60)",
            "broken@h1 did not boot within worker_timeout (2s) (killed by SIGKILL)",
        ),
    ],
    ids=["import-error", "sys-exit", "exit", "hang"],
)
def test_a_worker_that_cannot_boot_ends_the_start_with_exit_3_and_one_line_naming_it(
    make_fleet: Callable[..., Fleet], tmp_path: Path, action: str, reason: str
) -> None:
    fleet, action_line = fleet_with(make_fleet, action)
    with systemd(tmp_path) as (notify_socket, received):
        fleet.start(wait=False, env={"NOTIFY_SOCKET": notify_socket})
        assert fleet.wait_exit(30) == EXIT_BOOT_ERROR
        messages = received()
    line = reason.format(tasks=fleet.folder / "tasks.py", line=action_line)
    assert fleet.log().splitlines()[-1] == f"fleetd: {line}"
    assert not any("READY=1" in m.split("\n") for m in messages), messages
    assert f"STATUS={line}" in messages and "STOPPING=1" in messages
    assert "node=good@h1" in next(
        entry for entry in fleet.log().splitlines() if "-> STOPPED: exited" in entry
    )


def test_a_reload_to_code_that_cannot_boot_keeps_the_old_generation_running_and_says_so(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    fleet = make_fleet(workers=[{"name": "w"}])
    with systemd(tmp_path) as (notify_socket, received):
        fleet.start(env={"NOTIFY_SOCKET": notify_socket})
        _, before = ctl_json(fleet, "status")
        (fleet.folder / "tasks.py").write_text(TASKS + "\nthis is not python\n")
        fleet.signal(signal.SIGHUP)
        ready = wait_for(lambda: ready_after_reload(received()), 30, 0.1, "READY after RELOADING")
        _, after = ctl_json(fleet, "status")
    view = after["replies"]["w@h1"]
    assert view["state"] == "RUNNING" and view["generation"] == 0
    assert view["pid"] == before["replies"]["w@h1"]["pid"]
    assert view["reload_failed"].startswith("generation 1 could not boot: cannot import task")
    assert "NameError: name 'this' is not defined" in view["reload_failed"]
    assert fleet.client.submit("tasks.add", 1, 1).get(timeout=10) == 2
    assert "reload to generation 1 failed: w@h1 could not boot" in ready
    assert f"{FATAL_AFTER} failed starts in a row" in fleet.log()
    text = fleet.ctl("status").stdout
    assert "RUNNING" in text and "reload failed: generation 1" in text


CLOSED_STREAMS = ("sh", "-c", 'exec "$@" <&- >&- 2>&-', "sh")  # runs "$@" with fds 0-2 closed


def test_a_fleet_started_with_its_standard_streams_closed_runs_and_stops_as_any(
    make_fleet: Callable[..., Fleet],
) -> None:
    """`fleetd start <&- >&- 2>&-` (a careless daemonizer): the arbiter died at its first log
    line (exit 1, nothing said), and its workers, spawned with no fd 0, at their first open
    file; fleetctl with stdout closed died likewise. /dev/null now takes the three numbers."""
    fleet = make_fleet(launcher=CLOSED_STREAMS).start()
    assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == 3
    ping = subprocess.run([*CLOSED_STREAMS, FLEETCTL, "-c", str(fleet.config), "ping"], timeout=30)
    assert ping.returncode == 0
    fleet.signal(signal.SIGTERM)
    assert fleet.wait_exit(20) == 0


@pytest.mark.parametrize(
    "content",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe{",
        b'{"time_limits": {"t": [1e999, 2]}}',  # infinity: no limit a child can keep
        b'{"time_limits": {"t": [' + b"9" * 400 + b", 2]}}",  # past a float: OverflowError
        None,  # a FIFO: the worker's boot waited for someone to write into it
    ],
    ids=["deep", "bytes", "inf", "overflow", "fifo"],
)
def test_state_files_torn_or_not_ours_are_ignored_and_the_fleet_starts(
    make_fleet: Callable[..., Fleet], content: bytes | None
) -> None:
    """The run record and a node's saved limits, found holding JSON nested past the parser's
    depth or bytes that are no text: the arbiter (run.json) or the worker (limits) ended in a
    RecursionError at every start. Each is read as none now, the limits with a warning."""
    fleet = make_fleet()
    limits = fleet.folder / "state" / "limits"
    limits.mkdir(parents=True)
    (fleet.folder / "state").chmod(0o700)
    for path in (fleet.folder / "state" / "run.json", limits / "w@h1.json"):
        if content is None:
            os.mkfifo(path)
        else:
            path.write_bytes(content)
    fleet.start()
    assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == 3
    assert "ignoring saved limits" in fleet.log()


def test_a_file_where_the_sqlite_wake_folder_goes_is_one_line_naming_it_and_the_fleet_runs(
    make_fleet: Callable[..., Fleet],
) -> None:
    """The SQLite queue's wake-up pipes live in the folder `<queue file>-wake`: a file of
    that name (a stray `touch`) ended the start, and a worker restarted or reloaded on it
    failed its boot again and again to FATAL. One line says what to move; meanwhile the
    workers look at their queues every second, and make the pipes once they can."""
    fleet = make_fleet()
    wake = fleet.folder / "queue.db-wake"
    wake.write_text("in the way\n")
    fleet.start()
    assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == 3
    [line] = [entry for entry in fleet.log().splitlines() if "is no folder" in entry]
    assert f"{wake} is no folder" in line and "move it away" in line, line
    assert "Traceback" not in fleet.log()


UNREGISTERED_SCHEDULE = """
[[schedule]]
name = "tick"
task = "tasks.nope"
every = 1
"""


def test_a_schedule_whose_task_no_module_registers_ends_the_start_and_fails_a_reload(
    make_fleet: Callable[..., Fleet],
) -> None:
    """What `fleetd check` refuses, start and reload refuse too (the leader fired it to a dead
    letter, NotRegistered, every tick); a reload to it leaves the old generation serving."""
    reason = (
        "w@h1 could not boot: schedule[0].task: task 'tasks.nope' is not registered by"
        " fleet.imports (tasks) (exit code 4)"
    )
    fleet = make_fleet("refused", workers=[{"name": "w"}], extra=UNREGISTERED_SCHEDULE)
    fleet.start(wait=False)
    assert fleet.wait_exit(30) == EXIT_BOOT_ERROR
    assert fleet.log().splitlines()[-1] == f"fleetd: {reason}"

    fleet = make_fleet("reloaded", workers=[{"name": "w"}]).start()
    with open(fleet.config, "a") as config:
        config.write(UNREGISTERED_SCHEDULE)
    fleet.signal(signal.SIGHUP)

    def failed_reload() -> dict[str, Any] | None:
        view = ctl_json(fleet, "status")[1]["replies"]["w@h1"]
        return view if view.get("reload_failed") else None

    view = wait_for(failed_reload, 30, 0.2, "the reload to fail")
    assert view["state"] == "RUNNING" and view["generation"] == 0
    assert "schedule[0].task: task 'tasks.nope' is not registered" in view["reload_failed"]
    assert fleet.client.submit("tasks.add", 1, 1).get(timeout=10) == 2


def test_a_worker_whose_arbiter_died_before_it_booted_leaves_at_once(
    make_fleet: Callable[..., Fleet],
) -> None:
    """An arbiter SIGKILLed between a worker's spawn and the worker's parent-death signal
    (its interpreter's start): the orphan went on to import its task modules, and one that
    hangs there kept it for good, nobody's child. Started here as the arbiter starts one,
    but with an arbiter that is not its parent, it leaves before it imports anything."""
    fleet = make_fleet(workers=[{"name": "w"}])
    (fleet.folder / "tasks.py").write_text("import time\ntime.sleep(60)\n")
    [spec] = load(str(fleet.config), check_imports=False).workers
    env = {
        **os.environ,
        "FLEETD_WORKER_SPEC": json.dumps(spec.to_json()),
        "FLEETD_ARBITER_PID": "1",  # not our parent: it is gone
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", spec.node], env=env, cwd=fleet.folder
    )
    try:
        assert worker.wait(10) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(5)

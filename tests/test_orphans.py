"""The /proc readings that recognise processes, against psutil's, on real processes, and the
next start's ending of what a previous run left alive."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from supervisor import orphans
from tests.fleet import alive, wait_for

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def family():
    """A parent process with two children of its own, in a process group it leads."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            f"kids = [subprocess.Popen({SLEEPER!r}) for _ in range(2)]\n"
            "print(' '.join(str(k.pid) for k in kids), flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    kids = [int(pid) for pid in parent.stdout.readline().split()]
    try:
        yield parent, kids
    finally:
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait(timeout=10)


def test_create_time_is_psutils(family):
    parent, kids = family
    for pid in [os.getpid(), parent.pid, *kids]:
        expected = psutil.Process(pid).create_time()
        assert orphans.create_time(pid) == pytest.approx(expected, abs=0.01)


def test_create_time_of_an_ended_process_is_none():
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait(timeout=10)
    assert orphans.create_time(done.pid) is None


def test_children_are_psutils(family):
    parent, kids = family
    assert sorted(orphans.children(parent.pid)) == sorted(kids)
    assert sorted(orphans.children(parent.pid)) == sorted(
        child.pid for child in psutil.Process(parent.pid).children()
    )


def test_kill_groups_ends_the_group_and_spares_a_reused_pid(family):
    parent, kids = family
    leader = orphans.process_record(parent.pid)
    assert leader is not None
    stranger = {"pid": parent.pid, "create_time": leader["create_time"] - 100}
    assert orphans.kill_groups([stranger]) == 0  # that pid now belongs to someone else
    assert all(psutil.pid_exists(pid) for pid in kids)
    assert orphans.kill_groups([leader]) == 3  # the leader and both children
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(orphans.create_time(pid) is not None for pid in kids):  # a zombie counts as gone
        assert time.monotonic() < deadline, "children still alive 10 s after kill_groups"
        time.sleep(0.01)


def test_the_leftovers_of_a_run_spare_a_group_that_a_reused_pid_leads_now(family):
    """A record of a group leader whose pid another process leads now (pid reuse, after a
    reboot say): the next start ended that process and its group."""
    parent, kids = family
    leader = orphans.process_record(parent.pid)
    assert leader is not None
    stranger = {**leader, "create_time": leader["create_time"] - 100, "group": True}
    assert orphans.find_leftovers({"processes": [stranger]}) == []
    found = dict(orphans.find_leftovers({"processes": [{**leader, "group": True}]}))
    assert set(found) == {parent.pid, *kids}


@pytest.mark.parametrize("kind", ["fifo", "zero", "shape"])
def test_a_run_record_or_pidfile_of_anybodys_making_reads_as_none_at_once(tmp_path, kind):
    """A FIFO held `fleetd start` and `stop` until someone wrote into it, /dev/zero ate
    memory without end, and a record whose lists were numbers ended start in a traceback."""
    from supervisor.pidfile import PidfileError, read_live_pid

    for name in ("run.json", "fleetd.pid"):
        path = tmp_path / name
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "zero":
            path.symlink_to("/dev/zero")
        else:
            path.write_text('{"processes": 5, "owners": 5}')
    started = time.monotonic()
    record = orphans.RunRecord(str(tmp_path)).read()
    assert orphans.find_leftovers(record) == []
    with pytest.raises(PidfileError):
        read_live_pid(tmp_path / "fleetd.pid")
    assert time.monotonic() - started < 5


def test_the_arbiters_files_never_follow_a_link_left_in_the_state_dir(tmp_path):
    """A link at fleetd.lock or run.json.tmp made the arbiter write into the file it named."""
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    state = tmp_path / "state"
    state.mkdir()
    (state / "run.json.tmp").symlink_to(precious)
    assert orphans.StateFile(str(state / "run.json")).write('{"run": "x"}')
    assert precious.read_text() == "keep" and (state / "run.json").read_text() == '{"run": "x"}'
    (state / "fleetd.lock").symlink_to(precious)
    with pytest.raises(OSError):
        orphans.lock_state_dir(str(state))
    assert precious.read_text() == "keep"


def test_the_leftovers_of_a_run_before_the_last_boot_are_none(family):
    """After a reboot every recorded process is gone, and its pid and group id anybody's: a
    daemon leading a group whose id a recorded child's pid had was ended by the next start."""
    parent, kids = family
    leader = orphans.process_record(parent.pid)
    assert leader is not None
    parent.kill()  # the group lives on without its leader, as a daemon's does
    parent.wait(timeout=10)
    before_boot = {**leader, "create_time": orphans.boot_time() - 100, "group": True}
    assert orphans.find_leftovers({"processes": [before_boot]}) == []
    this_boot = {**leader, "group": True}
    assert sorted(pid for pid, _ in orphans.find_leftovers({"processes": [this_boot]})) == sorted(
        kids
    )


def as_nobody(call) -> str:
    """What `call()` returns (as text) in a forked copy of this process that runs as nobody
    (no exec: the modules are loaded), or "crashed"."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome = "crashed"
        try:
            os.setuid(65534)
            outcome = str(call())
        finally:
            os.write(write, outcome.encode())
            os._exit(0)
    os.close(write)
    try:
        with os.fdopen(read) as reply:
            return reply.read()
    finally:
        os.waitpid(pid, 0)


ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a process of another user")


@ROOT_ONLY
def test_a_group_of_another_user_is_skipped_not_a_crash(family):
    """kill_groups on a recorded group whose members are another user's now."""
    parent, kids = family  # root's; the arbiter below runs as nobody
    leader = orphans.process_record(parent.pid)
    assert as_nobody(lambda: orphans.kill_groups([leader])) == "0"
    assert parent.poll() is None


@ROOT_ONLY
def test_a_leftover_of_another_user_is_skipped_not_a_crash():
    """A previous run's task that became another user's (a command it ran under sudo): TERM
    to it is not permitted, which ended `fleetd start` in a traceback."""
    sleeper = subprocess.Popen(SLEEPER)  # root's; the arbiter below runs as nobody
    try:
        record = orphans.process_record(sleeper.pid)
        ended = as_nobody(lambda: orphans.end_leftovers({"processes": [record]}, grace=0.1))
        assert ended == "1"  # found, and left alone
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_stop_signal_during_the_leftovers_grace_waits_for_their_kill(
    make_fleet, tmp_path, signum
):
    """TERM or INT that reached `fleetd start` while it ended a previous run's processes
    (TERM, a grace, KILL) ended it by the default action (143, a KeyboardInterrupt
    traceback) before the KILL: whatever ignored the TERM lived on after it."""
    fleet = make_fleet(defaults={"concurrency": 1}).start()
    marker = tmp_path / "started.txt"
    fleet.client.submit("tasks.take_signals", "ignore", str(tmp_path / "gate"), str(marker))
    wait_for(marker.exists, 10, message="the task to start")
    old_run = [psutil.Process(pid) for pid in fleet.worker_pids() + fleet.child_pids()]
    try:
        assert len(old_run) == 2  # the worker, and its child that ignores TERM
        fleet.signal(signal.SIGKILL)
        fleet.wait_exit(5)
        fleet.start(wait=False)
        wait_for(lambda: "left by a previous run" in fleet.log(), 15, message="the cleanup")
        fleet.signal(signum)
        assert fleet.wait_exit(30) == 0, fleet.log()
        wait_for(lambda: not any(alive(p) for p in old_run), 2, message="the old run to be ended")
        assert "Traceback" not in fleet.log()
    finally:
        for proc in old_run:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(old_run, timeout=5)

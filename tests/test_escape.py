"""Processes a task started end with it, also those that left its process group.

A task here starts three escapees, each in a session of its own: `Popen(start_new_session=
True)`, the `setsid` command, and a daemon's double fork (its parent exits at once, so it is
nobody's child). Each test ends the task one way (hard time limit, revoke --terminate, a
killed or recycled child, a killed worker, a stop, a killed fleet and a new start) and checks
every escapee by pid; the escapees are killed by pid at the end whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from supervisor import orphans
from tests.fleet import Fleet, executions, holds, wait_for
from worker import TaskFailed, tree
from worker.child import Child, OutputFds

ESCAPE_TASKS = '''
import asyncio, os, signal, subprocess, sys, time
from worker import task

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def double_fork():
    """A daemon's double fork: the sleeper's parent exits at once."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.setsid()
        pid = os.fork()
        if pid == 0:
            os.execv(SLEEPER[0], SLEEPER)
        os.write(w, str(pid).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(middle, 0)
    pid = int(os.read(r, 64))
    os.close(r)
    return pid


def escape(pidfile):
    """Start three sleepers that leave the task's process group; write their pids."""
    pids = [
        subprocess.Popen(SLEEPER, start_new_session=True).pid,
        subprocess.Popen(["setsid", *SLEEPER]).pid,
        double_fork(),
    ]
    with open(pidfile + ".tmp", "w") as f:
        f.write(" ".join(map(str, pids)))
    os.replace(pidfile + ".tmp", pidfile)
    return pids


@task
def escape_and_hold(pidfile, gate, limit=60):
    escape(pidfile)
    deadline = time.monotonic() + limit
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


@task
def escape_bare_and_hold(pidfile, gate, limit=60):
    """Three sleepers in sessions of their own, each with an environment of its own (no mark
    of the run), then wait for the gate."""
    pids = [
        subprocess.Popen(SLEEPER, start_new_session=True, env={"PATH": "/usr/bin:/bin"}).pid
        for _ in range(3)
    ]
    with open(pidfile + ".tmp", "w") as f:
        f.write(" ".join(map(str, pids)))
    os.replace(pidfile + ".tmp", pidfile)
    deadline = time.monotonic() + limit
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


@task(time_limit=1)
def escape_and_hang(pidfile):
    escape(pidfile)
    time.sleep(600)


@task
def escape_and_return(pidfile):
    return escape(pidfile)


@task(time_limit=1)
def leave_group_and_hang(where, pidfile):
    """Move this very child out of the process group it was given, and hang: into its
    worker's group (`worker`), or into the group of a sleeper it starts (`sleeper`). Writes
    the pids of the child and of the sleeper."""
    pids = [os.getpid()]
    if where == "worker":
        os.setpgid(0, os.getpgid(os.getppid()))
    else:
        sleeper = subprocess.Popen(SLEEPER, preexec_fn=os.setpgrp)
        os.setpgid(0, sleeper.pid)
        pids.append(sleeper.pid)
    with open(pidfile + ".tmp", "w") as f:
        f.write(" ".join(str(pid) for pid in pids))
    os.rename(pidfile + ".tmp", pidfile)
    time.sleep(60)


@task
def short_lived_daemon():
    """A double fork whose daemon exits at once: it is adopted, then a zombie."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        if os.fork() == 0:
            os._exit(0)
        os._exit(0)
    os.close(w)
    os.close(r)
    os.waitpid(middle, 0)
    return os.getpid()


def copy_ends(how):
    """What a careless task's fork does in the copy: return, raise, or sys.exit(3)."""
    if how == "exit":
        sys.exit(3)
    if how == "raise":
        raise RuntimeError("the copy's error")
    return "the copy's result"


@task
def fork_and_wait(how):
    """Fork a copy that leaves the task the way `how` says: the copy's exit code."""
    pid = os.fork()
    if pid == 0:
        return copy_ends(how)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@task
async def fork_and_wait_async(how):
    pid = os.fork()
    if pid == 0:
        return copy_ends(how)
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        await asyncio.sleep(0.01)
    return os.waitstatus_to_exitcode(done[1])


def lose(how):
    if how == "full":
        sys.stdout = open("/dev/full", "w")  # as a file on a full disk
    print("printed, no end of line yet", end="")
    if how == "none":
        sys.stdout = None
    return os.getpid()


@task
def lose_stdout(how):
    """Print where it cannot be written: to a `full` disk, or with `none` in sys.stdout."""
    return lose(how)


@task
async def lose_stdout_async(how):
    return lose(how)


class Rang(Exception):
    pass


def ring(signum, frame):
    raise Rang("the alarm that a task before this one left")


def leave(how):
    if how == "handler":
        signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    return os.getpid()


@task
def leave_alarm(how):
    """Leave a timer running: SIGALRM in 0.3 s, to a handler that raises (`handler`) or to
    Python's default, which ends the process (`default`)."""
    return leave(how)


@task
async def leave_alarm_async(how):
    return leave(how)


@task
def leave_cpu_timer(how):
    """Leave what goes off after some CPU time: a sampling profiler's timer (`prof`), a
    virtual one (`virtual`), each at its default (which ends the process); a faulthandler
    dump that exits (`faulthandler`); a CPU-time limit one second on (`rlimit`)."""
    import faulthandler, resource
    if how == "prof":
        signal.setitimer(signal.ITIMER_PROF, 0.05, 0.05)
    elif how == "virtual":
        signal.setitimer(signal.ITIMER_VIRTUAL, 0.05, 0.05)
    elif how == "faulthandler":
        faulthandler.dump_traceback_later(0.3, exit=True)
    else:
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(used.ru_utime + used.ru_stime) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.getrlimit(resource.RLIMIT_CPU)[1]))
    return os.getpid()


@task
def leave_ringing_timer(journal, outside=False):
    """Note the run, then return with a timer that sets off a raising handler every 200 us
    (`outside`: every 20 us, raising once it goes off in the child's own code, after the
    task returned)."""
    with open(journal, "a") as f:
        f.write("ran\\n")
    signal.signal(signal.SIGALRM, ring_outside if outside else ring)
    signal.setitimer(signal.ITIMER_REAL, *((20e-6, 20e-6) if outside else (200e-6, 200e-6)))
    return os.getpid()


@task(bind=True)
def raise_on_term(self, journal):
    """Note the run, then spin 50 ms with a TERM handler of the task's own that raises."""
    with open(journal, "a") as f:
        f.write(self.request.id + "\\n")

    def raising(signum, frame):
        raise Rang("the task's own TERM handler")

    signal.signal(signal.SIGTERM, raising)
    deadline = time.monotonic() + 0.05
    while time.monotonic() < deadline:
        pass
    return os.getpid()


def ring_outside(signum, frame):
    """Raise once, in the child's own code (fleetd's worker package): once the task returned.
    Not in json's, where the result is encoded: that would be the result's EncodeError."""
    if frame is not None and os.sep + "worker" + os.sep in frame.f_code.co_filename:
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise Rang("the timer that the task left")


@task
async def leave_ringing_timer_async(journal, outside=False):
    return leave_ringing_timer(journal, outside)


@task
async def nap(seconds):
    await asyncio.sleep(seconds)


KEPT = []


@task
def spoil_output(how, path):
    """Close sys.stdout and sys.stderr (`streams`), fds 1 and 2 (`fds`), or put a file of
    the task's own on fd 1 (`file`: a later open() would take it, as the task left it)."""
    if how == "streams":
        sys.stdout.close()
        sys.stderr.close()
    elif how == "fds":
        os.close(1)
        os.close(2)
    else:
        os.close(1)
        KEPT.append(open(path, "w"))
    return os.getpid()


@task
def lower_limit(which, hard):
    """Lower a resource limit, the soft one or (`hard`) both, to what a next task needs more of."""
    import resource
    low = {"nofile": 20, "fsize": 1000, "as": 64 << 20}[which]
    kind = getattr(resource, "RLIMIT_" + which.upper())
    resource.setrlimit(kind, (low, low if hard else resource.getrlimit(kind)[1]))
    return os.getpid()


@task
def need(path):
    """What each limit of lower_limit holds back: 50 files open, 2 MB written, 256 MiB."""
    files = [open(os.devnull) for _ in range(50)]
    for f in files:
        f.close()
    with open(path, "wb") as f:
        f.write(bytes(2 << 20))
    return [len(bytearray(256 << 20)) >> 20, os.getpid()]


@task
def write_into_reply_pipe():
    """Write the start of a frame (a header announcing 1 MiB) into the child's reply pipe."""
    import gc
    from worker.child import Child
    [child] = [o for o in gc.get_objects() if isinstance(o, Child)]
    os.write(child.result_fd, (1 << 20).to_bytes(4, "big"))
    return "wrote"


@task
def burn(seconds):
    """Spend `seconds` of CPU time."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return os.getpid()


@task
def meddle(how):
    """Leave the child's process-wide state changed: SIGCHLD ignored (`chld`), SIGPIPE at
    its default (`pipe`), a recursion limit of 60 (`recursion`)."""
    if how == "chld":
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    elif how == "pipe":
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    else:
        sys.setrecursionlimit(60)
    return os.getpid()


@task
def rely_on(how):
    """What a task relies on that `meddle(how)` changed: a subprocess's exit status, EPIPE
    on a closed pipe, a result nested 100 deep."""
    if how == "chld":
        return subprocess.run([sys.executable, "-c", "raise SystemExit(3)"]).returncode
    if how == "pipe":
        r, w = os.pipe()
        os.close(r)
        try:
            os.write(w, b"x")
        except BrokenPipeError:
            return "EPIPE"
        finally:
            os.close(w)
    nested = []
    for _ in range(100):
        nested = [nested]
    return nested


@task
def move(how, folder):
    """Leave the child in another working directory, `folder`: one that stays (`stay`), or
    one removed (`remove`)."""
    os.mkdir(folder)
    os.chdir(folder)
    if how == "remove":
        os.rmdir(folder)
    return os.getpid()


@task
def where():
    return os.getcwd()
'''


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Escapees:
    """The pids the task wrote; every one still alive is killed at the end of the test."""

    def __init__(self, pidfile: Path) -> None:
        self.pidfile = pidfile
        self.pids: list[int] = []

    def read(self) -> list[int]:
        wait_for(self.pidfile.exists, 15, message="the task to start its escapees")
        self.pids = [int(pid) for pid in self.pidfile.read_text().split()]
        assert len(self.pids) == 3
        return self.pids

    def wait(self) -> list[int]:
        """The pids, once the task wrote them; all three are alive while the task runs."""
        assert all(alive(pid) for pid in self.read())
        return self.pids

    def living(self) -> list[int]:
        return [pid for pid in self.pids if alive(pid)]

    def wait_gone(self, timeout: float = 10.0) -> None:
        wait_for(lambda: not self.living(), timeout, message=f"escapees {self.living()} to end")

    def kill(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


@pytest.fixture
def escape_fleet(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> Iterator[Callable[..., tuple[Fleet, Escapees]]]:
    """`escape_fleet(defaults={...})` -> (a fleet that imports the escaping tasks, its escapees)."""
    made: list[Escapees] = []

    def make(**kwargs: object) -> tuple[Fleet, Escapees]:
        fleet = make_fleet(fleet={"imports": ["tasks", "escape_tasks"]}, **kwargs)
        (fleet.folder / "escape_tasks.py").write_text(textwrap.dedent(ESCAPE_TASKS))
        escapees = Escapees(tmp_path / f"escapees-{len(made)}.pid")
        made.append(escapees)
        return fleet, escapees

    try:
        yield make
    finally:
        for escapees in made:
            escapees.kill()


def test_hard_time_limit_ends_the_processes_the_task_started_in_other_sessions(
    escape_fleet,
) -> None:
    fleet, escapees = escape_fleet()
    fleet.start()
    handle = fleet.client.submit("escape_tasks.escape_and_hang", str(escapees.pidfile))
    escapees.wait()
    with pytest.raises(TaskFailed) as err:
        handle.get(timeout=15)
    assert err.value.exc_type == "TimeLimitExceeded"
    escapees.wait_gone()


@pytest.mark.parametrize("where", ["worker", "sleeper"])
def test_a_child_that_leaves_its_process_group_is_killed_all_the_same_at_its_hard_limit(
    escape_fleet, where: str
) -> None:
    """The task moves its very child out of the process group the child was given: into its
    worker's group, or into the group of a process it started. Killing that group no longer
    reaches the child: at the hard time limit it is killed all the same, with what it
    started, and does not hold the next task nor the fleet's stop."""
    fleet, escapees = escape_fleet(defaults={"concurrency": 1})
    fleet.start()
    handle = fleet.client.submit("escape_tasks.leave_group_and_hang", where, str(escapees.pidfile))
    wait_for(escapees.pidfile.exists, 15, message="the task to leave its group")
    escapees.pids = [int(pid) for pid in escapees.pidfile.read_text().split()]
    with pytest.raises(TaskFailed) as err:
        handle.get(timeout=15)
    assert err.value.exc_type == "TimeLimitExceeded"
    escapees.wait_gone(5)
    assert fleet.client.submit("tasks.pid").get(timeout=10) == fleet.child_pids()[0]


def test_revoke_with_terminate_ends_the_processes_the_task_started_in_other_sessions(
    escape_fleet, tmp_path: Path
) -> None:
    fleet, escapees = escape_fleet()
    fleet.start()
    handle = fleet.client.submit(
        "escape_tasks.escape_and_hold", str(escapees.pidfile), str(tmp_path / "gate")
    )
    escapees.wait()
    fleet.ctl("revoke", handle.id, "--terminate")  # TERM, then KILL after a grace period
    wait_for(lambda: handle.state == "REVOKED", 10, message="REVOKED")
    escapees.wait_gone()


def test_a_killed_child_takes_the_processes_its_task_started_in_other_sessions_with_it(
    escape_fleet, tmp_path: Path
) -> None:
    fleet, escapees = escape_fleet(defaults={"max_deliveries": 1})  # no redelivery
    fleet.start()
    handle = fleet.client.submit(
        "escape_tasks.escape_and_hold", str(escapees.pidfile), str(tmp_path / "gate")
    )
    [child] = {psutil.Process(pid).ppid() for pid in escapees.wait()[:2]}
    os.kill(child, signal.SIGKILL)
    with pytest.raises(TaskFailed) as err:
        handle.get(timeout=15)
    assert err.value.exc_type == "WorkerLost"
    escapees.wait_gone()


def test_a_recycled_child_takes_the_processes_its_tasks_started_in_other_sessions_with_it(
    escape_fleet,
) -> None:
    fleet, escapees = escape_fleet(defaults={"max_tasks_per_child": 1})
    fleet.start()
    handle = fleet.client.submit("escape_tasks.escape_and_return", str(escapees.pidfile))
    assert handle.get(timeout=15) == escapees.read()  # the task returns the pids it started
    escapees.wait_gone()


def test_a_killed_worker_takes_the_processes_its_tasks_started_in_other_sessions_with_it(
    escape_fleet, tmp_path: Path
) -> None:
    fleet, escapees = escape_fleet()
    fleet.start()
    fleet.client.submit(
        "escape_tasks.escape_and_hold", str(escapees.pidfile), str(tmp_path / "gate")
    )
    escapees.wait()
    [worker] = fleet.worker_pids()
    os.kill(worker, signal.SIGKILL)
    escapees.wait_gone()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGQUIT], ids=["warm", "cold"])
def test_nothing_a_task_started_outlives_fleetd_stop(
    escape_fleet, tmp_path: Path, signum: int
) -> None:
    """Warm: the task finished, its escapees live on until the stop. Cold: it still runs."""
    fleet, escapees = escape_fleet()
    fleet.start()
    if signum == signal.SIGTERM:
        handle = fleet.client.submit("escape_tasks.escape_and_return", str(escapees.pidfile))
        assert handle.get(timeout=15) == escapees.wait()
        assert holds(lambda: len(escapees.living()) == 3), "ended with a task that succeeded"
    else:
        fleet.client.submit(
            "escape_tasks.escape_and_hold", str(escapees.pidfile), str(tmp_path / "gate")
        )
        escapees.wait()
    fleet.signal(signum)
    assert fleet.wait_exit(20) == 0
    assert escapees.living() == [], "a process a task started outlived fleetd"


def test_next_start_ends_what_a_killed_fleet_left_in_other_sessions(
    escape_fleet, tmp_path: Path
) -> None:
    """The arbiter and every process it knows are SIGKILLed at once (stopped first, so none
    of them can act): the escapees, in sessions of their own, are nobody's then."""
    fleet, escapees = escape_fleet()
    fleet.start()
    fleet.client.submit(
        "escape_tasks.escape_and_hold", str(escapees.pidfile), str(tmp_path / "gate")
    )
    escapees.wait()
    fleet.remember_pids()
    known = [fleet.pid, *(p.pid for p in fleet.descendants() if p.pid not in escapees.pids)]
    for signum in (signal.SIGSTOP, signal.SIGKILL):
        for pid in known:
            os.kill(pid, signum)
    fleet.wait_exit(10)
    wait_for(lambda: not any(alive(pid) for pid in known), 10, message="the fleet to die")
    assert len(escapees.living()) == 3
    fleet.start()
    escapees.wait_gone(timeout=2)  # the start ended them before it was ready


def test_next_start_ends_what_a_live_leftover_started_without_the_runs_mark(
    escape_fleet, tmp_path: Path
) -> None:
    """Only the arbiter is killed; its worker drains a task whose subprocesses run in
    sessions of their own, with environments of their own. The next start ended the worker
    and its child, which orphaned those subprocesses for good: nothing named them."""
    fleet, escapees = escape_fleet()
    fleet.start()
    fleet.client.submit(
        "escape_tasks.escape_bare_and_hold", str(escapees.pidfile), str(tmp_path / "gate")
    )
    escapees.wait()
    os.kill(fleet.pid, signal.SIGKILL)
    fleet.wait_exit(10)
    assert len(escapees.living()) == 3
    fleet.start()
    escapees.wait_gone(timeout=5)


def test_a_child_reaps_the_daemons_its_tasks_left_between_tasks(escape_fleet) -> None:
    """A daemon a task double-forks is the child's to reap once it ends: no zombies pile up."""
    fleet, _ = escape_fleet(defaults={"concurrency": 1})
    fleet.start()
    handles = [fleet.client.submit("escape_tasks.short_lived_daemon") for _ in range(5)]
    [child] = {h.get(timeout=15) for h in handles}

    def zombies() -> list[int]:
        return [
            p.pid for p in psutil.Process(child).children() if p.status() == psutil.STATUS_ZOMBIE
        ]

    assert fleet.client.submit("tasks.pid").get(timeout=15) == child
    assert len(zombies()) <= 1, "the daemons of earlier tasks were never reaped"


@pytest.mark.parametrize("name", ["fork_and_wait", "fork_and_wait_async"])
def test_a_copy_that_a_task_forks_and_that_leaves_the_task_ends_there(
    escape_fleet, tmp_path: Path, name: str
) -> None:
    """A task forks and the copy leaves the task function (returns, raises, sys.exit, as a
    fork without os._exit does): the copy ends there, with the exit code its code asked
    for, and never answers for a task or reads one. Every task, those queued behind it in
    the same child included, runs once, on the child, with its own outcome."""
    fleet, _ = escape_fleet(defaults={"concurrency": 1, "prefetch": 4})
    fleet.start()
    journal = tmp_path / "journal.txt"
    [child] = fleet.child_pids()
    forks, others = {}, []
    for how in ("return", "raise", "exit"):
        forks[how] = fleet.client.submit(f"escape_tasks.{name}", how)
        others += [fleet.client.submit("tasks.journal", str(journal)) for _ in range(3)]
    assert {how: h.get(timeout=15) for how, h in forks.items()} == {
        "return": 0,
        "raise": 1,
        "exit": 3,
    }
    assert [h.get(timeout=15) for h in others] == [child] * len(others)
    assert executions(journal) == {h.id: 1 for h in others}
    assert fleet.child_pids() == [child]


# A library that forks at its import, without os._exit in the copy: the copy returns from
# the import as the worker itself does. It leaves its pid beside the module.
FORKS_AT_IMPORT = """
import os
if os.fork() == 0:
    with open(os.path.join(os.path.dirname(__file__), "copy.pid"), "w") as f:
        f.write(str(os.getpid()))
"""


def test_a_copy_that_a_task_module_forks_at_its_import_ends_there(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """The copy would boot as a second worker on the first one's arbiter channel, pool and
    tasks. It ends where the import returns, before it says anything or takes a task: one
    worker serves, and every task runs once."""
    fleet = make_fleet(fleet={"imports": ["tasks", "forks_at_import"]}, defaults={"concurrency": 1})
    (fleet.folder / "forks_at_import.py").write_text(FORKS_AT_IMPORT)
    pidfile = fleet.folder / "copy.pid"
    fleet.start()
    copy = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 10))
    wait_for(lambda: not alive(copy), 10, message="the copy to end")
    journal = tmp_path / "journal.txt"
    handles = fleet.client.submit_many([("tasks.journal", (str(journal),), {})] * 20)
    assert {h.get(timeout=15) for h in handles} == set(fleet.child_pids())
    assert executions(journal) == {h.id: 1 for h in handles}
    assert fleet.log().count("consuming default") == 1, fleet.log()


@pytest.mark.parametrize("how", ["full", "none"])
@pytest.mark.parametrize("name", ["escape_tasks.lose_stdout", "escape_tasks.lose_stdout_async"])
def test_a_task_whose_stdout_fails_succeeds_once_and_its_child_goes_on(
    escape_fleet, name: str, how: str
) -> None:
    """A task prints to a stdout on a full disk, or sets sys.stdout to None: flushing what it
    printed fails, which costs that output, not the child nor the task's outcome; the next
    task prints to the child's own stdout again."""
    fleet, _ = escape_fleet(defaults={"concurrency": 1})
    fleet.start()
    [child] = fleet.child_pids()
    handle = fleet.client.submit(name, how)
    assert handle.get(timeout=10) == child
    assert handle.info()["deliveries"] == 1
    assert fleet.client.submit("tasks.say", f"{how} was undone").get(timeout=10)
    wait_for(lambda: f"{how} was undone" in fleet.log(), 10, message="the next task's print")
    assert fleet.child_pids() == [child]


@pytest.mark.parametrize("how", ["handler", "default"])
@pytest.mark.parametrize("name", ["escape_tasks.leave_alarm", "escape_tasks.leave_alarm_async"])
def test_an_alarm_that_a_task_leaves_running_never_goes_off_in_a_later_task(
    escape_fleet, name: str, how: str
) -> None:
    """A task sets a timer and returns before it goes off, its handler still installed
    (`handler`) or none (`default`: SIGALRM ends the process). The next task in the same
    child runs past the moment the timer was set for: it succeeds once, on that child."""
    fleet, _ = escape_fleet(defaults={"concurrency": 1})
    fleet.start()
    [child] = fleet.child_pids()
    assert fleet.client.submit(name, how).get(timeout=10) == child
    handle = fleet.client.submit("tasks.sleep", 0.6)
    assert handle.get(timeout=10) == child
    assert handle.info()["deliveries"] == 1
    assert fleet.child_pids() == [child]


@pytest.mark.parametrize("how", ["sync", "sync-in-event-loop", "async"])
def test_a_timer_handler_that_raises_once_its_task_returned_costs_no_second_run(
    escape_fleet, tmp_path: Path, how: str
) -> None:
    """The handler raised in the child's own code, between the task's return and restore:
    the child died, the task that had run counted a death and ran again (three times), and
    had that child's stderr failed too, the exception went up into the worker's loop, where
    the child went on as a second copy of the worker. In an event-loop child the task stayed
    STARTED for good, and ran again after a restart."""
    fleet, _ = escape_fleet(defaults={"concurrency": 1})
    fleet.start()
    if how != "sync":  # the child runs an event loop from its first async task on
        assert fleet.client.submit("escape_tasks.nap", 0.01).get(timeout=10) is None
    journal = tmp_path / "journal.txt"
    name = "escape_tasks.leave_ringing_timer" + ("_async" if how == "async" else "")
    handle = fleet.client.submit(name, str(journal), how != "sync")
    info = fleet.wait_all_final([handle.id], 15)[0]
    assert (info["deliveries"], journal.read_text()) == (1, "ran\n")
    assert info["state"] == "SUCCESS" or info["exc_type"] == "Rang", info
    assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == 3


def test_a_storm_of_signals_to_a_task_handler_that_raises_costs_no_second_run(
    escape_fleet, tmp_path: Path
) -> None:
    """TERM after TERM at a child whose task took TERM with a handler that raises: between
    the task's return and restore, each one raised again in the child's own code, until one
    got past its recovery; the child died without a reply and its task, which had run, ran
    again (a quarter of the tasks). From a task's end on, signals wait for restore."""
    fleet, _ = escape_fleet(defaults={"concurrency": 2})
    fleet.start()
    journal = tmp_path / "journal.txt"
    handles = [fleet.client.submit("escape_tasks.raise_on_term", str(journal)) for _ in range(24)]
    done = threading.Event()

    def storm() -> None:
        while not done.is_set():
            children = fleet.child_pids()
            until = time.monotonic() + 0.02
            while time.monotonic() < until:
                for pid in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)

    stormer = threading.Thread(target=storm)
    stormer.start()
    try:
        infos = fleet.wait_all_final([h.id for h in handles], 60)
    finally:
        done.set()
        stormer.join(10)
    assert sorted(line for line in journal.read_text().splitlines()) == sorted(
        h.id for h in handles
    )
    assert {info["deliveries"] for info in infos} == {1}
    assert {
        info["state"] if info["state"] == "SUCCESS" else info["exc_type"] for info in infos
    } <= {
        "SUCCESS",
        "Rang",
    }
    assert fleet.client.submit("tasks.add", 1, 2).get(timeout=10) == 3


@pytest.mark.parametrize("stand_in", ["Writer()", "None"])
def test_a_task_module_that_puts_its_own_stdout_in_place_leaves_every_task_its_outcome(
    make_fleet: Callable[..., Fleet], stand_in: str
) -> None:
    """A logger's writer (an object with write and flush, no `closed`) or None in sys.stdout,
    put there at import: the child's look at whether a task closed its streams raised, and
    every task failed with an AttributeError."""
    fleet = make_fleet(fleet={"imports": ["tasks", "quiet"]}, defaults={"concurrency": 1})
    (fleet.folder / "quiet.py").write_text(
        "import sys\n"
        "class Writer:\n"
        "    def write(self, text):\n"
        "        return len(text)\n"
        "    def flush(self):\n"
        "        pass\n"
        f"sys.stdout = {stand_in}\n"
    )
    fleet.start()
    handles = fleet.client.submit_many([("tasks.add", (i, 1), {}) for i in range(4)])
    assert [h.get(timeout=10) for h in handles] == [1, 2, 3, 4]


@pytest.mark.parametrize("how", ["streams", "fds", "file"])
def test_a_task_that_spoils_the_childs_output_leaves_the_next_ones_theirs(
    escape_fleet, tmp_path: Path, how: str
) -> None:
    """A closed sys.stdout failed every later task that printed; closed fds 1 and 2 failed
    them with EBADF; and with the task's own file on fd 1, a later one printed into it."""
    fleet, _ = escape_fleet(defaults={"concurrency": 1})
    fleet.start()
    [child] = fleet.child_pids()
    taken = tmp_path / "taken.txt"
    spoiled = fleet.client.submit("escape_tasks.spoil_output", how, str(taken))
    assert spoiled.get(timeout=10) == child
    assert fleet.client.submit("tasks.say", f"{how} was undone").get(timeout=10)
    wait_for(lambda: f"{how} was undone" in fleet.log(), 10, message="the next task's print")
    assert "undone" not in (taken.read_text() if taken.exists() else "")
    assert fleet.child_pids() == [child]


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("which", ["nofile", "fsize", "as"])
def test_a_resource_limit_that_a_task_lowers_is_not_the_next_tasks(
    escape_fleet, tmp_path: Path, which: str, hard: bool
) -> None:
    """The next task failed (EMFILE, MemoryError) or, past the file size, its child died
    and the task ran twice. A soft limit is put back; a hard one cannot be, so a fresh child
    takes the next task."""
    fleet, _ = escape_fleet(defaults={"concurrency": 1})
    fleet.start()
    [child] = fleet.child_pids()
    assert fleet.client.submit("escape_tasks.lower_limit", which, hard).get(timeout=10) == child
    handle = fleet.client.submit("escape_tasks.need", str(tmp_path / "two-megabytes"))
    size, ran_in = handle.get(timeout=15)
    assert (size, handle.info()["deliveries"]) == (256, 1)
    assert (ran_in != child) is hard


@pytest.mark.parametrize("how", ["prof", "virtual", "faulthandler", "rlimit"])
def test_a_cpu_timer_or_limit_that_a_task_leaves_never_ends_a_later_task(
    escape_fleet, how: str
) -> None:
    """Each ended the child in the next task, which was counted a death (WorkerLost at the
    last delivery) though it did nothing of the kind."""
    fleet, _ = escape_fleet(defaults={"concurrency": 1, "max_deliveries": 1})
    fleet.start()
    [child] = fleet.child_pids()
    assert fleet.client.submit("escape_tasks.leave_cpu_timer", how).get(timeout=10) == child
    handle = fleet.client.submit("escape_tasks.burn", 1.2)
    assert handle.get(timeout=15) == child
    assert handle.info()["deliveries"] == 1


def test_a_task_that_writes_part_of_a_reply_into_its_childs_pipe_loses_that_child_alone(
    make_fleet: Callable[..., Fleet],
) -> None:
    """The bytes began a frame that never ended: every later reply of that child was taken
    for its rest, the task stayed STARTED for good and those behind it never settled. The
    child is killed once part of a reply has waited PARTIAL_REPLY_LIMIT (here 1 s)."""
    fleet = make_fleet(
        fleet={"imports": ["tasks", "escape_tasks", "quick"]},
        defaults={"concurrency": 1, "prefetch": 1, "max_deliveries": 1},
    )
    (fleet.folder / "escape_tasks.py").write_text(textwrap.dedent(ESCAPE_TASKS))
    (fleet.folder / "quick.py").write_text(
        "import worker.pool\nworker.pool.PARTIAL_REPLY_LIMIT = 1.0\n"
    )
    fleet.start()
    [worker] = fleet.worker_pids()
    hostile = fleet.client.submit("escape_tasks.write_into_reply_pipe")
    after = [fleet.client.submit("tasks.add", i, 1) for i in range(3)]
    with pytest.raises(TaskFailed) as failed:
        hostile.get(timeout=15)
    assert failed.value.exc_type == "WorkerLost"
    assert [h.get(timeout=15) for h in after] == [1, 2, 3]
    assert fleet.worker_pids() == [worker] and "left part of a reply" in fleet.log()


def test_a_child_stopped_in_the_middle_of_its_reply_finishes_it_once_continued(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """A child stopped (SIGSTOP, a debugger) while it wrote a reply larger than its pipe
    was taken for one whose task had written into the pipe: killed once part of the reply
    had waited PARTIAL_REPLY_LIMIT (here 1 s), its task, which had ended, ran again."""
    fleet = make_fleet(
        fleet={"imports": ["tasks", "quick"]}, defaults={"concurrency": 1, "prefetch": 1}
    )
    (fleet.folder / "quick.py").write_text(
        "import worker.pool\nworker.pool.PARTIAL_REPLY_LIMIT = 1.0\n"
    )
    fleet.start()
    [worker], [child] = fleet.worker_pids(), fleet.child_pids()
    journal = tmp_path / "journal"
    size = 4 << 20
    handle = fleet.client.submit("tasks.journal_reply", str(journal), 0.3, size)
    wait_for(lambda: executions(journal), 10, message="the task to start")
    os.kill(worker, signal.SIGSTOP)  # the pipe fills: the child waits in the middle of its write
    try:
        wait_for(lambda: "E " in journal.read_text(), 10, message="the task to end")
        wait_for(lambda: "pipe_write" in wchan(child), 10, message="the child to wait in write")
        os.kill(child, signal.SIGSTOP)
    finally:
        os.kill(worker, signal.SIGCONT)  # it reads what the pipe holds: part of the reply
    try:
        assert holds(lambda: tree.proc_stat(child) is not None, 3.0)  # three limits
    finally:
        with contextlib.suppress(ProcessLookupError):  # it was killed: the assertion says so
            os.kill(child, signal.SIGCONT)
    assert handle.get(timeout=20) == "x" * size
    assert executions(journal) == {handle.id: 1}
    assert handle.info()["deliveries"] == 1
    assert fleet.child_pids() == [child] and "left part of a reply" not in fleet.log()


def wchan(pid: int) -> str:
    """Where in the kernel `pid` waits (anon_pipe_write, pipe_write: writing to a pipe)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/wchan") as f:
        return f.read()
    return ""


@pytest.mark.parametrize(
    ("how", "expected"),
    [("chld", 3), ("pipe", "EPIPE"), ("recursion", None)],
)
def test_a_task_that_changes_the_childs_signals_or_recursion_limit_leaves_the_next_ones_theirs(
    escape_fleet, how: str, expected: object
) -> None:
    """A task ignores SIGCHLD (a daemon library's habit), puts SIGPIPE back to its default,
    or lowers the recursion limit, and returns. The next task in the same child sees
    Python's defaults: its subprocess's exit status, EPIPE on a closed pipe, a result
    nested 100 deep."""
    fleet, _ = escape_fleet(defaults={"concurrency": 1})
    fleet.start()
    [child] = fleet.child_pids()
    assert fleet.client.submit("escape_tasks.meddle", how).get(timeout=10) == child
    result = fleet.client.submit("escape_tasks.rely_on", how).get(timeout=10)
    if how == "recursion":
        depth = 0
        while result:
            result, depth = result[0], depth + 1
        assert depth == 100
    else:
        assert result == expected
    assert fleet.child_pids() == [child]


@pytest.mark.parametrize("how", ["stay", "remove"])
def test_a_task_that_moves_to_another_directory_leaves_the_next_ones_where_they_were(
    escape_fleet, tmp_path: Path, how: str
) -> None:
    """A task changes its working directory, to one that stays or one it then removes; the
    next task in the same child runs where the tasks before it ran."""
    fleet, _ = escape_fleet(defaults={"concurrency": 1})
    fleet.start()
    [child] = fleet.child_pids()
    home = fleet.client.submit("escape_tasks.where").get(timeout=10)
    moved = fleet.client.submit("escape_tasks.move", how, str(tmp_path / "elsewhere"))
    assert moved.get(timeout=10) == child
    assert fleet.client.submit("escape_tasks.where").get(timeout=10) == home
    assert fleet.child_pids() == [child]


def test_a_childs_restore_sets_again_only_the_dispositions_a_task_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After each task the child puts back its signal dispositions, one sigaction per
    signal that the task changed: none for the others (setting each again cost a child
    some 9 us a task, 40% of its CPU on a no-op task)."""
    child = Child(-1, -1, -1)
    child.handlers = {signal.SIGUSR2: signal.SIG_DFL, signal.SIGPIPE: signal.SIG_IGN}
    before = {sig: signal.signal(sig, handler) for sig, handler in child.handlers.items()}
    child.mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    child.streams = sys.stdout, sys.stderr
    child.output = OutputFds()
    child.recursion_limit = sys.getrecursionlimit()
    real, set_again = signal.signal, []
    raw = tree.raw_signal  # what set_dispositions sets them through
    monkeypatch.setattr(tree, "raw_signal", lambda sig, h: set_again.append(sig) or raw(sig, h))
    try:
        child.restore(alone=False)
        assert set_again == []
        real(signal.SIGUSR2, signal.SIG_IGN)  # what a task did
        child.restore(alone=False)
        assert set_again == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    finally:
        for sig, handler in before.items():
            real(sig, handler)


# --- the pieces, on plain processes ------------------------------------------------------------
FORKER = """
import os, subprocess, sys, time
sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
kids = [subprocess.Popen(sleeper, start_new_session=True), subprocess.Popen(sleeper)]
print(" ".join(str(k.pid) for k in kids), flush=True)
while True:  # keeps forking: the tree grows while it is being ended
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
    time.sleep(0.005)
"""


@pytest.fixture
def forker() -> Iterator[tuple[subprocess.Popen[str], list[int]]]:
    """A process that started a child in a session of its own and one in its group, and
    forks a new child every few milliseconds."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FORKER], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    kids = [int(pid) for pid in proc.stdout.readline().split()]
    seen: set[int] = set()
    try:
        yield proc, kids
    finally:
        with contextlib.suppress(psutil.Error):
            seen |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        for pid in [*kids, *seen]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait(timeout=10)


def test_end_tree_ends_a_growing_tree_and_what_left_its_session(forker) -> None:
    proc, kids = forker
    wait_for(lambda: len(tree.descendants(proc.pid)) >= 5, 10, message="the tree to grow")
    everyone = [proc.pid, *tree.descendants(proc.pid)]
    assert tree.end_tree(proc.pid) >= len(everyone)
    proc.wait(timeout=10)
    wait_for(lambda: not any(alive(pid) for pid in [*everyone, *kids]), 10, message="the tree")


def test_the_next_start_finds_the_processes_marked_with_the_previous_run() -> None:
    marked = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, orphans.RUN_MARK: "run-1"},
        start_new_session=True,
    )
    try:
        # Popen returns once the exec is under way; the kernel sets the new environment a
        # moment later (/proc/PID/environ reads empty until then: make test saw it once).
        wait_for(
            lambda: b"run-1" in Path(f"/proc/{marked.pid}/environ").read_bytes(),
            10,
            message="the exec to set the environment",
        )
        found = dict(orphans.find_leftovers({"run": "run-1"}))
        assert found.get(marked.pid) == pytest.approx(orphans.create_time(marked.pid))
        assert marked.pid not in dict(orphans.find_leftovers({"run": "run-2"}))
        assert marked.pid not in dict(orphans.find_leftovers({}))
    finally:
        marked.kill()
        marked.wait(timeout=10)


@pytest.mark.parametrize("end", ["time limit", "kill"])
def test_a_task_handed_to_a_stopped_idle_child_goes_back_unstruck_and_runs_once(
    make_fleet: Callable[..., Fleet], tmp_path: Path, end: str
) -> None:
    """An idle child stopped (SIGSTOP, a debugger) is handed a task it cannot read. Its time
    limit ended it FAILURE TimeLimitExceeded, and a kill of the child counted a death
    against it: a task that never ran. Its frame, still in the pipe, says it never began:
    it goes back without a strike and runs once on the child that replaces this one."""
    fleet = make_fleet(defaults={"concurrency": 1, "time_limit": 1 if end == "time limit" else 0})
    fleet.start()
    [child] = fleet.child_pids()
    os.kill(child, signal.SIGSTOP)
    try:
        journal = tmp_path / "journal"
        handle = fleet.client.submit("tasks.journal", str(journal))
        wait_for(lambda: handle.state != "PENDING", 10, message="the task handed to the child")
        if end == "kill":
            os.kill(child, signal.SIGKILL)
        assert handle.get(timeout=20) != child
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGCONT)
    assert executions(journal) == {handle.id: 1}
    assert handle.info()["state"] == "SUCCESS" and "died running task" not in fleet.log()
    assert child not in fleet.child_pids()
    if end == "time limit":
        assert f"child {child} did not read task {handle.id} within its time limit" in fleet.log()

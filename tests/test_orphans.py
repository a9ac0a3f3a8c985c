"""The /proc readings that recognise processes, against psutil's, on real processes."""

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

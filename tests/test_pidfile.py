"""The pidfile and `fleetd stop`, with real processes standing in for fleetd and for strangers."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from supervisor.pidfile import PidfileError, read_live_pid, remove_pidfile, stop, write_pidfile

# Reads like the arbiter's command line; ignores the signals named in argv[1]; QUIT ends it.
FAKE_FLEETD = """
import signal, sys, time
signal.signal(signal.SIGQUIT, lambda *_: sys.exit(0))
for name in filter(None, sys.argv[1].split(",")):
    signal.signal(getattr(signal, name), signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


@contextmanager
def fake_fleetd(ignore: str = "") -> Iterator[subprocess.Popen[bytes]]:
    """A live process that passes for `fleetd start`, with its signal handlers in place."""
    cmd = [sys.executable, "-c", FAKE_FLEETD, ignore, "fleetd", "start", "-c", "x.toml"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None
            readable, _, _ = select.select([proc.stdout], [], [], 10)
            assert readable and proc.stdout.readline() == b"ready\n"
            yield proc
        finally:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is not fleetd, once it has exec'd `sleep`."""
    cmd = ["sleep", "60"]
    with subprocess.Popen(cmd) as proc:
        try:
            deadline = time.monotonic() + 10
            while psutil.Process(proc.pid).cmdline() != cmd:
                assert time.monotonic() < deadline, "sleep did not start"
                time.sleep(0.01)
            yield proc
        finally:
            proc.kill()
            proc.wait(timeout=10)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=10)
    return proc.pid


def test_read_live_pid_returns_the_pid_of_a_running_fleetd(tmp_path: Path) -> None:
    pidfile = tmp_path / "fleetd.pid"
    with fake_fleetd() as proc:
        pidfile.write_text(f"{proc.pid}\n")
        assert read_live_pid(pidfile) == proc.pid


def test_read_live_pid_names_a_missing_pidfile(tmp_path: Path) -> None:
    with pytest.raises(PidfileError, match="no pidfile at .*fleetd.pid"):
        read_live_pid(tmp_path / "fleetd.pid")


@pytest.mark.parametrize("content", ["", "hello\n", "-5\n", "12 13\n"])
def test_read_live_pid_names_garbage_content(tmp_path: Path, content: str) -> None:
    pidfile = tmp_path / "fleetd.pid"
    pidfile.write_text(content)
    with pytest.raises(PidfileError, match="not a pid"):
        read_live_pid(pidfile)


def test_a_pidfile_of_bytes_that_are_no_text_or_of_no_end_is_no_pid(tmp_path: Path) -> None:
    """Another program's file where the pidfile goes, or a link to /dev/zero: `fleetd stop`
    ended in a UnicodeDecodeError's traceback, or read until memory ran out; `fleetd
    start` took neither over."""
    pidfile = tmp_path / "fleetd.pid"
    for content in (b"\xff\xfe\n", None):
        pidfile.unlink(missing_ok=True)
        if content is None:
            pidfile.symlink_to("/dev/zero")
        else:
            pidfile.write_bytes(content)
        with pytest.raises(PidfileError, match="not a pid" if content else "not a regular file"):
            read_live_pid(pidfile)
        pidfile.unlink()
        pidfile.write_bytes(content or b"\0" * 10000)
        write_pidfile(pidfile)
        assert pidfile.read_text() == f"{os.getpid()}\n"


def test_read_live_pid_calls_a_dead_pid_stale(tmp_path: Path) -> None:
    pid = dead_pid()
    pidfile = tmp_path / "fleetd.pid"
    pidfile.write_text(f"{pid}\n")
    with pytest.raises(PidfileError, match=f"^stale pidfile .*: pid {pid} is not running$"):
        read_live_pid(pidfile)


def test_read_live_pid_refuses_a_live_pid_that_is_not_fleetd(tmp_path: Path) -> None:
    pidfile = tmp_path / "fleetd.pid"
    with sleeper() as proc:
        pidfile.write_text(f"{proc.pid}\n")
        with pytest.raises(PidfileError, match=f"^stale pidfile .*: pid {proc.pid} is sleep, not"):
            read_live_pid(pidfile)
        assert proc.poll() is None


def test_write_pidfile_records_our_pid_atomically(tmp_path: Path) -> None:
    pidfile = tmp_path / "fleetd.pid"
    write_pidfile(pidfile)
    assert pidfile.read_text() == f"{os.getpid()}\n"
    assert os.listdir(tmp_path) == ["fleetd.pid"]


@pytest.mark.parametrize("content", ["garbage\n", "stale"])
def test_write_pidfile_takes_over_a_garbage_or_stale_pidfile(tmp_path: Path, content: str) -> None:
    pidfile = tmp_path / "fleetd.pid"
    pidfile.write_text(f"{dead_pid()}\n" if content == "stale" else content)
    write_pidfile(pidfile)
    assert pidfile.read_text() == f"{os.getpid()}\n"


def test_write_pidfile_takes_over_from_a_live_process_that_is_not_fleetd(tmp_path: Path) -> None:
    pidfile = tmp_path / "fleetd.pid"
    with sleeper() as proc:
        pidfile.write_text(f"{proc.pid}\n")
        write_pidfile(pidfile)
        assert pidfile.read_text() == f"{os.getpid()}\n"
        assert proc.poll() is None


def test_write_pidfile_refuses_while_a_live_fleetd_holds_it(tmp_path: Path) -> None:
    pidfile = tmp_path / "fleetd.pid"
    with fake_fleetd() as proc:
        pidfile.write_text(f"{proc.pid}\n")
        with pytest.raises(PidfileError, match=f"already running with pid {proc.pid}") as error:
            write_pidfile(pidfile)
        assert "\n" not in str(error.value)
        assert pidfile.read_text() == f"{proc.pid}\n"


def test_write_pidfile_names_a_folder_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(PidfileError, match="cannot write pidfile .*missing/fleetd.pid"):
        write_pidfile(tmp_path / "missing" / "fleetd.pid")


def test_remove_pidfile_removes_only_a_pidfile_holding_our_pid(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.pid", tmp_path / "theirs.pid"
    write_pidfile(ours)
    theirs.write_text(f"{os.getpid() + 1}\n")
    remove_pidfile(ours)
    remove_pidfile(theirs)
    remove_pidfile(tmp_path / "missing.pid")
    assert os.listdir(tmp_path) == ["theirs.pid"]


@pytest.mark.parametrize(
    ("ignore", "quit_after", "exits"),
    [
        pytest.param("", 10, True, id="term-ends-it"),
        pytest.param("SIGTERM", 10, True, id="quit-ends-it"),
        pytest.param("SIGTERM,SIGQUIT", 0.1, False, id="nothing-ends-it"),
        pytest.param("SIGTERM", 0, False, id="quit_after-0-sends-no-quit"),
    ],
)
def test_stop_sends_term_then_quit_and_says_whether_the_process_exited(
    ignore: str, quit_after: float, exits: bool
) -> None:
    with fake_fleetd(ignore) as proc:
        assert stop(proc.pid, timeout=0.3, quit_after=quit_after) is exits
        assert (proc.poll() is not None) is exits


def test_stop_wakes_a_stopped_arbiter() -> None:
    """A stopped arbiter (Ctrl-Z on a foreground `fleetd start`) held `fleetd stop` for ever."""
    with fake_fleetd("") as proc:
        os.kill(proc.pid, signal.SIGSTOP)
        assert stop(proc.pid, timeout=5, quit_after=0)
        assert proc.wait(5) is not None


def test_stop_of_a_pid_that_is_gone_is_done() -> None:
    assert stop(dead_pid(), timeout=1)

"""sd_notify: the datagrams systemd receives on a real unix socket."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.notify import Notifier


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A socket standing in for systemd's, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_ready_sends_ready_and_status_in_one_datagram(systemd: socket.socket) -> None:
    Notifier().ready("2 workers")
    assert received(systemd) == "READY=1\nSTATUS=2 workers"


def test_ready_without_status_sends_ready_only(systemd: socket.socket) -> None:
    Notifier().ready()
    assert received(systemd) == "READY=1"


def test_reloading_sends_monotonic_usec_in_one_datagram(systemd: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = received(systemd).split("\n")
    assert first == "RELOADING=1"
    key, usec = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= after


def test_stopping_status_and_watchdog_send_their_keys(systemd: socket.socket) -> None:
    notifier = Notifier()
    notifier.stopping()
    notifier.status("reloading config\nfrom disk")
    notifier.watchdog()
    assert received(systemd) == "STOPPING=1"
    assert received(systemd) == "STATUS=reloading config from disk"
    assert received(systemd) == "WATCHDOG=1"


def test_abstract_socket_address_starting_with_at(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"fleetd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        Notifier().ready()
        assert received(sock) == "READY=1"


def test_without_notify_socket_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready("up")
    notifier.reloading()
    notifier.stopping()
    notifier.watchdog()


def test_send_error_is_logged_at_debug_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert notifier.enabled
    with caplog.at_level(logging.DEBUG, logger="supervisor.notify"):
        notifier.ready()
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "READY=1" in caplog.records[0].getMessage()


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval() == 15.0


def test_watchdog_interval_applies_to_our_pid_only() -> None:
    ours = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(ours).watchdog_interval() == 2.0
    theirs = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(theirs).watchdog_interval() is None


@pytest.mark.parametrize("usec", ["", "0", "soon"])
def test_watchdog_interval_is_none_without_a_valid_watchdog_usec(usec: str) -> None:
    assert Notifier({"WATCHDOG_USEC": usec}).watchdog_interval() is None

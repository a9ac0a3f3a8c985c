"""Fixtures: a fresh fleet folder per test, stopped by pid at the end whatever happens, and
the broker it runs on."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.brokers.conftest import REDIS_URL, delete_prefix, require_redis
from tests.fleet import Fleet

ILLEGAL = "illegal state transition"  # what the arbiter logs on a bug in its state machine

# Started in the background by a shell (`make test &` in a script, as CI may), the suite
# inherits SIGINT ignored, and so would each fleetctl it starts, which a test ends with
# SIGINT as Ctrl-C does: with a handler here, exec gives every child the default back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    """`make_fleet(workers=[...], defaults={...})` -> a Fleet (not started), stopped at teardown."""
    fleets: list[Fleet] = []

    def make(name: str = "host", **kwargs: Any) -> Fleet:
        fleet = Fleet(tmp_path / name, **kwargs)
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.stop()
    leftovers = [pid for fleet in fleets for pid in fleet.leftovers()]
    assert not leftovers, f"processes left behind: {leftovers}"
    illegal = [line for fleet in fleets for line in fleet.log().splitlines() if ILLEGAL in line]
    assert not illegal, f"the arbiter broke its state machine: {illegal}"


@pytest.fixture(params=["sqlite", "redis"])
def broker_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The fleet's broker: its own SQLite file, or the shared Redis under a prefix of its own."""
    if request.param == "sqlite":
        yield "sqlite:///queue.db"
        return
    require_redis(REDIS_URL)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    try:
        yield f"{REDIS_URL}?prefix={prefix}"
    finally:
        delete_prefix(REDIS_URL, prefix)


# --- a full disk ------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A tmpfs at `mount` (made) with mount `options` (its size, its inodes), unmounted at the
    end: a disk that a test can really fill. Needs root (CI runs as root: it fails there)."""
    if os.geteuid() != 0:
        message = "mounting a tmpfs needs root"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        for _ in range(50):  # processes killed by the fleet's stop may still hold files
            if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "--lazy", str(mount)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """`tmp_path/host/state`: an 8 MiB tmpfs. Ask for it before make_fleet, so that the
    fleet is stopped before it is unmounted."""
    with tmpfs(tmp_path / "host" / "state", "size=8m,mode=0700") as mount:
        yield mount


def fill(folder: Path) -> Path:
    """Write a file into `folder` until its filesystem has no byte left."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (b"\0" * 65536, b"\0" * 4096, b"\0"):
            with contextlib.suppress(OSError):
                while os.write(fd, chunk):
                    pass
        with pytest.raises(OSError) as full:
            os.write(fd, b"\0")
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler

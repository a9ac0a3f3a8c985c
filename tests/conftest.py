"""Fixtures: a fresh fleet folder per test, stopped by pid at the end whatever happens, and
the broker it runs on."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.brokers.conftest import REDIS_URL, delete_prefix, require_redis
from tests.fleet import Fleet

ILLEGAL = "illegal state transition"  # what the arbiter logs on a bug in its state machine


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

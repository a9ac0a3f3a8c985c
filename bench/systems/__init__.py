"""The systems under test, in the order of the columns of RESULTS.md."""

from __future__ import annotations

from bench.systems.arq_sys import ArqSystem
from bench.systems.base import System
from bench.systems.celery_sys import CelerySystem
from bench.systems.dramatiq_sys import DramatiqSystem
from bench.systems.fleetd_sys import (
    FleetdRedis,
    FleetdRedisSpread,
    FleetdSQLite,
    FleetdSQLiteSpread,
)
from bench.systems.huey_sys import HueySystem
from bench.systems.rq_sys import RQSystem
from bench.systems.saq_sys import SAQSystem


def all_systems() -> list[System]:
    return [
        FleetdRedis(),
        FleetdSQLite(),
        CelerySystem(),
        RQSystem(),
        DramatiqSystem(),
        HueySystem(),
        SAQSystem(),
        ArqSystem(),
    ]


def scale_systems() -> list[System]:
    """The columns of `python -m bench.scale`: the peers that scale with processes, and fleetd
    on each broker with one worker and with its children over 4 workers."""
    return [
        CelerySystem(),
        HueySystem(),
        FleetdSQLite(),
        FleetdSQLiteSpread(),
        FleetdRedis(),
        FleetdRedisSpread(),
    ]


def system_named(name: str) -> System:
    known = {system.name: system for system in [*all_systems(), *scale_systems()]}
    if name not in known:
        raise KeyError(f"no system named {name!r}; known: {sorted(known)}")
    return known[name]

"""The systems under test, in the order of the columns of RESULTS.md."""

from __future__ import annotations

from bench.systems.arq_sys import ArqSystem
from bench.systems.base import System
from bench.systems.celery_sys import CelerySystem
from bench.systems.dramatiq_sys import DramatiqSystem
from bench.systems.fleetd_sys import FleetdRedis, FleetdSQLite
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


def system_named(name: str) -> System:
    for system in all_systems():
        if system.name == name:
            return system
    raise KeyError(f"no system named {name!r}; known: {[s.name for s in all_systems()]}")

"""What one worker process is told at spawn (`WorkerSpec`), and the rate and size notations.

A leaf of the `worker` package: the arbiter builds a spec from the config, the worker
reads it back from JSON; both sides need it, so it lives here, below both.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

# Patterns, not compiled ones: `re` compiles each on first use, which fleetctl never makes.
# [0-9], not \d: \d takes the digits of every script ("١/s"), which float() reads as well.
RATE_RE = r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(?:/\s*([smh]))?\s*$"
SIZE_RE = r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgG]?)(?:[iI]?[bB])?\s*$"
SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


@dataclass(frozen=True)
class WorkerSpec:
    """Everything one named worker process needs; sent to it as JSON at spawn."""

    name: str
    node: str  # name@host
    queues: list[str]
    concurrency: int
    prefetch: int = 1
    async_concurrency: int = 100  # async def tasks one child runs at once
    max_tasks_per_child: int = 0
    max_memory_per_child: int = 0  # bytes; 0 = no limit
    time_limit: float = 0
    soft_time_limit: float = 0
    acks_late: bool = True
    max_deliveries: int = 3
    shutdown_timeout: float = 0
    worker_timeout: float = 60  # seconds without a word before the arbiter kills it; 0 = never
    autoscale: list[int] = field(default_factory=list)  # [MIN, MAX]; empty: `concurrency` fixed
    autoscale_wait: float = 1.0  # seconds a task may wait to start before the pool grows
    autoscale_idle: float = 30.0  # seconds a child may sit idle before the pool shrinks
    rate_limits: dict[str, str] = field(default_factory=dict)
    broker: str = ""
    durability: str = "default"
    lease: float = 30
    result_ttl: int = 86400
    imports: list[str] = field(default_factory=list)
    pythonpath: list[str] = field(default_factory=list)
    state_dir: str = ""
    schedules: list[dict[str, Any]] = field(default_factory=list)  # worker/scheduler.py's, as JSON

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerSpec:
        return cls(**data)


def parse_rate(text: str) -> float:
    """`"200/m"` -> tasks per second (3.33...); `"0"` -> 0 (no limit). ValueError if malformed,
    or above 0 as written but too small for a float (it would clear the limit)."""
    text = str(text)
    shown = text if len(text) <= 40 else f"{text[:40]}..."
    match = re.match(RATE_RE, text)
    if not match:
        raise ValueError(f"rate {shown!r} is not N, N/s, N/m or N/h")
    number, unit = match.groups()
    per_second = float(number) / {"s": 1, "m": 60, "h": 3600}[unit or "s"]
    if not math.isfinite(per_second):  # digits past what a float holds
        raise ValueError(f"rate {shown!r} is too large")
    if per_second == 0 and number.strip("0."):
        raise ValueError(f"rate {shown!r} is too small: it reads as 0, which means no limit")
    return per_second


def parse_size(text: str) -> int:
    """`"512MB"` -> bytes; `"0"` -> 0."""
    match = re.match(SIZE_RE, str(text))
    if not match:
        raise ValueError(f"size {text!r:.80} is not like 512MB, 2GB or 0")
    size = float(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    if not math.isfinite(size):  # digits past what a float holds
        raise ValueError(f"size {text!r:.80} is too large")
    return int(size)

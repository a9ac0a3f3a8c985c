"""Brokers by URL scheme: `sqlite:///...` (embedded, the default) and `redis://...`."""

from __future__ import annotations

from .base import Broker


def open_broker(url: str, durability: str = "default") -> Broker:
    """A new connection to the broker at `url`; raises ValueError for an unknown scheme."""
    if url.startswith("sqlite:"):
        from .sqlite import SQLiteBroker

        return SQLiteBroker(url, durability=durability)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisBroker

        return RedisBroker(url)
    raise ValueError(f"unknown broker URL {url!r}: use sqlite:///path.db or redis://host:port/db")

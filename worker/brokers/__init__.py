"""Brokers by URL scheme: `sqlite:///...` (embedded, the default) and `redis://...`."""

from __future__ import annotations

from .base import Broker


def open_broker(
    url: str, durability: str = "default", result_ttl: int = 86400, fail_fast: bool = False
) -> Broker:
    """A new connection to the broker at `url`; raises ValueError for an unknown scheme.

    `result_ttl`: seconds an ended task's record is kept.
    `fail_fast`: a Redis call cut off by a lost connection is sent again only briefly
    before it raises `broker.unavailable`, for a caller that retries on its own and has
    other work meanwhile (the worker's loop); otherwise it rides out a Redis restart.
    """
    if url.startswith("sqlite:"):
        from .sqlite import SQLiteBroker

        return SQLiteBroker(url, durability=durability, result_ttl=result_ttl)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import CALL_RETRIES, FAIL_FAST_RETRIES, RedisBroker

        retries = FAIL_FAST_RETRIES if fail_fast else CALL_RETRIES
        return RedisBroker(url, result_ttl=result_ttl, call_retries=retries)
    raise ValueError(f"unknown broker URL {url!r}: use sqlite:///path.db or redis://host:port/db")

"""Token buckets for per-task-name rate limits ("N/s", "N/m", "N/h")."""

from __future__ import annotations

import time

from .spec import parse_rate


class TokenBucket:
    """`rate` tokens a second, holding at most `capacity` (at least one)."""

    def __init__(self, rate: float, capacity: float | None = None) -> None:
        self.rate = rate
        self.capacity = max(1.0, capacity if capacity is not None else min(rate, 1.0))
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float | None = None) -> bool:
        """Take a token if one is there."""
        now = time.monotonic() if now is None else now
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait_time(self, now: float | None = None) -> float:
        """Seconds until a token is there (0 if one is)."""
        now = time.monotonic() if now is None else now
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate


class RateLimits:
    """The buckets of one worker, by task name; a rate of 0 means no limit."""

    def __init__(self, limits: dict[str, str] | None = None) -> None:
        self.buckets: dict[str, TokenBucket] = {}
        self.rates: dict[str, str] = {}
        for name, rate in (limits or {}).items():
            self.set(name, rate)

    def set(self, name: str, rate: str) -> None:
        """Set or clear (`"0"`) the limit of a task name; ValueError if malformed."""
        per_second = parse_rate(rate)
        if per_second <= 0:
            self.buckets.pop(name, None)
            self.rates.pop(name, None)
        else:
            self.buckets[name] = TokenBucket(per_second)
            self.rates[name] = rate

    def take(self, name: str, now: float) -> float:
        """0 if a task of this name may start now (taking a token), else seconds to wait."""
        bucket = self.buckets.get(name)
        if bucket is None or bucket.take(now):
            return 0.0
        return bucket.wait_time(now)

"""Token-bucket arithmetic of per-task rate limits."""

from __future__ import annotations

import pytest

from worker.ratelimit import RateLimits, TokenBucket


def test_bucket_allows_its_rate_and_no_more() -> None:
    bucket = TokenBucket(5.0)
    now = 100.0
    bucket.stamp = now
    taken = sum(bucket.take(now + i * 0.01) for i in range(100))  # one second
    assert taken in (5, 6)  # the first token is there at once


def test_wait_time_says_when_the_next_token_comes() -> None:
    bucket = TokenBucket(2.0)
    bucket.stamp = 0.0
    assert bucket.take(0.0)
    assert not bucket.take(0.0)
    assert bucket.wait_time(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5)


def test_limits_by_name_and_zero_clears() -> None:
    limits = RateLimits({"tasks.a": "1/s"})
    assert limits.take("tasks.a", 10.0) == 0.0
    assert limits.take("tasks.a", 10.0) > 0
    assert limits.take("tasks.b", 10.0) == 0.0  # other names are not held up
    limits.set("tasks.a", "0")
    assert limits.take("tasks.a", 10.0) == 0.0


def test_bad_rate_is_refused() -> None:
    with pytest.raises(ValueError):
        RateLimits().set("tasks.a", "lots")


def test_a_rate_too_small_for_a_float_is_refused_not_taken_for_0() -> None:
    limits = RateLimits({"tasks.a": "1/s"})
    with pytest.raises(ValueError, match="too small"):
        limits.set("tasks.a", "0." + "0" * 400 + "1/s")
    assert limits.rates == {"tasks.a": "1/s"}

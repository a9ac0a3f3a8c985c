"""The one task body every system runs: push the time it ran onto a Redis list the harness reads.

The cost is one RPUSH on a connection the process keeps, the same in every system, so the
figures compare the systems and not their task bodies. The body returns its timestamp, so a
result is stored by every system (Huey stores no result for a task that returns None).

redis-py looks up its own version (importlib.metadata: a scan of sys.path, ~3 ms and ~2 MiB)
once per process, on its first connection. A system whose broker client is redis-py has done
it in the parent before forking; one whose broker is not Redis (fleetd on SQLite) would pay
it again in every child. It is done here, at import, so that every system pays it once.
"""

from __future__ import annotations

import functools
import os
import time

import redis
import redis.utils

redis.utils.get_lib_version()  # cached: see above

ASYNC_IO_SECONDS = 0.1  # what the I/O-bound async task awaits before its stamp


@functools.cache
def _client(pid: int) -> redis.Redis:
    """A connection per process: keyed by pid so that a forked child never shares its parent's."""
    return redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])


def stamp(key: str) -> float:
    """Record now on the list `key` and return it."""
    now = time.time()
    _client(os.getpid()).rpush(key, repr(now))
    return now

"""What a worker's revoke read costs as the revoked set grows: `python -m bench.revoke_reads
[--ids 100000] [--held 8]`.

On a private redis-server holding N revoked ids, times the two ways a worker can learn
which of its tasks were revoked: reading the whole set (`RedisBroker.revoked`, what every
worker did at its boot and whenever the set grew, until workers asked about their own
tasks) and asking about the `--held` ids it holds (`revoked_among`, what it does at each
lease renewal and revoke wake-up). Prints, for each, the caller's time per read and the
Redis server's CPU per read (INFO commandstats), medians of a few rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from bench.redis_server import RedisServer
from worker.brokers.redis import RedisBroker

ROUNDS = 7


def server_usec(server: RedisServer) -> float:
    stats = server.client.info("commandstats")
    return sum(float(s["usec"]) for name, s in stats.items() if "config" not in name)


def timed(server: RedisServer, read: Callable[[], object]) -> tuple[float, float]:
    """Median ms per read for the caller and for the server."""
    caller, busy = [], []
    for _ in range(ROUNDS):
        server.client.config_resetstat()
        started = time.perf_counter()
        read()
        caller.append((time.perf_counter() - started) * 1000)
        busy.append(server_usec(server) / 1000)
    return statistics.median(caller), statistics.median(busy)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.revoke_reads", description=__doc__)
    parser.add_argument("--ids", type=int, default=100_000, help="ids in the revoked set")
    parser.add_argument("--held", type=int, default=8, help="tasks the worker holds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetd-revokes-") as folder:
        with RedisServer(Path(folder)) as server:
            broker = RedisBroker(server.url, prefix="bench")
            ids = [uuid.uuid4().hex for _ in range(args.ids)]
            for start in range(0, len(ids), 10_000):
                server.client.sadd("bench:revoked", *ids[start : start + 10_000])
            held = [uuid.uuid4().hex for _ in range(args.held - 1)] + ids[-1:]
            for title, read in [
                ("the whole set (revoked)", broker.revoked),
                (f"the {args.held} held ids (revoked_among)", lambda: broker.revoked_among(held)),
            ]:
                caller, busy = timed(server, read)
                print(f"{args.ids:,} revoked ids, {title}: {caller:.3f} ms, Redis {busy:.3f} ms")
            broker.close()


if __name__ == "__main__":
    main()

"""Microseconds per call of the Redis broker's hot path: `python -m bench.redis_micro`.

Runs each operation in a loop against a Redis (127.0.0.1:6379 unless `--url`), under a
key prefix of its own that is deleted afterwards, and prints the time per call as the
caller sees it (the median of a few rounds) next to Redis's own time per script call
(INFO commandstats, so other clients of the same server add noise to that column).
`--profile OP` prints where the caller's time goes for one operation instead.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
import uuid
from collections.abc import Callable

import redis

from worker.brokers.base import SUCCESS, Envelope, Outcome, Turn
from worker.brokers.redis import RedisBroker

ROUNDS = 5
QUEUE = "bench"
CALLS = {"enqueue(1)": 2000, "enqueue(100)": 40, "reserve(4)": 1000, "turn(3+3)": 1000}


def envelopes(count: int) -> list[Envelope]:
    ids = [uuid.uuid4().hex for _ in range(count)]
    return [Envelope(i, QUEUE, "tasks.add", '{"args": [1, 2], "kwargs": {}}') for i in ids]


def script_usec(client: redis.Redis) -> tuple[int, int]:
    """(calls, usec) of every script command Redis has run so far."""
    stats = client.info("commandstats")
    calls = usec = 0
    for name in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall"):
        if name in stats:
            calls += stats[name]["calls"]
            usec += stats[name]["usec"]
    return calls, usec


def operations(broker: RedisBroker) -> dict[str, Callable[[], None]]:
    """Name -> one call; each leaves the broker ready for the next. The messages to enqueue
    are made beforehand, so that their ids cost nothing in the time measured."""
    held: list[str] = []
    singles = iter([envelopes(1) for _ in range(ROUNDS * CALLS["enqueue(1)"])])
    hundreds = iter([envelopes(100) for _ in range(ROUNDS * CALLS["enqueue(100)"])])

    def enqueue_one() -> None:
        broker.enqueue(next(singles))

    def enqueue_hundred() -> None:
        broker.enqueue(next(hundreds))

    def reserve_four() -> None:
        if not broker.reserve([QUEUE], 4, "bench-w1", 60):
            raise SystemExit("bench: the queue ran dry; enqueue more before reserving")

    def turn() -> None:
        outcomes = [Outcome(i, SUCCESS, result=3, node="bench@host", runtime=0.001) for i in held]
        deliveries = broker.turn(
            Turn(
                node="bench@host",
                started=held,
                outcomes=outcomes,
                queues=[QUEUE],
                n=3,
                owner="bench-w2",
                lease=60,
            )
        )
        held[:] = [d.id for d in deliveries]

    return {
        "enqueue(1)": enqueue_one,
        "enqueue(100)": enqueue_hundred,
        "reserve(4)": reserve_four,
        "turn(3+3)": turn,
    }


def measure(call: Callable[[], None], calls: int, client: redis.Redis) -> tuple[float, float]:
    """(us per call, median of the rounds; Redis us per script call over all rounds)."""
    rounds = []
    before = script_usec(client)
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        rounds.append((time.perf_counter() - started) / calls * 1e6)
    after = script_usec(client)
    scripts = after[0] - before[0]
    return statistics.median(rounds), (after[1] - before[1]) / scripts if scripts else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_micro", description=__doc__)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--profile", metavar="OP", help="cProfile one operation, e.g. 'enqueue(1)'")
    args = parser.parse_args()
    prefix = f"bench-micro-{uuid.uuid4().hex[:12]}"
    broker = RedisBroker(args.url, prefix=prefix)
    client = redis.Redis.from_url(args.url)
    try:
        ops = operations(broker)
        # Enough tasks queued for every reserve and turn that follows.
        reserved = ROUNDS * (CALLS["reserve(4)"] * 4 + CALLS["turn(3+3)"] * 3)
        for _ in range(reserved // 1000 + 1):
            broker.enqueue(envelopes(1000))
        if args.profile:
            call, calls = ops[args.profile], CALLS[args.profile]
            profiler = cProfile.Profile()
            profiler.runcall(lambda: [call() for _ in range(calls)])
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            return
        print(f"{'operation':<16}{'us/call':>10}{'redis us/script':>17}")
        for name, call in ops.items():
            client_us, server_us = measure(call, CALLS[name], client)
            print(f"{name:<16}{client_us:>10.0f}{server_us:>17.0f}")
    finally:
        broker.close()
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        client.close()


if __name__ == "__main__":
    main()

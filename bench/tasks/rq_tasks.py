"""RQ's copy of the benchmark task: a plain function that RQ imports by its dotted path."""

from __future__ import annotations

from bench.tasks import body


def stamp(key: str) -> float:
    return body.stamp(key)

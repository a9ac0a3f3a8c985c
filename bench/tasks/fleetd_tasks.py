"""fleetd's copy of the benchmark task: the shared body as a fleetd task (queue "default").
The async one is in fleetd_async_tasks.py."""

from __future__ import annotations

from bench.tasks import body
from fleetd import task


@task
def stamp(key: str) -> float:
    return body.stamp(key)

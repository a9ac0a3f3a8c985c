"""Celery's copy of the benchmark task: the shared body on a Redis broker and backend."""

from __future__ import annotations

import os

from celery import Celery

from bench.tasks import body

_URL = os.environ["BENCH_REDIS_URL"]

app = Celery("bench", broker=_URL, backend=_URL)
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)


@app.task(name="bench.stamp")
def stamp(key: str) -> float:
    return body.stamp(key)

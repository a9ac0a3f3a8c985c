"""A hostile producer: task records written straight into a broker, past the Client.

Each writer lays a record out the way its broker stores a task (a `tasks` row in SQLite;
a record hash plus a stream entry in Redis), but with whatever bytes it is given.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from dataclasses import dataclass

import redis

from tests.brokers.conftest import REDIS_URL
from worker.brokers.base import Broker
from worker.brokers.redis import RedisBroker
from worker.brokers.sqlite import SQLiteBroker
from worker.protocol import MAX_FRAME_SIZE


@dataclass(frozen=True)
class RawTask:
    id: bytes
    body: bytes
    name: bytes = b"tasks.add"
    queue: bytes = b"default"
    blobs: tuple[str, ...] = ()  # SQLite: the columns stored as BLOBs, not as (unchecked) TEXT


def body(task_id: str, **fields: object) -> bytes:
    """A task body as fleetd writes one for `tasks.add(1, 2)`, with `fields` changed
    (a field given as None is left out)."""
    message: dict[str, object] = {
        "id": task_id,
        "name": "tasks.add",
        "args": [1, 2],
        "kwargs": {},
        "retries": 0,
    }
    message.update(fields)
    return json.dumps({k: v for k, v in message.items() if v is not None}).encode()


def poison_bodies(prefix: str) -> dict[str, bytes]:
    """id -> body: every way a body can be unreadable or not a task."""
    deep = b"[" * 100_000 + b"]" * 100_000

    def named(kind: str) -> str:
        return f"{prefix}-{kind}"

    bodies = {
        named("not-utf8"): body(named("not-utf8"))[:-1] + b', "x": "\xff\xfe"}',
        named("not-json"): b"{not json",
        named("deep"): deep,
        named("deep-args"): body(named("deep-args"), args=[]).replace(b"[]", deep),
        named("not-object"): b"[1, 2]",
        named("args-not-list"): body(named("args-not-list"), args="12"),
        named("kwargs-not-dict"): body(named("kwargs-not-dict"), kwargs=[1]),
        named("retries-not-int"): body(named("retries-not-int"), retries="1"),
        named("retries-negative"): body(named("retries-negative"), retries=-1),
        named("retries-bool"): body(named("retries-bool"), retries=True),
        named("name-not-str"): body(named("name-not-str"), name=5),
        named("name-differs"): body(named("name-differs"), name="tasks.noop"),
        named("id-differs"): body(named("id-differs"), id="someone-else"),
        named("no-name"): body(named("no-name"), name=None),
        named("no-args"): body(named("no-args"), args=None),
        named("no-id"): body(named("no-id"), id=None),
        named("huge"): body(named("huge"), args=["x" * MAX_FRAME_SIZE]),
    }
    return bodies


def write_sqlite(path: str, tasks: list[RawTask]) -> None:
    """Insert rows as SQLiteBroker.enqueue does, bytes as they are (TEXT or BLOB)."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        for t in tasks:
            id_sql, body_sql = ("?" if c in t.blobs else "CAST(? AS TEXT)" for c in ("id", "body"))
            db.execute(
                "INSERT INTO tasks (id, queue, name, body, status, state, eta, created) VALUES"
                f" ({id_sql}, CAST(? AS TEXT), CAST(? AS TEXT), {body_sql}, 0, 'PENDING', 0, ?)",
                (t.id, t.queue, t.name, t.body, time.time()),
            )


def stream(prefix: str, queue: bytes = b"default") -> bytes:
    return f"{prefix}:q:".encode() + queue


def open_stream(client: redis.Redis, prefix: str, queue: bytes = b"default") -> None:
    client.sadd(f"{prefix}:queues", queue)
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it is there already
        client.xgroup_create(stream(prefix, queue), "workers", id="0", mkstream=True)


def write_redis(
    client: redis.Redis,
    prefix: str,
    tasks: list[RawTask],
    fields: tuple[bytes, ...] = (),
    group: bool = True,
) -> None:
    """Write records and stream entries as RedisBroker's ENQUEUE script does; `fields`
    names record fields to leave out; without `group`, a new stream gets no consumer group."""
    for t in tasks:
        if group:
            open_stream(client, prefix, t.queue)
        record = {
            b"id": t.id,
            b"queue": t.queue,
            b"name": t.name,
            b"body": t.body,
            b"state": b"PENDING",
            b"deliveries": b"0",
            b"status": b"queued",
        }
        for field in fields:
            del record[field]
        keys = [f"{prefix}:seq".encode(), stream(prefix, t.queue), f"{prefix}:r:".encode() + t.id]
        flat = [item for pair in record.items() for item in pair]
        client.eval(WRITE_ONE, 3, *keys, t.id, *flat)
    client.publish(f"{prefix}:wake:default", "1")


# A record and its stream entry in one step, as the broker's enqueue script writes them: a
# submit of a producer's that came between an INCR and an XADD of ours would top the stream
# ("The ID specified in XADD is equal or smaller"), and our entry would then take an id
# Redis picks, as the broker's does.
WRITE_ONE = """
local entry = '0-' .. redis.call('INCR', KEYS[1])
if type(redis.pcall('XADD', KEYS[2], entry, 'id', ARGV[1])) ~= 'string' then
  entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[1])
end
redis.call('HSET', KEYS[3], 'entry', entry, unpack(ARGV, 2))
return entry
"""


def add_entry(client: redis.Redis, prefix: str, fields: dict[bytes, bytes]) -> None:
    """A stream entry of the producer's own making (an id Redis picks), with no record."""
    open_stream(client, prefix)
    client.xadd(stream(prefix), fields)  # type: ignore[arg-type]
    client.publish(f"{prefix}:wake:default", "1")


def write_raw(broker: Broker, tasks: list[RawTask]) -> None:
    """Write records straight into the broker that `broker` is connected to."""
    if isinstance(broker, SQLiteBroker):
        write_sqlite(broker.path, tasks)
    else:
        assert isinstance(broker, RedisBroker)
        with contextlib.closing(redis.Redis.from_url(REDIS_URL)) as client:
            write_redis(client, broker.prefix, tasks)


def overwrite_fields(broker: Broker, task_id: str, fields: dict[str, bytes]) -> None:
    """Replace stored fields of a task's record with raw bytes (TEXT in SQLite)."""
    if isinstance(broker, SQLiteBroker):
        with contextlib.closing(sqlite3.connect(broker.path)) as db, db:
            for column, value in fields.items():
                db.execute(
                    f"UPDATE tasks SET {column} = CAST(? AS TEXT) WHERE id = ?", (value, task_id)
                )
    else:
        assert isinstance(broker, RedisBroker)
        with contextlib.closing(redis.Redis.from_url(REDIS_URL)) as client:
            client.hset(f"{broker.prefix}:r:{task_id}", mapping=fields)  # type: ignore[arg-type]

"""Read-only looks into the broker's task records that the Broker interface does not offer:
recent tasks, a task's body and timings, the oldest wait of each queue.

SQLite: plain SELECTs on the broker's own connection, which follows a queue file replaced
under it as the workers do. Redis keeps a task's record in a hash of its own,
`{prefix}:r:{id}`, and no index of them: recent tasks are those of a bounded SCAN, sorted
here (a sample, not every task, once there are more than SCAN_BUDGET records).
"""

from __future__ import annotations

import json
import time
from typing import Any

from worker.brokers.base import Broker
from worker.brokers.sqlite import DONE, QUEUED, SQLiteBroker

SCAN_BUDGET = 5000  # Redis records looked at for one list of recent tasks
LIST_COLUMNS = ("id", "name", "queue", "state", "deliveries", "node", "runtime", "exc_type")


class Records:
    """Recent tasks and task details of one broker, for one thread at a time (as the broker's
    connection is)."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._sqlite = broker if isinstance(broker, SQLiteBroker) else None

    def follow(self) -> None:
        """Look (at most once a second) whether the SQLite queue file was replaced, and read
        the new one if it was: a dashboard lives as long as the fleet."""
        if self._sqlite is not None:
            self._sqlite.follow_file()

    def recent(self, state: str, name: str, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """The newest tasks first (of a state and a name, if given), and whether the list may
        be partial (Redis: only SCAN_BUDGET records were looked at)."""
        if self._sqlite is not None:
            return self._recent_sqlite(state, name, limit), False
        return self._recent_redis(state, name, limit)

    def details(self, task_id: str) -> dict[str, Any]:
        """What the info dict lacks: args and kwargs (while the broker keeps the body: SQLite
        always, Redis until the task ended), and the times it has."""
        body, created, finished, eta = self._details_row(task_id)
        try:
            # NaN and infinity (another producer's json.dumps) as their names: the page's JSON
            # holds no such number.
            decoded = json.loads(body, parse_constant=str) if body is not None else {}
        except (ValueError, TypeError, RecursionError):
            decoded = {}
        if not isinstance(decoded, dict):
            decoded = {}
        return {
            "args": decoded.get("args"),
            "kwargs": decoded.get("kwargs"),
            "created": created,
            "finished": finished,
            "eta": eta or None,
        }

    def _details_row(self, task_id: str) -> tuple[Any, Any, Any, Any]:
        if self._sqlite is None:
            redis = self._broker.redis  # type: ignore[attr-defined]
            key = f"{self._broker.prefix}:r:{task_id}"  # type: ignore[attr-defined]
            body, finished, eta = redis.hmget(key, "body", "finished", "eta")
            return body, None, _number(finished), _number(eta)
        row = self._sqlite.db.execute(
            "SELECT body, created, finished, eta FROM tasks WHERE id = ?", (task_id,)
        ).fetchone()
        return row or (None, None, None, None)

    def oldest_waits(self) -> dict[str, float]:
        """Seconds the oldest due task of each queue has waited (SQLite only)."""
        if self._sqlite is None:
            return {}
        now = time.time()
        rows = self._sqlite.db.execute(
            "SELECT queue, min(created) FROM tasks"
            f" WHERE status = {QUEUED} AND eta <= ? GROUP BY queue",
            (now,),
        ).fetchall()
        return {queue: max(0.0, now - created) for queue, created in rows if created}

    @property
    def knows_waits(self) -> bool:
        """Whether `waits` can answer: SQLite only (see there)."""
        return self._sqlite is not None

    def waits(self, since: float, until: float) -> list[float] | None:
        """Seconds each task that ended in [since, until) and ran waited for its start: from
        when it was due (submitted, or its eta: a retry's backoff or a delay is no wait) to
        when it started (finished - runtime). None on Redis: its records keep no submit time,
        nor an index that finds the tasks of a window."""
        if self._sqlite is None:
            return None
        # `status = DONE` as a literal: the partial index tasks_finished then serves the range.
        rows = self._sqlite.db.execute(
            "SELECT finished - runtime - max(created, eta) FROM tasks"
            f" WHERE status = {DONE} AND finished >= ? AND finished < ? AND runtime IS NOT NULL",
            (since, until),
        ).fetchall()
        return [max(0.0, wait) for (wait,) in rows]

    def _recent_sqlite(self, state: str, name: str, limit: int) -> list[dict[str, Any]]:
        where, params = [], []
        for column, value in (("state", state), ("name", name)):
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        sql = (
            f"SELECT {', '.join(LIST_COLUMNS)}, created, finished FROM tasks"
            f" {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY seq DESC LIMIT ?"
        )
        rows = self._sqlite.db.execute(sql, (*params, limit)).fetchall()  # type: ignore[union-attr]
        return [dict(zip((*LIST_COLUMNS, "created", "finished"), row, strict=True)) for row in rows]

    def _recent_redis(self, state: str, name: str, limit: int) -> tuple[list[dict[str, Any]], bool]:
        redis = self._broker.redis  # type: ignore[attr-defined]
        prefix = f"{self._broker.prefix}:r:"  # type: ignore[attr-defined]
        keys = []
        for key in redis.scan_iter(match=prefix + "*", count=1000):
            keys.append(key)
            if len(keys) >= SCAN_BUDGET:
                break
        pipe = redis.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, *LIST_COLUMNS[1:], "finished")
        fields = (*LIST_COLUMNS[1:], "finished")
        tasks = [
            {"id": key[len(prefix) :], **dict(zip(fields, values, strict=True))}
            for key, values in zip(keys, pipe.execute(), strict=True)
        ]
        for task in tasks:
            task["finished"] = _number(task["finished"])
            task["runtime"] = _number(task["runtime"])
        # Unfinished first, then the newest ended: SCAN's own order is none.
        tasks.sort(key=lambda t: -(t["finished"] or float("inf")))
        wanted = [
            t
            for t in tasks
            if t["state"] is not None
            and (not state or t["state"] == state)
            and (not name or t["name"] == name)
        ]
        return wanted[:limit], len(keys) >= SCAN_BUDGET


def _number(text: Any) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None

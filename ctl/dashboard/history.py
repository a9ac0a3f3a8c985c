"""The dashboard's own memory: a sampler thread that reads the fleet every SAMPLE_EVERY
seconds, keeps the newest snapshot for the live pages, and writes throughput and failures
into a small SQLite file (`{state_dir}/dashboard.db`) so that the charts survive a restart."""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from typing import Any

from ctl.dashboard import DashboardError
from ctl.dashboard.fleet import Fleet
from worker.brokers.base import BrokerUnavailable

SAMPLE_EVERY = 2.0  # seconds between two samples of the fleet
KEEP = 24 * 3600.0  # seconds of samples kept
FILE_NAME = "dashboard.db"

log = logging.getLogger("fleetd.dashboard")

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    at REAL PRIMARY KEY,  -- unix time
    done REAL NOT NULL,   -- tasks ended per second since the sample before
    failed REAL NOT NULL, -- of which FAILURE
    ready INTEGER NOT NULL,
    dead INTEGER NOT NULL,
    wait_p50 REAL,        -- seconds the tasks ended since the sample before waited for
    wait_p99 REAL         -- their start; NULL: none ended, or the broker does not say
);
"""
COLUMNS = ("at", "done", "failed", "ready", "dead", "wait_p50", "wait_p99")
SQLITE_IOERR, SQLITE_FULL = 10, 13  # the primary result codes of a disk that takes no more


class History:
    """The samples file; used by the sampler thread and the web server's threads."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, FILE_NAME)
        self._lock = threading.Lock()
        try:
            self._db = self._open(self.path)
        except sqlite3.Error as exc:
            if exc.sqlite_errorcode & 0xFF in (SQLITE_IOERR, SQLITE_FULL):  # type: ignore[attr-defined]
                # No room to write it (a full disk): the file is sound, the charts are kept
                # in memory until the dashboard's next start.
                log.warning(
                    "charts file %s: %s; the charts are kept in memory until a restart",
                    self.path,
                    exc,
                )
                self._db = self._open(":memory:")
            else:
                self._db = self._set_aside(exc)

    def _set_aside(self, exc: sqlite3.Error) -> sqlite3.Connection:
        """The charts are a cache of the last day: a file that cannot serve (corrupt,
        truncated, a folder or a FIFO in its place) is set aside, and they start anew."""
        aside = f"{self.path}.unreadable-{int(time.time())}"
        log.warning("charts file %s: %s; moved it to %s, starting anew", self.path, exc, aside)
        try:
            os.replace(self.path, aside)
            return self._open(self.path)
        except (OSError, sqlite3.Error) as again:
            raise DashboardError(f"charts file {self.path}: {again}") from None

    def _open(self, path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            db.executescript(SCHEMA)
            self._db = db
            self._add_wait_columns()
        except BaseException:
            db.close()
            raise
        return db

    def _add_wait_columns(self) -> None:
        """A file written before the waits were sampled gets their columns (NULL in its
        older samples), so that its charts survive the upgrade."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(samples)")}
        for column in ("wait_p50", "wait_p99"):
            if column not in have:
                self._db.execute(f"ALTER TABLE samples ADD COLUMN {column} REAL")

    def add(self, sample: dict[str, Any]) -> None:
        """One sample: a value for each of COLUMNS."""
        with self._lock:
            self._db.execute(
                f"INSERT OR REPLACE INTO samples ({', '.join(COLUMNS)})"
                f" VALUES ({', '.join('?' * len(COLUMNS))})",
                tuple(sample[column] for column in COLUMNS),
            )
            self._db.execute("DELETE FROM samples WHERE at < ?", (sample["at"] - KEEP,))

    def since(self, seconds: float) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(COLUMNS)} FROM samples WHERE at >= ? ORDER BY at",
                (time.time() - seconds,),
            ).fetchall()
        return [dict(zip(COLUMNS, row, strict=True)) for row in rows]

    def close(self) -> None:
        self._db.close()


def counters(nodes: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(tasks ended, tasks failed) of each node that reported its counters."""
    out = {}
    for node, view in nodes.items():
        if isinstance(view, dict) and isinstance(view.get("children"), list):
            failed = int(view.get("failed", 0))
            out[node] = (int(view.get("succeeded", 0)) + failed, failed)
    return out


def growth(before: dict[str, tuple[int, int]], now: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """Tasks ended and failed between two readings of the counters; a node that restarted
    (its counters went back) counts from zero, one not read before counts nothing."""
    done = failed = 0
    for node, (ended, failures) in now.items():
        if node not in before:
            continue
        old_ended, old_failures = before[node]
        done += ended - old_ended if ended >= old_ended else ended
        failed += failures - old_failures if failures >= old_failures else failures
    return done, failed


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile (`share` of 1) of `values`; None if there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


class Sampler(threading.Thread):
    """Reads the fleet every SAMPLE_EVERY seconds until `stop()`; `snapshot` is the newest
    reading and `version` counts them (the live pages send each new one)."""

    def __init__(self, fleet: Fleet, history: History) -> None:
        super().__init__(name="dashboard-sampler", daemon=True)
        self.fleet = fleet
        self.history = history
        self.snapshot: dict[str, Any] = {}
        self.version = 0
        self._stopping = threading.Event()
        self._counters: dict[str, tuple[int, int]] = {}
        self._read_at = 0.0

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self.sample()
            except Exception as exc:  # a bad reading must not end the live pages for good
                log.warning("cannot sample the fleet: %s", exc)
                log.debug("sample failed", exc_info=True)
            self._stopping.wait(max(0.0, SAMPLE_EVERY - (time.monotonic() - started)))

    def sample(self) -> None:
        now = time.time()
        nodes = self.fleet.nodes()
        waits: list[float] | None = None
        try:
            queues: dict[str, Any] = self.fleet.queues()
            if self._read_at:
                waits = self.fleet.waits(self._read_at, now)
        except BrokerUnavailable as exc:
            queues = {"error": str(exc)}
        reading = counters(nodes["nodes"])
        point = None
        if self._read_at:
            done, failed = growth(self._counters, reading)
            elapsed = max(now - self._read_at, 1e-3)
            ready = sum(q["ready"] for q in queues.get("queues", []))
            dead = len(queues.get("dead_letters", []))
            point = {
                "at": now,
                "done": done / elapsed,
                "failed": failed / elapsed,
                "ready": ready,
                "dead": dead,
                "wait_p50": percentile(waits or [], 0.5),
                "wait_p99": percentile(waits or [], 0.99),
            }
        self._counters, self._read_at = reading, now
        self.snapshot = {"nodes": nodes, "queues": queues, "sample": point}
        self.version += 1
        if point is not None:  # after the live pages have it: a full disk must not stop them
            try:
                self.history.add(point)
            except sqlite3.Error as exc:
                log.warning("cannot keep the charts' sample in %s: %s", self.history.path, exc)

"""The embedded broker: one SQLite file in WAL mode, one transaction per batch.

A task is one row of `tasks`: `status` says where it is for the broker (queued,
held by an owner under a lease, done: deleted `result_ttl` seconds after it
ended) and `state` what a user sees. Idle consumers sleep on a FIFO each (in
`<db>-wake/`), which producers poke after every commit, so a task starts within
a millisecond of its submit without any polling loop.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ..files import file_identity
from ..task import LAST_ETA
from .base import (
    BAD_MESSAGE,
    FAIL_FAST_WAIT,
    FAILURE,
    INFO_FIELDS,
    PENDING,
    RETRY,
    REVOKED,
    STARTED,
    Broker,
    DeadLetter,
    Delivery,
    Envelope,
    Outcome,
    QueueDepth,
    Retry,
    Turn,
    Wakeup,
    dead_letter_from,
    owner_runs,
    stored_number,
    stored_text,
    stored_tick,
    task_info,
    utf8_text,
)
from .sqlite_wake import FifoWakeup, Poker

QUEUED, HELD, DONE = 0, 1, 2
SAFETY_CHECKPOINT_PAGES = 2000  # ~8 MB of WAL
LOCK_TIMEOUT = 30.0  # seconds a write waits for the lock before it fails
# Seconds between tries for the write lock, doubling. A worker's turn holds it some tens of
# us: a producer that met one (4% of its submits while a fleet drained) waited 0.2 ms at
# first, 9% of its run; 0.05 (~0.1 with the timer's slack) made the run 3% faster.
LOCK_RETRY_FIRST, LOCK_RETRY_MAX = 0.00005, 0.0005
IDLE_CHECKPOINT_AFTER = 2.0  # seconds
EXPIRE_EVERY = 60.0  # seconds between two looks for results older than result_ttl
EXPIRE_BATCH = 500  # rows deleted per transaction, so writers never wait long for the lock
IN_BATCH = 500  # ids in one `IN (...)` (SQLite's older builds take 999 parameters at most)
FILE_CHECK_EVERY = 1.0  # seconds between two looks at whether the queue file was replaced
# A connection's page cache (SQLite's default: 2 MiB), which an idle worker keeps as its own
# memory. A turn touches a few dozen pages, and in WAL mode another connection's commit (a
# submit) empties the cache anyway: only a worker draining alone reads it again.
PAGE_CACHE_KIB = 256

log = logging.getLogger("fleetd.broker")

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY,  -- FIFO order; no AUTOINCREMENT: a page less to write per submit
    id TEXT NOT NULL UNIQUE,
    queue TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    status INTEGER NOT NULL,
    state TEXT NOT NULL,
    eta REAL NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until REAL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    exc_type TEXT,
    exc_message TEXT,
    traceback TEXT,
    node TEXT,
    runtime REAL,
    created REAL NOT NULL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS tasks_ready ON tasks (queue, eta, seq) WHERE status = 0;
CREATE INDEX IF NOT EXISTS tasks_held ON tasks (owner) WHERE status = 1;
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (finished) WHERE status = 2;
CREATE TABLE IF NOT EXISTS dead_letters (
    id TEXT PRIMARY KEY, queue TEXT, name TEXT, body TEXT, reason TEXT, at REAL, extra TEXT
);
CREATE TABLE IF NOT EXISTS revoked (id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS routes (name TEXT PRIMARY KEY, queue TEXT NOT NULL);
"""

# One new task per row (id, queue, name, body, state, eta, created). An id still queued or
# held is left as it is; an ended one starts over (a new task under the same id).
ENQUEUE = (
    "INSERT INTO tasks (id, queue, name, body, status, state, eta, created)"
    f" VALUES (?, ?, ?, ?, {QUEUED}, ?, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET queue = excluded.queue, name = excluded.name,"
    f" body = excluded.body, status = {QUEUED}, state = excluded.state,"
    " eta = excluded.eta, created = excluded.created, deliveries = 0, result = NULL,"
    " exc_type = NULL, exc_message = NULL, traceback = NULL, node = NULL, runtime = NULL,"
    f" finished = NULL WHERE tasks.status = {DONE}"
)
# A queued task of a revoked id ends REVOKED (finished, id): the revoke's own, and the
# submit's of an id revoked ahead, so that no worker runs it, not even one that has not read
# the revoke yet.
REVOKE_QUEUED = (
    f"UPDATE tasks SET status = {DONE}, state = '{REVOKED}', finished = ?"
    f" WHERE id = ? AND status = {QUEUED} AND id IN (SELECT id FROM revoked)"
)
# Text columns as str whatever bytes a producer stored (see the base module): sqlite3's own
# decoding raises OperationalError, which would read as "the broker is unavailable".
TEXT_FACTORY = functools.partial(str, encoding="utf-8", errors="surrogateescape")
DUE = "eta <= ? ORDER BY eta, seq"
# An ETA that is never due: past the year 9999 (the client refuses one), infinity, and TEXT
# and BLOB values (not a number), which sort after every number.
NEVER_DUE = f"eta > {LAST_ETA!r}"
INFO_COLUMNS = (*INFO_FIELDS, "status")
DEAD_LETTER_COLUMNS = ("id", "queue", "name", "body", "reason", "at", "extra")


# A column's value is a number (not NULL, text or a blob that other hands wrote there).
IS_NUMBER = "(typeof({0}) IN ('integer', 'real') AND abs({0}) < 9e999)"  # finite: 9e999 is inf
# A column's value is a schedule tick (base.stored_tick): a number within the calendar.
IS_TICK = f"({IS_NUMBER} AND {{0}} BETWEEN 0 AND {LAST_ETA!r})"


def close_revoked(db: sqlite3.Connection, ids: Sequence[str], now: float) -> int:
    """End REVOKED those of `ids`, just queued (submitted, retried, given back), that are
    revoked; returns how many. One look at an empty revoked table, the common case."""
    if not ids or db.execute("SELECT 1 FROM revoked LIMIT 1").fetchone() is None:
        return 0
    return sum(db.execute(REVOKE_QUEUED, (now, task_id)).rowcount for task_id in ids)


def reserve_sql(marks: str, picked: str) -> str:
    """Hand out the queued rows of the queues `marks` stands for that `picked` selects.

    OR FAIL: an UPDATE of many rows that a NOT NULL column could ABORT opens a statement
    journal (a savepoint) in our write transaction; one that would FAIL keeps the rows it
    wrote, so needs none. Nothing here can be NULL, and an error ends the whole turn's
    transaction anyway. With the journal, a reserve cost the worker 20 us in some runs and 90
    in others; without it, 19 in every one."""
    return (
        f"UPDATE OR FAIL tasks SET status = {HELD}, owner = ?, lease_until = ?,"
        " deliveries = deliveries + 1"
        f" WHERE seq IN (SELECT seq FROM tasks WHERE status = {QUEUED} AND queue IN ({marks})"
        f" AND {picked} LIMIT ?) RETURNING eta, seq, id, queue, name, body, deliveries, created"
    )


def unreadable(row: tuple[Any, ...]) -> str | None:
    """Why a reserved row (as `reserve_sql` returns it) cannot be handed out, if it cannot:
    the worker addresses a task by its id, and a body is the worker's to judge."""
    eta, _, task_id, queue, name, _, _, _ = row
    if not isinstance(eta, (int, float)):
        return "its ETA is not a number"
    if not eta <= LAST_ETA:
        return "its ETA is past the year 9999"
    for column, value in (("id", task_id), ("queue", queue), ("name", name)):
        if not utf8_text(value):
            return f"its {column} is not UTF-8 text"
    return None


def dead_letter(
    db: sqlite3.Connection, by: str, letters: list[tuple[Any, str | None, str | None]], now: float
) -> None:
    """Copy tasks' rows whole into the dead-letter list: (`by`'s value, reason, message)."""
    db.executemany(
        "INSERT OR REPLACE INTO dead_letters (id, queue, name, body, reason, at, extra)"
        f" SELECT id, queue, name, body, ?, ?, ? FROM tasks WHERE {by} = ?",
        [(reason, now, json.dumps({"message": message}), key) for key, reason, message in letters],
    )


def due_order(row: tuple[Any, ...]) -> tuple[float, int]:
    eta = row[0]
    return (eta if isinstance(eta, (int, float)) else math.inf, row[1])


def path_from_url(url: str) -> str:
    """`sqlite:///rel.db` -> `rel.db`, `sqlite:////abs/q.db` -> `/abs/q.db` (SQLAlchemy's form)."""
    if not url.startswith("sqlite:///"):
        raise ValueError(
            f"not a sqlite URL: {url!r} (expected sqlite:///relative.db or sqlite:////abs.db)"
        )
    path = url[len("sqlite:///") :]
    if not path:
        raise ValueError(f"sqlite URL without a file path: {url!r}")
    if path == ":memory:":
        raise ValueError(
            f"{url!r}: a database in memory is one process's alone; give a file every"
            " process of the fleet opens"
        )
    # A file path, never one of SQLite's URIs ("file:q.db?mode=memory" would be a private
    # database in memory, and its wake-up folder another path than its file).
    return path if os.path.isabs(path) or not path.startswith("file:") else "./" + path


class SQLiteBroker(Broker):
    unavailable = (sqlite3.OperationalError,)  # locked past the busy timeout, disk I/O errors

    def unavailable_now(self, exc: BaseException) -> bool:
        """Also a queue file that is damaged or no database (sqlite3.DatabaseError itself,
        none of its kinds that a call's own mistake raises): the workers wait it out, one
        line in the log, rather than dying on it again and again until they are FATAL."""
        return super().unavailable_now(exc) or type(exc) is sqlite3.DatabaseError

    def __init__(
        self,
        url: str,
        durability: str = "default",
        result_ttl: int = 86400,
        fail_fast: bool = False,
        call_wait: float | None = None,
    ) -> None:
        self.url = url
        # Seconds a write waits for the lock before it fails (open_broker's `fail_fast`).
        self.lock_timeout = (call_wait or FAIL_FAST_WAIT) if fail_fast else LOCK_TIMEOUT
        self.result_ttl = result_ttl
        self.expire_at = 0.0  # monotonic time from which `expire` looks again
        self.path = path_from_url(url)
        self.wake_folder = self.path + "-wake"
        self.poker = Poker(self.wake_folder)
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        # A Client may be shared between threads: every use of the connection holds this,
        # as a close or a reopen (follow_file) under a read crashed the process (RLock: a
        # read may come inside a write's).
        self._lock = threading.RLock()
        self.durability = durability
        self._connect()

    def _connect(self) -> None:
        """Open the queue file (made, with its schema, if it is not there) and note which
        file it is, so that one deleted or replaced under us is noticed. Raises one of
        `unavailable` if it cannot, leaving the connection we had."""
        db = sqlite3.connect(
            self.path, isolation_level=None, timeout=self.lock_timeout, check_same_thread=False
        )
        db.text_factory = TEXT_FACTORY
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KIB}")
            sync = "FULL" if self.durability == "fsync" else "NORMAL"
            db.execute(f"PRAGMA synchronous={sync}")
            # Checkpoints sync the database file: left to commits, they land on whichever
            # submit or turn comes next, as a tail of tens of ms. Workers run them when idle
            # (`maintain`); this is only the safety net for a fleet that is never idle.
            db.execute(f"PRAGMA wal_autocheckpoint={SAFETY_CHECKPOINT_PAGES}")
            db.executescript(SCHEMA)
        except BaseException:
            db.close()
            raise
        self.db = db
        self.dirty_since = 0.0  # monotonic time of our first commit since the last checkpoint
        self.identity = file_identity(self.path)
        self.check_file_at = time.monotonic() + FILE_CHECK_EVERY

    def follow_file(self, always: bool = False) -> None:
        """Reopen the queue file if it was deleted or replaced since we opened it (a restore
        from a backup, a cleanup): the old file's tasks are gone with it, and a task
        submitted into the new one must not wait while we commit into a file nobody sees.
        Looks once a FILE_CHECK_EVERY, or `always` (a write: one stat)."""
        if not always and time.monotonic() < self.check_file_at:
            return
        self.check_file_at = time.monotonic() + FILE_CHECK_EVERY
        if file_identity(self.path) == self.identity:
            return
        log.warning("queue file %s was deleted or replaced: opening it anew", self.path)
        with self._lock:
            old = self.db
            self._connect()
            with contextlib.suppress(sqlite3.Error):
                old.close()

    def _begin(self) -> None:
        """Take the write lock, retrying every fraction of a millisecond while another
        connection holds it. SQLite's own busy handler sleeps 1, 2, 5, 10 ... 100 ms between
        tries, so two workers writing at once (a reload, say) stalled each other for
        hundreds of ms; reads never wait in WAL mode and keep the ordinary timeout."""
        self.db.execute("PRAGMA busy_timeout = 0")
        try:
            delay, give_up = LOCK_RETRY_FIRST, time.monotonic() + self.lock_timeout
            while True:
                try:
                    self.db.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() >= give_up:
                        raise
                time.sleep(delay)
                delay = min(delay * 2, LOCK_RETRY_MAX)
        finally:
            self.db.execute(f"PRAGMA busy_timeout = {int(self.lock_timeout * 1000)}")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the write lock up front so it never deadlocks; in
        the queue file there is now (a producer that kept writing into a file deleted or
        replaced under it lost every task it submitted after)."""
        self.follow_file(always=True)
        with self._lock:
            self._begin()
            try:
                yield self.db
                self.db.execute("COMMIT")
                self.dirty_since = self.dirty_since or time.monotonic()
            except BaseException:
                if self.db.in_transaction:  # a failed COMMIT (busy, I/O) leaves it open
                    self.db.execute("ROLLBACK")
                raise

    # --- producing -------------------------------------------------------------
    def enqueue(self, envelopes: Sequence[Envelope]) -> None:
        now = time.time()
        rows = [(e.id, e.queue, e.name, e.body, PENDING, e.eta or 0.0, now) for e in envelopes]
        with self._write() as db:
            db.executemany(ENQUEUE, rows)
            close_revoked(db, [e.id for e in envelopes], now)
        self.poker.poke(scheduled=any(row[5] > now for row in rows))

    # --- consuming -------------------------------------------------------------
    def turn(self, turn: Turn) -> list[Delivery]:
        if turn.empty:
            return []
        with self._write() as db:
            self._mark_started(db, turn.marks(), turn.node)
            self._finish(db, turn.outcomes, turn.retries)
            deliveries = self._reserve(db, turn) if turn.wanted else []
        if turn.retries:
            self.poker.poke(scheduled=True)
        return deliveries

    @classmethod
    def _reserve(cls, db: sqlite3.Connection, turn: Turn) -> list[Delivery]:
        now, n, queues = time.time(), turn.wanted, turn.queues
        marks, lease = ",".join("?" * len(queues)), (turn.owner, now + turn.lease)
        rows = db.execute(reserve_sql(marks, DUE), (*lease, *queues, now, n)).fetchall()
        if len(rows) < n:  # never due, so never handed out: take them while the queue is dry
            rows += db.execute(
                reserve_sql(marks, NEVER_DUE), (*lease, *queues, n - len(rows))
            ).fetchall()
        rows.sort(key=due_order)  # RETURNING comes in no set order: due order, then queue order
        deliveries, bad, recount = [], [], []
        for row in rows:
            problem = unreadable(row)
            if problem:
                bad.append((row[1], problem))
                continue
            eta, seq, task_id, queue, name, body, count, created = row
            # Columns other hands wrote: a count that is no whole number starts over (as on
            # Redis), a creation time that is no number is none.
            number = stored_number(count)
            if number is None or not 1 <= number < 2**53 or number != int(number):
                number = 1
                recount.append((seq,))
            ready_at = max(eta, stored_number(created) or 0.0)
            text = stored_text(body) or ""
            deliveries.append(Delivery(task_id, queue, name, text, int(number), ready_at))
        if bad:
            cls._bury(db, bad, now)
        if recount:
            db.executemany("UPDATE tasks SET deliveries = 1 WHERE seq = ?", recount)
        return deliveries

    @staticmethod
    def _bury(db: sqlite3.Connection, rows: list[tuple[int, str]], now: float) -> None:
        """End rows (by seq) that cannot be handed out as BadMessage, whole in the
        dead-letter list."""
        messages = [(seq, f"the record cannot be read: {problem}") for seq, problem in rows]
        dead_letter(db, "seq", [(seq, BAD_MESSAGE, m) for seq, m in messages], now)
        db.executemany(
            f"UPDATE tasks SET status = {DONE}, state = '{FAILURE}', exc_type = ?,"
            " exc_message = ?, owner = NULL, lease_until = NULL, finished = ? WHERE seq = ?",
            [(BAD_MESSAGE, m, now, seq) for seq, m in messages],
        )

    @staticmethod
    def _mark_started(db: sqlite3.Connection, ids: list[str], node: str) -> None:
        if ids:
            db.executemany(
                f"UPDATE tasks SET state = '{STARTED}', node = ? WHERE id = ? AND status = {HELD}",
                [(node, i) for i in ids],
            )

    def _finish(
        self, db: sqlite3.Connection, outcomes: Sequence[Outcome], retries: Sequence[Retry]
    ) -> None:
        now = time.time()
        if outcomes:
            updated = db.executemany(
                f"UPDATE tasks SET status = {DONE}, state = ?, result = ?, exc_type = ?,"
                " exc_message = ?, traceback = ?, node = coalesce(?, node), runtime = ?,"
                " finished = ?, owner = NULL WHERE id = ?",
                [
                    (
                        o.state,
                        o.stored_result(),
                        o.exc_type,
                        o.exc_message,
                        o.traceback,
                        o.node,
                        o.runtime,
                        now,
                        o.id,
                    )
                    for o in outcomes
                ],
            ).rowcount
            if updated < len(outcomes):  # records for ids never stored: keep them as results
                db.executemany(
                    "INSERT OR IGNORE INTO tasks (id, queue, name, body, status, state, result,"
                    " exc_type, exc_message, traceback, node, created, finished)"
                    f" VALUES (?, '', coalesce(?, ''), '', {DONE}, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            o.id,
                            o.name,
                            o.state,
                            o.stored_result(),
                            o.exc_type,
                            o.exc_message,
                            o.traceback,
                            o.node,
                            now,
                            now,
                        )
                        for o in outcomes
                    ],
                )
            dead = [(o.id, o.exc_type, o.exc_message) for o in outcomes if o.dead_letter]
            if dead:
                dead_letter(db, "id", dead, now)
        if retries:
            db.executemany(
                f"UPDATE tasks SET status = {QUEUED}, state = '{RETRY}', body = ?, eta = ?,"
                " exc_type = ?, exc_message = ?, owner = NULL, lease_until = NULL,"
                " deliveries = 0 WHERE id = ?",
                [(r.body, r.eta, r.exc_type, r.exc_message, r.id) for r in retries],
            )
            close_revoked(db, [r.id for r in retries], now)

    def release(self, ids: list[str], died: bool, owner: str | None = None) -> None:
        if not ids:
            return
        taken_back = "0" if died else "1"
        with self._write() as db:
            db.executemany(
                f"UPDATE tasks SET status = {QUEUED}, owner = NULL, lease_until = NULL,"
                f" deliveries = deliveries - {taken_back},"
                f" state = CASE WHEN state = '{STARTED}' THEN '{PENDING}' ELSE state END"
                f" WHERE id = ? AND status = {HELD} AND owner = coalesce(?, owner)",
                [(i, owner) for i in ids],
            )
            close_revoked(db, ids, time.time())
        self.poker.poke()

    def extend(self, ids: list[str], owner: str, lease: float) -> list[str]:
        if not ids:
            return []
        until = time.time() + lease
        with self._write() as db:
            renewed = db.executemany(
                f"UPDATE tasks SET lease_until = ? WHERE id = ? AND owner = ? AND status = {HELD}",
                [(until, i, owner) for i in ids],
            ).rowcount
            if renewed == len(ids):  # all still ours, as a renew almost always finds them
                return []
            held = {
                row[0]
                for row in db.execute(
                    f"SELECT id FROM tasks WHERE owner = ? AND status = {HELD}"
                    " AND id IN (SELECT value FROM json_each(?))",
                    (owner, json.dumps(ids)),
                )
            }
        return [i for i in ids if i not in held]

    def _requeue_where(self, where: str, params: Sequence[Any]) -> int:
        """Queue again the held tasks `where` says, of an owner that is gone or whose lease
        ran out: one that had not started there is given back its delivery, as a death it
        cannot have caused (max_deliveries counts those); a started one keeps it."""
        with self._write() as db:
            ids = db.execute(
                f"UPDATE tasks SET status = {QUEUED}, owner = NULL, lease_until = NULL,"
                f" deliveries = CASE WHEN state = '{STARTED}' THEN deliveries"
                f" ELSE max(deliveries - 1, 0) END,"
                f" state = CASE WHEN state = '{STARTED}' THEN '{PENDING}' ELSE state END"
                f" WHERE status = {HELD} AND {where} RETURNING id",
                params,
            ).fetchall()
            count = len(ids) - close_revoked(db, [row[0] for row in ids], time.time())
        if count:
            self.poker.poke()
        return count

    def recover(self, owner: str) -> int:
        return self._requeue_where("owner = ?", (owner,))

    def recover_expired(self, queues: list[str], host: str = "", me: str = "") -> int:
        """Requeue the tasks whose lease ran out. With `host`, only those of owners that are
        gone: one host holds the queue file, so every owner is this host's, and one that
        still runs has not renewed because something held it (another process holding the
        write lock past the lease, a stopped terminal) while its task runs; it renews when it
        can, and were it hung, its arbiter ends it and its tasks come back at once."""
        marks = ",".join("?" * len(queues))
        # A lease that is no number (other hands' writing) has run out: else never.
        expired = f"(lease_until < ? OR NOT {IS_NUMBER.format('lease_until')})"
        where, params = f"{expired} AND queue IN ({marks})", (time.time(), *queues)
        if host:
            owners = [
                row[0]
                for row in self._read(
                    f"SELECT DISTINCT owner FROM tasks WHERE status = {HELD} AND {where}", params
                )
            ]
            running = [o for o in owners if o is not None and o != me and owner_runs(o)]
            if len(running) == len(owners):
                return 0
            if running:
                where += f" AND (owner IS NULL OR owner NOT IN ({','.join('?' * len(running))}))"
                params = (*params, *running)
        return self._requeue_where(where, params)

    def wakeup(self, queues: list[str]) -> Wakeup:
        return FifoWakeup(self.wake_folder)

    def next_due(self, queues: list[str]) -> float | None:
        marks = ",".join("?" * len(queues))
        row = self._read_one(
            f"SELECT min(eta) FROM tasks WHERE status = {QUEUED}"
            f" AND queue IN ({marks}) AND eta > ? AND eta <= ?",
            (*queues, time.time(), LAST_ETA),
        )
        return row[0] if row and row[0] is not None else None

    # --- results, dead letters, revokes --------------------------------------
    def get_result(self, task_id: str) -> dict[str, Any] | None:
        self.follow_file()
        key: str | bytes = task_id
        where = "id = ?"
        if not utf8_text(task_id):  # an id read back from a row stored with bytes, not UTF-8
            key, where = task_id.encode("utf-8", "surrogateescape"), "id = CAST(? AS TEXT)"
        row = self._read_one(f"SELECT {', '.join(INFO_COLUMNS)} FROM tasks WHERE {where}", (key,))
        if row is None:
            return None
        fields = dict(zip(INFO_COLUMNS, row, strict=True))
        return task_info(task_id, fields, done=fields["status"] == DONE)

    def depths(self) -> list[QueueDepth]:
        self.follow_file()
        now = time.time()
        depth: dict[str, list[int]] = {}
        for queue, ready, scheduled in self._read(
            f"SELECT queue, sum(eta <= ?), sum(eta > ?) FROM tasks WHERE status = {QUEUED}"
            " GROUP BY queue",
            (now, now),
        ):
            depth[str(stored_text(queue))] = [ready, scheduled, 0]
        for queue, held in self._read(
            f"SELECT queue, count(*) FROM tasks WHERE status = {HELD} GROUP BY queue"
        ):
            depth.setdefault(str(stored_text(queue)), [0, 0, 0])[2] = held
        return [QueueDepth(q, *depth[q]) for q in sorted(depth)]

    def dead_letters(
        self, limit: int | None = 100, ids: Sequence[str] | None = None
    ) -> list[DeadLetter]:
        self.follow_file()
        query = f"SELECT {', '.join(DEAD_LETTER_COLUMNS)} FROM dead_letters"
        params: list[Any] = []
        if ids is not None:
            query += " WHERE id IN (SELECT value FROM json_each(?))"
            params.append(json.dumps(list(ids)))
        params.append(-1 if limit is None else limit)  # LIMIT -1: no limit
        # Letters of one transaction share `at`: the later row (rowid) is the newer.
        rows = self._read(query + " ORDER BY at DESC, rowid DESC LIMIT ?", params)
        return [dead_letter_from(dict(zip(DEAD_LETTER_COLUMNS, r, strict=True))) for r in rows]

    def retry_dead(self, ids: Sequence[str]) -> list[str]:
        now = time.time()
        retried = []
        with self._write() as db:
            for task_id in dict.fromkeys(ids):
                letter = db.execute(
                    "DELETE FROM dead_letters WHERE id = ? RETURNING queue, name, body", (task_id,)
                ).fetchone()
                if letter is not None:
                    db.execute(ENQUEUE, (task_id, *letter, PENDING, 0.0, now))
                    retried.append(task_id)
            close_revoked(db, retried, now)
        if retried:
            self.poker.poke()
        return retried

    def purge_dead(self) -> int:
        with self._write() as db:
            return int(db.execute("DELETE FROM dead_letters").rowcount)

    def revoke(self, ids: list[str]) -> None:
        now = time.time()
        with self._write() as db:
            db.executemany(
                "INSERT OR IGNORE INTO revoked (id, at) VALUES (?, ?)", [(i, now) for i in ids]
            )
            db.executemany(REVOKE_QUEUED, [(now, i) for i in ids])
        self.poker.poke(revoked=True)  # a worker holding one skips it

    def revoked(self) -> set[str]:
        return {r[0] for r in self._read("SELECT id FROM revoked WHERE typeof(id) = 'text'")}

    def revoked_among(self, ids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(ids), IN_BATCH):
            batch = ids[start : start + IN_BATCH]
            marks = ",".join("?" * len(batch))
            query = f"SELECT id FROM revoked WHERE id IN ({marks}) AND typeof(id) = 'text'"
            found.update(r[0] for r in self._read(query, batch))
        return found

    def set_routes(self, routes: dict[str, str]) -> None:
        if self.routes() == routes:
            return  # a restart or reload of an unchanged fleet writes nothing
        with self._write() as db:
            db.executemany(
                "INSERT OR REPLACE INTO routes (name, queue) VALUES (?, ?)", list(routes.items())
            )

    def routes(self) -> dict[str, str]:
        return {str(n): str(q) for n, q in self._read("SELECT name, queue FROM routes")}

    def expire(self) -> int:
        """Delete up to EXPIRE_BATCH records of tasks that ended more than `result_ttl`
        seconds ago, in one short transaction; returns how many. Queued and held tasks stay
        whatever their age, and so do dead letters and revokes (records of their own).

        A backlog goes one batch per call, so neither other writers (the lock) nor the
        worker's loop ever wait long; once a batch comes back short, nothing more is
        due for EXPIRE_EVERY seconds. A worker calls it (or `maintain`) on every turn, so
        it also looks, once a second, whether the queue file was replaced."""
        self.follow_file()
        if time.monotonic() < self.expire_at:
            return 0
        with self._write() as db:
            count = db.execute(
                "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks"
                f" WHERE status = {DONE} AND finished < ? LIMIT {EXPIRE_BATCH})",
                (time.time() - self.result_ttl,),
            ).rowcount
        if count < EXPIRE_BATCH:
            self.expire_at = time.monotonic() + EXPIRE_EVERY
        return count

    def maintain(self) -> None:
        """Move the WAL into the database (a PASSIVE checkpoint: it never waits for other
        connections) once our commits are IDLE_CHECKPOINT_AFTER seconds old; expire
        results when due."""
        if self.dirty_since and time.monotonic() - self.dirty_since >= IDLE_CHECKPOINT_AFTER:
            self.dirty_since = 0.0
            with self._lock:
                self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self.expire()

    def close(self) -> None:
        self.poker.close()
        with self._lock, contextlib.suppress(sqlite3.Error):
            self.db.close()

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one query, read while no other thread uses the connection."""
        with self._lock:
            return self.db.execute(sql, params).fetchall()

    def _read_one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row of one query, or None."""
        rows = self._read(sql, params)
        return rows[0] if rows else None

    # --- schedules ---------------------------------------------------------------
    def _schedule_tables(self) -> None:
        """Make the schedules' tables in the file we have open now, once per connection."""
        if getattr(self, "_schedules_in", None) is not self.db:
            with self._lock:
                self.db.executescript(SCHEDULE_SCHEMA)
            self._schedules_in = self.db

    def claim_lead(self, key: str, holder: str, ttl: float) -> tuple[str, float]:
        self._schedule_tables()
        now = time.time()
        with self._write() as db:
            db.execute(
                "INSERT INTO leases (key, holder, until) VALUES (?, ?, ?) ON CONFLICT (key)"
                " DO UPDATE SET holder = excluded.holder, until = excluded.until"
                " WHERE leases.holder = excluded.holder OR leases.until <= ?"
                f" OR NOT {IS_NUMBER.format('leases.until')}",  # other hands': no lease
                (key, holder, now + ttl, now),
            )
            owner, until = db.execute(
                "SELECT holder, until FROM leases WHERE key = ?", (key,)
            ).fetchone()
        return str(stored_text(owner)), max(0.0, (stored_number(until) or now) - now)

    def release_lead(self, key: str, holder: str) -> None:
        self._schedule_tables()
        with self._write() as db:
            db.execute("DELETE FROM leases WHERE key = ? AND holder = ?", (key, holder))

    def lead_holder(self, key: str) -> str | None:
        self._schedule_tables()
        row = self._read_one(
            "SELECT holder FROM leases WHERE key = ? AND until > ?", (key, time.time())
        )
        return str(row[0]) if row else None

    def fire_schedule(self, name: str, tick: float | None, envelope: Envelope | None) -> bool:
        self._schedule_tables()
        now = time.time()
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO schedules (name) VALUES (?)", (name,))
            if tick is not None:
                moved = db.execute(
                    "UPDATE schedules SET last_tick = ? WHERE name = ?"
                    f" AND (NOT {IS_TICK.format('last_tick')} OR last_tick < ?)",
                    (tick, name, tick),
                ).rowcount
                if not moved:
                    return False
            if envelope is not None:
                e = envelope
                db.execute(ENQUEUE, (e.id, e.queue, e.name, e.body, PENDING, e.eta or 0.0, now))
                db.execute(
                    "UPDATE schedules SET last_id = ?, last_at = ? WHERE name = ?",
                    (e.id, now, name),
                )
        if envelope is not None:
            self.poker.poke()
        return True

    def schedule_states(self) -> dict[str, dict[str, Any]]:
        self._schedule_tables()
        rows = self._read("SELECT name, last_tick, last_id, last_at, paused FROM schedules")
        return {  # what other hands wrote there reads as none
            str(stored_text(name)): {
                "last_tick": stored_tick(tick),
                "last_id": stored_text(task_id),
                "last_at": stored_number(at),
                "paused": p == 1,  # as pause_schedule writes it; other hands' 'no' is not
            }
            for name, tick, task_id, at, p in rows
        }

    def pause_schedule(self, name: str, paused: bool) -> None:
        self._schedule_tables()
        with self._write() as db:
            db.execute(
                "INSERT INTO schedules (name, paused) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET paused = excluded.paused",
                (name, int(paused)),
            )


# The schedules' own tables (worker/scheduler.py): the last tick each schedule fired, and
# the lease that says which scheduler leads.
SCHEDULE_SCHEMA = """
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY, last_tick REAL, last_id TEXT, last_at REAL,
    paused INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS leases (key TEXT PRIMARY KEY, holder TEXT NOT NULL, until REAL NOT NULL);
"""

"""Brokers by URL scheme: `sqlite:///...` (embedded, the default) and `redis://...`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the arbiter imports this package for url_problem alone
    from .base import Broker


def url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL that redis-py would take silently (a database that is
    no number: it would use 0) or fail on only when first used, if anything is."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    import urllib.parse  # here: an arbiter on SQLite never needs it

    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises for a port out of range or no number
    except ValueError as exc:  # its message may quote a part of the URL whole
        from ..logs import shortened

        return shortened(str(exc), 120)
    if parts.scheme == "unix":
        return None if parts.path else "a unix:// URL needs the socket's path"
    try:  # as a connection will: a label over 63 characters, or empty, is no host name
        (parts.hostname or "").encode("idna")
    except UnicodeError:
        return f"the host {parts.hostname!r:.80} is no host name"
    db = parts.path.strip("/")
    digits = db.isascii() and db.isdigit() and len(db.lstrip("0")) <= 10  # int() of 5,000: no
    if db and not (digits and int(db) < 2**31):
        return f"the database must be a number from 0 to {2**31 - 1}, got {db!r:.80}"
    return None


def open_broker(
    url: str,
    durability: str = "default",
    result_ttl: int = 86400,
    fail_fast: bool = False,
    connect_timeout: float | None = None,
    call_wait: float | None = None,
) -> Broker:
    """A new connection to the broker at `url`; raises ValueError for an unknown scheme and
    BrokerUnavailable for a broker that cannot be opened (a SQLite path that cannot be made).

    `result_ttl`: seconds an ended task's record is kept.
    `fail_fast`: for a caller that retries on its own and has other work meanwhile (the
    worker's loop): a call raises `broker.unavailable` once it has waited FAIL_FAST_WAIT on
    a broker that does not answer (a hung Redis; a SQLite write lock someone holds), and a
    Redis call cut off by a lost connection is sent again only briefly; otherwise a call
    rides out a Redis restart and waits out a long write.
    `connect_timeout`: seconds a new Redis connection may take (None: the broker's default).
    `call_wait`: with `fail_fast`, seconds instead of FAIL_FAST_WAIT.
    """
    from .base import unavailable_error

    if url.startswith("sqlite:"):
        import sqlite3

        from .sqlite import SQLiteBroker

        try:
            return SQLiteBroker(
                url,
                durability=durability,
                result_ttl=result_ttl,
                fail_fast=fail_fast,
                call_wait=call_wait,
            )
        # DatabaseError: SQLiteBroker.unavailable (OperationalError: locked, an I/O error),
        # and a file that is no SQLite database (or a damaged one) at the path
        except (OSError, sqlite3.DatabaseError) as exc:
            raise unavailable_error(url, exc) from exc
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import CONNECT_TIMEOUT, RedisBroker

        return RedisBroker(
            url,
            result_ttl=result_ttl,
            fail_fast=fail_fast,
            connect_timeout=connect_timeout or CONNECT_TIMEOUT,
            call_wait=call_wait,
        )
    raise ValueError(
        f"unknown broker URL {url!r:.80}: use sqlite:///path.db or redis://host:port/db"
    )

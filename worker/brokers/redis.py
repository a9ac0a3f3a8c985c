"""The multi-host broker: Redis Streams with one consumer group per queue, run by Lua scripts.

Keys, under a prefix (`fleetd` unless given):

    {p}:q:{queue}     stream of ready messages (one field, `id`); group `workers`; the
                      group's pending list is what is held, the consumer name is the owner
    {p}:eta:{queue}   sorted set of scheduled task ids, scored by ETA (epoch seconds)
    {p}:idle:{queue}  sorted set of the workers (owners) that wait to be woken for the
                      queue, scored by when (Redis's clock, ms); a write publishes on the
                      wake channel only while it holds one
    {p}:r:{id}        hash: the task's record (name, queue, body, state, deliveries, where
                      it is, its stream entry and lease while queued or held) and later
                      its result; it expires `result_ttl` seconds after the task ended
    {p}:queues        set of known queue names        {p}:seq     counter of entry ids
    {p}:dead          list of dead letters (JSON), newest first
    {p}:revoked       set of revoked ids (never expires, like Celery's statedb)
    {p}:routes        hash: task name -> its queue, as the workers published them
    {p}:wake:{queue}  pub/sub channel that every write touching the queue publishes to,
                      while a worker waits ({p}:idle); a revoke of a task held from the
                      queue, always
    {p}:call:{link}   token and reply of the last write sent over one link (below), kept
                      2 minutes so that a retry of that write can't run it twice
    {p}:w:{id}        flag: a client waits for the task to end (Handle.get)
    {p}:n:{id}        list the task's end is pushed to while the flag is up, for the
                      waiting client's BLPOP; both expire on their own
    {p}:alien:{key}   a key of ours that held a value of another kind (someone else's
                      write), moved aside as it was (redis_mend.lua, redis_queue.lua)

Every write is one Lua script (`redis_*.lua` beside this module): atomic, one round trip
per batch, and one per worker turn (`turn` marks started, acks and stores results, and
reserves more in one script).
Calls go over connections of our own, "links", each with a random name; a call's token
counts the calls made over its link. redis-py retries a call cut off by a lost
connection over the same link with the same token, and a write script first compares
its token with the one its link's call key holds: a retried call whose first attempt did
run returns that attempt's reply instead of running again. Enqueue, the one write made per
task submitted, is leaner: its own script, without the prelude, JSON or call key; it keeps
the token on each task record it writes instead (field `call`).
Stream entry ids are `0-N`, N from one counter, so entries of all queues sort in the
order they were queued and `reserve` can hand out the oldest across queues.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import inspect
import json
import logging
import os
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis._parsers.base import BaseParser
from redis.backoff import EqualJitterBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry as ConnectionRetry

from ..resp import ErrorReply, pack, read_reply, resp_array
from ..task import LAST_ETA
from . import url_problem
from .base import (
    FAIL_FAST_WAIT,
    INFO_FIELDS,
    Broker,
    DeadLetter,
    Delivery,
    Envelope,
    Outcome,
    QueueDepth,
    Turn,
    Wakeup,
    dead_letter_from,
    number_or_text,
    owner_runs,
    stored_number,
    stored_tick,
    task_info,
)

log = logging.getLogger("fleetd.broker")

# A call cut off by a lost connection is retried this often, backing off up to 2 s
# (about 15 s in all): long enough to ride out a Redis restart.
CALL_RETRIES = 10
FAIL_FAST_RETRIES = 2  # for a caller that retries on its own (the worker's loop): about 0.3 s
CALL_BACKOFF = EqualJitterBackoff(cap=2.0, base=0.1)
# How Redis refuses a write for now, having run none of it (a script is refused at its first
# write, never after one): out of memory (OOM); a replica, as after a failover (READONLY);
# in a cluster, a shard being moved or down. redis-py raises these as their own classes;
# these others only as a ResponseError whose message starts with their code: snapshots or
# the AOF failing to be written, as on a full disk (MISCONF); another client's script past
# lua-time-limit (BUSY, for reads too); too few replicas acknowledging (NOREPLICAS); and,
# at connect, the URL's database past the server's `databases` (SELECT's refusal).
REFUSALS = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.MasterDownError,
)
REFUSAL_CODES = ("MISCONF ", "BUSY ", "NOREPLICAS ", "DB index is out of range")
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
# Unless the URL says otherwise (`?socket_timeout=...`): a call that a silent network leaves
# unanswered is cut off and retried (once: CallRetry), never waited on forever. Every call
# is short. A fail-fast caller's are cut off after base.FAIL_FAST_WAIT.
SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
WAKE_RECONNECT_INTERVAL = 1.0  # seconds between attempts to resubscribe a broken wake-up
# What a write publishes on a queue's wake channel (the scripts' `woken`): "n<N>" if it
# added only tasks ready now, the newest as entry 0-N; "eta" if it scheduled one for later.
WAKE_READY = b"n"
WAKE_READY_BEFORE = b"1"  # what an older fleetd publishes for ready tasks
WAKE_REVOKE = b"revoke"  # what a revoke publishes on the queues of the held tasks it names
WAKE_READ_SIZE = 65536
# Seconds a producer trusts that a queue it registered (its name in {p}:queues, its stream
# and group) is still there: its submits skip that in between. Past it the next submit
# registers it again. A stream that a skipped submit made after Redis lost its data has no
# group: that registration or a worker's first read makes it, from the first entry.
KNOWN_FRESH = 5.0
# How Redis fails a command on a key that holds a value of another kind than the command
# takes: a key of ours that someone else wrote (a string where a stream belongs, a counter
# that is no number). The call's keys are mended (redis_mend.lua) and the call sent again,
# while each mend moves a key aside: a few keys at most, but never for good.
MISPLACED = ("WRONGTYPE ", "value is not an integer", "increment or decrement would overflow")
MEND_ROUNDS = 8


class LuaScript:
    """A script's text and the SHA1 digest that EVALSHA names it by."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


def lua(name: str) -> str:
    """The text of `redis_{name}.lua`, which lies beside this module (package data)."""
    return importlib.resources.files(__package__).joinpath(f"redis_{name}.lua").read_text("utf-8")


# Each write script is how a task enters a queue (redis_queue.lua, shared with enqueue), the
# prelude, its body (which defines `main`) and the epilogue.
PRELUDE, EPILOGUE = lua("queue") + lua("prelude"), lua("epilogue")
WRITE_SCRIPTS = {
    name: LuaScript(PRELUDE + lua(name) + EPILOGUE)
    for name in (
        "turn",
        "release",
        "extend",
        "recover",
        "recover_expired",
        "revoke",
        "retry_dead",
        "purge_dead",
    )
}
DEPTHS_SCRIPT = LuaScript(lua("depths"))
MEND_SCRIPT = LuaScript(lua("mend"))
ENQUEUE_SCRIPT = LuaScript(lua("queue") + lua("enqueue"))

# What redis-py names itself with at each connection (CLIENT SETINFO), its version given: by
# default redis-py 8 looks it up with importlib.metadata (a scan of sys.path: ms and MiB, in
# every process that connects). Older ones take no DriverInfo and look it up at import.
CONNECTION_OPTIONS: dict[str, Any] = (
    {"driver_info": redis.DriverInfo(lib_version=redis.__version__)}
    if hasattr(redis, "DriverInfo")
    else {}
)

# Script arguments as compact JSON; everything passed is made of str, int, float, bool, None.
encode_args = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode

# The fields of a task record that get_result reads (status: whether there is one).
RESULT_FIELDS = ("status", *INFO_FIELDS)


def url_options_problem(url: str) -> str | None:
    """What redis-py cannot take in the URL's query (an option name it does not know, as a
    typo; a value of the wrong kind): it would fail only at the first connection, in a
    traceback. `prefix` is fleetd's own."""
    address, _, query_text = url.partition("?")
    query = urllib.parse.parse_qs(query_text)
    query.pop("prefix", None)
    try:
        options = redis.connection.parse_url(
            address + ("?" + urllib.parse.urlencode(query, doseq=True) if query else "")
        )
    except ValueError as exc:
        return str(exc)
    if not query:  # no option names to check: spare the signatures (ms at every start)
        return None
    kind = options.pop("connection_class", redis.connection.Connection)
    known = {
        name
        for cls in (*kind.__mro__, redis.connection.ConnectionPool)
        if "__init__" in vars(cls)
        for name in inspect.signature(cls.__init__).parameters
    }
    unknown = sorted(set(query) - known)
    return f"unknown URL option {unknown[0]!r:.80}" if unknown else None


def lease_keys(key: str) -> list[tuple[str, str]]:
    """A leader lease's key, for _mended: a string."""
    return [("lead:" + key, "string")]


def fields_of(text: str | bytes) -> dict[str, Any]:
    """A dead letter's JSON object; one that is not (someone else's writing) as its body."""
    try:
        # NaN and infinity as names, a number past a float's range as its text
        fields = json.loads(text, parse_constant=str, parse_float=number_or_text)
    except (ValueError, RecursionError):
        fields = None
    return fields if isinstance(fields, dict) else {"body": text}


def _exact(value: float) -> str:
    """A float as text that Redis and Lua read back exactly (JSON numbers lose digits in Lua)."""
    return repr(float(value))


def outcome_args(o: Outcome) -> list[Any]:
    """An outcome as the turn script reads it (see redis_turn.lua)."""
    runtime = None if o.runtime is None else _exact(o.runtime)
    result, error = o.stored_result(), [o.exc_type, o.exc_message, o.traceback]
    return [o.id, o.name or "", o.dead_letter, o.state, result, *error, o.node, runtime]


def delivery(task_id: str, queue: str, name: str, body: str, count: int, ready: Any) -> Delivery:
    """A reserved task as the turn script returns it (`ready`: epoch seconds, as text)."""
    try:
        ready_at = float(ready)
    except (TypeError, ValueError):  # a record written before it carried the time
        ready_at = 0.0
    return Delivery(task_id, queue, name, body, count, ready_at)


class PubSubWakeup(Wakeup):
    """A connection subscribed to the queues' wake channels; readable when one is published to.

    The subscription lives from creation, so nothing published after `wakeup()` returned
    is missed, whatever happens between a reserve and `arm`. The descriptor number stays
    the same across reconnects (the new socket is dup2'd onto it), so it can stay
    registered with poll(). While Redis is unreachable it is an idle pipe instead and
    `arm` tries to resubscribe at most once a second; once it is back, a PING makes the
    descriptor readable, so that the next reserve finds what was queued meanwhile.
    Once subscribed, a plain socket is read here, one read per wake-up (redis-py's reader
    spent 16 us on each, a worker's wake-up per task); a TLS one through redis-py.

    `seen`: the entry counter as the broker's last turn that read every entry there was
    found it (-1: none yet). A wake-up for entries up to it is no news: that turn took them,
    or someone else did. (Should the counter start over, a Redis that lost its data, the
    next reserve, woken by the resubscribe or by DRY_RECHECK, sets it anew.)
    """

    def __init__(self, connection: redis.Connection, channels: list[str]) -> None:
        self._conn = connection
        self._channels = channels
        self.seen = -1
        self._news = True  # what the last clear() found
        self._revoked = False
        self._idle_r, self._idle_w = os.pipe()
        self._fd = os.dup(self._idle_r)
        self._broken = False
        self._next_attempt = 0.0
        self._raw = False  # the socket is read here, not by redis-py
        self._tail = b""  # what the last read left of an incomplete frame
        try:
            self._subscribe()
        except CONNECTION_ERRORS:
            self._break()

    def _subscribe(self) -> None:
        self._conn.connect()
        self._conn.send_command("SUBSCRIBE", *self._channels)
        for _ in self._channels:  # confirmed: everything published from now on reaches us
            self._conn.read_response()
        sock = self._conn._sock  # redis-py keeps no public handle on the socket
        assert sock is not None
        os.dup2(sock.fileno(), self._fd, inheritable=False)
        self._clear_parsed()  # redis-py's buffer now empty: what comes is in the socket
        self._raw, self._tail = not isinstance(sock, ssl.SSLSocket), b""

    def _break(self) -> None:
        self._broken = True
        self._conn.disconnect()
        os.dup2(self._idle_r, self._fd, inheritable=False)

    def fileno(self) -> int:
        return self._fd

    def arm(self) -> None:
        if not self._broken or time.monotonic() < self._next_attempt:
            return
        self._next_attempt = time.monotonic() + WAKE_RECONNECT_INTERVAL
        try:
            self._subscribe()
            self._conn.send_command("PING")
        except CONNECTION_ERRORS:
            self._break()
            return
        self._broken = False

    def news(self) -> bool:
        return self._news

    def revoked(self) -> bool:
        return self._revoked

    def clear(self) -> bool:
        self._news = self._revoked = True
        if self._broken:
            return True
        if not self._raw:
            return self._clear_parsed()
        try:  # one read: if more waits, the descriptor stays readable
            data = os.read(self._fd, WAKE_READ_SIZE)
        except BlockingIOError:
            self._news = self._revoked = False
            return False
        except OSError:
            data = b""
        try:
            if not data:  # the server closed the connection
                raise ValueError("end of stream")
            self._tail, scheduled, self._news, self._revoked = wake_frames(
                self._tail + data, self.seen
            )
        except ValueError:  # gone, or out of step with the protocol: subscribe anew
            self._break()
            return True
        return scheduled

    def _clear_parsed(self) -> bool:
        frames = []
        try:
            while self._conn.can_read(timeout=0):
                message = self._conn.read_response()  # text: the pool decodes replies
                frames.append([str(item).encode("utf-8", "surrogateescape") for item in message])
        except CONNECTION_ERRORS:
            self._break()
            return True
        scheduled, self._news, self._revoked = wake_news(frames, self.seen)
        return scheduled

    def close(self) -> None:
        self._conn.disconnect()
        for fd in (self._fd, self._idle_r, self._idle_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def wake_frames(buffer: bytes, seen: int) -> tuple[bytes, bool, bool, bool]:
    """What follows the complete frames of a subscribed connection's `buffer` (the start of
    an incomplete one); whether any of them may announce a scheduled task; whether any may
    announce a task that a reserve which read up to entry `seen` did not see; whether any
    may announce a revoke (wake_news).
    ValueError for what is not the protocol."""
    frames, at = [], 0
    while at < len(buffer):
        frame = resp_array(buffer, at)
        if frame is None:
            break
        at, items = frame
        frames.append(items)
    return (buffer[at:], *wake_news(frames, seen))


def wake_news(frames: Sequence[Sequence[bytes | int]], seen: int) -> tuple[bool, bool, bool]:
    """What a subscribed connection's frames say: (any may announce a scheduled task, any
    may announce one not seen, any may announce a revoke). ["message", channel, b"n<N>"]:
    ready tasks up to entry N, news past `seen`; b"1" (an older fleetd's): ready ones,
    news; b"revoke": ids revoked, maybe held here; b"eta" or a payload not ours: the first
    two; the PING reply after a resubscribe (which may have missed anything): all three."""
    scheduled = news = revoked = False
    for frame in frames:
        if len(frame) != 3 or frame[0] != b"message" or not isinstance(frame[2], bytes):
            return True, True, True
        payload = frame[2]
        if payload[:1] == WAKE_READY and payload[1:].isdigit():
            news = news or int(payload[1:]) > seen
        elif payload == WAKE_READY_BEFORE:
            news = True
        elif payload == WAKE_REVOKE:
            revoked = True
        else:
            scheduled = news = True
    return scheduled, news, revoked


# A password or user the server refuses: redis-py raises them as a lost connection.
WRONG_CREDENTIALS = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)


class CallRetry(ConnectionRetry):
    """redis-py's retry, but a call that timed out is sent again once at most. Redis may only
    have been slow (another client's long script, a stalled fsync): a write's second try,
    under its link's token, then finds the reply its first run kept. A hung Redis (stopped,
    swapping) would hold the caller as long on every try: CALL_RETRIES of them were minutes
    for a producer, and a worker's loop answers nothing meanwhile. A call cut off by a lost
    connection is sent again as often as the retry allows (a Redis restart)."""

    def call_with_retry(
        self,
        do: Callable[[], Any],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> Any:
        timeouts = 0

        def retryable(error: Exception) -> bool:
            nonlocal timeouts
            if isinstance(error, WRONG_CREDENTIALS):  # a ConnectionError that no try mends
                return False
            timeouts += isinstance(error, (redis.TimeoutError, TimeoutError))
            return timeouts <= 1 and (is_retryable is None or is_retryable(error))

        return super().call_with_retry(do, fail, retryable, with_failure_count)


class Link:
    """A connection of ours, named so that Redis can keep the reply of the last write sent
    over it (`{p}:call:{name}`) for a retry of that write to find."""

    def __init__(self, connection: redis.Connection) -> None:
        self.connection = connection
        self.name = uuid.uuid4().hex
        self.calls = 0  # the current call's token: calls on one link never overlap
        # Bytes read past the last reply (read), and the socket they came from: a
        # connection made again (after a disconnect) has nothing of the old one's to read.
        self.unread = bytearray()
        self.read_from: socket.socket | None = None
        # Its own waits for a reply and for a connect, which a caller's deadline shortens.
        self.waits = (connection.socket_timeout, connection.socket_connect_timeout)

    def attempt(self, request: Callable[[Link], Any], deadline: float | None = None) -> Any:
        """`request(self)`, sent again (same token) after a lost connection or a timeout;
        with a `deadline` (time.monotonic()), no try waits past it, and none starts after it."""
        if deadline is None:
            return self.connection.retry.call_with_retry(
                lambda: request(self), lambda _error: self.connection.disconnect()
            )

        def before(_error: Exception) -> bool:
            return time.monotonic() < deadline

        def do() -> Any:
            self.wait_until(deadline)
            return request(self)

        try:
            return self.connection.retry.call_with_retry(
                do, lambda _error: self.connection.disconnect(), before
            )
        finally:
            self.wait_as_made()

    def wait_until(self, deadline: float) -> None:
        """Cut the link's waits (a reply, a connect) to the time left before `deadline`;
        redis.TimeoutError once it has passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise redis.TimeoutError("the caller's deadline for this call has passed")
        self.set_waits(*(left if w is None else min(w, left) for w in self.waits))

    def wait_as_made(self) -> None:
        """The link's own waits again, after a call that a deadline cut short."""
        self.set_waits(*self.waits)

    def set_waits(self, wait: float | None, connect_wait: float | None) -> None:
        connection = self.connection
        connection.socket_timeout, connection.socket_connect_timeout = wait, connect_wait
        if connection._sock is not None:  # connected: the wait is the socket's
            connection._sock.settimeout(wait)

    def execute(self, *args: Any) -> Any:
        self.send(*args)
        return self.read()

    def read(self) -> Any:
        """The next reply, read off the connection's socket here (resp.read_reply: redis-py's
        reader costs a caller more per call than the parse itself), and raised as redis-py
        raises it: an error reply as its class (NoScriptError, ...), a timeout or a lost
        connection, which disconnects the link, as redis.TimeoutError or ConnectionError."""
        connection = self.connection
        sock = connection._sock  # redis-py keeps no public handle on the socket
        if sock is None:
            raise redis.ConnectionError("the link is not connected")
        if sock is not self.read_from:
            self.unread, self.read_from = bytearray(), sock
        try:
            reply = read_reply(sock, self.unread)
        except TimeoutError as exc:  # the socket's own (socket.timeout)
            connection.disconnect()
            raise redis.TimeoutError(f"Timeout reading from Redis: {exc}") from exc
        except (OSError, EOFError, ValueError) as exc:
            connection.disconnect()
            raise redis.ConnectionError(f"Error while reading from Redis: {exc}") from exc
        except BaseException:  # a signal handler's exception mid-read: the reply is not ours
            connection.disconnect()
            raise
        if isinstance(reply, ErrorReply):
            raise BaseParser.parse_error(reply)
        return reply

    def send(self, *args: Any) -> None:
        self.connection.send_packed_command([pack(args)])

    def evaluate(self, script: LuaScript, *argv: Any) -> Any:
        try:
            return self.execute("EVALSHA", script.sha, 0, *argv)
        except NoScriptError:  # a restarted or flushed Redis: the text, which it then keeps
            return self.execute("EVAL", script.source, 0, *argv)


class RedisBroker(Broker):
    """A connection to a Redis broker; every call may be retried after a lost connection.

    The key prefix is `prefix`, else the URL's `?prefix=` (fleets, or tests, sharing one
    Redis database keep apart by it), else `fleetd`. A call cut off by a lost connection
    is sent again up to CALL_RETRIES times (backing off) before it raises, one that timed
    out once (CallRetry); `fail_fast`: calls are cut off after `call_wait` (default
    base.FAIL_FAST_WAIT) and sent again FAIL_FAST_RETRIES times at most.

    Writes and get_result go over links (see the module docstring) rather than through
    redis-py's client and pool, whose bookkeeping cost more than Redis's own work; a thread
    takes an idle link for one call, or opens one.
    """

    unavailable = (redis.ConnectionError, redis.TimeoutError, *REFUSALS)

    def unavailable_now(self, exc: BaseException) -> bool:
        return super().unavailable_now(exc) or (
            isinstance(exc, redis.ResponseError) and str(exc).startswith(REFUSAL_CODES)
        )

    def __init__(
        self,
        url: str,
        prefix: str | None = None,
        result_ttl: int = 86400,
        fail_fast: bool = False,
        connect_timeout: float = CONNECT_TIMEOUT,
        call_wait: float | None = None,
    ) -> None:
        problem = url_problem(url) or url_options_problem(url)
        if problem:
            raise ValueError(f"broker URL {url!r:.80}: {problem}")
        self.url = url
        address, _, query_text = url.partition("?")
        query = urllib.parse.parse_qs(query_text)
        self.prefix = prefix or query.pop("prefix", ["fleetd"])[0]
        self.result_ttl = result_ttl
        self.redis = redis.Redis.from_url(
            address + ("?" + urllib.parse.urlencode(query, doseq=True) if query else ""),
            decode_responses=True,
            encoding_errors="surrogateescape",  # stored bytes as the base module says
            protocol=2,
            retry=CallRetry(CALL_BACKOFF, FAIL_FAST_RETRIES if fail_fast else CALL_RETRIES),
            socket_timeout=(call_wait or FAIL_FAST_WAIT) if fail_fast else SOCKET_TIMEOUT,
            socket_connect_timeout=connect_timeout,
            **CONNECTION_OPTIONS,
        )
        self._idle: list[Link] = []
        # A reserving turn cut off by a lost connection or a timeout, its link held aside
        # with its token, and what it turned out to have reserved (see _reclaim).
        self._cut_off: Link | None = None
        self._reclaimed: list[Delivery] = []
        self._pid = os.getpid()
        self._wakeups: list[PubSubWakeup] = []  # told what each short reserve saw
        self._registered: dict[str, float] = {}  # queue -> when our enqueue registered it
        self._waiting: dict[str, bool] = {}  # owner -> its last reserve came back short
        self._deadline = threading.local()  # see give_up_at: one Client, many threads

    def give_up_at(self, deadline: float | None) -> None:
        """Every call of this thread over a link from now on (a worker's acks, releases and
        renewals; a Handle.get's reads): its waits and its retry cut at `deadline`, past
        which it raises redis.TimeoutError; None: its own again."""
        self._deadline.at = deadline

    @property
    def _give_up_at(self) -> float | None:
        return getattr(self._deadline, "at", None)

    def _take_link(self) -> Link:
        if self._pid != os.getpid():  # forked: the parent's sockets are not ours to use
            self._pid, self._idle, self._cut_off = os.getpid(), [], None
        try:
            return self._idle.pop()
        except IndexError:
            pool = self.redis.connection_pool
            return Link(pool.connection_class(**pool.connection_kwargs))

    def _mended(
        self,
        request: Callable[[], Any],
        queues: Sequence[str] = (),
        keys: Sequence[tuple[str, str]] = (),
    ) -> Any:
        """`request()`, sent again after each mend of a key it failed on, a key of ours that
        held another kind of value (MISPLACED): the keys every fleet has, those of `queues`
        and `keys` ([name past the prefix, the kind Redis's TYPE names], as the scripts
        use them). A write script that fails partway has run up to that point: each is safe
        to run again from the start, as it is after a lost connection."""
        for _ in range(MEND_ROUNDS):
            try:
                return request()
            except redis.ResponseError as exc:
                # A pipeline's error names its command first: the code is further in.
                if not any(code in str(exc) for code in MISPLACED) or not self._mend(queues, keys):
                    raise
        return request()

    def _mend(self, queues: Sequence[str], keys: Sequence[tuple[str, str]]) -> bool:
        """Move aside our keys that hold another kind of value (redis_mend.lua); whether
        there was one."""
        args = encode_args({"queues": list(queues), "keys": [list(k) for k in keys]})
        moved = self._send(lambda link: link.evaluate(MEND_SCRIPT, self.prefix, args))
        for move in moved:
            log.warning("a key of another kind than fleetd's: moved %s", move)
        return bool(moved)

    def _call(
        self,
        request: Callable[[Link], Any],
        queues: Sequence[str] = (),
        keys: Sequence[tuple[str, str]] = (),
        hold: bool = False,
    ) -> Any:
        """`request(link)` on an idle link (_send), mended (_mended, for `queues` and
        `keys`) when it fails on a key of ours that holds another kind of value."""
        return self._mended(lambda: self._send(request, hold), queues, keys)

    def _send(self, request: Callable[[Link], Any], hold: bool = False) -> Any:
        """`request(link)` on an idle link, sent again (same link, same token) after a lost
        connection or a timeout (CallRetry). A call that ends in an exception leaves its
        link disconnected: one raised between its request and its reply (by a signal
        handler of the caller's, say) would leave that reply for the link's next call.
        `hold`: a call that the broker's absence cut off keeps its link and token aside
        for _reclaim (one at a time)."""
        link = self._take_link()
        link.calls += 1
        idle = True
        try:
            return link.attempt(request, self._give_up_at)
        except BaseException as exc:
            link.connection.disconnect()
            if hold and self._cut_off is None and isinstance(exc, self.unavailable):
                self._cut_off, idle = link, False
            raise
        finally:
            if idle:
                self._idle.append(link)

    def _run(
        self,
        script: str,
        args: Any,
        queues: Sequence[str] = (),
        keys: Sequence[tuple[str, str]] = (),
        hold: bool = False,
    ) -> Any:
        """Run a write script once, even if it has to be sent again (see _mended for
        `queues` and `keys`, _send for `hold`)."""
        return json.loads(self._call(self._write(script, args), queues, keys, hold))

    def _write(self, script: str, args: Any) -> Callable[[Link], Any]:
        """A write script's request: sent over a link, under that link's current token."""
        now, encoded = _exact(time.time()), encode_args(args)
        return lambda link: link.evaluate(
            WRITE_SCRIPTS[script], self.prefix, link.name, link.calls, now, encoded
        )

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # --- producing -------------------------------------------------------------
    def enqueue(self, envelopes: Sequence[Envelope]) -> None:
        if not envelopes:
            return
        now, queues = time.monotonic(), {e.queue for e in envelopes}
        known = all(now - self._registered.get(q, -KNOWN_FRESH) < KNOWN_FRESH for q in queues)
        argv = [self.prefix, "known" if known else "", "", _exact(time.time()), self.result_ttl]
        for e in envelopes:
            argv += (e.id, e.queue, e.name, e.body, "" if e.eta is None else _exact(e.eta))

        def send(link: Link) -> Any:
            argv[2] = f"{link.name}:{link.calls}"  # the same token if it is sent again
            return link.evaluate(ENQUEUE_SCRIPT, *argv)

        self._call(send, sorted(queues))
        if not known:
            self._registered.update(dict.fromkeys(queues, now))

    # --- consuming -------------------------------------------------------------
    def turn(self, turn: Turn) -> list[Delivery]:
        if turn.empty:
            return []
        args = {
            "started": turn.marks(),
            "node": turn.node,
            "outcomes": [outcome_args(o) for o in turn.outcomes],
            "retries": [
                [r.id, r.body, _exact(r.eta), r.exc_type, r.exc_message] for r in turn.retries
            ],
            "ttl": str(self.result_ttl),  # numbers as text: Lua writes them unformatted
            "queues": list(dict.fromkeys(turn.queues)),
            "n": turn.wanted,
            "owner": turn.owner,
            "lease_ms": str(int(turn.lease * 1000)),
            # Whether the owner's last reserve marked it waiting (None: not known here).
            "waited": self._waiting.get(turn.owner),
        }
        if turn.wanted and self._cut_off is not None:
            self._reclaim(args)
        reply = self._run("turn", args, turn.queues, hold=turn.wanted > 0)
        reclaimed, self._reclaimed = self._reclaimed, []
        if not reply:  # nothing asked for: {}
            return reclaimed
        if reply["seq"] is not None:
            for wake in self._wakeups:
                wake.seen = reply["seq"]
        rows = reply["rows"] or []  # no rows: {}
        self._waiting[turn.owner] = len(rows) < turn.wanted  # as redis_turn.lua marks it
        return reclaimed + [delivery(*row) for row in rows]

    def _reclaim(self, args: dict[str, Any]) -> None:
        """What a reserving turn cut off by a lost connection or a timeout reserved, if Redis
        ran it after all: a server that hung runs what waited in its sockets once it wakes,
        and those tasks, held for us, would otherwise wait for their lease to run out. The
        turn's link sends an empty turn under the same token: it returns the turn's reply if
        the turn ran; else it takes the token, and the turn, should it still come, does not
        run (redis_epilogue.lua). Kept for the next reserving turn to hand over (tasks still
        held for us only: a lease may have run out meanwhile). Sent again while the broker is
        unreachable (the token's reply is kept 2 minutes); on any other error, left to the
        leases."""
        link = self._cut_off
        assert link is not None
        empty = {**args, "started": [], "outcomes": [], "retries": [], "n": 0, "waited": None}
        rows: list[list[Any]] = []
        holders: list[list[Any]] = []
        try:
            reply = json.loads(link.attempt(self._write("turn", empty), self._give_up_at))
            rows = (reply.get("rows") or []) if reply else []
            if rows:
                pipe = self.redis.pipeline(transaction=False)
                for row in rows:
                    pipe.hmget(self._key("r", row[0]), "status", "owner")
                holders = pipe.execute()
        except self.unavailable:
            link.connection.disconnect()
            raise
        except Exception as exc:  # noqa: BLE001 - a best effort: the leases are the rest
            log.warning("could not look for what a turn cut off reserved: %r", exc)
            rows, holders = [], []
        self._cut_off = None
        self._idle.append(link)
        taken = [
            delivery(*row)
            for row, (status, owner) in zip(rows, holders, strict=False)
            if status == "held" and owner == args["owner"]
        ]
        if rows:
            log.info(
                "a turn cut off by the broker's absence ran once it answered: %d of the %d"
                " tasks it reserved are still ours",
                len(taken),
                len(rows),
            )
        self._reclaimed += taken

    def release(self, ids: list[str], died: bool, owner: str | None = None) -> None:
        if ids:
            self._run(
                "release",
                {"ids": ids, "died": died, "owner": owner or "", "ttl": self.result_ttl},
            )

    def extend(self, ids: list[str], owner: str, lease: float) -> list[str]:
        if not ids:
            return []
        lost = self._run("extend", {"ids": ids, "owner": owner, "lease_ms": int(lease * 1000)})
        return [str(i) for i in lost]  # none: {} (cjson writes an empty table so)

    def recover(self, owner: str) -> int:
        return int(self._run("recover", {"owner": owner, "ttl": self.result_ttl}))

    def recover_expired(self, queues: list[str], host: str = "", me: str = "") -> int:
        if not queues:
            return 0
        queues = list(dict.fromkeys(queues))
        keep = [c for c in self._running_here(queues, host) if c != me] if host else []
        return int(
            self._run(
                "recover_expired",
                {"queues": queues, "keep": keep, "ttl": self.result_ttl},
                queues,
            )
        )

    def _running_here(self, queues: list[str], host: str) -> list[str]:
        """The consumers of these queues that are workers of `host` whose process runs."""
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.xinfo_consumers(self._key("q", queue), "workers")  # the scripts' GROUP
        running = set()
        for reply in pipe.execute(raise_on_error=False):  # no stream or group yet: none
            for consumer in reply if isinstance(reply, list) else ():
                name = str(consumer.get("name", ""))
                if name.split(":", 1)[0].endswith(f"@{host}") and owner_runs(name):
                    running.add(name)
        return sorted(running)

    def wakeup(self, queues: list[str]) -> Wakeup:
        pool = self.redis.connection_pool
        # Its own connection, which never waits out the retries: it must not block a worker.
        options = {
            **pool.connection_kwargs,
            "retry": ConnectionRetry(CALL_BACKOFF, 0),
            "socket_connect_timeout": 1.0,
        }
        connection = pool.connection_class(**options)
        wake = PubSubWakeup(connection, [self._key("wake", q) for q in dict.fromkeys(queues)])
        self._wakeups.append(wake)
        return wake

    def next_due(self, queues: list[str]) -> float | None:
        def read() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            after_now = f"({time.time()!r}"
            for q in queues:
                # Past the calendar: never due (recover_expired buries it), no time to show.
                pipe.zrangebyscore(self._key("eta", q), after_now, LAST_ETA, 0, 1, withscores=True)
            return pipe.execute()

        etas = [row[0][1] for row in self._mended(read, queues) if row]
        return min(etas) if etas else None

    # --- results, dead letters, revokes --------------------------------------
    announces_ends = True
    end_wait_late = 0.1  # Redis times a blocked BLPOP out at its `hz`: 10 a second by default

    def wait_for_end(self, task_id: str, timeout: float) -> dict[str, Any] | None:
        """Raise the task's wait flag (or, if it has ended, wake ourselves), block on its
        wake-up list and read its record once the pop returns, all sent at once: one round
        trip, then as long as the task runs (Redis runs the read when the pop is done)."""
        record, flag, woken = (self._key(kind, task_id) for kind in ("r", "w", "n"))
        alien = self._key("alien", "n", task_id)
        wait = f"{max(timeout, 0.001):.3f}"
        flag_ms = int((timeout + WAIT_FLAG_SLACK) * 1000)

        def send(link: Link) -> dict[str, Any] | None:
            connection = link.connection
            # In one write (redis-py sends each item of a list with a sendall of its own).
            connection.send_packed_command(
                [
                    pack(("EVAL", WAIT_SCRIPT, 0, record, flag, woken, flag_ms, alien))
                    + pack(("BLPOP", woken, wait))
                    + pack(("HMGET", record, *RESULT_FIELDS))
                ]
            )
            try:
                link.read()
            except redis.ResponseError:  # no flag (Redis out of memory): the pop times out
                pass
            link.read()
            return self._result_of(task_id, link.read)

        # The script moves a foreign key off the wake-up list, but one written there before
        # the pop runs (another client's, between the two) fails the pop: mended, waited again.
        return self._call(send, keys=[(f"n:{task_id}", "list")])

    def get_result(self, task_id: str) -> dict[str, Any] | None:
        key = self._key("r", task_id)
        return self._call(
            lambda link: self._result_of(
                task_id, lambda: link.execute("HMGET", key, *RESULT_FIELDS)
            )
        )

    @staticmethod
    def _result_of(task_id: str, read: Callable[[], Any]) -> dict[str, Any] | None:
        """The info dict of the record `read` replies with (an HMGET of RESULT_FIELDS), or
        None if there is none."""
        try:
            values = read()
        except redis.ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise
            return None  # someone else's key where the record belongs (redis_queue.lua's record)
        fields = dict(zip(RESULT_FIELDS, values, strict=True))
        if fields["status"] is None:
            return None
        return task_info(task_id, fields, done=fields["status"] == "done")

    def depths(self) -> list[QueueDepth]:
        rows = self._call(
            lambda link: link.evaluate(DEPTHS_SCRIPT, self.prefix, _exact(time.time()))
        )
        return sorted(
            (QueueDepth(q, int(r), int(s), int(h)) for q, r, s, h in rows),
            key=lambda depth: depth.queue,
        )

    def dead_letters(
        self, limit: int | None = 100, ids: Sequence[str] | None = None
    ) -> list[DeadLetter]:
        if limit is not None and limit <= 0:
            return []
        wanted = None if ids is None else set(ids)
        last = -1 if limit is None or wanted is not None else limit - 1
        letters = [
            dead_letter_from(fields_of(text))
            for text in self._mended(lambda: self.redis.lrange(self._key("dead"), 0, last))
        ]
        if wanted is not None:
            letters = [letter for letter in letters if letter.id in wanted]
        return letters[:limit]

    def retry_dead(self, ids: Sequence[str]) -> list[str]:
        if not ids:
            return []
        ids = list(dict.fromkeys(ids))
        return list(self._run("retry_dead", {"ids": ids, "ttl": self.result_ttl}))  # none: {}

    def purge_dead(self) -> int:
        return int(self._run("purge_dead", {}))

    def revoke(self, ids: list[str]) -> None:
        if ids:
            self._run("revoke", {"ids": ids, "ttl": self.result_ttl})

    def revoked(self) -> set[str]:
        members = self._mended(lambda: self.redis.smembers(self._key("revoked")))
        return {str(task_id) for task_id in members}

    def revoked_among(self, ids: list[str]) -> set[str]:
        key = self._key("revoked")

        def ask() -> list[Any]:  # one round trip; SMISMEMBER would need Redis 6.2
            pipe = self.redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.sismember(key, task_id)
            return pipe.execute()

        return {task_id for task_id, member in zip(ids, self._mended(ask), strict=True) if member}

    def set_routes(self, routes: dict[str, str]) -> None:
        if routes:  # HSET is idempotent: a retried call does no harm
            pairs: list[Any] = [word for pair in routes.items() for word in pair]
            self._mended(lambda: self.redis.hset(self._key("routes"), items=pairs))

    def routes(self) -> dict[str, str]:
        routes = self._mended(lambda: self.redis.hgetall(self._key("routes")))
        return {str(n): str(q) for n, q in routes.items()}

    def ping(self) -> None:
        self._call(lambda link: link.execute("PING"))

    def risks(self) -> list[str]:
        try:
            _, policy = self._call(lambda link: link.execute("CONFIG", "GET", "maxmemory-policy"))
        except (redis.ResponseError, ValueError):  # CONFIG renamed or denied (a managed Redis)
            return []
        if policy == "noeviction":
            return []
        return [
            f"Redis evicts keys when it is full (maxmemory-policy {policy}): a task's record"
            " or a whole queue can vanish; set maxmemory-policy noeviction to keep every task"
        ]

    def close(self) -> None:
        for link in self._idle + ([self._cut_off] if self._cut_off else []):
            link.connection.disconnect()
        self._idle, self._cut_off = [], None
        self.redis.close()

    # --- schedules ---------------------------------------------------------------
    def claim_lead(self, key: str, holder: str, ttl: float) -> tuple[str, float]:
        owner, left_ms = self._call(
            lambda link: link.evaluate(
                CLAIM_LEAD_SCRIPT, self._key("lead", key), holder, int(ttl * 1000)
            ),
            keys=lease_keys(key),
        )
        return str(owner), max(0, int(left_ms)) / 1000

    def release_lead(self, key: str, holder: str) -> None:
        self._call(
            lambda link: link.evaluate(RELEASE_LEAD_SCRIPT, self._key("lead", key), holder),
            keys=lease_keys(key),
        )

    def lead_holder(self, key: str) -> str | None:
        holder = self._mended(lambda: self.redis.get(self._key("lead", key)), keys=lease_keys(key))
        return None if holder is None else str(holder)

    def fire_schedule(self, name: str, tick: float | None, envelope: Envelope | None) -> bool:
        task = (
            None
            if envelope is None
            else [envelope.id, envelope.queue, envelope.name, envelope.body]
        )
        args = {"name": name, "tick": None if tick is None else _exact(tick), "task": task}
        queues = [] if envelope is None else [envelope.queue]
        return bool(self._run("fire_schedule", args, queues, [("schedule:" + name, "hash")]))

    def schedule_states(self) -> dict[str, dict[str, Any]]:
        def read() -> tuple[list[str], list[Any]]:
            names = sorted(str(n) for n in self.redis.smembers(self._key("schedules")))
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                pipe.hmget(self._key("schedule", name), "last_tick", "last_id", "last_at", "paused")
            return names, pipe.execute()

        names, rows = self._mended(read)
        states = {}
        for name, (tick, task_id, at, paused) in zip(names, rows, strict=True):
            states[name] = {  # what other hands wrote there reads as none
                "last_tick": stored_tick(tick),
                "last_id": task_id,
                "last_at": stored_number(at),
                "paused": paused == "1",
            }
        return states

    def pause_schedule(self, name: str, paused: bool) -> None:
        def write() -> None:
            pipe = self.redis.pipeline(transaction=True)  # a retry does no harm
            pipe.sadd(self._key("schedules"), name)
            pipe.hset(self._key("schedule", name), "paused", "1" if paused else "0")
            pipe.execute()

        self._mended(write, keys=[("schedule:" + name, "hash")])


# A client waiting for a task to end (wait_for_end). ARGV: the task's record, its wait flag
# and wake-up list, the flag's life in ms. An ended task wakes its waiter at once; else the
# flag asks close_record (redis_prelude.lua) to wake it. EVAL, not EVALSHA: a BLPOP sent
# behind it must never wait out a NOSCRIPT. A wake-up list of another kind (someone else's
# write) is moved aside to ARGV[5], as redis_mend.lua moves keys.
WAIT_SCRIPT = """
local kind = redis.call('TYPE', ARGV[3]).ok
if kind ~= 'none' and kind ~= 'list' then redis.call('RENAME', ARGV[3], ARGV[5]) end
if redis.call('HGET', ARGV[1], 'status') == 'done' then
  redis.call('LPUSH', ARGV[3], '1')
  redis.call('EXPIRE', ARGV[3], 60)
else
  redis.call('SET', ARGV[2], '1', 'PX', ARGV[4])
end
return 0
"""
WAIT_FLAG_SLACK = 60.0  # seconds a wait flag outlives the wait it was raised for

# Keys of the schedules (worker/scheduler.py): {p}:schedules, the set of their names;
# {p}:schedule:{name}, a hash of last_tick, last_id, last_at and paused; {p}:lead:{key}, the
# leader lease (its holder, expiring on its own). ARGV: the lease's key, holder, ttl in ms;
# replies who holds it and for how many ms more. Safe to send again: it only renews.
CLAIM_LEAD_SCRIPT = LuaScript("""
local holder = redis.call('GET', ARGV[1])
-- A lease without an expiry is none of ours (someone else's SET): it would hold for ever.
if not holder or holder == ARGV[2] or redis.call('PTTL', ARGV[1]) < 0 then
  redis.call('SET', ARGV[1], ARGV[2], 'PX', ARGV[3])
  return {ARGV[2], tonumber(ARGV[3])}
end
return {holder, redis.call('PTTL', ARGV[1])}
""")

# ARGV: the lease's key, holder: deletes the lease if that holder has it.
RELEASE_LEAD_SCRIPT = LuaScript("""
if redis.call('GET', ARGV[1]) == ARGV[2] then redis.call('DEL', ARGV[1]) end
return 0
""")

# A: {name, tick (text) or null, task: [id, queue, name, body] or null}; see
# Broker.fire_schedule. Replies whether it fired. The tick is written last: a call that
# fails halfway (a key of another kind, mended and sent again) keeps what it did, and a
# tick written before its task would have been a tick that never ran.
FIRE_SCHEDULE = f"""
local function main()
  local key = P .. ':schedule:' .. A.name
  redis.call('SADD', P .. ':schedules', A.name)
  if A.tick ~= null then
    -- Not a number, NaN, or outside the calendar (base.stored_tick): none.
    local last = tonumber(redis.call('HGET', key, 'last_tick'))
    local known = last and last >= 0 and last <= {LAST_ETA!r}
    if known and last >= tonumber(A.tick) then return false end
  end
  if A.task ~= null then
    local e = A.task
    submit(e[1], e[2], e[3], e[4], '')
    redis.call('HSET', key, 'last_id', e[1], 'last_at', NOW)
  end
  if A.tick ~= null then redis.call('HSET', key, 'last_tick', A.tick) end
  return true
end
"""
WRITE_SCRIPTS["fire_schedule"] = LuaScript(PRELUDE + FIRE_SCHEDULE + EPILOGUE)

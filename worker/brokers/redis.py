"""The multi-host broker: Redis Streams with one consumer group per queue, run by Lua scripts.

Keys, under a prefix (`fleetd` unless given):

    {p}:q:{queue}     stream of ready messages (one field, `id`); group `workers`; the
                      group's pending list is what is held, the consumer name is the owner
    {p}:eta:{queue}   sorted set of scheduled task ids, scored by ETA (epoch seconds)
    {p}:r:{id}        hash: the task's record (name, queue, body, state, deliveries, where
                      it is, its stream entry and lease while queued or held) and later
                      its result; it expires `result_ttl` seconds after the task ended
    {p}:queues        set of known queue names        {p}:seq     counter of entry ids
    {p}:dead          list of dead letters (JSON), newest first
    {p}:revoked       set of revoked ids (never expires, like Celery's statedb)
    {p}:wake:{queue}  pub/sub channel that every write touching the queue publishes to
    {p}:call:{token}  the reply of one write call, kept a while so a retry can't run it twice

Every write is one Lua script (atomic, one round trip per batch) that first looks up
its call token: redis-py retries any call cut off by a lost connection, and a retried
call whose first attempt did run returns that attempt's reply instead of running again.
Stream entry ids are `0-N`, N from one counter, so entries of all queues sort in the
order they were queued and `reserve` can hand out the oldest across queues.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from typing import Any

import redis
from redis.backoff import EqualJitterBackoff
from redis.commands.core import Script
from redis.retry import Retry as ConnectionRetry

from .base import Broker, DeadLetter, Delivery, Envelope, Outcome, QueueDepth, Retry, Wakeup

# A call cut off by a lost connection is retried this often, backing off up to 2 s
# (about 15 s in all): long enough to ride out a Redis restart.
CALL_RETRIES = 10
FAIL_FAST_RETRIES = 2  # for a caller that retries on its own (the worker's loop): about 0.3 s
CALL_BACKOFF = EqualJitterBackoff(cap=2.0, base=0.1)
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
# Unless the URL says otherwise (`?socket_timeout=...`): a call that a silent network leaves
# unanswered is cut off and retried, never waited on forever. Every call is short.
SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
WAKE_RECONNECT_INTERVAL = 1.0  # seconds between attempts to resubscribe a broken wake-up

# Shared by every write script. ARGV: prefix, call token, now (epoch seconds), JSON args.
PRELUDE = """
local P, TOKEN, NOW = ARGV[1], ARGV[2], ARGV[3]
local A = cjson.decode(ARGV[4])
local GROUP = 'workers'
local woken = {}

local function task_key(id) return P .. ':r:' .. id end
local function stream_key(q) return P .. ':q:' .. q end
local function eta_key(q) return P .. ':eta:' .. q end

local function load(id)
  local v = redis.call('HMGET', task_key(id), 'status', 'queue', 'entry', 'owner', 'state')
  if not v[1] then return nil end
  return {status = v[1], queue = v[2], entry = v[3], owner = v[4], state = v[5]}
end

local function set_fields(key, fields)
  for field, value in pairs(fields) do
    if value == cjson.null then
      redis.call('HDEL', key, field)
    else
      redis.call('HSET', key, field, value)
    end
  end
end

-- Put a task at the tail of its queue's stream as a new, undelivered entry.
local function append(id, q)
  redis.call('SADD', P .. ':queues', q)
  if redis.call('EXISTS', stream_key(q)) == 0 then
    redis.call('XGROUP', 'CREATE', stream_key(q), GROUP, '0', 'MKSTREAM')
  end
  local entry = '0-' .. redis.call('INCR', P .. ':seq')
  redis.call('XADD', stream_key(q), entry, 'id', id)
  redis.call('HSET', task_key(id), 'status', 'queued', 'entry', entry)
  redis.call('HDEL', task_key(id), 'owner', 'lease_ms')
  woken[q] = true
end

-- Hold a task back in its queue's ETA set until it is due.
local function schedule(id, q, eta)
  redis.call('SADD', P .. ':queues', q)
  redis.call('ZADD', eta_key(q), eta, id)
  redis.call('HSET', task_key(id), 'status', 'scheduled', 'eta', eta)
  redis.call('HDEL', task_key(id), 'owner', 'entry', 'lease_ms')
  woken[q] = true
end

-- Mark a task's record ended; it is kept `ttl` seconds for its result to be read.
local function close_record(id, ttl)
  local key = task_key(id)
  redis.call('HSET', key, 'status', 'done', 'finished', NOW)
  redis.call('HDEL', key, 'owner', 'entry', 'lease_ms', 'eta', 'body')
  redis.call('EXPIRE', key, ttl)
end

-- Take a task out of wherever it waits or is held (its stream or its ETA set).
local function take_out(id, t)
  if t.status == 'queued' or t.status == 'held' then
    redis.call('XACK', stream_key(t.queue), GROUP, t.entry)
    redis.call('XDEL', stream_key(t.queue), t.entry)
  elseif t.status == 'scheduled' then
    redis.call('ZREM', eta_key(t.queue), id)
  end
end

-- Give a held task back to its queue; its delivery count stays as it is.
local function requeue(id, t)
  take_out(id, t)
  append(id, t.queue)
  if t.state == 'STARTED' then redis.call('HSET', task_key(id), 'state', 'PENDING') end
end

-- Give back the pending entries of one queue that `consumer` (or anyone, if false) holds
-- and that `expired(entry idle ms, task id)` says to give back; returns how many.
local function give_back(q, consumer, expired)
  local key, count, start = stream_key(q), 0, '-'
  while true do
    local pending
    if consumer then
      pending = redis.call('XPENDING', key, GROUP, start, '+', 100, consumer)
    else
      pending = redis.call('XPENDING', key, GROUP, start, '+', 100)
    end
    if #pending == 0 then return count end
    for _, p in ipairs(pending) do
      local entry, idle = p[1], p[3]
      local found = redis.call('XRANGE', key, entry, entry)[1]
      local id = found and found[2][2]
      local t = id and load(id)
      if not (t and t.status == 'held' and t.entry == entry) then
        redis.call('XACK', key, GROUP, entry)
        redis.call('XDEL', key, entry)
      elseif expired(idle, id) then
        requeue(id, t)
        count = count + 1
      end
      start = '(' .. entry
    end
  end
end

local function stream_exists(q) return redis.call('EXISTS', stream_key(q)) == 1 end
"""

# Runs `main` once per call token (its reply is kept 2 minutes for retries to find) and
# wakes the queues it touched.
EPILOGUE = """
local call_key = P .. ':call:' .. TOKEN
local saved = redis.call('GET', call_key)
if saved then return cjson.decode(saved) end
local reply = main()
redis.call('SET', call_key, cjson.encode(reply), 'EX', 120)
for q in pairs(woken) do redis.call('PUBLISH', P .. ':wake:' .. q, '1') end
return reply
"""

# A.tasks: [[id, queue, name, body, eta or ""]]. A task id already waiting or held is
# skipped, so that submitting the same id twice does not run it twice; an ended one
# starts over.
ENQUEUE = """
local function main()
  for _, e in ipairs(A.tasks) do
    local id, q, eta = e[1], e[2], e[5]
    local t = load(id)
    if not t or t.status == 'done' then
      redis.call('DEL', task_key(id))
      redis.call('HSET', task_key(id), 'id', id, 'queue', q, 'name', e[3], 'body', e[4],
        'state', 'PENDING', 'deliveries', 0)
      if eta ~= '' and tonumber(eta) > tonumber(NOW) then
        schedule(id, q, eta)
      else
        append(id, q)
      end
    end
  end
  return 0
end
"""

# A: queues, n, owner, lease_ms. Moves due ETA messages into their streams (up to 1000 a
# queue per call), then hands out the n oldest undelivered entries of all the queues.
RESERVE = """
local function last_delivered(q)
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', stream_key(q))) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    if info['name'] == GROUP then return info['last-delivered-id'] end
  end
  return nil
end

local function entry_before(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  if a_ms ~= b_ms then return tonumber(a_ms) < tonumber(b_ms) end
  return tonumber(a_seq) < tonumber(b_seq)
end

local function main()
  for _, q in ipairs(A.queues) do
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', eta_key(q), '-inf', NOW, 'LIMIT', 0, 1000)) do
      redis.call('ZREM', eta_key(q), id)
      redis.call('HDEL', task_key(id), 'eta')
      append(id, q)
    end
  end
  local candidates = {}
  for _, q in ipairs(A.queues) do
    local cursor = stream_exists(q) and last_delivered(q)
    if cursor then
      for _, e in ipairs(redis.call('XRANGE', stream_key(q), '(' .. cursor, '+', 'COUNT', A.n)) do
        table.insert(candidates, {entry = e[1], queue = q})
      end
    end
  end
  table.sort(candidates, function(a, b) return entry_before(a.entry, b.entry) end)
  local counts = {}
  for i = 1, math.min(A.n, #candidates) do
    local q = candidates[i].queue
    counts[q] = (counts[q] or 0) + 1
  end
  local delivered = {}
  for q, count in pairs(counts) do
    local read = redis.call('XREADGROUP', 'GROUP', GROUP, A.owner, 'COUNT', count,
      'STREAMS', stream_key(q), '>')
    for _, e in ipairs(read and read[1][2] or {}) do
      local entry, id = e[1], e[2][2]
      local t = load(id)
      if t and t.status == 'queued' and t.entry == entry then
        local key = task_key(id)
        redis.call('HSET', key, 'status', 'held', 'owner', A.owner, 'lease_ms', A.lease_ms)
        local deliveries = redis.call('HINCRBY', key, 'deliveries', 1)
        local v = redis.call('HMGET', key, 'name', 'body')
        table.insert(delivered, {entry = entry, reply = {id, q, v[1], v[2], deliveries}})
      else
        redis.call('XACK', stream_key(q), GROUP, entry)
        redis.call('XDEL', stream_key(q), entry)
      end
    end
  end
  table.sort(delivered, function(a, b) return entry_before(a.entry, b.entry) end)
  local reply = {}
  for i, d in ipairs(delivered) do reply[i] = d.reply end
  return reply
end
"""

# A: ids, node.
MARK_STARTED = """
local function main()
  for _, id in ipairs(A.ids) do
    local t = load(id)
    if t and t.status == 'held' then
      redis.call('HSET', task_key(id), 'state', 'STARTED', 'node', A.node)
    end
  end
  return 0
end
"""

# A.outcomes: [{id, name, dead, reason, extra, fields}], A.retries: [{id, body, eta, fields}],
# A.ttl. `fields` are written to the record (a null value deletes the field).
FINISH = """
local function main()
  for _, o in ipairs(A.outcomes) do
    local key = task_key(o.id)
    local t = load(o.id)
    if t then
      take_out(o.id, t)
    else
      redis.call('HSET', key, 'id', o.id, 'name', o.name, 'deliveries', 0)
    end
    if o.dead then
      local v = redis.call('HMGET', key, 'queue', 'name', 'body')
      redis.call('LPUSH', P .. ':dead', cjson.encode({id = o.id, queue = v[1] or '',
        name = v[2] or '', body = v[3] or '', reason = o.reason, at = tonumber(NOW),
        extra = o.extra}))
    end
    set_fields(key, o.fields)
    close_record(o.id, A.ttl)
  end
  for _, r in ipairs(A.retries) do
    local t = load(r.id)
    if t then
      take_out(r.id, t)
      set_fields(task_key(r.id), r.fields)
      redis.call('HSET', task_key(r.id), 'body', r.body, 'state', 'RETRY', 'deliveries', 0)
      schedule(r.id, t.queue, r.eta)
    end
  end
  return 0
end
"""

# A: ids, started.
RELEASE = """
local function main()
  for _, id in ipairs(A.ids) do
    local t = load(id)
    if t and t.status == 'held' then
      requeue(id, t)
      if not A.started then redis.call('HINCRBY', task_key(id), 'deliveries', -1) end
    end
  end
  return 0
end
"""

# A: ids, owner, lease_ms. XCLAIM by the holder itself resets the entry's idle time.
EXTEND = """
local function main()
  for _, id in ipairs(A.ids) do
    local t = load(id)
    if t and t.status == 'held' and t.owner == A.owner then
      redis.call('XCLAIM', stream_key(t.queue), GROUP, A.owner, 0, t.entry, 'JUSTID')
      redis.call('HSET', task_key(id), 'lease_ms', A.lease_ms)
    end
  end
  return 0
end
"""

# A: owner.
RECOVER = """
local function main()
  local count = 0
  for _, q in ipairs(redis.call('SMEMBERS', P .. ':queues')) do
    if stream_exists(q) then
      count = count + give_back(q, A.owner, function() return true end)
      redis.call('XGROUP', 'DELCONSUMER', stream_key(q), GROUP, A.owner)
    end
  end
  return count
end
"""

# A: queues. An entry has expired once it has been idle (not delivered or claimed again)
# for longer than the lease its task was reserved or extended with. Consumers left
# holding nothing are removed (one that is alive is re-created by its next reserve).
RECOVER_EXPIRED = """
local function expired(idle, id)
  return idle > tonumber(redis.call('HGET', task_key(id), 'lease_ms') or 0)
end

local function main()
  local count = 0
  for _, q in ipairs(A.queues) do
    if stream_exists(q) then
      count = count + give_back(q, false, expired)
      for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', stream_key(q), GROUP)) do
        if consumer[4] == 0 then
          redis.call('XGROUP', 'DELCONSUMER', stream_key(q), GROUP, consumer[2])
        end
      end
    end
  end
  return count
end
"""

# A: ids, ttl. Queued and scheduled tasks end REVOKED now; held ones are the worker's.
REVOKE = """
local function main()
  for _, id in ipairs(A.ids) do
    redis.call('SADD', P .. ':revoked', id)
    local t = load(id)
    if t and (t.status == 'queued' or t.status == 'scheduled') then
      take_out(id, t)
      redis.call('HSET', task_key(id), 'state', 'REVOKED')
      close_record(id, A.ttl)
    end
  end
  return 0
end
"""

# Read-only, so not wrapped: ARGV prefix, now. One consistent snapshot of every queue.
DEPTHS = """
local P, NOW = ARGV[1], ARGV[2]
local reply = {}
for _, q in ipairs(redis.call('SMEMBERS', P .. ':queues')) do
  local stream, etas = P .. ':q:' .. q, P .. ':eta:' .. q
  local ready, reserved = 0, 0
  if redis.call('EXISTS', stream) == 1 then
    reserved = redis.call('XPENDING', stream, 'workers')[1]
    ready = redis.call('XLEN', stream) - reserved
  end
  ready = ready + redis.call('ZCOUNT', etas, '-inf', NOW)
  local scheduled = redis.call('ZCOUNT', etas, '(' .. NOW, '+inf')
  if ready + scheduled + reserved > 0 then
    table.insert(reply, {q, ready, scheduled, reserved})
  end
end
return reply
"""

WRITE_SCRIPTS = {
    "enqueue": ENQUEUE,
    "reserve": RESERVE,
    "mark_started": MARK_STARTED,
    "finish": FINISH,
    "release": RELEASE,
    "extend": EXTEND,
    "recover": RECOVER,
    "recover_expired": RECOVER_EXPIRED,
    "revoke": REVOKE,
}


def _exact(value: float) -> str:
    """A float as text that Redis and Lua read back exactly (JSON numbers lose digits in Lua)."""
    return repr(float(value))


class PubSubWakeup(Wakeup):
    """A connection subscribed to the queues' wake channels; readable when one is published to.

    The subscription lives from creation, so nothing published after `wakeup()` returned
    is missed, whatever happens between a reserve and `arm`. The descriptor number stays
    the same across reconnects (the new socket is dup2'd onto it), so it can stay
    registered with poll(). While Redis is unreachable it is an idle pipe instead and
    `arm` tries to resubscribe at most once a second; once it is back, a PING makes the
    descriptor readable, so that the next reserve finds what was queued meanwhile.
    """

    def __init__(self, connection: redis.Connection, channels: list[str]) -> None:
        self._conn = connection
        self._channels = channels
        self._idle_r, self._idle_w = os.pipe()
        self._fd = os.dup(self._idle_r)
        self._broken = False
        self._next_attempt = 0.0
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

    def clear(self) -> None:
        if self._broken:
            return
        try:
            while self._conn.can_read(timeout=0):
                self._conn.read_response()
        except CONNECTION_ERRORS:
            self._break()

    def close(self) -> None:
        self._conn.disconnect()
        for fd in (self._fd, self._idle_r, self._idle_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class RedisBroker(Broker):
    """A connection to a Redis broker; every call may be retried after a lost connection.

    The key prefix is `prefix`, else the URL's `?prefix=` (fleets, or tests, sharing one
    Redis database keep apart by it), else `fleetd`. A call cut off by a lost connection
    is sent again up to `call_retries` times (backing off) before it raises.
    """

    unavailable = (redis.ConnectionError, redis.TimeoutError)

    def __init__(self, url: str, prefix: str | None = None, result_ttl: int = 86400,
                 call_retries: int = CALL_RETRIES) -> None:
        self.url = url
        address, _, query_text = url.partition("?")
        query = urllib.parse.parse_qs(query_text)
        self.prefix = prefix or query.pop("prefix", ["fleetd"])[0]
        self.result_ttl = result_ttl
        self.redis = redis.Redis.from_url(
            address + ("?" + urllib.parse.urlencode(query, doseq=True) if query else ""),
            decode_responses=True,
            protocol=2,
            retry=ConnectionRetry(CALL_BACKOFF, call_retries),
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
        )
        self._scripts: dict[str, Script] = {
            name: self.redis.register_script(PRELUDE + body + EPILOGUE)
            for name, body in WRITE_SCRIPTS.items()
        }
        self._depths = self.redis.register_script(DEPTHS)

    def _run(self, script: str, args: dict[str, Any], token: str | None = None) -> Any:
        """Run a write script once, even if redis-py has to send it again."""
        argv = [self.prefix, token or uuid.uuid4().hex, _exact(time.time()), json.dumps(args)]
        return self._scripts[script](args=argv)

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # --- producing -------------------------------------------------------------
    def enqueue(self, envelopes: Sequence[Envelope]) -> None:
        if not envelopes:
            return
        tasks = [
            [e.id, e.queue, e.name, e.body, "" if e.eta is None else _exact(e.eta)]
            for e in envelopes
        ]
        self._run("enqueue", {"tasks": tasks})

    # --- consuming -------------------------------------------------------------
    def reserve(self, queues: list[str], n: int, owner: str, lease: float) -> list[Delivery]:
        if n <= 0 or not queues:
            return []
        args = {
            "queues": list(dict.fromkeys(queues)),
            "n": n,
            "owner": owner,
            "lease_ms": int(lease * 1000),
        }
        return [Delivery(*row) for row in self._run("reserve", args)]

    def mark_started(self, ids: list[str], node: str) -> None:
        if ids:
            self._run("mark_started", {"ids": ids, "node": node})

    def finish(self, outcomes: Sequence[Outcome], retries: Sequence[Retry] = ()) -> None:
        if not outcomes and not retries:
            return
        args = {
            "outcomes": [
                {
                    "id": o.id,
                    "name": o.name or "",
                    "dead": o.dead_letter,
                    "reason": o.exc_type,
                    "extra": {"message": o.exc_message},
                    "fields": {
                        "state": o.state,
                        "result": json.dumps(o.result),
                        "exc_type": o.exc_type,
                        "exc_message": o.exc_message,
                        "traceback": o.traceback,
                        "runtime": None if o.runtime is None else _exact(o.runtime),
                        **({"node": o.node} if o.node is not None else {}),
                    },
                }
                for o in outcomes
            ],
            "retries": [
                {
                    "id": r.id,
                    "body": r.body,
                    "eta": _exact(r.eta),
                    "fields": {"exc_type": r.exc_type, "exc_message": r.exc_message},
                }
                for r in retries
            ],
            "ttl": self.result_ttl,
        }
        self._run("finish", args)

    def release(self, ids: list[str], started: bool) -> None:
        if ids:
            self._run("release", {"ids": ids, "started": started})

    def extend(self, ids: list[str], owner: str, lease: float) -> None:
        if ids:
            self._run("extend", {"ids": ids, "owner": owner, "lease_ms": int(lease * 1000)})

    def recover(self, owner: str) -> int:
        return int(self._run("recover", {"owner": owner}))

    def recover_expired(self, queues: list[str]) -> int:
        if not queues:
            return 0
        return int(self._run("recover_expired", {"queues": list(dict.fromkeys(queues))}))

    def wakeup(self, queues: list[str]) -> Wakeup:
        pool = self.redis.connection_pool
        # Its own connection, which never waits out the retries: it must not block a worker.
        options = {
            **pool.connection_kwargs,
            "retry": ConnectionRetry(CALL_BACKOFF, 0),
            "socket_connect_timeout": 1.0,
        }
        connection = pool.connection_class(**options)
        return PubSubWakeup(connection, [self._key("wake", q) for q in dict.fromkeys(queues)])

    def next_due(self, queues: list[str]) -> float | None:
        pipe = self.redis.pipeline(transaction=False)
        after_now = f"({time.time()!r}"
        for q in queues:
            pipe.zrangebyscore(self._key("eta", q), after_now, "+inf", 0, 1, withscores=True)
        etas = [row[0][1] for row in pipe.execute() if row]
        return min(etas) if etas else None

    # --- results, dead letters, revokes --------------------------------------
    def get_result(self, task_id: str) -> dict[str, Any] | None:
        record = self.redis.hgetall(self._key("r", task_id))
        if not record:
            return None
        done = record.get("status") == "done"
        runtime = record.get("runtime")
        return {
            "id": task_id,
            "name": record.get("name"),
            "queue": record.get("queue"),
            "state": record.get("state"),
            "result": json.loads(record["result"]) if done and "result" in record else None,
            "exc_type": record.get("exc_type"),
            "exc_message": record.get("exc_message"),
            "traceback": record.get("traceback"),
            "deliveries": int(record.get("deliveries", 0)),
            "node": record.get("node"),
            "runtime": float(runtime) if runtime is not None else None,
        }

    def depths(self) -> list[QueueDepth]:
        rows = self._depths(args=[self.prefix, _exact(time.time())])
        return sorted((QueueDepth(q, int(r), int(s), int(h)) for q, r, s, h in rows),
                      key=lambda depth: depth.queue)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:
            return []
        letters = []
        for text in self.redis.lrange(self._key("dead"), 0, limit - 1):
            d = json.loads(text)
            extra = d.get("extra") or {}
            letters.append(
                DeadLetter(d["id"], d["queue"], d["name"], d["body"], d["reason"], d["at"], extra)
            )
        return letters

    def revoke(self, ids: list[str]) -> None:
        if ids:
            self._run("revoke", {"ids": ids, "ttl": self.result_ttl})

    def revoked(self) -> set[str]:
        return {str(task_id) for task_id in self.redis.smembers(self._key("revoked"))}

    def close(self) -> None:
        self.redis.close()

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
    {p}:routes        hash: task name -> its queue, as the workers published them
    {p}:wake:{queue}  pub/sub channel that every write touching the queue publishes to
    {p}:call:{link}   token and reply of the last write sent over one link (below), kept
                      2 minutes so that a retry of that write can't run it twice

Every write is one Lua script: atomic, one round trip per batch, and one per worker turn
(`exchange` marks started, acks and stores results, and reserves more in one script).
Calls go over connections of our own, "links", each with a random name; a call's token
counts the calls made over its link. redis-py retries a call cut off by a lost
connection over the same link with the same token, and a write script first compares
its token with the one its link's call key holds: a retried call whose first attempt did
run returns that attempt's reply instead of running again.
Stream entry ids are `0-N`, N from one counter, so entries of all queues sort in the
order they were queued and `reserve` can hand out the oldest across queues.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.backoff import EqualJitterBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry as ConnectionRetry

from .base import (
    INFO_FIELDS,
    Broker,
    DeadLetter,
    Delivery,
    Envelope,
    Outcome,
    QueueDepth,
    Retry,
    Wakeup,
    dead_letter_from,
    task_info,
)

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

# Shared by every write script. ARGV: prefix, connection name, call token, now (epoch
# seconds), JSON args.
PRELUDE = """
local P, CONNECTION, TOKEN, NOW = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local A = cjson.decode(ARGV[5])
local null = cjson.null
local GROUP = 'workers'
local woken = {}

local function task_key(id) return P .. ':r:' .. id end
local function stream_key(q) return P .. ':q:' .. q end
local function eta_key(q) return P .. ':eta:' .. q end
local function stream_exists(q) return redis.call('EXISTS', stream_key(q)) == 1 end

local function load(id)
  local v = redis.call('HMGET', task_key(id), 'status', 'queue', 'entry', 'owner', 'state')
  if not v[1] then return nil end
  return {status = v[1], queue = v[2], entry = v[3], owner = v[4], state = v[5]}
end

-- Add a field and its value to the flat list `fields`, or its name to `unset` if null.
local function put(fields, unset, field, value)
  if value == null then
    unset[#unset + 1] = field
  else
    fields[#fields + 1] = field
    fields[#fields + 1] = value
  end
end

-- The queue's name in the set of queues, and its stream and group: once per call and queue.
local opened = {}
local function open_queue(q)
  if opened[q] then return end
  opened[q] = true
  redis.call('SADD', P .. ':queues', q)
  if not stream_exists(q) then
    redis.call('XGROUP', 'CREATE', stream_key(q), GROUP, '0', 'MKSTREAM')
  end
end

-- Put a task at the tail of its queue's stream as a new, undelivered entry. `fields` (a
-- flat list, no nulls) go to its record in the same HSET; removing stale fields (the
-- lease, the ETA) is the caller's.
local function append(id, q, fields)
  open_queue(q)
  local entry = '0-' .. redis.call('INCR', P .. ':seq')
  if type(redis.pcall('XADD', stream_key(q), entry, 'id', id)) ~= 'string' then
    -- Someone else's entry (an id Redis chose) tops the stream: ours must come after it.
    entry = redis.call('XADD', stream_key(q), '*', 'id', id)
  end
  redis.call('HSET', task_key(id), 'status', 'queued', 'entry', entry, unpack(fields))
  woken[q] = true
end

-- Hold a task back in its queue's ETA set until it is due (`fields` as for append).
local function schedule(id, q, eta, fields)
  open_queue(q)
  redis.call('ZADD', eta_key(q), eta, id)
  redis.call('HSET', task_key(id), 'status', 'scheduled', 'eta', eta, unpack(fields))
  woken[q] = true
end

-- Store a new task, due at `eta` (epoch seconds as text; '' or past: now). An id still
-- waiting or held is left as it is; an ended one starts over as a new task.
local function submit(id, q, name, body, eta)
  local status = redis.call('HGET', task_key(id), 'status')
  if status and status ~= 'done' then return end
  if status then redis.call('DEL', task_key(id)) end
  local fields = {'id', id, 'queue', q, 'name', name, 'body', body, 'state', 'PENDING',
    'deliveries', 0}
  if eta ~= '' and tonumber(eta) > tonumber(NOW) then
    schedule(id, q, eta, fields)
  else
    append(id, q, fields)
  end
end

-- Mark a task's record ended, writing `fields` and deleting `unset` and where it was; it
-- is kept `ttl` seconds for its result to be read.
local function close_record(id, ttl, fields, unset)
  local key = task_key(id)
  redis.call('HSET', key, 'status', 'done', 'finished', NOW, unpack(fields))
  redis.call('HDEL', key, 'owner', 'entry', 'lease_ms', 'eta', 'body', unpack(unset))
  redis.call('EXPIRE', key, ttl)
end

-- Stream entries of tasks taken out, per queue: drop_spent acks and deletes them, a
-- thousand per command. The epilogue calls it; a script that reads its streams after
-- taking tasks out calls it first.
local spent = {}
local function drop_spent()
  for q, entries in pairs(spent) do
    for i = 1, #entries, 1000 do
      local last = math.min(i + 999, #entries)
      redis.call('XACK', stream_key(q), GROUP, unpack(entries, i, last))
      redis.call('XDEL', stream_key(q), unpack(entries, i, last))
    end
  end
  spent = {}
end

-- Take a task out of wherever it waits or is held (its stream or its ETA set).
local function take_out(id, t)
  if t.status == 'queued' or t.status == 'held' then
    spent[t.queue] = spent[t.queue] or {}
    table.insert(spent[t.queue], t.entry)
  elseif t.status == 'scheduled' then
    redis.call('ZREM', eta_key(t.queue), id)
  end
end

-- Give a held task back to its queue; its delivery count stays as it is.
local function requeue(id, t)
  take_out(id, t)
  append(id, t.queue, t.state == 'STARTED' and {'state', 'PENDING'} or {})
  redis.call('HDEL', task_key(id), 'owner', 'lease_ms')
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
"""

# Runs `main` once per call token, wakes the queues it touched and returns main's reply as
# JSON text (cheaper to send and read than nested RESP arrays; an empty table comes out as
# {}). The call key lasts as long as a retrying call can (CALL_RETRIES, each attempt cut
# off by the connect or socket timeout, and the backoff between them).
EPILOGUE = """
local call_key = P .. ':call:' .. CONNECTION
local last = redis.call('GET', call_key)
if last then
  local space = string.find(last, ' ', 1, true)
  if string.sub(last, 1, space - 1) == TOKEN then return string.sub(last, space + 1) end
end
local reply = cjson.encode(main())
drop_spent()
redis.call('SET', call_key, TOKEN .. ' ' .. reply, 'EX', 120)
for q in pairs(woken) do redis.call('PUBLISH', P .. ':wake:' .. q, '1') end
return reply
"""

# A: [[id, queue, name, body, eta or ""]]. A task id already waiting or held is skipped, so
# that submitting the same id twice does not run it twice; an ended one starts over.
ENQUEUE = """
local function main()
  for _, e in ipairs(A) do submit(e[1], e[2], e[3], e[4], e[5]) end
  return 0
end
"""

# A worker's turn, each part optional. A.started, A.node: tasks that started running.
# A.outcomes: [[id, name, dead letter?, state, result, exc_type, exc_message, traceback,
# node, runtime]]: acked and stored as results (kept A.ttl seconds); a null field is
# deleted from the record, but for node. A.retries: [[id, body, eta, exc_type,
# exc_message]]. Then A.n, A.queues, A.owner, A.lease_ms: moves due ETA messages into
# their streams (up to 1000 a queue per call) and hands out the n oldest undelivered
# entries of all the queues.
TURN = """
local OUTCOME_FIELDS = {'state', 'result', 'exc_type', 'exc_message', 'traceback', 'node',
  'runtime'}

local function mark_started(id)
  if redis.call('HGET', task_key(id), 'status') == 'held' then
    redis.call('HSET', task_key(id), 'state', 'STARTED', 'node', A.node)
  end
end

local function push_dead(id, q, name, body, reason, message)
  redis.call('LPUSH', P .. ':dead', cjson.encode({id = id, queue = q, name = name,
    body = body, reason = reason, at = tonumber(NOW), extra = {message = message}}))
end

local function dead_letter(o)
  local v = redis.call('HMGET', task_key(o[1]), 'queue', 'name', 'body')
  push_dead(o[1], v[1] or '', v[2] or o[2], v[3] or '', o[6], o[7])
end

local function finish(o)
  local id = o[1]
  local t = load(id)
  local fields, unset = {}, {}
  if t then
    take_out(id, t)
  else
    fields = {'id', id, 'name', o[2], 'deliveries', 0}
  end
  if o[3] then dead_letter(o) end
  for i, field in ipairs(OUTCOME_FIELDS) do
    if o[i + 3] ~= null or field ~= 'node' then put(fields, unset, field, o[i + 3]) end
  end
  close_record(id, A.ttl, fields, unset)
end

local function retry(r)
  local t = load(r[1])
  if t then
    take_out(r[1], t)
    local fields, unset = {'body', r[2], 'state', 'RETRY', 'deliveries', 0}, {}
    put(fields, unset, 'exc_type', r[4])
    put(fields, unset, 'exc_message', r[5])
    schedule(r[1], t.queue, r[3], fields)
    redis.call('HDEL', task_key(r[1]), 'owner', 'lease_ms', 'entry', unpack(unset))
  end
end

-- The id of the last entry the group read; a stream someone else made has no group yet.
local function last_delivered(q)
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', stream_key(q))) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    if info['name'] == GROUP then return info['last-delivered-id'] end
  end
  return '0-0'
end

-- Our entry ids are 0-N: N says which entry of all the queues is older. Entries that others
-- added (ids Redis chose) come after ours.
local function seq(entry) return tonumber(string.match(entry, '^0%-(%d+)$')) or math.huge end

-- Whether s is UTF-8 (a byte at a time past the ASCII check: for ids and names, short).
local function is_utf8(s)
  if not string.find(s, '[\\128-\\255]') then return true end
  local i = 1
  while i <= #s do
    local c, size, low, high = string.byte(s, i), 0, 128, 191
    if c < 128 then size = 1
    elseif c >= 194 and c <= 223 then size = 2
    elseif c == 224 then size, low = 3, 160
    elseif c == 237 then size, high = 3, 159
    elseif c >= 225 and c <= 239 then size = 3
    elseif c == 240 then size, low = 4, 144
    elseif c >= 241 and c <= 243 then size = 4
    elseif c == 244 then size, high = 4, 143
    else return false end
    for j = 1, size - 1 do
      local b = string.byte(s, i + j)
      if not b or b < low or b > high then return false end
      low, high = 128, 191
    end
    i = i + size
  end
  return true
end

-- A stored count, whatever the field holds: a whole number from 0, else 0.
local function stored_count(value)
  local n = tonumber(value)
  if n and n >= 0 and n < 2^53 then return math.floor(n) end
  return 0
end

-- The value of `name` in a stream entry's flat field list, or nil.
local function entry_field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

-- End a queued entry that is no task we can hand out (no record, an id that is not text):
-- BadMessage, with what it holds in the dead-letter list.
local function bury(q, entry, fields, record)
  local id = entry_field(fields, 'id')
  local message = 'the stream entry has no task record'
  local name, body = '', nil
  if record then
    message, name, body = 'its id or name is not UTF-8 text', record[3] or '', record[4] or ''
  else
    local all = {}
    for i = 1, #fields, 2 do all[fields[i]] = fields[i + 1] end
    body = cjson.encode(all)
  end
  push_dead(id or entry, q, name, body, 'BadMessage', message)
  if id then
    close_record(id, A.ttl, {'id', id, 'queue', q, 'name', name, 'state', 'FAILURE',
      'exc_type', 'BadMessage', 'exc_message', message, 'deliveries', 0}, {})
  end
  spent[q] = spent[q] or {}
  table.insert(spent[q], entry)
end

-- Read up to `count` new entries of the queue; a stream someone else made gets its group.
local function read_new(q, count)
  if not stream_exists(q) then return {} end
  local args = {'XREADGROUP', 'GROUP', GROUP, A.owner, 'COUNT', count, 'STREAMS',
    stream_key(q), '>'}
  local read = redis.pcall(unpack(args))
  if read and read.err then
    redis.call('XGROUP', 'CREATE', stream_key(q), GROUP, '0')
    read = redis.call(unpack(args))
  end
  return read and read[1][2] or {}
end

-- How many entries to read from each queue: the n oldest undelivered of them all.
local function counts_to_read()
  if #A.queues == 1 then return {[A.queues[1]] = A.n} end
  local candidates = {}
  for _, q in ipairs(A.queues) do
    local cursor = stream_exists(q) and last_delivered(q)
    if cursor then
      for _, e in ipairs(redis.call('XRANGE', stream_key(q), '(' .. cursor, '+', 'COUNT', A.n)) do
        candidates[#candidates + 1] = {seq = seq(e[1]), queue = q}
      end
    end
  end
  table.sort(candidates, function(a, b) return a.seq < b.seq end)
  local counts = {}
  for i = 1, math.min(A.n, #candidates) do
    local q = candidates[i].queue
    counts[q] = (counts[q] or 0) + 1
  end
  return counts
end

local function reserve()
  for _, q in ipairs(A.queues) do
    local due = redis.call('ZRANGEBYSCORE', eta_key(q), '-inf', NOW, 'LIMIT', 0, 1000)
    if #due > 0 then redis.call('ZREM', eta_key(q), unpack(due)) end
    for _, id in ipairs(due) do
      append(id, q, {})
      redis.call('HDEL', task_key(id), 'eta')
    end
  end
  local delivered = {}
  for q, count in pairs(counts_to_read()) do
    for _, e in ipairs(read_new(q, count)) do
      local entry, id = e[1], entry_field(e[2], 'id')
      local v = id and redis.call('HMGET', task_key(id), 'status', 'entry', 'name', 'body',
        'deliveries')
      local mine = v and v[1] == 'queued' and v[2] == entry
      if not (v and v[1]) or (mine and not (is_utf8(id) and is_utf8(v[3] or ''))) then
        bury(q, entry, e[2], v and v[1] and v)
      elseif mine then
        local deliveries = stored_count(v[5]) + 1
        redis.call('HSET', task_key(id), 'status', 'held', 'owner', A.owner, 'lease_ms',
          A.lease_ms, 'deliveries', deliveries)
        delivered[#delivered + 1] = {seq = seq(entry),
          reply = {id, q, v[3] or '', v[4] or '', deliveries}}
      else  -- a stale entry: its task is queued again, held or ended
        redis.call('XACK', stream_key(q), GROUP, entry)
        redis.call('XDEL', stream_key(q), entry)
      end
    end
  end
  table.sort(delivered, function(a, b) return a.seq < b.seq end)
  local reply = {}
  for i, d in ipairs(delivered) do reply[i] = d.reply end
  return reply
end

local function main()
  -- A task that also ends in this call is not marked: its outcome overwrites state and node.
  local ending = {}
  for _, o in ipairs(A.outcomes) do
    if o[9] ~= null then ending[o[1]] = true end
  end
  for _, id in ipairs(A.started) do
    if not ending[id] then mark_started(id) end
  end
  for _, o in ipairs(A.outcomes) do finish(o) end
  for _, r in ipairs(A.retries) do retry(r) end
  drop_spent()
  if A.n > 0 then return reserve() end
  return {}
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
  return idle > (tonumber(redis.call('HGET', task_key(id), 'lease_ms')) or 0)
end

local function main()
  local count = 0
  for _, q in ipairs(A.queues) do
    if stream_exists(q) then
      count = count + give_back(q, false, expired)
      drop_spent()
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
      close_record(id, A.ttl, {'state', 'REVOKED'}, {})
    end
  end
  return 0
end
"""

# A: ids. The dead letters of these ids go back to their queue as new tasks (the newest
# letter of an id, if it has several) and off the list, which is written anew in one pass
# (LREM per letter would read the whole list each time). Returns the ids that were there.
RETRY_DEAD = """
local function main()
  local wanted, found = {}, {}
  for _, id in ipairs(A) do wanted[id] = true end
  local key, kept, letters = P .. ':dead', {}, {}
  for _, text in ipairs(redis.call('LRANGE', key, 0, -1)) do
    local d = cjson.decode(text)
    if wanted[d.id] then
      if not found[d.id] then
        found[d.id] = true
        letters[#letters + 1] = d
      end
    else
      kept[#kept + 1] = text
    end
  end
  if #letters == 0 then return {} end
  redis.call('DEL', key)
  for i = 1, #kept, 1000 do
    redis.call('RPUSH', key, unpack(kept, i, math.min(i + 999, #kept)))
  end
  local reply = {}
  for i = #letters, 1, -1 do  -- oldest first: they go back in the order they died
    local d = letters[i]
    submit(d.id, d.queue, d.name, d.body, '')
    reply[#reply + 1] = d.id
  end
  return reply
end
"""

PURGE_DEAD = """
local function main()
  local count = redis.call('LLEN', P .. ':dead')
  redis.call('DEL', P .. ':dead')
  return count
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


class LuaScript:
    """A script's text and the SHA1 digest that EVALSHA names it by."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


WRITE_SCRIPTS = {
    name: LuaScript(PRELUDE + body + EPILOGUE)
    for name, body in {
        "enqueue": ENQUEUE,
        "turn": TURN,
        "release": RELEASE,
        "extend": EXTEND,
        "recover": RECOVER,
        "recover_expired": RECOVER_EXPIRED,
        "revoke": REVOKE,
        "retry_dead": RETRY_DEAD,
        "purge_dead": PURGE_DEAD,
    }.items()
}
DEPTHS_SCRIPT = LuaScript(DEPTHS)

# Script arguments as compact JSON; everything passed is made of str, int, float, bool, None.
encode_args = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode

# The fields of a task record that get_result reads (status: whether there is one).
RESULT_FIELDS = ("status", *INFO_FIELDS)


def fields_of(text: str | bytes) -> dict[str, Any]:
    """A dead letter's JSON object; one that is not (someone else's writing) as its body."""
    try:
        fields = json.loads(text)
    except (ValueError, RecursionError):
        fields = None
    return fields if isinstance(fields, dict) else {"body": text}


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


class Link:
    """A connection of ours, named so that Redis can keep the reply of the last write sent
    over it (`{p}:call:{name}`) for a retry of that write to find."""

    def __init__(self, connection: redis.Connection) -> None:
        self.connection = connection
        self.name = uuid.uuid4().hex
        self.calls = 0  # the current call's token: calls on one link never overlap

    def execute(self, *args: Any) -> Any:
        self.connection.send_command(*args)
        return self.connection.read_response()

    def evaluate(self, script: LuaScript, *argv: Any) -> Any:
        try:
            return self.execute("EVALSHA", script.sha, 0, *argv)
        except NoScriptError:  # a restarted or flushed Redis: the text, which it then keeps
            return self.execute("EVAL", script.source, 0, *argv)


class RedisBroker(Broker):
    """A connection to a Redis broker; every call may be retried after a lost connection.

    The key prefix is `prefix`, else the URL's `?prefix=` (fleets, or tests, sharing one
    Redis database keep apart by it), else `fleetd`. A call cut off by a lost connection
    is sent again up to `call_retries` times (backing off) before it raises.

    Writes and get_result go over links (see the module docstring) rather than through
    redis-py's client and pool, whose bookkeeping cost more than Redis's own work; a thread
    takes an idle link for one call, or opens one.
    """

    unavailable = (redis.ConnectionError, redis.TimeoutError)

    def __init__(
        self,
        url: str,
        prefix: str | None = None,
        result_ttl: int = 86400,
        call_retries: int = CALL_RETRIES,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
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
            retry=ConnectionRetry(CALL_BACKOFF, call_retries),
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=connect_timeout,
        )
        self._idle: list[Link] = []
        self._pid = os.getpid()

    def _take_link(self) -> Link:
        if self._pid != os.getpid():  # forked: the parent's sockets are not ours to use
            self._pid, self._idle = os.getpid(), []
        try:
            return self._idle.pop()
        except IndexError:
            pool = self.redis.connection_pool
            return Link(pool.connection_class(**pool.connection_kwargs))

    def _call(self, request: Callable[[Link], Any]) -> Any:
        """`request(link)` on an idle link, sent again (same link, same token) after a lost
        connection."""
        link = self._take_link()
        link.calls += 1
        try:
            return link.connection.retry.call_with_retry(
                lambda: request(link), lambda _error: link.connection.disconnect()
            )
        finally:
            self._idle.append(link)

    def _run(self, script: str, args: Any) -> Any:
        """Run a write script once, even if it has to be sent again."""
        now, encoded = _exact(time.time()), encode_args(args)
        return json.loads(
            self._call(
                lambda link: link.evaluate(
                    WRITE_SCRIPTS[script], self.prefix, link.name, link.calls, now, encoded
                )
            )
        )

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
        self._run("enqueue", tasks)

    # --- consuming -------------------------------------------------------------
    def exchange(
        self,
        started: list[str],
        node: str,
        outcomes: Sequence[Outcome],
        retries: Sequence[Retry],
        queues: list[str],
        n: int,
        owner: str,
        lease: float,
    ) -> list[Delivery]:
        if not (started or outcomes or retries) and (n <= 0 or not queues):
            return []
        args = {
            "started": started,
            "node": node,
            "outcomes": [
                [
                    o.id,
                    o.name or "",
                    o.dead_letter,
                    o.state,
                    o.stored_result(),
                    o.exc_type,
                    o.exc_message,
                    o.traceback,
                    o.node,
                    None if o.runtime is None else _exact(o.runtime),
                ]
                for o in outcomes
            ],
            "retries": [[r.id, r.body, _exact(r.eta), r.exc_type, r.exc_message] for r in retries],
            "ttl": self.result_ttl,
            "queues": list(dict.fromkeys(queues)),
            "n": n if queues else 0,
            "owner": owner,
            "lease_ms": int(lease * 1000),
        }
        return [Delivery(*row) for row in self._run("turn", args)]  # no rows: {}

    def reserve(self, queues: list[str], n: int, owner: str, lease: float) -> list[Delivery]:
        return self.exchange([], "", (), (), queues, n, owner, lease)

    def flush(
        self,
        started: list[str],
        node: str,
        outcomes: Sequence[Outcome],
        retries: Sequence[Retry] = (),
    ) -> None:
        self.exchange(started, node, outcomes, retries, [], 0, "", 0)

    def mark_started(self, ids: list[str], node: str) -> None:
        self.flush(ids, node, ())

    def finish(self, outcomes: Sequence[Outcome], retries: Sequence[Retry] = ()) -> None:
        self.flush([], "", outcomes, retries)

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
        key = self._key("r", task_id)
        values = self._call(lambda link: link.execute("HMGET", key, *RESULT_FIELDS))
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
            for text in self.redis.lrange(self._key("dead"), 0, last)
        ]
        if wanted is not None:
            letters = [letter for letter in letters if letter.id in wanted]
        return letters[:limit]

    def retry_dead(self, ids: Sequence[str]) -> list[str]:
        if not ids:
            return []
        return list(self._run("retry_dead", list(dict.fromkeys(ids))))  # none: {}

    def purge_dead(self) -> int:
        return int(self._run("purge_dead", {}))

    def revoke(self, ids: list[str]) -> None:
        if ids:
            self._run("revoke", {"ids": ids, "ttl": self.result_ttl})

    def revoked(self) -> set[str]:
        return {str(task_id) for task_id in self.redis.smembers(self._key("revoked"))}

    def set_routes(self, routes: dict[str, str]) -> None:
        if routes:  # HSET is idempotent: a retried call does no harm
            pairs: list[Any] = [word for pair in routes.items() for word in pair]
            self.redis.hset(self._key("routes"), items=pairs)

    def routes(self) -> dict[str, str]:
        return {str(n): str(q) for n, q in self.redis.hgetall(self._key("routes")).items()}

    def ping(self) -> None:
        self._call(lambda link: link.execute("PING"))

    def close(self) -> None:
        for link in self._idle:
            link.connection.disconnect()
        self._idle = []
        self.redis.close()

    # --- schedules ---------------------------------------------------------------
    def claim_lead(self, key: str, holder: str, ttl: float) -> tuple[str, float]:
        owner, left_ms = self._call(
            lambda link: link.evaluate(
                CLAIM_LEAD_SCRIPT, self._key("lead", key), holder, int(ttl * 1000)
            )
        )
        return str(owner), max(0, int(left_ms)) / 1000

    def release_lead(self, key: str, holder: str) -> None:
        self._call(lambda link: link.evaluate(RELEASE_LEAD_SCRIPT, self._key("lead", key), holder))

    def lead_holder(self, key: str) -> str | None:
        holder = self.redis.get(self._key("lead", key))
        return None if holder is None else str(holder)

    def fire_schedule(self, name: str, tick: float | None, envelope: Envelope | None) -> bool:
        task = (
            None
            if envelope is None
            else [envelope.id, envelope.queue, envelope.name, envelope.body]
        )
        args = {"name": name, "tick": None if tick is None else _exact(tick), "task": task}
        return bool(self._call_schedule(args))

    def _call_schedule(self, args: dict[str, Any]) -> Any:
        """Run the fire script once, even if it has to be sent again (as `_run` does)."""
        now, encoded = _exact(time.time()), encode_args(args)
        return json.loads(
            self._call(
                lambda link: link.evaluate(
                    FIRE_SCHEDULE_SCRIPT, self.prefix, link.name, link.calls, now, encoded
                )
            )
        )

    def schedule_states(self) -> dict[str, dict[str, Any]]:
        names = sorted(str(n) for n in self.redis.smembers(self._key("schedules")))
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hmget(self._key("schedule", name), "last_tick", "last_id", "last_at", "paused")
        states = {}
        for name, (tick, task_id, at, paused) in zip(names, pipe.execute(), strict=True):
            states[name] = {
                "last_tick": None if tick is None else float(tick),
                "last_id": task_id,
                "last_at": None if at is None else float(at),
                "paused": paused == "1",
            }
        return states

    def pause_schedule(self, name: str, paused: bool) -> None:
        pipe = self.redis.pipeline(transaction=True)  # both or neither; a retry does no harm
        pipe.sadd(self._key("schedules"), name)
        pipe.hset(self._key("schedule", name), "paused", "1" if paused else "0")
        pipe.execute()


# Keys of the schedules (worker/scheduler.py): {p}:schedules, the set of their names;
# {p}:schedule:{name}, a hash of last_tick, last_id, last_at and paused; {p}:lead:{key}, the
# leader lease (its holder, expiring on its own). ARGV: the lease's key, holder, ttl in ms;
# replies who holds it and for how many ms more. Safe to send again: it only renews.
CLAIM_LEAD_SCRIPT = LuaScript("""
local holder = redis.call('GET', ARGV[1])
if not holder or holder == ARGV[2] then
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
# Broker.fire_schedule. Replies whether it fired.
FIRE_SCHEDULE = """
local function main()
  local key = P .. ':schedule:' .. A.name
  redis.call('SADD', P .. ':schedules', A.name)
  if A.tick ~= null then
    local last = redis.call('HGET', key, 'last_tick')
    if last and tonumber(last) >= tonumber(A.tick) then return false end
    redis.call('HSET', key, 'last_tick', A.tick)
  end
  if A.task ~= null then
    local e = A.task
    submit(e[1], e[2], e[3], e[4], '')
    redis.call('HSET', key, 'last_id', e[1], 'last_at', NOW)
  end
  return true
end
"""
FIRE_SCHEDULE_SCRIPT = LuaScript(PRELUDE + FIRE_SCHEDULE + EPILOGUE)

-- How a task enters a queue: shared by every script that writes tasks (the write scripts,
-- after which redis_prelude.lua comes, and enqueue). ARGV[1]: the key prefix; ARGV[4]: now
-- (epoch seconds). Stream entries are `0-N`, N from one counter across the queues.
local P, NOW = ARGV[1], ARGV[4]
local GROUP = 'workers'
-- Queue -> what to publish on its wake channel: 'n<N>' (tasks ready, the newest entry 0-N:
-- a worker whose last reserve came back short when N was already taken ignores it), 'eta'
-- (one scheduled for later; maybe ready ones too).
local woken = {}

local function task_key(id) return P .. ':r:' .. id end
local function stream_key(q) return P .. ':q:' .. q end
local function eta_key(q) return P .. ':eta:' .. q end
local function stream_exists(q) return redis.call('EXISTS', stream_key(q)) == 1 end

-- HMGET of a task's record. A key of another type where the record belongs (a string, a
-- list: someone else's write) would fail every script that reads it, and so stop a queue
-- for good: it is moved aside to {p}:alien:{id}, kept as it was, and the task is one
-- without a record. Returns the values, and whether the key was moved.
local function record(id, ...)
  local v = redis.pcall('HMGET', task_key(id), ...)
  if not v.err then return v, false end
  redis.call('RENAME', task_key(id), P .. ':alien:' .. id)
  return {}, true
end

-- A stored count, whatever the field holds: a whole number from 0, else 0.
local function stored_count(value)
  local n = tonumber(value)
  if n and n >= 0 and n < 2^53 then return math.floor(n) end
  return 0
end

-- Our group's XINFO fields (name, last-delivered-id, ...) on the queue's stream, or nil.
local function group_info(q)
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', stream_key(q))) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    if info['name'] == GROUP then return info end
  end
  return nil
end

-- Whether the queue's stream has our group: a stream that someone else's XADD made, or
-- that a submit made after Redis lost its data, has none until a worker's read (or a
-- registration) makes it, and holds no entry of ours that a reader reserved.
local function has_group(q) return stream_exists(q) and group_info(q) ~= nil end

-- The queue's name in the set of queues, and its stream and group: once per call and queue.
-- A stream can be there without the group: someone else's XADD made it, or a submit that
-- trusted an older registration after Redis lost its data (redis_enqueue.lua).
local opened = {}
local function open_queue(q)
  if opened[q] then return end
  opened[q] = true
  redis.call('SADD', P .. ':queues', q)
  if not stream_exists(q) then
    redis.call('XGROUP', 'CREATE', stream_key(q), GROUP, '0', 'MKSTREAM')
  elseif not group_info(q) then
    redis.call('XGROUP', 'CREATE', stream_key(q), GROUP, '0')
  end
end

-- Put a task at the tail of its queue's stream as a new, undelivered entry. `fields` (a
-- flat list, no nulls) go to its record in the same HSET; removing stale fields (the
-- lease, the ETA) is the caller's.
local function append(id, q, fields)
  open_queue(q)
  local n = redis.call('INCR', P .. ':seq')
  local entry = '0-' .. n
  if type(redis.pcall('XADD', stream_key(q), entry, 'id', id)) ~= 'string' then
    -- Someone else's entry (an id Redis chose) tops the stream: ours must come after it.
    entry = redis.call('XADD', stream_key(q), '*', 'id', id)
  end
  redis.call('HSET', task_key(id), 'status', 'queued', 'entry', entry, 'ready', NOW,
    unpack(fields))
  if woken[q] ~= 'eta' then woken[q] = 'n' .. n end
end

-- Hold a task back in its queue's ETA set until it is due (`fields` as for append).
local function schedule(id, q, eta, fields)
  open_queue(q)
  redis.call('ZADD', eta_key(q), eta, id)
  redis.call('HSET', task_key(id), 'status', 'scheduled', 'eta', eta, unpack(fields))
  woken[q] = 'eta'
end

-- Ids of the records this call closed: their waiters are woken at its end (wake_waiters).
local closed = {}

-- Mark a task's record ended, writing `fields` and deleting `unset` and where it was; it
-- is kept `ttl` seconds for its result to be read. A client waiting for it is woken when
-- the call ends (wake_waiters).
local function close_record(id, ttl, fields, unset)
  local key = task_key(id)
  redis.call('HSET', key, 'status', 'done', 'finished', NOW, unpack(fields))
  redis.call('HDEL', key, 'owner', 'entry', 'lease_ms', 'eta', 'body', unpack(unset))
  redis.call('EXPIRE', key, ttl)
  closed[#closed + 1] = id
end

-- Wake a client waiting for the task's end (it took its flag down): through the list
-- `{p}:n:{id}` its wait blocks on.
local function wake(id)
  local woken = P .. ':n:' .. id
  if type(redis.pcall('LPUSH', woken, '1')) == 'table' then  -- another kind: kept aside
    redis.call('RENAME', woken, P .. ':alien:n:' .. id)
    redis.call('LPUSH', woken, '1')
  end
  redis.call('EXPIRE', woken, 60)
end

-- Wake the clients waiting for the records this call closed: each raised its flag
-- `{p}:w:{id}` (see redis.py's WAIT_SCRIPT). Most tasks have no one waiting: one EXISTS
-- looks at a thousand flags, and only where it finds some is each taken down (DEL).
local function wake_waiters()
  for i = 1, #closed, 1000 do
    local ids, flags = {unpack(closed, i, math.min(i + 999, #closed))}, {}
    for j, id in ipairs(ids) do flags[j] = P .. ':w:' .. id end
    if redis.call('EXISTS', unpack(flags)) > 0 then
      for j, id in ipairs(ids) do
        if redis.call('DEL', flags[j]) == 1 then wake(id) end
      end
    end
  end
  closed = {}
end

-- Whether the id is in the revoked set: a task of it never enters a queue (again).
local function is_revoked(id) return redis.call('SISMEMBER', P .. ':revoked', id) == 1 end

-- End a task's record REVOKED, kept `ttl` seconds.
local function close_revoked(id, ttl) close_record(id, ttl, {'state', 'REVOKED'}, {}) end

-- Store a new task, due at `eta` (epoch seconds as text; '' or past: now). An id still
-- waiting or held is left as it is; an ended one starts over as a new task. With a call
-- `token` (enqueue's), the record keeps it, and a record that holds it already was written
-- by this very call (a retry after a lost reply): left as it is, so that a retried submit
-- neither runs twice nor starts over a task that ran meanwhile. An id revoked ahead ends
-- REVOKED at once, its record kept `ttl` seconds: it never enters a queue, so no worker
-- runs it, not even one that has not read the revoke yet.
local function submit(id, q, name, body, eta, token, ttl)
  local was = record(id, 'status', 'call')
  if (token and was[2] == token) or (was[1] and was[1] ~= 'done') then return end
  if was[1] then redis.call('DEL', task_key(id)) end
  local fields = {'id', id, 'queue', q, 'name', name, 'body', body, 'state', 'PENDING',
    'deliveries', 0}
  if token then
    fields[#fields + 1] = 'call'
    fields[#fields + 1] = token
  end
  if is_revoked(id) then
    redis.call('HSET', task_key(id), unpack(fields))
    close_revoked(id, ttl)
  elseif eta ~= '' and tonumber(eta) > tonumber(NOW) then
    schedule(id, q, eta, fields)
  else
    append(id, q, fields)
  end
end

-- Wake the workers of the queues this call added to (what `woken` says of each), if one
-- waits to be: a worker whose last reserve came back short is in the queue's {p}:idle set
-- (redis_turn.lua's mark_idle) until one comes back full, and a worker that is not reserves
-- again as soon as it has room, without a wake-up. So a busy fleet is not woken once per
-- task submitted, every worker of the queue at every submit.
local function announce()
  for q, what in pairs(woken) do
    if redis.call('EXISTS', P .. ':idle:' .. q) == 1 then
      redis.call('PUBLISH', P .. ':wake:' .. q, what)
    end
  end
end

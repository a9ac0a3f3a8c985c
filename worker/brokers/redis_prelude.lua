-- The Redis broker's write scripts: redis_queue.lua, this prelude, then one script's body
-- (which defines `main`), then the epilogue, as one script (redis.py puts them together).
-- Shared by every write script. ARGV: prefix, connection name, call token, now (epoch
-- seconds), JSON args.
local CONNECTION, TOKEN = ARGV[2], ARGV[3]
local A = cjson.decode(ARGV[5])
local null = cjson.null

-- A task's record, or nil if it has none: where it waits or is held (status, queue, entry:
-- all take_out needs) and the other fields named (owner, state). A turn reads the first
-- three alone for every task it ends: each field more is a lookup and a copy more.
local function load(id, ...)
  local v = record(id, 'status', 'queue', 'entry', ...)
  if not v[1] then return nil end
  local t = {status = v[1], queue = v[2], entry = v[3]}
  for i = 1, select('#', ...) do t[select(i, ...)] = v[i + 3] end
  return t
end

-- The statuses a record of ours can hold: any other is other hands' writing.
local WRITTEN_STATUS = {queued = true, held = true, done = true, scheduled = true}

-- A dead letter: the task, whole, and why it died.
local function push_dead(id, q, name, body, reason, message)
  redis.call('LPUSH', P .. ':dead', cjson.encode({id = id, queue = q, name = name,
    body = body, reason = reason, at = tonumber(NOW), extra = {message = message}}))
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

-- Give a held task back to its queue; its delivery count stays as it is. One revoked
-- meanwhile ends REVOKED instead (kept A.ttl seconds), whether or not its worker had read
-- the revoke. Returns whether it went back. `t`: its record as load reads it, with its state.
local function requeue(id, t)
  take_out(id, t)
  if is_revoked(id) then
    close_revoked(id, A.ttl)
    return false
  end
  append(id, t.queue, t.state == 'STARTED' and {'state', 'PENDING'} or {})
  redis.call('HDEL', task_key(id), 'owner', 'lease_ms')
  return true
end

-- Give back the pending entries of one queue that `consumer` (or anyone, if false) holds
-- and that `expired(entry idle ms, task id, consumer)` says to give back (a consumer that is
-- gone, a lease that ran out); returns how many went back (not those revoked: requeue).
-- A task that had not started there gets its delivery back: max_deliveries counts the
-- deaths a task may cause, and it caused none.
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
      local t = id and load(id, 'state')  -- requeue reads the state
      if not (t and t.status == 'held' and t.entry == entry) then
        redis.call('XACK', key, GROUP, entry)
        redis.call('XDEL', key, entry)
      elseif expired(idle, id, p[2]) and requeue(id, t) then
        if t.state ~= 'STARTED' then
          local deliveries = stored_count(redis.call('HGET', task_key(id), 'deliveries'))
          redis.call('HSET', task_key(id), 'deliveries', math.max(deliveries - 1, 0))
        end
        count = count + 1
      end
      start = '(' .. entry
    end
  end
end

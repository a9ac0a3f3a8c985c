-- A worker's turn (base.Turn), each part optional. A.started, A.node: tasks that started
-- running (none that an outcome with a node ends in the same turn: base.Turn.marks).
-- A.outcomes: [[id, name, dead letter?, state, result, exc_type, exc_message, traceback,
-- node, runtime]]: acked and stored as results (kept A.ttl seconds); a null field is
-- deleted from the record, but for node. A.retries: [[id, body, eta, exc_type,
-- exc_message]]. Then A.n, A.queues, A.owner, A.lease_ms: moves due ETA messages into
-- their streams (up to 1000 a queue per call) and hands out the n oldest undelivered
-- entries of all the queues. Its reply is then {rows = what it handed out, seq = the entry
-- counter if it read every entry there was, else null}: a wake-up for an entry up to seq
-- announces nothing that this reserve did not see.
local OUTCOME_FIELDS = {'state', 'result', 'exc_type', 'exc_message', 'traceback', 'node',
  'runtime'}

local function mark_started(id)
  if record(id, 'status')[1] == 'held' then
    redis.call('HSET', task_key(id), 'state', 'STARTED', 'node', A.node)
  end
end

local function dead_letter(o)
  local v = record(o[1], 'queue', 'name', 'body')
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
  -- An ended record: these outcomes were written already (a turn sent again after its
  -- reply was lost), and so was the dead letter.
  if o[3] and not (t and t.status == 'done') then dead_letter(o) end
  for i, field in ipairs(OUTCOME_FIELDS) do
    if o[i + 3] ~= null or field ~= 'node' then put(fields, unset, field, o[i + 3]) end
  end
  close_record(id, A.ttl, fields, unset)
end

local function retry(r)
  local t = load(r[1])
  if not t then return end
  take_out(r[1], t)
  if is_revoked(r[1]) then  -- revoked while it ran: it ends here
    close_revoked(r[1], A.ttl)
  else
    local fields, unset = {'body', r[2], 'state', 'RETRY', 'deliveries', 0}, {}
    put(fields, unset, 'exc_type', r[4])
    put(fields, unset, 'exc_message', r[5])
    schedule(r[1], t.queue, r[3], fields)
    redis.call('HDEL', task_key(r[1]), 'owner', 'lease_ms', 'entry', unpack(unset))
  end
end

-- The id of the last entry the group read; a stream someone else made has no group yet.
local function last_delivered(q)
  local info = group_info(q)
  return info and info['last-delivered-id'] or '0-0'
end

-- Our entry ids are 0-N: N says which entry of all the queues is older. Entries that others
-- added (ids Redis chose) come after ours.
local function seq(entry) return tonumber(string.match(entry, '^0%-(%d+)$')) or math.huge end

-- Whether s is UTF-8 (a byte at a time past the ASCII check: for ids and names, short).
-- The bytes of a short one are looked at all at once (string.byte puts them on the stack).
local function is_utf8(s)
  local n = #s
  if n == 0 or (n <= 64 and math.max(string.byte(s, 1, n)) < 128) then return true end
  if not string.find(s, '[\128-\255]') then return true end
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

-- The value of `name` in a stream entry's flat field list, or nil.
local function entry_field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

-- End a queued entry that is no task we can hand out (no record, a record that was no
-- hash, an id that is not text): BadMessage, with what it holds in the dead-letter list.
local function bury(q, entry, fields, found, alien)
  local id = entry_field(fields, 'id')
  local message = 'the stream entry has no task record'
  local name, body = '', nil
  if alien then
    message = 'its record was no hash: moved to ' .. P .. ':alien:' .. id
  end
  if found then
    message, name, body = 'its id or name is not UTF-8 text', found[3] or '', found[4] or ''
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
      -- A key of another type is moved aside. A member whose task is not scheduled (queued,
      -- held or ended: someone else's ZADD) is stale: queued again, it would run twice or
      -- overwrite a result. One without a record goes on, to be buried as no task; one
      -- whose status is none we write (other hands') goes on too, else it would wait for ever.
      local status = record(id, 'status')[1]
      if not status or status == 'scheduled' or not WRITTEN_STATUS[status] then
        append(id, q, {'queue', q})
        redis.call('HDEL', task_key(id), 'eta')
      end
    end
  end
  -- One queue's entries come in their order; those of several are put in order of age.
  local delivered, read, several = {}, 0, #A.queues > 1
  for q, count in pairs(counts_to_read()) do
    local entries = read_new(q, count)
    read = read + #entries
    for _, e in ipairs(entries) do
      local entry, id = e[1], entry_field(e[2], 'id')
      local v, alien
      if id then
        v, alien = record(id, 'status', 'entry', 'name', 'body', 'deliveries', 'ready')
      end
      -- A queued record without its entry (written by other hands) is this entry's; so is
      -- one whose status is none we write (other hands'), which would wait for ever else.
      local queued = v and v[1] and (v[1] == 'queued' or not WRITTEN_STATUS[v[1]])
      local mine = queued and (v[2] == entry or not v[2])
      if not (v and v[1]) or (mine and not (is_utf8(id) and is_utf8(v[3] or ''))) then
        bury(q, entry, e[2], v and v[1] and v, alien)
      elseif mine then
        local deliveries = stored_count(v[5]) + 1
        -- Its queue and entry too: taking the task out later acks the entry it really has.
        redis.call('HSET', task_key(id), 'status', 'held', 'owner', A.owner, 'lease_ms',
          A.lease_ms, 'deliveries', deliveries, 'queue', q, 'entry', entry)
        delivered[#delivered + 1] = {seq = several and seq(entry),
          reply = {id, q, v[3] or '', v[4] or '', deliveries, v[6] or '0'}}
      else  -- a stale entry: its task is queued again, held or ended
        redis.call('XACK', stream_key(q), GROUP, entry)
        redis.call('XDEL', stream_key(q), entry)
      end
    end
  end
  if several then table.sort(delivered, function(a, b) return a.seq < b.seq end) end
  local reply = {}
  for i, d in ipairs(delivered) do reply[i] = d.reply end
  return reply, read
end

-- Whether the worker now waits to be woken for its queues (announce, redis_queue.lua):
-- its reserve came back short, so it counts them dry until a wake-up or DRY_RECHECK,
-- each of which has it reserve, and mark itself, again. Its {p}:idle:{queue} entry is
-- scored by Redis's clock (hosts' clocks may differ); one that no reserve renewed for
-- IDLE_STALE_MS is a worker gone without a word, dropped. A worker whose last reserve
-- was not short (A.waited false: it is in no set) costs its reserves nothing here while
-- it stays busy. A key of another kind there (someone else's write) fails these writes,
-- which are let be (pcall): EXISTS finds it, so every write publishes, as before this
-- set, until a mend (redis_mend.lua) moves it aside.
local IDLE_STALE_MS = 60000
local function mark_idle(idle)
  local now
  if idle then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  for _, q in ipairs(A.queues) do
    local key = P .. ':idle:' .. q
    if idle then
      redis.pcall('ZREMRANGEBYSCORE', key, '-inf', now - IDLE_STALE_MS)
      redis.pcall('ZADD', key, now, A.owner)
    elseif A.waited ~= false then
      redis.pcall('ZREM', key, A.owner)
    end
  end
end

local function main()
  for _, id in ipairs(A.started) do mark_started(id) end
  for _, o in ipairs(A.outcomes) do finish(o) end
  for _, r in ipairs(A.retries) do retry(r) end
  drop_spent()
  if A.n > 0 then
    local rows, read = reserve()
    mark_idle(#rows < A.n)
    -- Read fewer than asked: every queue's entries up to the counter's value were read.
    local counter = read < A.n and (tonumber(redis.call('GET', P .. ':seq')) or 0) or null
    return {rows = rows, seq = counter}
  end
  return {}
end

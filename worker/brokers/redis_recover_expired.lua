-- A: queues, keep, ttl. An entry has expired once it has been idle (not delivered or claimed
-- again) for longer than the lease its task was reserved or extended with, unless its
-- consumer is one of `keep` (a worker of the caller's host whose process runs: redis.py).
-- Consumers left holding nothing are removed (one that is alive is re-created by its next
-- reserve).
local kept = {}
for _, consumer in ipairs(A.keep or {}) do kept[consumer] = true end

local function expired(idle, id, consumer)
  if kept[consumer] then return false end
  return idle > (tonumber(redis.call('HGET', task_key(id), 'lease_ms')) or 0)
end

-- The last second a calendar date holds (9999-12-31 23:59:59 UTC): worker.task.LAST_ETA.
-- The client refuses an ETA past it; one there (+inf too: someone else's ZADD) is never due.
local LAST_ETA = 253402300799

-- End the queue's tasks scheduled past LAST_ETA (up to 1000 a call): they would neither run
-- nor fail, so they end BadMessage, whole in the dead-letter list, as a due task that is no
-- task does. A member whose task is not scheduled (queued, held, ended) is dropped: stale.
local function bury_never_due(q)
  local never = redis.call('ZRANGEBYSCORE', eta_key(q), '(' .. LAST_ETA, '+inf', 'LIMIT', 0, 1000)
  if #never == 0 then return end
  redis.call('ZREM', eta_key(q), unpack(never))
  local message = 'the record cannot be read: its ETA is past the year 9999'
  for _, id in ipairs(never) do
    local v = record(id, 'status', 'name', 'body')
    if not v[1] or v[1] == 'scheduled' or not WRITTEN_STATUS[v[1]] then
      push_dead(id, q, v[2] or '', v[3] or '', 'BadMessage', message)
      close_record(id, A.ttl, {'queue', q, 'state', 'FAILURE', 'exc_type', 'BadMessage',
        'exc_message', message}, {})
    end
  end
end

local function main()
  local count = 0
  for _, q in ipairs(A.queues) do
    bury_never_due(q)
    if has_group(q) then
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

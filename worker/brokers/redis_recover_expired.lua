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

local function main()
  local count = 0
  for _, q in ipairs(A.queues) do
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

-- A: queues. An entry has expired once it has been idle (not delivered or claimed again)
-- for longer than the lease its task was reserved or extended with. Consumers left
-- holding nothing are removed (one that is alive is re-created by its next reserve).
local function expired(idle, id)
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

-- A: ids, died, owner ('': whoever holds them), ttl.
local function main()
  for _, id in ipairs(A.ids) do
    local t = load(id, 'owner', 'state')  -- requeue reads the state
    if t and t.status == 'held' and (A.owner == '' or t.owner == A.owner)
        and requeue(id, t) then
      if not A.died then
        local deliveries = stored_count(redis.call('HGET', task_key(id), 'deliveries'))
        redis.call('HSET', task_key(id), 'deliveries', math.max(deliveries - 1, 0))
      end
    end
  end
  return 0
end

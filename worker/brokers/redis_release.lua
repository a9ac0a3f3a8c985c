-- A: ids, died, owner ('': whoever holds them).
local function main()
  for _, id in ipairs(A.ids) do
    local t = load(id)
    if t and t.status == 'held' and (A.owner == '' or t.owner == A.owner) then
      requeue(id, t)
      if not A.died then redis.call('HINCRBY', task_key(id), 'deliveries', -1) end
    end
  end
  return 0
end

-- A: ids, died.
local function main()
  for _, id in ipairs(A.ids) do
    local t = load(id)
    if t and t.status == 'held' then
      requeue(id, t)
      if not A.died then redis.call('HINCRBY', task_key(id), 'deliveries', -1) end
    end
  end
  return 0
end

-- A: ids, ttl. Queued and scheduled tasks end REVOKED now; held ones are the worker's.
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

-- A: ids, ttl. Queued and scheduled tasks end REVOKED now. Held ones are their worker's to
-- skip: a 'revoke' on their queue's wake channel has it read the revoked set at once.
local function main()
  local held = {}
  for _, id in ipairs(A.ids) do
    redis.call('SADD', P .. ':revoked', id)
    local t = load(id)
    if t and (t.status == 'queued' or t.status == 'scheduled') then
      take_out(id, t)
      close_revoked(id, A.ttl)
    elseif t and t.status == 'held' and t.queue then
      held[t.queue] = true
    end
  end
  for q in pairs(held) do redis.call('PUBLISH', P .. ':wake:' .. q, 'revoke') end
  return 0
end

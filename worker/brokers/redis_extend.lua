-- A: ids, owner, lease_ms. XCLAIM by the holder itself resets the entry's idle time.
-- Returns the ids the owner no longer holds (lost: given back, taken by another, ended).
local function main()
  local lost = {}
  for _, id in ipairs(A.ids) do
    local t = load(id, 'owner')
    if t and t.status == 'held' and t.owner == A.owner then
      redis.call('XCLAIM', stream_key(t.queue), GROUP, A.owner, 0, t.entry, 'JUSTID')
      redis.call('HSET', task_key(id), 'lease_ms', A.lease_ms)
    else
      lost[#lost + 1] = id
    end
  end
  return lost
end

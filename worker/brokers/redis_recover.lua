-- A: owner, ttl.
local function main()
  local count = 0
  for _, q in ipairs(redis.call('SMEMBERS', P .. ':queues')) do
    if has_group(q) then
      count = count + give_back(q, A.owner, function() return true end)
      redis.call('XGROUP', 'DELCONSUMER', stream_key(q), GROUP, A.owner)
    end
  end
  return count
end

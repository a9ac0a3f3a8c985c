-- Deletes every dead letter; returns how many.
local function main()
  local count = redis.call('LLEN', P .. ':dead')
  redis.call('DEL', P .. ':dead')
  return count
end

-- Read-only, so run alone (no prelude or epilogue): ARGV prefix, now. One consistent
-- snapshot of every queue: [[queue, ready, scheduled, reserved]] for each that holds any.
local P, NOW = ARGV[1], ARGV[2]
local reply = {}
for _, q in ipairs(redis.call('SMEMBERS', P .. ':queues')) do
  local stream, etas = P .. ':q:' .. q, P .. ':eta:' .. q
  local ready, reserved = 0, 0
  if redis.call('EXISTS', stream) == 1 then
    -- A stream without our group (someone else's XADD made it; a submit after Redis lost
    -- its data) has nothing reserved yet.
    local pending = redis.pcall('XPENDING', stream, 'workers')
    if not pending.err then
      reserved = pending[1]
    elseif not string.find(pending.err, '^NOGROUP') then
      return redis.error_reply(pending.err)
    end
    ready = redis.call('XLEN', stream) - reserved
  end
  ready = ready + redis.call('ZCOUNT', etas, '-inf', NOW)
  local scheduled = redis.call('ZCOUNT', etas, '(' .. NOW, '+inf')
  if ready + scheduled + reserved > 0 then
    table.insert(reply, {q, ready, scheduled, reserved})
  end
end
return reply

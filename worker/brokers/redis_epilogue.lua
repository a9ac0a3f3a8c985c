-- Runs `main` once per call token, wakes the clients waiting for the tasks it ended and the
-- queues it touched, and returns main's reply as JSON text (cheaper to send and read than
-- nested RESP arrays; an empty table comes out as {}). The call key lasts as long as a
-- retrying call can (redis.py's CALL_RETRIES, each attempt cut off by the connect or socket
-- timeout, and the backoff between them).
local call_key = P .. ':call:' .. CONNECTION
local last = redis.pcall('GET', call_key)
if type(last) == 'table' then  -- another kind of value (redis_mend.lua): kept aside
  redis.call('RENAME', call_key, P .. ':alien:call:' .. CONNECTION)
elseif last then
  local space = string.find(last, ' ', 1, true)
  if space and string.sub(last, 1, space - 1) == TOKEN then
    return string.sub(last, space + 1)
  end
end
local reply = cjson.encode(main())
drop_spent()
wake_waiters()
redis.call('SET', call_key, TOKEN .. ' ' .. reply, 'EX', 120)
announce()
return reply

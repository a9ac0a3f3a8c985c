-- Store new tasks: redis_queue.lua, then this; not a write script (no prelude, JSON or
-- call key), as it runs once per task submitted. ARGV: prefix, 'known' or '', the call
-- token, now (epoch seconds), the result TTL (seconds), then five per task: id, queue,
-- name, body, eta ('' or epoch seconds). See `submit` for what is skipped. 'known': the
-- caller registered every queue of the call a moment ago (redis.py's KNOWN_FRESH), so
-- open_queue leaves them as they are.
if ARGV[2] == 'known' then
  for i = 7, #ARGV, 5 do opened[ARGV[i]] = true end
end
for i = 6, #ARGV, 5 do
  submit(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[3], ARGV[5])
end
wake_waiters()
announce()
return 0

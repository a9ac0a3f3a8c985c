-- Store new tasks: a script of its own, not a write script (no prelude, JSON or call key),
-- as it runs once per task submitted. ARGV: prefix, call token, now (epoch seconds), then
-- five per task: id, queue, name, body, eta ('' or epoch seconds).
-- A task id already waiting or held is skipped, so that submitting the same id twice does
-- not run it twice; an ended one starts over. A task written by this very call (its record
-- holds the call token: a retry after a lost reply) is skipped too, so that a retried
-- submit neither runs twice nor starts over a task that ran meanwhile.
-- Keys and entries as the write scripts make them (see redis_prelude.lua): stream entry
-- `0-N` from the shared counter; a queue's stream and group are made on its first task.
local P, TOKEN, NOW = ARGV[1], ARGV[2], ARGV[3]
local woken = {}  -- queue -> what to publish on its wake channel: '1' (ready), 'eta'
for i = 4, #ARGV, 5 do
  local id, q, name, body, eta = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local key = P .. ':r:' .. id
  local was = redis.call('HMGET', key, 'status', 'call')
  if was[2] ~= TOKEN and (not was[1] or was[1] == 'done') then
    if was[1] then redis.call('DEL', key) end
    if not woken[q] then
      woken[q] = '1'
      redis.call('SADD', P .. ':queues', q)
      if redis.call('EXISTS', P .. ':q:' .. q) == 0 then
        redis.call('XGROUP', 'CREATE', P .. ':q:' .. q, 'workers', '0', 'MKSTREAM')
      end
    end
    if eta ~= '' and tonumber(eta) > tonumber(NOW) then
      redis.call('ZADD', P .. ':eta:' .. q, eta, id)
      woken[q] = 'eta'
      redis.call('HSET', key, 'status', 'scheduled', 'eta', eta, 'id', id, 'queue', q,
        'name', name, 'body', body, 'state', 'PENDING', 'deliveries', 0, 'call', TOKEN)
    else
      local stream = P .. ':q:' .. q
      local entry = '0-' .. redis.call('INCR', P .. ':seq')
      if type(redis.pcall('XADD', stream, entry, 'id', id)) ~= 'string' then
        -- Someone else's entry (an id Redis chose) tops the stream: ours must come after it.
        entry = redis.call('XADD', stream, '*', 'id', id)
      end
      redis.call('HSET', key, 'status', 'queued', 'entry', entry, 'ready', NOW, 'id', id,
        'queue', q, 'name', name, 'body', body, 'state', 'PENDING', 'deliveries', 0,
        'call', TOKEN)
    end
  end
end
for q, what in pairs(woken) do redis.call('PUBLISH', P .. ':wake:' .. q, what) end
return 0

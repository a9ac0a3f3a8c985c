-- A: ids, ttl. The dead letters of these ids go back to their queue as new tasks (the newest
-- letter of an id, if it has several) and off the list, which is written anew in one pass
-- (LREM per letter would read the whole list each time). Returns the ids that were there.
-- The letters are submitted before the list loses them: a script that fails halfway (a key
-- of another kind: redis.py mends it and sends the call again) keeps what it did, and a
-- submit run again leaves a task that is queued as it is.
local function main()
  local wanted, found = {}, {}
  for _, id in ipairs(A.ids) do wanted[id] = true end
  local key, kept, letters = P .. ':dead', {}, {}
  for _, text in ipairs(redis.call('LRANGE', key, 0, -1)) do
    local ok, d = pcall(cjson.decode, text)
    -- A letter of someone else's writing that is no letter of ours stays where it is.
    local letter = ok and type(d) == 'table' and type(d.id) == 'string'
      and type(d.queue) == 'string' and d.queue ~= '' and type(d.name) == 'string'
      and type(d.body) == 'string'
    if letter and wanted[d.id] then
      if not found[d.id] then
        found[d.id] = true
        letters[#letters + 1] = d
      end
    else
      kept[#kept + 1] = text
    end
  end
  if #letters == 0 then return {} end
  local reply = {}
  for i = #letters, 1, -1 do  -- oldest first: they go back in the order they died
    local d = letters[i]
    submit(d.id, d.queue, d.name, d.body, '', nil, A.ttl)
    reply[#reply + 1] = d.id
  end
  redis.call('DEL', key)
  for i = 1, #kept, 1000 do
    redis.call('RPUSH', key, unpack(kept, i, math.min(i + 999, #kept)))
  end
  return reply
end

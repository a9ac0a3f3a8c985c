-- Run alone, after a call failed on a key of ours holding a value of another kind than ours
-- (someone else's SET where a queue's stream belongs, a list where the counter is): every
-- script that touches such a key fails, and a worker with it at every start. Each key of
-- ours below that holds another kind is moved aside, kept as it was, to {p}:alien:{its name
-- past the prefix} (or that with :2, :3, ... while the name is taken). ARGV: the prefix,
-- JSON {queues = [...], keys = [[name past the prefix, kind], ...]}: what the failed call
-- touched beyond the keys every fleet has. Returns "key -> where it went" for each move.
local P = ARGV[1]
local A = cjson.decode(ARGV[2])
local moved = {}

local function kind(name) return redis.call('TYPE', P .. ':' .. name).ok end

local function move_aside(name)
  local target, n = P .. ':alien:' .. name, 1
  while redis.call('EXISTS', target) == 1 do
    n = n + 1
    target = P .. ':alien:' .. name .. ':' .. n
  end
  redis.call('RENAME', P .. ':' .. name, target)
  moved[#moved + 1] = P .. ':' .. name .. ' -> ' .. target
end

-- Whether the key holds `want` now (moved aside if it held another kind; none: false).
local function expect(name, want)
  local have = kind(name)
  if have ~= 'none' and have ~= want then move_aside(name) end
  return have == want
end

-- The entry counter (redis_queue.lua's append): a whole number INCR can add to. One that is
-- not is moved aside, and the counter starts again from the newest entry of our queues.
local function mend_counter(queues)
  local have = kind('seq')
  if have == 'none' then return end
  if have == 'string' then
    local n = redis.call('GET', P .. ':seq')
    if #n < 16 and (n == '0' or string.match(n, '^[1-9]%d*$')) then return end
  end
  move_aside('seq')
  local newest = 0
  for _, q in ipairs(queues) do
    if kind('q:' .. q) == 'stream' then
      local info = redis.call('XINFO', 'STREAM', P .. ':q:' .. q)
      for i = 1, #info, 2 do
        if info[i] == 'last-generated-id' then
          newest = math.max(newest, tonumber(string.match(info[i + 1], '^0%-(%d+)$')) or 0)
        end
      end
    end
  end
  if newest > 0 then redis.call('SET', P .. ':seq', newest) end
end

local queues, seen = {}, {}
local function add_queue(q)
  if type(q) == 'string' and not seen[q] then
    seen[q] = true
    queues[#queues + 1] = q
  end
end
if expect('queues', 'set') then
  for _, q in ipairs(redis.call('SMEMBERS', P .. ':queues')) do add_queue(q) end
end
for _, q in ipairs(A.queues) do add_queue(q) end
for _, q in ipairs(queues) do
  expect('q:' .. q, 'stream')
  expect('eta:' .. q, 'zset')
  expect('idle:' .. q, 'zset')
end
mend_counter(queues)
expect('dead', 'list')
expect('revoked', 'set')
expect('routes', 'hash')
if expect('schedules', 'set') then
  for _, name in ipairs(redis.call('SMEMBERS', P .. ':schedules')) do
    expect('schedule:' .. name, 'hash')
  end
end
for _, pair in ipairs(A.keys) do expect(pair[1], pair[2]) end
return moved

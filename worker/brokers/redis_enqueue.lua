-- A: [[id, queue, name, body, eta or ""]]. A task id already waiting or held is skipped, so
-- that submitting the same id twice does not run it twice; an ended one starts over.
local function main()
  for _, e in ipairs(A) do submit(e[1], e[2], e[3], e[4], e[5]) end
  return 0
end

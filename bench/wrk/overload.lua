-- GET /v1/users/{id} for bench/overload.py: user.lua's requests, plus every answer counted by
-- status and the 503s that came without Retry-After. wrk's latency mixes admitted and refused
-- answers (it cannot pair an answer with its request in Lua); the split by status comes from
-- the server's access log.
local common = dofile("bench/wrk/common.lua")
local requests = {}
local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function init(args)
  for i, row in ipairs(common.read_tsv(args[1])) do
    requests[i] = wrk.format("GET", "/v1/users/" .. row[2], common.headers(row[1], row[3]))
  end
  statuses = {}
  no_retry_after = 0
end

function request()
  return requests[math.random(#requests)]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 503 and headers["Retry-After"] == nil and headers["retry-after"] == nil then
    no_retry_after = no_retry_after + 1
  end
end

function done(summary, latency, reqs)
  common.done(summary, latency, reqs)
  local merged, missing = {}, 0
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("statuses")) do
      merged[status] = (merged[status] or 0) + n
    end
    missing = missing + t:get("no_retry_after")
  end
  local parts = {}
  for status, n in pairs(merged) do
    parts[#parts + 1] = string.format('"%d":%d', status, n)
  end
  io.write(string.format('BENCH_STATUS {"statuses":{%s},"no_retry_after":%d}\n',
    table.concat(parts, ","), missing))
end

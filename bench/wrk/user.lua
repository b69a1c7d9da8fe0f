-- GET /v1/users/{id}: a random sampled user per request, with a token of that user's tenant.
-- Requests are formatted once in init(); request() only picks one.
local common = dofile("bench/wrk/common.lua")
local requests = {}

function init(args)
  for i, row in ipairs(common.read_tsv(args[1])) do
    requests[i] = wrk.format("GET", "/v1/users/" .. row[2], common.headers(row[1], row[3]))
  end
end

function request()
  return requests[math.random(#requests)]
end

done = common.done

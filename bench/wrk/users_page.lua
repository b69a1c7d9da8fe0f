-- GET /v1/users?limit=50: the first page of a random sampled user's tenant.
local common = dofile("bench/wrk/common.lua")
local requests = {}

function init(args)
  for i, row in ipairs(common.read_tsv(args[1])) do
    requests[i] = wrk.format("GET", "/v1/users?limit=50", common.headers(row[1], row[3]))
  end
end

function request()
  return requests[math.random(#requests)]
end

done = common.done

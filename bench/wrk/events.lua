-- POST /v1/events: 100 events per request; a few prepared bodies from different tenants.
local common = dofile("bench/wrk/common.lua")
local requests = {}

function init(args)
  for i, row in ipairs(common.read_tsv(args[2])) do
    local headers = common.headers(row[1], row[2])
    headers["Content-Type"] = "application/json"
    requests[i] = wrk.format("POST", "/v1/events", headers, row[3])
  end
end

function request()
  return requests[math.random(#requests)]
end

done = common.done

-- GET /healthz: one static request, so wrk never calls into Lua per request.
local common = dofile("bench/wrk/common.lua")

wrk.path = "/healthz"
done = common.done

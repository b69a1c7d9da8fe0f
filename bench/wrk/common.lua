-- Shared by the endpoint scripts: reading the targets bench/run.py writes, and reporting the
-- run as one JSON line that bench/run.py parses (steadier than scraping wrk's text output).
local M = {}

-- Each line: three tab-separated fields (tenant_id, user_id or token, token or body).
function M.read_tsv(path)
  local rows = {}
  for line in io.lines(path) do
    local a, b, c = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
    if a then
      rows[#rows + 1] = { a, b, c }
    end
  end
  assert(#rows > 0, "no targets in " .. path)
  return rows
end

-- Every server gets the same request bytes: Surge reads the tenant from the token, the
-- baseline and the FastAPI peer from X-Tenant.
function M.headers(tenant, token)
  return { ["Authorization"] = "Bearer " .. token, ["X-Tenant"] = tenant }
end

function M.done(summary, latency, requests)
  local e = summary.errors
  local p = function(q) return latency:percentile(q) end
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,'
      .. '"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    p(50), p(75), p(90), p(99), p(99.9)))
end

return M

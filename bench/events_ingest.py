"""python -m bench.events_ingest: event ingestion, Surge against a plain INSERT-per-event server.

For each batch size (events per request: 1, 100, 1000) each server is started afresh, pinned
to CPU 0 with taskset, and wrk (pinned to CPU 1; 64 connections, 32 for 1000-event requests)
posts prepared bodies to POST /v1/events: a warm-up, then the measured run. Reported per run:

- events/s: rows that reached the events table during the measured run;
- events per CPU-second: the events committed during the run divided by the CPU time the
  server process used in it (from /proc/<pid>/stat), i.e. the rate one fully used core would
  sustain. The server is pinned to one core, so this and events/s differ by how busy it was;
- requests/s, p50/p99 latency and non-2xx answers, from wrk.

The baseline is what ingestion looks like without group commit: a bare aiohttp + asyncpg
handler (no auth, no rate limit, no metrics, no validation beyond the JSON shape) that
INSERTs each event in the request's own transaction, into the same partitioned table.

PostgreSQL and Redis run unpinned on the same machine, so on a two-core host they share the
cores with the server and wrk: the absolute figures are this machine's, the ratio is the point.
Results are printed as JSON and written into docs/EVENTS.md between its bench markers.

    python -m bench.events_ingest [--rounds 3] [--seconds 10] [--warmup 3]
        [--batches 1,100,1000] [--servers surge,baseline] [--wait-quiet 120] [--no-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from bench.common import DOCS_DIR, ROOT, sample_event

SERVER_CPU = "0"
CLIENT_CPU = "1"
# 64 connections, as bench/run.py; 32 for 1000-event requests, so the events in flight (32,000)
# stay under Surge's default EVENTS_MAX_PENDING (50,000) and the run measures throughput, not
# the 503s that protect the buffer (a refusal is cheap, but counts for nothing).
CONNECTIONS = {1: 64, 100: 64, 1000: 32}
BODIES = 16
BATCHES = (1, 100, 1000)
DATABASE = "surge_events_bench"  # its own: tables are truncated between runs
ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
JWT_KEYS = "bench:" + "b" * 48
DOC = DOCS_DIR / "EVENTS.md"
START, END = "<!-- bench:events_ingest:start -->", "<!-- bench:events_ingest:end -->"

_LUA = r"""
local requests, n = {}, 0
function init(args)
  local headers = { ["Content-Type"] = "application/json" }
  if args[2] ~= "" then headers["Authorization"] = "Bearer " .. args[2] end
  for line in io.lines(args[1]) do
    requests[#requests + 1] = wrk.format("POST", "/v1/events", headers, line)
  end
end
function request()
  n = n % #requests + 1
  return requests[n]
end
function done(summary, latency, requests)
  io.write(string.format('BENCH_JSON {"requests":%d,"duration_us":%d,"status_errors":%d,' ..
    '"socket_errors":%d,"p50_us":%d,"p99_us":%d}\n', summary.requests, summary.duration,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def database_url() -> str:
    parts = urlsplit(ADMIN_URL)
    return urlunsplit(parts._replace(path="/" + DATABASE))


# --- the baseline server ---------------------------------------------------------------------

_INSERT = (
    "INSERT INTO events (tenant_id, ts, name, user_id, props) VALUES ($1, $2, $3, $4, $5::jsonb)"
)


def serve_baseline(port: int, dsn: str) -> None:
    import uvloop
    from aiohttp import web

    tenant = uuid.UUID(int=7)
    pool_key = web.AppKey("pool", asyncpg.Pool)

    async def post_events(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        events = body["events"]
        if type(events) is not list or not 1 <= len(events) <= 1000:
            return web.json_response({"error": "1..1000 events"}, status=422)
        now = datetime.now(UTC)
        async with request.app[pool_key].acquire() as con, con.transaction():
            for e in events:
                await con.execute(
                    _INSERT,
                    tenant,
                    now,
                    e["name"],
                    e.get("user_id"),
                    orjson.dumps(e.get("props", {})).decode(),
                )
        return web.Response(
            body=b'{"accepted":%d}' % len(events), status=202, content_type="application/json"
        )

    async def pool_ctx(app: web.Application) -> Any:
        app[pool_key] = await asyncpg.create_pool(dsn, min_size=16, max_size=16)
        yield
        await app[pool_key].close()

    async def readyz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    app = web.Application(client_max_size=4 << 20)
    app.cleanup_ctx.append(pool_ctx)
    app.router.add_post("/v1/events", post_events)
    app.router.add_get("/readyz", readyz)
    web.run_app(
        app,
        host="127.0.0.1",
        port=port,
        print=None,
        access_log=None,
        loop=uvloop.new_event_loop(),
    )


# --- orchestration ---------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def prepare_database() -> None:
    con = await asyncpg.connect(ADMIN_URL)
    try:
        if not await con.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
            await con.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await con.close()
    from db.migrate import migrate

    await migrate(database_url())


async def truncate() -> None:
    con = await asyncpg.connect(database_url())
    try:
        await con.execute("TRUNCATE events, event_counts")
        await con.execute("CHECKPOINT")  # every run starts without the last one's dirty pages
    finally:
        await con.close()


async def count_rows() -> int:
    con = await asyncpg.connect(database_url())
    try:
        n: int = await con.fetchval("SELECT count(*) FROM events WHERE name <> 'user.created'")
        return n
    finally:
        await con.close()


def surge_env(port: int) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url(),
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": "surgeevbench:",
        "PORT": str(port),
        "WORKERS": "1",  # one process, measured by its pid
        "JWT_KEYS": JWT_KEYS,
        "ACCESS_TOKEN_TTL_S": "86400",
        "ACCESS_LOG": "false",
        "LOG_LEVEL": "warning",
        "RATE_LIMIT_RATE": "1000000000",
        "RATE_LIMIT_BURST": "1000000000",
    }


def start(server: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    if server == "surge":
        argv, env = [sys.executable, "-m", "server", "serve"], surge_env(port)
    else:
        argv = [sys.executable, "-m", "bench.events_ingest", "--serve-baseline", str(port)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # taskset execs the server, so the Popen pid is the server's own (for /proc/<pid>/stat).
    with log.open("wb") as sink:
        return subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, *argv],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )


def wait_ready(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if proc.poll() is not None:
            raise RuntimeError("the server died; see its log")
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not become ready")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _busy(cpu: str) -> tuple[int, int]:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(cpu + " "):
            ticks = [int(v) for v in line.split()[1:]]
            return ticks[3] + ticks[4], sum(ticks)  # (idle + iowait, total)
    raise RuntimeError(f"{cpu} not in /proc/stat")


def wait_quiet(limit_s: float, threshold: float = 0.10) -> float:
    """Wait up to limit_s for both cores to be nearly idle; the busiest share last seen.
    On a shared machine a test suite running beside the bench would halve every figure."""
    deadline = time.monotonic() + limit_s
    while True:
        cpus = (f"cpu{SERVER_CPU}", f"cpu{CLIENT_CPU}")
        before = [_busy(c) for c in cpus]
        time.sleep(2.0)
        after = [_busy(c) for c in cpus]
        worst = max(
            1 - (a[0] - b[0]) / max(1, a[1] - b[1]) for a, b in zip(after, before, strict=True)
        )
        if worst <= threshold or time.monotonic() >= deadline:
            return worst
        print(f"machine busy ({worst:.0%} of a core); waiting", file=sys.stderr, flush=True)


def refusals(port: int) -> dict[str, float]:
    """surge_events_refused_total by reason, from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.findall(r'^surge_events_refused_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    return {reason: float(v) for reason, v in found}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


def signup_token(port: int) -> str:
    body = json.dumps(
        {
            "tenant_name": "Bench",
            "email": f"bench{uuid.uuid4().hex[:8]}@example.com",
            "username": "bench",
            "password": "correct horse battery",
        }
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/auth/signup",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 (an http:// URL we built)
        token: str = json.loads(r.read())["access_token"]
        return token


def write_bodies(path: Path, batch: int) -> None:
    lines = []
    for b in range(BODIES):
        events = [
            sample_event(b * batch + i, str(uuid.UUID(int=b)) if i % 2 else None)
            for i in range(batch)
        ]
        lines.append(orjson.dumps({"events": events}).decode())
    path.write_text("\n".join(lines) + "\n")


def wrk(
    port: int, seconds: int, connections: int, script: Path, bodies: Path, token: str
) -> dict[str, Any]:
    out = subprocess.run(
        [
            "taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
            "--timeout", "10s", "-s", str(script), f"http://127.0.0.1:{port}", "--",
            str(bodies), token,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout  # fmt: skip
    match = re.search(r"^BENCH_JSON (.*)$", out, re.M)
    assert match, out
    result: dict[str, Any] = json.loads(match[1])
    return result


def run_one(
    server: str, batch: int, seconds: int, warmup: int, tmp: Path, quiet_s: float
) -> dict[str, Any]:
    asyncio.run(truncate())
    busy_before = wait_quiet(quiet_s)
    port = free_port()
    log = tmp / f"{server}-{batch}.log"
    proc = start(server, port, log)
    try:
        wait_ready(proc, port)
        token = signup_token(port) if server == "surge" else ""
        bodies = tmp / f"bodies-{batch}.ndjson"
        if not bodies.exists():
            write_bodies(bodies, batch)
        script = tmp / "events.lua"
        connections = CONNECTIONS.get(batch, 64)
        wrk(port, warmup, connections, script, bodies, token)
        # The warm-up's connections close with requests still in flight, which the server
        # finishes anyway: let them, or the measured run starts with twice the load.
        time.sleep(1.0)
        # Throughput is what PostgreSQL received while wrk ran: with 1000-event requests a
        # request can take longer than a short run, so counting wrk's answers would not do.
        rows_before = asyncio.run(count_rows())
        cpu_before = cpu_seconds(proc.pid)
        started = time.perf_counter()
        res = wrk(port, seconds, connections, script, bodies, token)
        rows = asyncio.run(count_rows()) - rows_before
        cpu = cpu_seconds(proc.pid) - cpu_before
        duration = time.perf_counter() - started
        refused = refusals(port) if server == "surge" else {}
        peak_rss = peak_rss_mb(proc.pid)
    finally:
        stop(proc)
    if res["status_errors"]:
        print(f"{server}: {res['status_errors']} non-2xx answers; refusals {refused}; log tail:")
        print("\n".join(log.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr)
    ok = res["requests"] - res["status_errors"]
    return {
        "server": server,
        "batch": batch,
        "connections": connections,
        "requests_per_s": round(ok / (res["duration_us"] / 1e6), 1),
        "events_per_s": round(rows / duration, 1),
        "server_cpu_share": round(cpu / duration, 3),
        "events_per_cpu_s": round(rows / cpu, 1) if cpu else None,
        "rows_committed": rows,
        "p50_ms": res["p50_us"] / 1000,
        "p99_ms": res["p99_us"] / 1000,
        "non_2xx": res["status_errors"],
        "socket_errors": res["socket_errors"],
        "busy_before": round(busy_before, 2),
        "refused": refused,
        "peak_rss_mb": round(peak_rss, 1),
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (batch, server): the median run by events per CPU-second, with the range
    of that figure and every run's non-2xx answers added up."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["batch"], r["server"]), []).append(r)
    rows = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: r["events_per_cpu_s"] or 0)
        row = dict(ranked[len(ranked) // 2])
        row["rounds"] = len(group)
        row["per_cpu_min"] = ranked[0]["events_per_cpu_s"] or 0
        row["per_cpu_max"] = ranked[-1]["events_per_cpu_s"] or 0
        row["non_2xx"] = sum(r["non_2xx"] for r in group)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| events/request | connections | server | events/s | server CPU | events per CPU-second "
        "| (range) | req/s | p50 ms | p99 ms | non-2xx | peak RSS MB |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['connections']} | {r['server']} | {r['events_per_s']:,.0f} | "
            f"{r['server_cpu_share']:.0%} | {r['events_per_cpu_s'] or 0:,.0f} | "
            f"{r['per_cpu_min']:,.0f}-{r['per_cpu_max']:,.0f} | {r['requests_per_s']:,.0f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['non_2xx']} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def write_doc(runs: list[dict[str, Any]], command: str, seconds: int, rounds: int) -> None:
    text = DOC.read_text()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    busiest = max(r["busy_before"] for r in runs)
    block = (
        f"{START}\n"
        f"Measured {when} on {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}: {rounds} rounds of {seconds} s per row, the median round "
        f"shown (by events per CPU-second, with the range over the rounds); the busiest core "
        f"was {busiest:.0%} busy just before a run started.\n\n"
        f"```sh\n{command}\n```\n\n{table(summarise(runs))}\n{END}"
    )
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _m: block, text, flags=re.S)
    else:
        text += "\n" + block + "\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.events_ingest")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--servers", default="surge,baseline")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=120,
        metavar="SECONDS",
        help="before each run, wait up to this long for both cores to be idle",
    )
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline:
        serve_baseline(args.serve_baseline, database_url())
        return 0
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} is needed", file=sys.stderr)
            return 2
    asyncio.run(prepare_database())
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "events.lua").write_text(_LUA)
        # Rounds outermost: drift on a shared machine spreads over every row instead of
        # landing on one.
        for _round in range(args.rounds):
            for batch in [int(b) for b in args.batches.split(",")]:
                for server in args.servers.split(","):
                    result = run_one(
                        server, batch, args.seconds, args.warmup, Path(tmp), args.wait_quiet
                    )
                    print(json.dumps(result), flush=True)
                    runs.append(result)
    print(table(summarise(runs)))
    if not args.no_docs:
        command = "python -m bench.events_ingest " + " ".join(argv or sys.argv[1:])
        write_doc(runs, command.strip(), args.seconds, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

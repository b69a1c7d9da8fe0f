"""What tracing costs: server CPU microseconds per request, tracing off vs on.

    .venv/bin/python -m bench.tracing_overhead    # 3 rounds x 3 endpoints x 4 modes: ~6 min
    .venv/bin/python -m bench.tracing_overhead --rounds 1 --seconds 3 --endpoints healthz

Surge runs as `python -m server serve` pinned to CPU 0 (access log on, to /dev/null; rate limits
out of the way); wrk (1 thread, 16 connections) and, when tracing is on, a local OTLP/HTTP sink
(this file with --sink: decodes every ExportTraceServiceRequest and counts its spans) share
CPU 1. The figure is the server process's CPU time (utime + stime of all its threads, so the
exporter thread's protobuf encoding and HTTP posts are included) over the requests wrk
completed: a CPU cost, steadier than throughput when other work shares the machine, but still
noisy there (cache and frequency effects); modes alternate within each round and the table
shows the median of the rounds.

Modes:
  off         OTEL_EXPORTER_OTLP_ENDPOINT unset (the default)
  off+tp      unset, every request carrying a traceparent (its trace id goes to the access log)
  on          endpoint set, every request carrying a sampled traceparent: all spans exported
  on-unsampled endpoint set, OTEL_TRACES_SAMPLER_ARG=0, no traceparent: spans created, none kept

Endpoints: healthz (middleware only), user (GET /v1/users/{id}, cache off: the server span and
one SQL span), user_cached (the same through Redis: the server span and one MGET span).

`--micro` instead drives the middleware in-process, no sockets: one call of a trivial route's
handler inside the pipeline per request, CPU time over 100,000 calls, for the modes above
compared with `off` (`on` counts the exporter thread too: a queue large enough to drop nothing, and
the final flush inside the timing). It isolates what the hooks themselves cost, below the
noise of the whole-server figures:

    .venv/bin/python -m bench.tracing_overhead --micro --rounds 7

PostgreSQL: BENCH_ADMIN_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/postgres); a
database `surge_tracing_bench` is created afresh. Redis: BENCH_REDIS_URL (default
redis://127.0.0.1:6379/0), keys under `surgetracebench:`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
LOG = ROOT / "bench" / "data" / "logs" / "tracing_overhead.log"
SERVER_CPU, CLIENT_CPU = "0", "1"
CONNECTIONS = 16
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
JWT_KEYS = "bench:" + "b" * 40
MODES = ("off", "off+tp", "on", "on-unsampled")
ENDPOINTS = ("healthz", "user", "user_cached")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def get_json(url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(  # noqa: S310 (http://127.0.0.1 only)
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
        return json.loads(resp.read())


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise SystemExit(f"{what} did not answer {url}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the sink -----------------------------------------------------------------------------------


def run_sink(port: int) -> None:
    import uvloop
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    spans = 0
    answer = ExportTraceServiceResponse().SerializeToString()

    async def traces(request: web.Request) -> web.Response:
        nonlocal spans
        message = ExportTraceServiceRequest.FromString(await request.read())
        for rs in message.resource_spans:
            for ss in rs.scope_spans:
                spans += len(ss.spans)
        return web.Response(body=answer, content_type="application/x-protobuf")

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"spans": spans})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/count", count)
    uvloop.run(web._run_app(app, host="127.0.0.1", port=port, print=None))


def start_sink(port: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "bench.tracing_overhead", "--sink", str(port)]
    return subprocess.Popen(["taskset", "-c", CLIENT_CPU, *argv], cwd=ROOT)


# --- set-up -------------------------------------------------------------------------------------


async def fresh_database(admin: str, name: str) -> str:
    import asyncpg

    from db.migrate import migrate

    con = await asyncpg.connect(admin)
    try:
        await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await con.execute(f'CREATE DATABASE "{name}"')
    finally:
        await con.close()
    dsn = urlunsplit(urlsplit(admin)._replace(path="/" + name))
    await migrate(dsn)
    return dsn


def clear_redis(url: str, prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(url)
    try:
        keys = list(r.scan_iter(match=prefix + "*", count=1000))
        if keys:
            r.delete(*keys)
    finally:
        r.close()


class Bench:
    def __init__(self, dsn: str, redis_url: str) -> None:
        self.dsn = dsn
        self.redis_url = redis_url
        self.port = free_port()
        self.sink_port = free_port()
        self.token = ""
        self.user_id = ""

    def env(self, mode: str, endpoint: str) -> dict[str, str]:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
            "DATABASE_URL": self.dsn,
            "REDIS_URL": self.redis_url,
            "REDIS_KEY_PREFIX": "surgetracebench:",
            "PORT": str(self.port),
            "JWT_KEYS": JWT_KEYS,
            "ACCESS_TOKEN_TTL_S": "86400",
            "RATE_LIMIT_RATE": "1000000000",
            "RATE_LIMIT_BURST": "1000000000",
            "USER_CACHE_TTL_S": "600" if endpoint == "user_cached" else "0",
            "ACCESS_LOG": "true",
            "OUTBOX_RELAY": "false",
            "ANALYTICS_CONSUMER": "false",
        }
        if mode.startswith("on"):
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{self.sink_port}"
            env["OTEL_BSP_SCHEDULE_DELAY"] = "1000"
        if mode == "on-unsampled":
            env["OTEL_TRACES_SAMPLER_ARG"] = "0"
        return env

    def start(self, mode: str, endpoint: str) -> subprocess.Popen[bytes]:
        LOG.parent.mkdir(parents=True, exist_ok=True)
        with LOG.open("ab") as log:
            proc = subprocess.Popen(
                ["taskset", "-c", SERVER_CPU, sys.executable, "-m", "server", "serve"],
                cwd=ROOT,
                env=self.env(mode, endpoint),
                stdout=subprocess.DEVNULL,  # the access log: written, then discarded
                stderr=log,
            )
        wait_http(f"http://127.0.0.1:{self.port}/healthz", proc, f"surge (log: {LOG})")
        return proc

    def seed(self) -> None:
        proc = self.start("off", "user")
        try:
            base = f"http://127.0.0.1:{self.port}"
            owner = get_json(
                base + "/v1/auth/signup",
                {
                    "tenant_name": "Bench",
                    "email": "owner@example.com",
                    "username": "owner",
                    "password": "correct horse battery",
                },
            )
            self.token = owner["access_token"]
            self.user_id = owner["user"]["id"]
        finally:
            stop(proc)

    def wrk(self, mode: str, endpoint: str, seconds: int) -> int:
        path = "/healthz" if endpoint == "healthz" else f"/v1/users/{self.user_id}"
        headers = ["-H", f"Authorization: Bearer {self.token}"]
        if mode in ("off+tp", "on"):
            headers += ["-H", f"traceparent: 00-{TRACE_ID}-00f067aa0ba902b7-01"]
        out = subprocess.run(
            [
                *("taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{CONNECTIONS}"),
                f"-d{seconds}s",
                *headers,
                f"http://127.0.0.1:{self.port}{path}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        if "Non-2xx" in out:
            raise SystemExit(f"wrk saw errors on {endpoint} ({mode}):\n{out}")
        m = re.search(r"(\d+) requests in", out)
        assert m is not None, out
        return int(m[1])

    def sink_spans(self) -> int:
        spans: int = get_json(f"http://127.0.0.1:{self.sink_port}/count")["spans"]
        return spans

    def measure(self, mode: str, endpoint: str, seconds: int) -> dict[str, float]:
        proc = self.start(mode, endpoint)
        try:
            self.wrk(mode, endpoint, 1)  # warm-up: statement caches, the cache entry
            before_spans = self.sink_spans() if mode.startswith("on") else 0
            cpu0 = cpu_seconds(proc.pid)
            t0 = time.monotonic()
            n = self.wrk(mode, endpoint, seconds)
            elapsed = time.monotonic() - t0
            cpu = cpu_seconds(proc.pid) - cpu0
        finally:
            stop(proc)  # a graceful stop flushes the exporter: the sink has every span now
        spans = (self.sink_spans() - before_spans) if mode.startswith("on") else 0
        return {
            "cpu_us_per_req": cpu / n * 1e6,
            "req_per_s": n / elapsed,
            "spans_per_req": spans / n,
        }


# --- in-process: the middleware alone ---------------------------------------------------------

MICRO_MODES = ("off", "off+tp", "on-unsampled", "on")


async def _micro_mode(mode: str, calls: int, sink_url: str, devnull: io.BufferedWriter) -> float:
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from db.gate import FairGate
    from server.access_log import AccessLog
    from server.chain import Chain
    from server.config import Config
    from server.routes import get
    from server.tracing import Tracing

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"ok")

    app = web.Application()
    app.router.add_get("/healthz", handler)
    # As in the server runs: a sampled traceparent in off+tp and on, none elsewhere.
    traced = mode in ("off+tp", "on")
    headers = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"} if traced else {}
    request = make_mocked_request("GET", "/healthz", headers=headers, app=app)
    request._match_info = await app.router.resolve(request)  # the route, as aiohttp would
    log = AccessLog(devnull)
    gate = FairGate(512, 0.1)
    tracing = None
    if mode.startswith("on"):
        config = Config(
            otel_exporter_otlp_endpoint=sink_url,
            otel_traces_sampler_arg=0.0 if mode == "on-unsampled" else 1.0,
        )
        tracing = Tracing(config)
        tracing.start()
    # the route's handler inside the chain, as server.app.add_routes registers it
    wrapped = Chain(log, gate, tracing).wrap(get("/healthz", handler, ops=True), "GET")
    for _ in range(1000):  # warm-up
        await wrapped(request)
    t0 = time.process_time()  # every thread of the process: the exporter's too
    for _ in range(calls):
        await wrapped(request)
    if tracing is not None:
        await tracing.flush(timeout_s=60)
    cpu = time.process_time() - t0
    if tracing is not None:
        await tracing.stop()
    log.flush()
    return cpu / calls * 1e6


def run_micro(rounds: int, calls: int, sink_port: int) -> None:
    import uvloop

    # Big enough that `on` drops nothing: every span is encoded and posted, and counted.
    os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = str(calls * 2)
    sink_url = f"http://127.0.0.1:{sink_port}"
    results: dict[str, list[float]] = {m: [] for m in MICRO_MODES}
    for r in range(rounds):
        for mode in MICRO_MODES:
            with open(os.devnull, "wb") as devnull:
                us = uvloop.run(_micro_mode(mode, calls, sink_url, devnull))
            results[mode].append(us)
            print(f"round {r + 1} {mode:13} {us:6.2f} us/call", file=sys.stderr)
    # The minimum is the figure to compare (other load only ever adds); the median shows noise.
    base = min(results["off"])
    print(f"\n{rounds} round(s), {calls} calls each, middleware only (/healthz route)")
    print("| mode | CPU µs per request, min | median | min vs off |")
    print("|---|---|---|---|")
    for mode in MICRO_MODES:
        us, med = min(results[mode]), statistics.median(results[mode])
        rel = f"{us - base:+.2f} µs ({(us / base - 1) * 100:+.1f} %)"
        print(f"| {mode} | {us:.2f} | {med:.2f} | {rel} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--micro", action="store_true", help="the middleware alone, in-process")
    parser.add_argument("--calls", type=int, default=100_000, help="--micro: calls per mode")
    parser.add_argument("--sink", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sink:
        run_sink(args.sink)
        return 0
    modes = [m for m in MODES if m in args.modes.split(",")]
    endpoints = [e for e in ENDPOINTS if e in args.endpoints.split(",")]

    if args.micro:
        port = free_port()
        sink = start_sink(port)
        try:
            wait_http(f"http://127.0.0.1:{port}/count", sink, "sink")
            os.sched_setaffinity(0, {int(SERVER_CPU)})
            run_micro(args.rounds, args.calls, port)
        finally:
            stop(sink)
        return 0

    admin = os.environ.get(
        "BENCH_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    dsn = asyncio.run(fresh_database(admin, "surge_tracing_bench"))
    clear_redis(redis_url, "surgetracebench:")
    bench = Bench(dsn, redis_url)
    sink = start_sink(bench.sink_port)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        wait_http(f"http://127.0.0.1:{bench.sink_port}/count", sink, "sink")
        bench.seed()
        for r in range(args.rounds):
            for endpoint in endpoints:
                for mode in modes:
                    row = bench.measure(mode, endpoint, args.seconds)
                    results.setdefault((endpoint, mode), []).append(row)
                    print(
                        f"round {r + 1} {endpoint:12} {mode:13} "
                        f"{row['cpu_us_per_req']:7.1f} us/req {row['req_per_s']:8.0f} req/s "
                        f"{row['spans_per_req']:4.2f} spans/req",
                        file=sys.stderr,
                    )
    finally:
        stop(sink)
    print(f"\nmedian of {args.rounds} round(s), {args.seconds:g} s each, {CONNECTIONS} connections")
    print("| endpoint | mode | server CPU µs/req | req/s | spans exported/req | CPU vs off |")
    print("|---|---|---|---|---|---|")
    for endpoint in endpoints:
        off = results.get((endpoint, "off"))
        base = statistics.median(x["cpu_us_per_req"] for x in off) if off else None
        for mode in modes:
            rows = results[(endpoint, mode)]
            cpu = statistics.median(x["cpu_us_per_req"] for x in rows)
            rps = statistics.median(x["req_per_s"] for x in rows)
            spans = statistics.median(x["spans_per_req"] for x in rows)
            rel = f"{(cpu / base - 1) * 100:+.1f} %" if base else "-"
            print(f"| {endpoint} | {mode} | {cpu:.1f} | {rps:.0f} | {spans:.2f} | {rel} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

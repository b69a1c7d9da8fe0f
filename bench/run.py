"""python -m bench.run: Surge, the bare baseline and FastAPI side by side, under wrk.

For each endpoint, each round starts every server afresh pinned to CPU 0, in alternating order
(A B C A B C ...), so drift on this shared machine spreads over all servers instead of
landing on one. wrk runs pinned to CPU 1: 64 connections, a warm-up, then the measured run.
Before the first round's warm-up a verification client checks every answer belongs to its
request. Results go to bench/results/<UTC timestamp>.json; docs/PERFORMANCE.md and its charts
are regenerated from them unless something failed.

    python -m bench.run [--quick] [--servers surge,baseline,fastapi] [--endpoints user,...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
import redis

from bench.common import (
    DATA_DIR,
    DATABASE_URL,
    EVENTS_TABLE,
    IDS_FILE,
    REDIS_KEY_PREFIX,
    REDIS_URL,
    RESULTS_DIR,
    ROOT,
    WRK_DIR,
    sample_event,
)

SERVER_CPU = "0"
CLIENT_CPU = "1"
CONNECTIONS = 64
POOL_SIZE = 16
EVENTS_PER_REQUEST = 100
EVENT_BODIES = 16
TOKEN_TTL_S = 6 * 3600  # outlives the longest full run by hours
LOG_DIR = DATA_DIR / "logs"
TARGETS_JSON = DATA_DIR / "targets.json"
TARGETS_TSV = DATA_DIR / "targets.tsv"
EVENTS_TSV = DATA_DIR / "events.tsv"
PY = sys.executable
GO_SOURCE = ROOT / "bench" / "peers" / "go" / "main.go"
GO_BINARY = DATA_DIR / "go-peer"
# Debian's Go library packages put their sources here: GOPATH mode builds with no download.
GO_PATH = "/usr/share/gocode"
GO_PACKAGES = "golang-go golang-github-jackc-pgx-v4-dev"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One measured request kind. Adding an endpoint is adding an entry to ENDPOINTS."""

    name: str
    title: str
    method: str
    path: str  # as verify.py requests it; "{id}" is the user id
    route: str  # the route template with parameters as "{}", to find it in Surge's URL map
    script: str  # in bench/wrk/
    check: str  # verify.py's check
    expect: int = 200
    read: bool = True  # read endpoints carry the p99 budget
    servers: tuple[str, ...] | None = None  # None: every server
    surge_env: Mapping[str, str] = field(default_factory=dict)
    # Ratios against another endpoint's figures for the other servers (cache on vs uncached).
    compare_with: str | None = None
    events_per_request: int = 0
    truncate: tuple[str, ...] = ()  # emptied before every server start, when they exist
    # Surge is asked for every sampled user once before the warm-up, so the measured run sees
    # the cache's steady state (its hit ratio is reported) rather than the cache filling.
    prime: bool = False


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("healthz", "GET /healthz", "GET", "/healthz", "/healthz", "healthz.lua", "healthz"),
    Endpoint(
        "user",
        "GET /v1/users/{id}, cache off",
        "GET",
        "/v1/users/{id}",
        "/v1/users/{}",
        "user.lua",
        "user",
        surge_env={"USER_CACHE_TTL_S": "0"},
    ),
    Endpoint(
        "user_cached",
        "GET /v1/users/{id}, cache on",
        "GET",
        "/v1/users/{id}",
        "/v1/users/{}",
        "user.lua",
        "user",
        # The other servers have no cache: the budget compares with their uncached figures.
        servers=("surge",),
        surge_env={"USER_CACHE_TTL_S": "60"},
        compare_with="user",
        prime=True,
    ),
    Endpoint(
        "users_page",
        "GET /v1/users?limit=50",
        "GET",
        "/v1/users?limit=50",
        "/v1/users",
        "users_page.lua",
        "page",
    ),
    Endpoint(
        "events",
        "POST /v1/events, 100 events",
        "POST",
        "/v1/events",
        "/v1/events",
        "events.lua",
        "events",
        expect=202,
        read=False,
        events_per_request=EVENTS_PER_REQUEST,
        # Surge's own events tables too: every round starts from the same table sizes.
        truncate=(EVENTS_TABLE, "events", "event_counts"),
    ),
)


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    title: str
    port: int
    argv: tuple[str, ...]
    env: Mapping[str, str]
    routes: frozenset[str] | None  # endpoint names it serves; None: read Surge's URL map


def make_servers(jwt_secret: str) -> dict[str, Server]:
    bench_env = {"BENCH_DATABASE_URL": DATABASE_URL}
    everything = frozenset(e.name for e in ENDPOINTS if e.servers is None)
    return {
        "surge": Server(
            "surge",
            "Surge (auth, rate limit, metrics, access log, shedding)",
            8201,
            (PY, "-m", "server", "serve"),
            {
                "HOST": "127.0.0.1",
                "PORT": "8201",
                "WORKERS": "1",  # one process pinned to one core, measured by its pid
                "DATABASE_URL": DATABASE_URL,
                "REDIS_URL": REDIS_URL,
                "REDIS_KEY_PREFIX": REDIS_KEY_PREFIX,
                "JWT_KEYS": f"bench:{jwt_secret}",
                # On, as in production, but high enough never to refuse the load generator.
                "RATE_LIMIT_RATE": "1000000000",
                "RATE_LIMIT_BURST": "1000000000",
                # Every line is formatted and written; stdout goes to /dev/null.
                "ACCESS_LOG": "true",
                "PG_POOL_MAX": str(POOL_SIZE),
                "SHUTDOWN_GRACE_S": "2",
            },
            None,
        ),
        "baseline": Server(
            "baseline",
            "bare aiohttp + uvloop + asyncpg + orjson",
            8202,
            (PY, "-m", "bench.baseline", "--port", "8202", "--pool", str(POOL_SIZE)),
            bench_env,
            everything,
        ),
        "fastapi": Server(
            "fastapi",
            "FastAPI + uvicorn + SQLAlchemy 2 async ORM",
            8203,
            (PY, "-m", "bench.peers.fastapi_app", "--port", "8203"),
            bench_env,
            everything,
        ),
        # Built from Debian's packages when they are there (build_go); skipped, and said so, if not.
        "go": Server(
            "go",
            "Go net/http + pgx v4 (pgxpool)",
            8205,
            (str(GO_BINARY), "--port", "8205", "--pool", str(POOL_SIZE), "--sql", "sql/users.sql"),
            bench_env,
            frozenset({"healthz", "user", "users_page"}),
        ),
        # Not in the default set: how much asyncpg's reset on release costs the bare floor.
        "baseline_noreset": Server(
            "baseline_noreset",
            "bare baseline, asyncpg reset off",
            8204,
            (PY, "-m", "bench.baseline", "--port", "8204", "--pool", str(POOL_SIZE), "--no-reset"),
            bench_env,
            everything,
        ),
    }


class BenchError(Exception):
    pass


# --- data for the load generators -------------------------------------------------------------


def write_targets(jwt_secret: str) -> int:
    """Tokens for the sampled users, in the two forms the clients read (TSV for wrk's Lua)."""
    from server.tokens import TokenService

    if not IDS_FILE.exists():
        raise BenchError(f"{IDS_FILE} is missing: run `python -m bench.seed` first")
    pairs = json.loads(IDS_FILE.read_text())["pairs"]
    tokens = TokenService([("bench", jwt_secret.encode())], "surge", "surge-api", TOKEN_TTL_S)
    users = [
        [tenant, user, tokens.issue(uuid.UUID(user), uuid.UUID(tenant), ["member"])]
        for tenant, user in pairs
    ]
    events = []
    for i, (tenant, user, token) in enumerate(users[:EVENT_BODIES]):
        batch = [
            sample_event(i * EVENTS_PER_REQUEST + j, user if j % 2 else None)
            for j in range(EVENTS_PER_REQUEST)
        ]
        events.append([tenant, token, orjson.dumps({"events": batch}).decode()])
    TARGETS_JSON.write_text(json.dumps({"users": users, "events": events}))
    TARGETS_TSV.write_text("".join(f"{t}\t{u}\t{k}\n" for t, u, k in users))
    EVENTS_TSV.write_text("".join(f"{t}\t{k}\t{b}\n" for t, k, b in events))
    return len(users)


def surge_routes() -> set[str]:
    """(method path) pairs in Surge's URL map, parameters as "{}"; read in a child process so
    a half-written handler module fails there, not here."""
    code = (
        "import json, handlers\n"
        "print(json.dumps([[r.method, r.path] for r in handlers.routes"
        " if hasattr(r, 'method') and hasattr(r, 'path')]))"
    )
    out = subprocess.run(
        [PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    if out.returncode != 0:
        raise BenchError(f"cannot read Surge's routes:\n{out.stderr[-2000:]}")
    return {f"{m} {re.sub(r'{[^}]*}', '{}', p)}" for m, p in json.loads(out.stdout)}


def build_go() -> str | None:
    """Builds the Go peer; the reason when it cannot be built."""
    go = shutil.which("go")
    if go is None or not Path(GO_PATH, "src/github.com/jackc/pgx/v4").is_dir():
        return f"Go or pgx v4 is not installed (Debian: apt-get install {GO_PACKAGES})"
    if GO_BINARY.exists() and GO_BINARY.stat().st_mtime >= GO_SOURCE.stat().st_mtime:
        return None
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": GO_PATH,
        "GOCACHE": str(DATA_DIR / "go-cache"),
        "CGO_ENABLED": "0",
    }
    out = subprocess.run(
        [go, "build", "-o", str(GO_BINARY), str(GO_SOURCE)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        return "go build failed: " + " ".join((out.stderr or out.stdout).split())[:300]
    return None


def unsupported(server: Server, endpoint: Endpoint, routes: set[str]) -> str | None:
    if endpoint.servers is not None and server.name not in endpoint.servers:
        return "not applicable"
    if server.routes is not None:
        return None if endpoint.name in server.routes else "route not implemented"
    if f"{endpoint.method} {endpoint.route}" not in routes:
        return f"{endpoint.method} {endpoint.route} not in Surge's routes yet"
    return None


# --- services ---------------------------------------------------------------------------------


async def _db_check() -> dict[str, Any]:
    con = await asyncpg.connect(DATABASE_URL)
    try:
        users = await con.fetchval("SELECT count(*) FROM users")
        version = await con.fetchval("SHOW server_version")
        events = await con.fetchval("SELECT to_regclass($1) IS NOT NULL", EVENTS_TABLE)
        return {"users": users, "version": version, "events_table": events}
    finally:
        await con.close()


async def _truncate(tables: Sequence[str]) -> None:
    con = await asyncpg.connect(DATABASE_URL)
    try:
        for table in tables:
            if await con.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
                # Names come from ENDPOINTS, never from input; the database is the bench's.
                try:
                    await con.execute(f"TRUNCATE {table}")
                except asyncpg.PostgresError as exc:
                    _say(f"bench: could not truncate {table} ({exc}); rounds may differ")
    finally:
        await con.close()


def clear_redis(prefix: str = REDIS_KEY_PREFIX) -> int:
    """Surge's bench keys (user cache, limiter buckets): each start begins cold."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i : i + 500])
        return len(keys)
    finally:
        client.close()


# --- processes --------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in task.read_text().split())
            except OSError:
                continue
    return pids


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += _stat_seconds(Path(f"/proc/{pid}/stat").read_text())
        except OSError:
            continue
    return total


def rss_mb(pids: Sequence[int]) -> float:
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
                    break
        except OSError:
            continue
    return total_kb / 1024


def _stat_seconds(stat: str) -> float:
    # The command name may contain spaces and parentheses: split after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime + stime, all threads


_BENCH_DB = urlsplit(DATABASE_URL).path.lstrip("/")


def service_cpu_seconds() -> dict[int, float]:
    """CPU used so far, per pid, by the bench's share of PostgreSQL and Redis: the postmaster
    and its helpers, the backends connected to the bench database, and redis-server. Backends
    of other databases (tests running beside the bench) are left out: they are other load."""
    found: dict[int, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            if comm not in ("postgres", "redis-server"):
                continue
            if comm == "postgres":
                cmdline = (proc / "cmdline").read_text().replace("\0", " ")
                # Client backends are titled "postgres: [cluster:] user database host(port) ..."
                if "(" in cmdline and f" {_BENCH_DB} " not in cmdline:
                    continue
            found[int(proc.name)] = _stat_seconds((proc / "stat").read_text())
        except (OSError, ValueError):
            continue
    return found


def cpu_delta(before: Mapping[int, float], after: Mapping[int, float]) -> float:
    # Per pid, so a process that exits in between does not subtract its whole lifetime.
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def children_cpu_seconds() -> float:
    """CPU of finished child processes (wrk, once waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_jiffies() -> dict[str, tuple[int, int]]:
    """(busy, total) jiffies per CPU ("cpu0", "cpu1", ...) since boot."""
    out: dict[str, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        values = [int(v) for v in rest.split()]
        idle = values[3] + values[4]  # idle + iowait
        total = sum(values[:8])  # guest time is already inside user time
        out[name] = (total - idle, total)
    return out


def busy_share(
    before: Mapping[str, tuple[int, int]], after: Mapping[str, tuple[int, int]], cpu: str
) -> float:
    busy = after[cpu][0] - before[cpu][0]
    total = after[cpu][1] - before[cpu][1]
    return busy / total if total else 0.0


def wait_quiet(limit_s: float, threshold: float = 0.10, window_s: float = 2.0) -> float:
    """Wait (up to limit_s) for both cores to be nearly idle; return the last busy share seen.

    This machine is shared: a test suite running beside the bench halves every figure."""
    deadline = time.monotonic() + limit_s
    while True:
        before = cpu_jiffies()
        time.sleep(window_s)
        after = cpu_jiffies()
        worst = max(busy_share(before, after, c) for c in (f"cpu{SERVER_CPU}", f"cpu{CLIENT_CPU}"))
        if worst <= threshold or time.monotonic() >= deadline:
            return worst
        _say(f"bench: machine busy ({worst:.0%} of a core in use); waiting for it to quieten")


class RssSampler:
    """Samples the server's RSS while wrk runs: the peak, and the first and last samples."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss_mb(process_tree(self.pid)))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def start_server(
    server: Server, endpoint: Endpoint, log_name: str, stdout: Path | None = None
) -> subprocess.Popen[bytes]:
    """Starts `server` pinned to SERVER_CPU and waits for /healthz; its stdout (Surge's access
    log) goes to `stdout` when given, else to /dev/null."""
    env = {**os.environ, **server.env}
    if server.name == "surge":
        env.update(endpoint.surge_env)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / log_name
    with log_path.open("wb") as log, (stdout or Path(os.devnull)).open("wb") as out:
        # taskset execs the server, so the Popen pid is the server's own pid.
        proc = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, *server.argv],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=log,
        )
    deadline = time.monotonic() + 60
    url = f"http://127.0.0.1:{server.port}/healthz"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(
                f"{server.name} exited with {proc.returncode} while starting:\n"
                + log_path.read_text(errors="replace")[-3000:]
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return proc
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    stop_server(proc)
    raise BenchError(f"{server.name} did not answer {url} within 60 s (log: {log_path})")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def port_free(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=0.5):
            return False
    except urllib.error.HTTPError:
        return False
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return True


# --- load and verification --------------------------------------------------------------------


def run_wrk(endpoint: Endpoint, port: int, seconds: int) -> dict[str, Any]:
    cmd = [
        "taskset",
        "-c",
        CLIENT_CPU,
        "wrk",
        "-t1",
        f"-c{CONNECTIONS}",
        f"-d{seconds}s",
        "--latency",
        # Long enough that a stall is measured as latency, not dropped as a timeout.
        "--timeout",
        "10s",
        "-s",
        str((WRK_DIR / endpoint.script).relative_to(ROOT)),
        f"http://127.0.0.1:{port}/",
        "--",
        str(TARGETS_TSV.relative_to(ROOT)),
        str(EVENTS_TSV.relative_to(ROOT)),
    ]
    out = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            return result
    raise BenchError(f"wrk gave no result (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")


def run_verify(endpoint: Endpoint, port: int, seconds: float, each: bool = False) -> dict[str, Any]:
    cmd = [
        "taskset",
        "-c",
        CLIENT_CPU,
        PY,
        "-m",
        "bench.verify",
        "--url",
        f"http://127.0.0.1:{port}",
        "--check",
        endpoint.check,
        "--method",
        endpoint.method,
        "--path",
        endpoint.path,
        "--expect",
        str(endpoint.expect),
        "--targets",
        str(TARGETS_JSON),
        "--seconds",
        str(seconds),
        "--concurrency",
        str(CONNECTIONS),
        *(["--each"] if each else []),
    ]
    out = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if out.returncode != 0:
        raise BenchError(f"verify failed to run:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    result["passed"] = result["requests"] > 0 and result["ok"] == result["requests"]
    return result


PRIME_MAX_S = 60.0


def cache_counts(port: int) -> dict[str, float]:
    """Surge's surge_user_cache_total by result, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.findall(r'^surge_user_cache_total\{result="(\w+)"\} (\S+)$', text, re.M)
    return {result: float(value) for result, value in found}


def hit_ratio(before: Mapping[str, float], after: Mapping[str, float]) -> float | None:
    hits = after.get("hit", 0) - before.get("hit", 0)
    misses = after.get("miss", 0) - before.get("miss", 0)
    return round(hits / (hits + misses), 4) if hits + misses else None


def measure(
    server: Server, endpoint: Endpoint, proc: subprocess.Popen[bytes], seconds: int
) -> dict[str, Any]:
    pids = process_tree(proc.pid)
    cpu_before = cpu_seconds(pids)
    services_before = service_cpu_seconds()
    children_before = children_cpu_seconds()
    jiffies_before = cpu_jiffies()
    wall_before = time.monotonic()
    with RssSampler(proc.pid) as rss:
        wrk = run_wrk(endpoint, server.port, seconds)
    wall = time.monotonic() - wall_before
    cpu = cpu_seconds(process_tree(proc.pid)) - cpu_before
    jiffies_after = cpu_jiffies()
    services = cpu_delta(services_before, service_cpu_seconds())
    wrk_cpu = children_cpu_seconds() - children_before
    server_core = busy_share(jiffies_before, jiffies_after, f"cpu{SERVER_CPU}")
    client_core = busy_share(jiffies_before, jiffies_after, f"cpu{CLIENT_CPU}")
    # Everything busy on the two cores that is neither the server, wrk, nor the bench's
    # PostgreSQL and Redis: other jobs on this shared machine (and, in a VM, stolen time).
    other = (server_core + client_core) * wall - cpu - wrk_cpu - services
    if proc.poll() is not None:
        raise BenchError(f"{server.name} died during the measured run")
    requests = wrk["requests"]
    duration_s = wrk["duration_us"] / 1e6
    rps = requests / duration_s if duration_s else 0.0
    lat = wrk["latency_us"]
    errors = wrk["errors"]
    row: dict[str, Any] = {
        "requests": requests,
        "duration_s": round(duration_s, 3),
        "rps": round(rps, 1),
        "p50_ms": lat["p50"] / 1000,
        "p75_ms": lat["p75"] / 1000,
        "p90_ms": lat["p90"] / 1000,
        "p99_ms": lat["p99"] / 1000,
        "p999_ms": lat["p999"] / 1000,
        "max_ms": lat["max"] / 1000,
        "mean_ms": round(lat["mean"] / 1000, 3),
        # Little's law: with a closed loop of N connections, mean latency = N / throughput.
        "mean_little_ms": round(CONNECTIONS / rps * 1000, 3) if rps else None,
        "cpu_us_per_req": round(cpu * 1e6 / requests, 1) if requests else None,
        # Near 1.0: the server's core was the bottleneck; well below: it waited on something.
        "cpu_busy": round(cpu / wall, 3) if wall else None,
        "db_cpu_us_per_req": round(services * 1e6 / requests, 1) if requests else None,
        "wrk_cpu_busy": round(wrk_cpu / wall, 3) if wall else None,
        # In cores: a round with much of it was measured on a contended machine.
        "other_load": round(max(other / wall, 0.0), 3) if wall else None,
        "server_core_busy": round(server_core, 3),
        "client_core_busy": round(client_core, 3),
        "rss_start_mb": round(rss.samples[0], 1) if rss.samples else None,
        "rss_peak_mb": round(max(rss.samples), 1) if rss.samples else None,
        "rss_end_mb": round(rss.samples[-1], 1) if rss.samples else None,
        "errors": errors,
        "error_count": sum(errors.values()),
    }
    if endpoint.events_per_request:
        row["events_per_s"] = round(rps * endpoint.events_per_request, 1)
    return row


# --- aggregation ------------------------------------------------------------------------------

MEDIAN_FIELDS = (
    "rps",
    "p50_ms",
    "p75_ms",
    "p90_ms",
    "p99_ms",
    "p999_ms",
    "mean_ms",
    "mean_little_ms",
    "cpu_us_per_req",
    "cpu_busy",
    "db_cpu_us_per_req",
    "wrk_cpu_busy",
    "other_load",
    "server_core_busy",
    "client_core_busy",
    "rss_peak_mb",
    "events_per_s",
)


def medians(rounds: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rounds:
        groups.setdefault((r["endpoint"], r["server"]), []).append(r)
    for (ep, srv), rows in groups.items():
        agg: dict[str, Any] = {"rounds": len(rows)}
        for f in MEDIAN_FIELDS:
            values = [r[f] for r in rows if r.get(f) is not None]
            if values:
                agg[f] = round(statistics.median(values), 3)
        agg["rps_min"] = min(r["rps"] for r in rows)
        agg["rps_max"] = max(r["rps"] for r in rows)
        agg["rss_max_mb"] = max(r["rss_peak_mb"] or 0 for r in rows)
        agg["error_count"] = sum(r["error_count"] for r in rows)
        out.setdefault(ep, {})[srv] = agg
    return out


def ratios(
    med: Mapping[str, Mapping[str, Mapping[str, Any]]], endpoints: Sequence[Endpoint]
) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for ep in endpoints:
        surge = med.get(ep.name, {}).get("surge", {}).get("rps")
        base = med.get(ep.compare_with or ep.name, {})
        row: dict[str, float | None] = {}
        for other in ("baseline", "fastapi", "go"):
            theirs = base.get(other, {}).get("rps")
            row[f"surge/{other}"] = round(surge / theirs, 3) if surge and theirs else None
        out[ep.name] = row
    return out


def budgets(
    med: Mapping[str, Mapping[str, Mapping[str, Any]]],
    rat: Mapping[str, Mapping[str, float | None]],
    endpoints: Sequence[Endpoint],
) -> list[dict[str, Any]]:
    """The figures issue 4 and ARCHITECTURE.md set, each with what this run measured."""

    def ratio(ep: str, key: str) -> float | None:
        return rat.get(ep, {}).get(key)

    def surge(ep: str, f: str) -> float | None:
        value = med.get(ep, {}).get("surge", {}).get(f)
        return None if value is None else float(value)

    rows: list[dict[str, Any]] = [
        {"budget": "user by id, cache off: ≥ 0.80× baseline", "target": 0.80, "op": ">=",
         "value": ratio("user", "surge/baseline"), "unit": "×"},
        {"budget": "user by id, cache off: ≥ 5× FastAPI", "target": 5.0, "op": ">=",
         "value": ratio("user", "surge/fastapi"), "unit": "×"},
        {"budget": "user by id, cache on: ≥ 1.3× baseline uncached", "target": 1.3, "op": ">=",
         "value": ratio("user_cached", "surge/baseline"), "unit": "×"},
        {"budget": "page of 50 users: ≥ 0.80× baseline", "target": 0.80, "op": ">=",
         "value": ratio("users_page", "surge/baseline"), "unit": "×"},
        {"budget": "/healthz: ≥ 0.80× baseline", "target": 0.80, "op": ">=",
         "value": ratio("healthz", "surge/baseline"), "unit": "×"},
    ]  # fmt: skip
    for ep in endpoints:
        if ep.read:
            rows.append(
                {"budget": f"{ep.title}: p99 ≤ 25 ms", "target": 25.0, "op": "<=",
                 "value": surge(ep.name, "p99_ms"), "unit": "ms"}
            )  # fmt: skip
    rows.append(
        {"budget": "events: ≥ 100,000 events/s per core", "target": 100_000.0, "op": ">=",
         "value": surge("events", "events_per_s"), "unit": "events/s"}
    )  # fmt: skip
    peaks = [v.get("rss_max_mb") for v in (e.get("surge", {}) for e in med.values()) if v]
    rows.append(
        {"budget": "RSS ≤ 100 MB per worker (peak)", "target": 100.0, "op": "<=",
         "value": max(p for p in peaks if p is not None) if peaks else None, "unit": "MB"}
    )  # fmt: skip
    for row in rows:
        v = row["value"]
        if v is None:
            row["met"] = None
        else:
            row["met"] = v >= row["target"] if row["op"] == ">=" else v <= row["target"]
    return rows


# --- the machine ------------------------------------------------------------------------------


def machine(db: Mapping[str, Any]) -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        redis_version = str(client.info("server").get("redis_version"))
    finally:
        client.close()
    packages = (
        "aiohttp",
        "uvloop",
        "asyncpg",
        "orjson",
        "redis",
        "pyjwt",
        "fastapi",
        "uvicorn",
        "sqlalchemy",
        "pydantic",
        "httptools",
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": db["version"],
        "redis": redis_version,
        "wrk": (wrk_v.stdout or wrk_v.stderr).splitlines()[0].strip(),
        "packages": {p: version(p) for p in packages},
        "uvicorn_http": "httptools" if version("httptools") else "h11",
    }


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Settings:
    rounds: int
    warmup_s: int
    duration_s: int
    verify_s: float
    quick: bool


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt_row(row: Mapping[str, Any]) -> str:
    return (
        f"{row['rps']:>9,.0f} rps  p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:8.2f} ms  "
        f"cpu {row['cpu_us_per_req'] or 0:6.0f} µs/req  rss {row['rss_peak_mb'] or 0:5.1f} MB"
        + (f"  ERRORS {row['errors']}" if row["error_count"] else "")
        + (
            f"  cache hits {row['cache_hit_ratio']:.1%}"
            if row.get("cache_hit_ratio") is not None
            else ""
        )
    )


def execute(
    settings: Settings,
    servers: Sequence[Server],
    endpoints: Sequence[Endpoint],
    routes: set[str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    rounds: list[dict[str, Any]] = []
    verifications: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    failures: list[str] = []
    for ep in endpoints:
        runnable = []
        for srv in servers:
            reason = unsupported(srv, ep, routes)
            if reason is None:
                runnable.append(srv)
            elif reason != "not applicable":
                skipped.append({"endpoint": ep.name, "server": srv.name, "reason": reason})
                _say(f"[{ep.name}] {srv.name}: skipped ({reason})")
        for r in range(settings.rounds):
            for order, srv in enumerate(runnable):
                tag = f"[{ep.name} r{r + 1}/{settings.rounds}] {srv.name:<16}"
                if ep.truncate:
                    asyncio.run(_truncate(ep.truncate))
                if srv.name == "surge":
                    clear_redis()
                try:
                    proc = start_server(srv, ep, f"{srv.name}.{ep.name}.r{r + 1}.log")
                except BenchError as exc:
                    failures.append(f"{ep.name}/{srv.name}: {exc}")
                    _say(f"{tag} FAILED TO START: {exc}")
                    continue
                try:
                    if r == 0:
                        v = run_verify(ep, srv.port, settings.verify_s)
                        v.update(endpoint=ep.name, server=srv.name)
                        verifications.append(v)
                        status = "ok" if v["passed"] else "FAILED"
                        _say(f"{tag} verify {status}: {v['ok']}/{v['requests']} {v['statuses']}")
                        if not v["passed"]:
                            failures.append(
                                f"{ep.name}/{srv.name}: verification failed: "
                                f"{v['mismatches']} mismatches, {v['shape_errors']} shape "
                                f"errors, {v['transport_errors']} transport errors, statuses "
                                f"{v['statuses']}; e.g. {v['examples'][:2]}"
                            )
                    primed = ep.prime and srv.name == "surge"
                    if primed:
                        v = run_verify(ep, srv.port, PRIME_MAX_S, each=True)
                        if not v["passed"]:
                            raise BenchError(f"priming failed: {v['statuses']} {v['examples'][:2]}")
                    run_wrk(ep, srv.port, settings.warmup_s)
                    hits = cache_counts(srv.port) if primed else None
                    row = measure(srv, ep, proc, settings.duration_s)
                    if hits is not None:
                        row["cache_hit_ratio"] = hit_ratio(hits, cache_counts(srv.port))
                except BenchError as exc:
                    failures.append(f"{ep.name}/{srv.name} round {r + 1}: {exc}")
                    _say(f"{tag} FAILED: {exc}")
                    continue
                finally:
                    stop_server(proc)
                row.update(endpoint=ep.name, server=srv.name, round=r + 1, order=order)
                rounds.append(row)
                if row["error_count"]:
                    failures.append(
                        f"{ep.name}/{srv.name} round {r + 1}: wrk saw errors {row['errors']}"
                    )
                _say(f"{tag} {_fmt_row(row)}")
    return rounds, verifications, skipped, failures


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 round, 2 s warm-up, 5 s measured")
    parser.add_argument("--servers", default="surge,baseline,fastapi,go")
    parser.add_argument("--endpoints", default=",".join(e.name for e in ENDPOINTS))
    parser.add_argument("--rounds", type=int, help="default 3 (1 with --quick)")
    parser.add_argument("--duration", type=int, help="measured seconds: 10 (5 with --quick)")
    parser.add_argument("--warmup", type=int, help="warm-up seconds: 3 (2 with --quick)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to this long for both cores to be idle (shared machines)",
    )
    parser.add_argument(
        "--no-report", action="store_true", help="write the results JSON only, not docs/"
    )
    args = parser.parse_args(argv)
    settings = Settings(
        rounds=args.rounds or (1 if args.quick else 3),
        warmup_s=args.warmup or (2 if args.quick else 3),
        duration_s=args.duration or (5 if args.quick else 10),
        verify_s=2.0,
        quick=args.quick,
    )
    secret = secrets.token_urlsafe(30)  # 40 characters; new every run
    all_servers = make_servers(secret)
    by_name = {e.name: e for e in ENDPOINTS}
    try:
        servers = [all_servers[s] for s in args.servers.split(",") if s]
        endpoints = [by_name[e] for e in args.endpoints.split(",") if e]
    except KeyError as exc:
        parser.error(
            f"unknown name {exc}; servers: {', '.join(all_servers)}; "
            f"endpoints: {', '.join(by_name)}"
        )

    go_skipped: str | None = None
    try:
        for tool in ("wrk", "taskset"):
            if shutil.which(tool) is None:
                raise BenchError(f"{tool} is not installed (Debian: apt-get install {tool})")
        db = asyncio.run(_db_check())
        if not db["users"] or not db["events_table"] or not IDS_FILE.exists():
            raise BenchError("the bench database is empty: run `python -m bench.seed` first")
        busy = [s.name for s in servers if not port_free(s.port)]
        if busy:
            raise BenchError(f"ports already in use for {busy}: is another bench running?")
        if any(s.name == "go" for s in servers):
            reason = build_go()
            if reason is not None:
                _say(f"bench: the Go peer is skipped: {reason}")
                servers = [s for s in servers if s.name != "go"]
                go_skipped = reason
        users = write_targets(secret)
        routes = surge_routes() if any(s.routes is None for s in servers) else set()
    except BenchError as exc:
        _say(f"bench: {exc}")
        return 2

    idle_check = wait_quiet(args.wait_quiet)
    if idle_check > 0.10:
        _say(
            f"bench: WARNING: {idle_check:.0%} of a core was busy before the run: other work on "
            "this machine will lower and scatter the figures"
        )
    started = datetime.now(UTC)
    _say(
        f"bench: {settings.rounds} round(s), {settings.warmup_s} s warm-up + "
        f"{settings.duration_s} s measured, {CONNECTIONS} connections, {users} users with tokens"
    )
    rounds, verifications, skipped, failures = execute(settings, servers, endpoints, routes)
    if go_skipped is not None:
        skipped.append({"endpoint": "all", "server": "go", "reason": go_skipped})
    med = medians(rounds)
    rat = ratios(med, endpoints)
    results = {
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.run", *argv]).strip(),
        "settings": asdict(settings)
        | {
            "connections": CONNECTIONS,
            "wrk_threads": 1,
            "pool_size": POOL_SIZE,
            "server_cpu": SERVER_CPU,
            "client_cpu": CLIENT_CPU,
            "users_sampled": users,
            "busy_before_run": round(idle_check, 3),
            "dataset": json.loads(IDS_FILE.read_text()) | {"pairs": None},
        },
        "machine": machine(db),
        "servers": {
            s.name: {
                "title": s.title,
                "argv": [
                    "taskset",
                    "-c",
                    SERVER_CPU,
                    "python" if s.argv[0] == PY else Path(s.argv[0]).name,
                    *s.argv[1:],
                ],
                "env": {k: ("<random>" if k == "JWT_KEYS" else v) for k, v in s.env.items()},
            }
            for s in servers
        },
        "endpoints": [
            {k: v for k, v in asdict(e).items() if k not in ("surge_env",)}
            | {"surge_env": dict(e.surge_env)}
            for e in endpoints
        ],
        "rounds": rounds,
        "verification": verifications,
        "skipped": skipped,
        "medians": med,
        "ratios": rat,
        "budgets": budgets(med, rat, endpoints),
        "failures": failures,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    tmp.rename(path)
    _say(f"bench: results in {path.relative_to(ROOT)}")

    if failures:
        _say("\n" + "!" * 78 + "\nBENCH FAILED: docs/PERFORMANCE.md was not regenerated\n")
        for f in failures:
            _say(f"  - {f}")
        _say("!" * 78)
        return 1
    if not args.no_report:
        from bench.report import generate

        written = generate(results, path)
        _say("bench: wrote " + ", ".join(str(p.relative_to(ROOT)) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

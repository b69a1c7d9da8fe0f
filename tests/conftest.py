"""Test services: real PostgreSQL and Redis, never mocks.

PostgreSQL: DATABASE_URL if set, else the one at 127.0.0.1:5432 (CI's, database `test`) when
reachable, else an embedded one under .surge/test. Redis likewise (REDIS_URL, 127.0.0.1:6379,
embedded). Nothing is skipped when a service is missing: the embedded one starts instead.

Isolation: the session gets its own database (created, migrated, dropped at the end) and its
own Redis key prefix; every test that touches them starts from empty tables and no keys.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis as sync_redis
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from bench.cluster import ClusterError, find_program
from db.migrate import migrate
from db.pool import Database, open_database
from server.config import Config
from server.devservices import EmbeddedServices, tcp_reachable
from server.encoding import BODY_AS_SENT
from server.runner import free_port

from .json_logs import assert_json_log

ROOT = Path(__file__).resolve().parent.parent
TEST_JWT_KEYS = "k2:" + "t" * 40 + ",k1:" + "o" * 40


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Until `predicate()` holds, checked every 10 ms for up to 5 s; then it must hold."""
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    assert predicate()


def debian_program(name: str) -> str:
    """The path of `name`, from Debian's package of that name (`.ci/run` and `make cluster`
    install haproxy and pgbouncer): without it the test fails under CI and skips elsewhere."""
    try:
        return find_program(name, name)
    except ClusterError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc}: CI must provide it (.ci/run installs it)")
        pytest.skip(str(exc))


# A test (with its fixtures' teardown) that runs longer than this is hung: the watchdog prints
# every asyncio task's stack and every thread's, then fails the test instead of hanging CI.
HANG_S = float(os.environ.get("SURGE_TEST_HANG_S", "120"))


def _dump_tasks() -> None:
    out = sys.__stderr__ or sys.stderr
    for obj in gc.get_objects():
        if isinstance(obj, asyncio.AbstractEventLoop) and not obj.is_closed():
            for task in asyncio.all_tasks(obj):
                print(f"--- {task!r}", file=out)
                task.print_stack(file=out)
    faulthandler.dump_traceback(file=out, all_threads=True)


@pytest.fixture(autouse=True)
def _hang_watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    def on_alarm(signum: int, frame: FrameType | None) -> None:
        _dump_tasks()
        raise TimeoutError(f"{request.node.nodeid} hung for {HANG_S:.0f} s (task dump on stderr)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass(frozen=True)
class Services:
    admin_dsn: str  # a database to connect to for CREATE/DROP DATABASE
    dsn: str  # this session's own database
    redis_url: str
    redis_prefix: str


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


async def _create_database(admin_dsn: str, name: str) -> None:
    con = await asyncpg.connect(admin_dsn)
    try:
        await con.execute(f'CREATE DATABASE "{name}"')
    finally:
        await con.close()


async def _drop_database(admin_dsn: str, name: str) -> None:
    con = await asyncpg.connect(admin_dsn)
    try:
        await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await con.close()


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    embedded = EmbeddedServices(ROOT / ".surge" / "test")
    try:
        admin = os.environ.get("DATABASE_URL")
        if not admin:
            if tcp_reachable("127.0.0.1", 5432):
                admin = "postgresql://postgres@127.0.0.1:5432/test"
            else:
                admin = embedded.start_postgres()
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            if tcp_reachable("127.0.0.1", 6379):
                redis_url = "redis://127.0.0.1:6379/0"
            else:
                redis_url = embedded.start_redis()
        name = f"surge_test_{os.getpid()}_{secrets.token_hex(3)}"
        asyncio.run(_create_database(admin, name))
        dsn = with_database(admin, name)
        asyncio.run(migrate(dsn))
        try:
            yield Services(admin, dsn, redis_url, f"surgetest:{name}:")
        finally:
            asyncio.run(_drop_database(admin, name))
            r = sync_redis.Redis.from_url(redis_url)
            for key in r.scan_iter(match=f"surgetest:{name}:*", count=1000):
                r.delete(key)
            r.close()
    finally:
        embedded.stop()


async def _truncate(dsn: str) -> None:
    con = await asyncpg.connect(dsn)
    try:
        tables = await con.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename <> 'schema_migrations'"
        )
        if tables:
            names = ", ".join(f'"{t["tablename"]}"' for t in tables)
            await con.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    finally:
        await con.close()


@pytest.fixture
def clean(services: Services) -> Services:
    """Empty tables and no Redis keys under this session's prefix."""
    asyncio.run(_truncate(services.dsn))
    r = sync_redis.Redis.from_url(services.redis_url)
    try:
        keys = list(r.scan_iter(match=services.redis_prefix + "*", count=1000))
        if keys:
            r.delete(*keys)
    finally:
        r.close()
    return services


@pytest.fixture
def config(clean: Services) -> Config:
    return Config(
        database_url=clean.dsn,
        redis_url=clean.redis_url,
        redis_key_prefix=clean.redis_prefix,
        access_log=False,
        jwt_keys=TEST_JWT_KEYS,
        pg_pool_min=1,
        pg_pool_max=8,
        # generous limits: tests that exercise limiting set their own
        rate_limit_rate=10_000,
        rate_limit_burst=10_000,
        auth_rate_limit_per_minute=10_000,
        # the fixed gate (MAX_IN_FLIGHT=512): a test's burst of requests measures what the
        # test names, not admission, which tests/test_admission.py exercises on its own
        adaptive_concurrency=False,
        # hashing at OWASP cost is slow; tests of the hash itself use the real parameters
        hash_concurrency=2,
        shutdown_grace_s=3,
    )


def configured(config: Config, **changes: object) -> Config:
    return replace(config, **changes)  # type: ignore[arg-type]


def server_env(services: Services, port: int, **overrides: str) -> dict[str, str]:
    """The environment of a real `python -m server serve` subprocess on this session's services."""
    return {
        **os.environ,
        "DATABASE_URL": services.dsn,
        "REDIS_URL": services.redis_url,
        "REDIS_KEY_PREFIX": services.redis_prefix,
        "PORT": str(port),
        "JWT_KEYS": TEST_JWT_KEYS,
        "WORKERS": "1",  # today's single process; tests of the supervisor ask for more
        **overrides,
    }


@pytest.fixture
async def pg(config: Config) -> AsyncIterator[Database]:
    """A small pool of the test database, for tests that call the db/ functions directly."""
    assert config.database_url is not None
    db = await open_database(
        config.database_url, min_size=1, max_size=6, acquire_timeout=5, command_timeout=10
    )
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
async def redis(config: Config) -> AsyncIterator[Redis]:
    """A client of the test Redis (keys under config.redis_key_prefix)."""
    client = Redis.from_url(config.redis_url or "")
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def provider_url() -> Iterator[str]:
    """The fake payment provider as its own process, as a deployment would see a real one."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.fake_provider", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "PAYMENTS_API_KEY": "lt_key", "PAYMENTS_WEBHOOK_SECRET": "lt_secret"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not tcp_reachable("127.0.0.1", port, timeout=0.2):
            assert proc.poll() is None and time.monotonic() < deadline, "fake provider died"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def server_url(clean: Services, provider_url: str, tmp_path: Path) -> Iterator[str]:
    """A real `python -m server serve` on this session's services and the fake provider, with
    limits no test client reaches (every client is 127.0.0.1). At teardown every line it wrote
    to stderr must be a JSON log line (tests/json_logs.py)."""
    port = free_port()
    env = server_env(
        clean,
        port,
        ACCESS_LOG="false",
        PAYMENTS_URL=provider_url,
        PAYMENTS_API_KEY="lt_key",
        PAYMENTS_WEBHOOK_SECRET="lt_secret",
        AUTH_RATE_LIMIT_PER_MINUTE="100000",
        RATE_LIMIT_RATE="100000",
        RATE_LIMIT_BURST="100000",
    )
    log = tmp_path / "server.stderr"
    with log.open("wb") as stderr:  # a file, not a pipe nobody drains while the test runs
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
    assert_json_log(log.read_text(errors="replace"), str(log))


@pytest.fixture
def aiohttp_client(aiohttp_client: Any) -> Callable[..., Awaitable[Any]]:
    """pytest-aiohttp's, its test server reading bodies as the real one does: as sent, never
    decompressed by aiohttp (server/encoding.py). (A TestServer drops the handler arguments
    given to its constructor: they go to its start_server.)"""

    async def go(app: Any, *, server_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        if isinstance(app, web.Application):
            server = TestServer(app, **(server_kwargs or {}))
            await server.start_server(**BODY_AS_SENT)
            app = server
        return await aiohttp_client(app, **kwargs)

    return go

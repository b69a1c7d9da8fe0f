"""Read replicas against a real streaming replica (bench/pgreplica.py: initdb, pg_basebackup -R).

Which server answered a read is told by the data, not by a counter: with the replica's replay
paused, a product renamed directly on the primary (a write nobody records) reads back with its
old name from the replica and its new name from the primary (`answered_by`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis as sync_redis
from aiohttp import web
from aiohttp.test_utils import TestClient

import handlers
from bench.fake_provider import FakeProvider
from bench.pgreplica import ReplicaError, Replicated, read_urls
from db.migrate import migrate
from server import metrics
from server.app import create_app
from server.config import Config
from server.replica import READS
from server.runner import free_port

from .conftest import ROOT
from .helpers import Actor, signup
from .test_prometheus import run, tool

RULES = ROOT / "deploy" / "prometheus" / "rules" / "replica.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "tests" / "replica.test.yml"
API_KEY, SECRET = "replica_provider_key", "whsec_replica"


# --- the pair, the app, and how to tell who answered ------------------------------------------


@contextlib.contextmanager
def pair_dir() -> Iterator[Path]:
    """A directory for a pair, outside pytest's tmp: a pytest starting elsewhere on the machine
    makes /tmp/pytest-of-root owner-only again, and the servers run as another user."""
    base = Path(tempfile.mkdtemp(prefix="surge-pgreplica-"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def pair() -> Iterator[Replicated]:
    """One primary + streaming replica for the module (~3 s to make), migrated."""
    with pair_dir() as base:
        try:
            rp = Replicated(base).start()
        except ReplicaError as exc:  # never skipped: the pair is what these tests are about
            pytest.fail(f"could not start a primary and a streaming replica: {exc}")
        try:
            asyncio.run(migrate(rp.primary_url))
            rp.wait_caught_up()
            yield rp
        finally:
            rp.stop()


async def _truncate(dsn: str) -> None:
    con = await asyncpg.connect(dsn)
    try:
        tables = await con.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename <> 'schema_migrations'"
        )
        names = ", ".join(f'"{t["tablename"]}"' for t in tables)
        await con.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    finally:
        await con.close()


@pytest.fixture
def rp(pair: Replicated) -> Iterator[Replicated]:
    """The pair replaying at once, with empty tables on both."""
    pair.start_replica()  # a test may have stopped it
    pair.resume_replay()
    pair.delay_replay(0)
    asyncio.run(_truncate(pair.primary_url))
    pair.wait_caught_up()
    yield pair
    pair.start_replica()
    pair.resume_replay()


@pytest.fixture
def rconfig(config: Config, rp: Replicated) -> Config:
    return dataclasses.replace(
        config,
        database_url=rp.primary_url,
        database_read_url=rp.replica_url,
        user_cache_ttl_s=0,  # every read reaches the database, where the routing is
        replica_poll_ms=20,
    )


@pytest.fixture
async def primary(rp: Replicated) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the primary for writes behind the app's back."""
    con = await asyncpg.connect(rp.primary_url)
    yield con
    await con.close()


async def caught_up(app: web.Application, rp: Replicated, primary: asyncpg.Connection) -> None:
    """Until the app's poller has seen the replica replay everything written so far."""
    target = await primary.fetchval("SELECT (pg_current_wal_insert_lsn() - '0/0')::int8")
    reads = app[READS]
    deadline = time.monotonic() + 20
    nudged = time.monotonic()
    while not (reads.state == "ok" and reads.replay_lsn >= target):
        assert time.monotonic() < deadline, (
            f"replica {reads.state} at {reads.replay_lsn} < {target}"
        )
        if time.monotonic() - nudged > 0.5:
            # The insert position can sit past a page header until the next record anywhere.
            await primary.execute("SELECT txid_current()")
            nudged = time.monotonic()
        await asyncio.sleep(0.01)


async def product(client: TestClient, admin: Actor, name: str = "Widget") -> str:
    resp = await client.post(
        "/v1/products",
        json={"sku": f"sku-{uuid.uuid4()}", "name": name, "price_cents": 1250,
              "currency": "EUR", "stock": 10},
        headers=admin.headers,
    )  # fmt: skip
    assert resp.status == 201, await resp.text()
    product_id: str = (await resp.json())["id"]
    return product_id


async def answered_by(
    client: TestClient, actor: Actor, product_id: str, primary: asyncpg.Connection
) -> str:
    """'replica' or 'primary'. With replay paused: rename the product on the primary behind
    the app's back (recorded nowhere), read it through the API, and see which name comes back."""
    marker = f"primary-{uuid.uuid4().hex[:8]}"
    await primary.execute(
        "UPDATE products SET name = $3 WHERE tenant_id = $1 AND id = $2",
        uuid.UUID(actor.tenant_id),
        uuid.UUID(product_id),
        marker,
    )
    resp = await client.get(f"/v1/products/{product_id}", headers=actor.headers)
    assert resp.status == 200, await resp.text()
    return "primary" if (await resp.json())["name"] == marker else "replica"


def routed(server: str, reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "surge_replica_reads_total", {"server": server, "reason": reason}
    )
    return value or 0.0


async def readyz(client: TestClient) -> tuple[int, dict[str, Any]]:
    resp = await client.get("/readyz")
    return resp.status, await resp.json()


async def wait_state(app: web.Application, state: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while app[READS].state != state:
        assert time.monotonic() < deadline, f"replica still {app[READS].state}, not {state}"
        await asyncio.sleep(0.01)


async def in_thread(fn: Any, *args: Any) -> Any:
    """A blocking pgreplica call (psql, pg_ctl) without stalling the app under test."""
    return await asyncio.to_thread(fn, *args)


# --- routing ----------------------------------------------------------------------------------


async def test_reads_of_a_tenant_the_replica_has_caught_up_with_go_to_the_replica(
    aiohttp_client: Any, rconfig: Config, rp: Replicated, primary: asyncpg.Connection
) -> None:
    app = create_app(rconfig)
    client = await aiohttp_client(app)
    owner = await signup(client)
    pid = await product(client, owner)
    await caught_up(app, rp, primary)
    fresh = routed("replica", "fresh")
    await in_thread(rp.pause_replay)
    try:
        assert await answered_by(client, owner, pid, primary) == "replica"
        assert await answered_by(client, owner, pid, primary) == "replica"
    finally:
        await in_thread(rp.resume_replay)
    assert routed("replica", "fresh") == fresh + 2


async def test_after_its_own_write_a_tenant_reads_from_the_primary_until_the_replica_has_it(
    aiohttp_client: Any, rconfig: Config, rp: Replicated, primary: asyncpg.Connection
) -> None:
    app = create_app(rconfig)
    client = await aiohttp_client(app)
    writer, other = await signup(client, "Writer"), await signup(client, "Other")
    old = await product(client, writer)
    others = await product(client, other)
    await caught_up(app, rp, primary)
    await in_thread(rp.pause_replay)
    try:
        # The write goes through the API; the replica, paused, has not replayed it.
        new = await product(client, writer, "Brand new")
        behind = routed("primary", "behind")
        resp = await client.get(f"/v1/products/{new}", headers=writer.headers)
        assert resp.status == 200, "read from the replica, which does not have it yet"
        assert (await resp.json())["name"] == "Brand new"
        etag = resp.headers["ETag"]
        # The list shows it too, and every read of the writer's tenant goes to the primary.
        resp = await client.get("/v1/products", headers=writer.headers)
        assert new in [p["id"] for p in (await resp.json())["items"]]
        assert await answered_by(client, writer, old, primary) == "primary"
        assert routed("primary", "behind") >= behind + 3
        # A tenant that wrote nothing since the replica caught up still reads from the replica.
        assert await answered_by(client, other, others, primary) == "replica"
    finally:
        await in_thread(rp.resume_replay)
    # Replayed: the writer's reads go back to the replica (paused again to tell).
    await caught_up(app, rp, primary)
    await in_thread(rp.pause_replay)
    try:
        resp = await client.get(f"/v1/products/{new}", headers=writer.headers)
        assert resp.status == 200 and resp.headers["ETag"] == etag
        assert await answered_by(client, writer, old, primary) == "replica"
    finally:
        await in_thread(rp.resume_replay)


async def test_a_write_recorded_by_one_process_steers_the_reads_of_another(
    aiohttp_client: Any, rconfig: Config, rp: Replicated, primary: asyncpg.Connection
) -> None:
    """The last-write LSN lives in Redis: a second app (another worker or instance) that never
    saw the write still sends the tenant's reads to the primary."""
    first, second = create_app(rconfig), create_app(rconfig)
    client, client2 = await aiohttp_client(first), await aiohttp_client(second)
    owner = await signup(client)
    old = await product(client, owner)
    await caught_up(second, rp, primary)
    await in_thread(rp.pause_replay)
    try:
        assert await answered_by(client2, owner, old, primary) == "replica"
        new = await product(client, owner, "Written by the first")
        resp = await client2.get(f"/v1/products/{new}", headers=owner.headers)
        assert resp.status == 200, "the second process read a replica that lacks the write"
        assert await answered_by(client2, owner, old, primary) == "primary"
    finally:
        await in_thread(rp.resume_replay)


@pytest.fixture
async def provider() -> AsyncIterator[FakeProvider]:
    fake = FakeProvider(api_key=API_KEY, webhook_secret=SECRET)
    fake.base_url = await fake.start()  # type: ignore[attr-defined]
    try:
        yield fake
    finally:
        await fake.close()


async def test_an_order_being_paid_never_reads_older_than_what_was_shown(
    aiohttp_client: Any,
    rconfig: Config,
    rp: Replicated,
    primary: asyncpg.Connection,
    provider: FakeProvider,
) -> None:
    """/pay, then the saga and the provider's webhooks settle the order in several commits,
    while the replica applies each commit 150 ms late: the client polling its order sees its
    version and status only move forward, from the primary while the replica is behind and
    from the replica once it has caught up."""
    cfg = dataclasses.replace(
        rconfig,
        payments_url=provider.base_url,  # type: ignore[attr-defined]
        payments_api_key=API_KEY,
        payments_webhook_secret=SECRET,
        payments_timeout_s=2.0,
        payments_backoff_ms=5,
    )
    app = create_app(cfg)
    client = await aiohttp_client(app)
    provider.webhook_url = str(client.make_url("/v1/webhooks/payments"))
    owner = await signup(client)
    pid = await product(client, owner)
    resp = await client.post(
        "/v1/orders", json={"items": [{"product_id": pid, "quantity": 2}]}, headers=owner.headers
    )
    assert resp.status == 201, await resp.text()
    order_id = (await resp.json())["id"]
    await caught_up(app, rp, primary)
    await in_thread(rp.delay_replay, 150)
    fresh, behind = routed("replica", "fresh"), routed("primary", "behind")
    try:
        resp = await client.post(
            f"/v1/orders/{order_id}/pay", json={"payment_method": "pm_card_visa"},
            headers=owner.headers,
        )  # fmt: skip
        assert resp.status == 202, await resp.text()
        seen: list[tuple[int, str, str | None]] = []
        paid_at = None
        deadline = time.monotonic() + 20
        # Until 1 s after it is paid: by then the replica has replayed it and answers again.
        while paid_at is None or time.monotonic() < paid_at + 1.0:
            assert time.monotonic() < deadline, f"not paid: {seen[-1:]}"
            resp = await client.get(f"/v1/orders/{order_id}", headers=owner.headers)
            assert resp.status == 200
            body = await resp.json()
            assert resp.headers["ETag"] == f'"{body["version"]}"'
            seen.append((body["version"], body["status"], (body["payment"] or {}).get("status")))
            if paid_at is None and body["status"] == "paid":
                paid_at = time.monotonic()
            await asyncio.sleep(0.01)
    finally:
        await in_thread(rp.delay_replay, 0)
    versions = [v for v, _, _ in seen]
    assert versions == sorted(versions), f"went back in time: {seen}"
    order = ["paying", "paid"]
    statuses = [order.index(s) for _, s, _ in seen]
    assert statuses == sorted(statuses), seen
    assert seen[0][1] == "paying", "the read right after /pay missed it"
    assert seen[-1][1] == "paid"
    # Both servers answered: the test saw the replica behind and caught up.
    assert routed("primary", "behind") > behind
    assert routed("replica", "fresh") > fresh


# --- falling back ----------------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own, so the test can stop it."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    r = sync_redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(sync_redis.ConnectionError):
            if r.ping():
                break
        assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    r.close()
    try:
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)


async def test_with_redis_down_reads_go_to_the_primary(
    aiohttp_client: Any,
    rconfig: Config,
    rp: Replicated,
    primary: asyncpg.Connection,
    own_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, redis_proc = own_redis
    app = create_app(dataclasses.replace(rconfig, redis_url=url))
    client = await aiohttp_client(app)
    owner = await signup(client)
    pid = await product(client, owner)
    await caught_up(app, rp, primary)
    await in_thread(rp.pause_replay)
    try:
        assert await answered_by(client, owner, pid, primary) == "replica"
        redis_proc.terminate()
        redis_proc.wait(10)
        # Without Redis a write elsewhere could be missed: the primary, always right.
        down = routed("primary", "redis")
        assert await answered_by(client, owner, pid, primary) == "primary"
        assert await answered_by(client, owner, pid, primary) == "primary"
        assert routed("primary", "redis") == down + 2
        status, body = await readyz(client)
        assert status == 200 and body["checks"]["redis"] == "degraded", body
        assert body["checks"]["replica"] == "ok", body
    finally:
        await in_thread(rp.resume_replay)


async def test_with_the_replica_down_reads_go_to_the_primary_and_readyz_says_so(
    aiohttp_client: Any, rconfig: Config, rp: Replicated, primary: asyncpg.Connection
) -> None:
    app = create_app(rconfig)
    client = await aiohttp_client(app)
    owner = await signup(client)
    pid = await product(client, owner)
    await caught_up(app, rp, primary)
    status, body = await readyz(client)
    assert (status, body["checks"].get("replica")) == (200, "ok"), body

    await in_thread(rp.stop_replica)
    await wait_state(app, "down")
    down = routed("primary", "down")
    new = await product(client, owner, "While the replica is down")
    resp = await client.get(f"/v1/products/{new}", headers=owner.headers)
    assert resp.status == 200, await resp.text()
    resp = await client.get(f"/v1/products/{pid}", headers=owner.headers)
    assert resp.status == 200, await resp.text()
    assert routed("primary", "down") == down + 2
    status, body = await readyz(client)
    assert status == 200, body
    assert body["status"] == "ready" and body["checks"]["replica"] == "down", body
    assert metrics.REGISTRY.get_sample_value("surge_replica_up", {"pool": "replica"}) == 0

    await in_thread(rp.start_replica)
    await wait_state(app, "ok")
    await caught_up(app, rp, primary)
    await in_thread(rp.pause_replay)
    try:
        assert await answered_by(client, owner, pid, primary) == "replica"
    finally:
        await in_thread(rp.resume_replay)
    assert metrics.REGISTRY.get_sample_value("surge_replica_up", {"pool": "replica"}) == 1


async def test_a_replica_lagging_past_the_limit_is_skipped_and_readyz_says_lagging(
    aiohttp_client: Any, rconfig: Config, rp: Replicated, primary: asyncpg.Connection
) -> None:
    app = create_app(dataclasses.replace(rconfig, replica_max_lag_s=0.3))
    client = await aiohttp_client(app)
    owner = await signup(client)
    pid = await product(client, owner)
    await caught_up(app, rp, primary)
    await in_thread(rp.pause_replay)
    try:
        # Other writers keep the primary moving while the replica stands still.
        deadline = time.monotonic() + 10
        while app[READS].state != "lagging":
            assert time.monotonic() < deadline, f"still {app[READS].state}, {app[READS].lag_s}"
            await primary.execute("SELECT txid_current()")
            await asyncio.sleep(0.05)
        lag = metrics.REGISTRY.get_sample_value("surge_replica_lag_seconds", {"pool": "replica"})
        assert lag is not None and lag > 0.3
        assert (lag_bytes := app[READS].lag_bytes) > 0, lag_bytes
        lagging = routed("primary", "lagging")
        # A tenant with no recent write: the replica would do for read-your-writes, but not
        # for a replica this far behind.
        assert await answered_by(client, owner, pid, primary) == "primary"
        assert routed("primary", "lagging") == lagging + 1
        status, body = await readyz(client)
        assert (status, body["checks"]["replica"]) == (200, "lagging"), body
    finally:
        await in_thread(rp.resume_replay)
    await wait_state(app, "ok")


async def test_without_a_read_url_reads_ask_neither_redis_nor_the_replica(
    aiohttp_client: Any, config: Config
) -> None:
    """The hot path with DATABASE_READ_URL unset: no last-write key written or read, no
    routing counted, no poller, and /readyz does not mention a replica."""
    app = create_app(config)
    client = await aiohttp_client(app)
    counted = sum(routed(s, r) for s, r in metrics.REPLICA_READ_ROUTES)
    owner = await signup(client)
    pid = await product(client, owner)
    resp = await client.get(f"/v1/products/{pid}", headers=owner.headers)
    assert resp.status == 200
    assert app[READS].replica is None and app[READS]._task is None
    r = sync_redis.Redis.from_url(config.redis_url or "")
    try:
        assert list(r.scan_iter(match=f"{config.redis_key_prefix}wlsn:*")) == []
    finally:
        r.close()
    assert sum(routed(s, r) for s, r in metrics.REPLICA_READ_ROUTES) == counted
    status, body = await readyz(client)
    assert status == 200 and "replica" not in body["checks"], body


async def test_a_read_url_naming_the_primary_itself_serves_reads_as_fresh(
    aiohttp_client: Any, config: Config
) -> None:
    """DATABASE_READ_URL may name the primary (a second pool, another PgBouncer): not in
    recovery, but the same server, so never stale: `ok`, and reads use the read pool."""
    app = create_app(dataclasses.replace(config, database_read_url=config.database_url))
    client = await aiohttp_client(app)
    owner = await signup(client)
    pid = await product(client, owner)
    fresh = routed("replica", "fresh")
    resp = await client.get(f"/v1/products/{pid}", headers=owner.headers)
    assert resp.status == 200
    assert routed("replica", "fresh") == fresh + 1
    status, body = await readyz(client)
    assert (status, body["checks"]["replica"]) == (200, "ok"), body


async def test_a_read_url_naming_another_writable_server_is_not_used(
    aiohttp_client: Any, config: Config, rp: Replicated
) -> None:
    """A writable server that is not the primary (a promoted replica, a wrong URL) could be
    anything: reads stay on the primary and /readyz says `down`."""
    app = create_app(dataclasses.replace(config, database_read_url=rp.primary_url))
    client = await aiohttp_client(app)
    await wait_state(app, "down")
    owner = await signup(client)
    down = routed("primary", "down")
    resp = await client.get("/v1/products", headers=owner.headers)
    assert resp.status == 200 and (await resp.json())["items"] == []
    assert routed("primary", "down") == down + 1


# --- the write paths, the CLI, the alert -----------------------------------------------------

# Writes that need no @writes: signup records its new tenant itself (note_write); the payment
# webhook through the saga runner (SagaRunner.wrote); login, refresh and logout change only
# sessions, which are read from the primary; events are counted asynchronously (docs/EVENTS.md);
# POST /graphql only reads.
RECORDED_OTHERWISE = {
    "/v1/auth/signup",
    "/v1/auth/login",
    "/v1/auth/refresh",
    "/v1/auth/logout",
    "/v1/events",
    "/v1/webhooks/payments",
    "/graphql",
}


def test_every_route_that_writes_records_the_tenants_write() -> None:
    for route in handlers.routes:
        if route.method in ("GET", "HEAD", "OPTIONS") or route.path in RECORDED_OTHERWISE:
            continue
        assert getattr(route.handler, "records_writes", False), (
            f"{route.method} {route.path}: decorate its handler with server.replica.writes, or"
            " say here why its writes need no record"
        )


def test_pgreplica_up_and_down_keep_their_urls() -> None:
    with pair_dir() as base:
        _up_down_up(base / "pair")


def _up_down_up(base: Path) -> None:

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "bench.pgreplica", *args, str(base)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    try:
        out = cli("up")
        urls = read_urls(base)
        assert out.splitlines() == [f"PRIMARY_URL={urls['PRIMARY_URL']}",
                                    f"REPLICA_URL={urls['REPLICA_URL']}"]  # fmt: skip

        async def recovery(url: str) -> bool:
            con = await asyncpg.connect(url)
            try:
                return bool(await con.fetchval("SELECT pg_is_in_recovery()"))
            finally:
                await con.close()

        assert asyncio.run(recovery(urls["PRIMARY_URL"])) is False
        assert asyncio.run(recovery(urls["REPLICA_URL"])) is True
        cli("down")
        with pytest.raises(OSError):
            asyncio.run(recovery(urls["PRIMARY_URL"]))
        cli("up")
        assert read_urls(base) == urls
    finally:
        cli("down", "--clean")
    assert not base.exists()


def test_promtool_checks_and_tests_the_replica_alerts() -> None:
    promtool = tool("promtool")
    run(promtool, "check", "rules", str(RULES))
    run(promtool, "test", "rules", str(RULE_TESTS))

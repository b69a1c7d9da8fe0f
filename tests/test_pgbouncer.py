"""Surge through a real PgBouncer in transaction mode (deploy/pgbouncer.ini, filled in).

The server gets DATABASE_URL through PgBouncer with PG_STATEMENT_CACHE_SIZE=0 and
DATABASE_MIGRATION_URL straight to PostgreSQL, on a database of its own that nothing has
migrated: start-up migrates it over the direct URL (a session advisory lock, which transaction
pooling would strand), then a shop's requests run through PgBouncer: signup, login, users,
products, orders, payment, events, analytics, GraphQL. PgBouncer's own counters show the
transactions went through it. A last test shows this PgBouncer really pools per transaction:
asyncpg's named prepared statements (its default cache) break through it.

PgBouncer comes from Debian's package (`.ci/run` and `make cluster` install it); without it the
tests fail under CI and skip elsewhere, saying so. PostgreSQL refuses nothing to root, but
PgBouncer refuses to run as root: it then runs as `postgres` (bench/pgreplica.RunAs).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest

from bench.cluster import accepts, write_pgbouncer_ini
from bench.pgreplica import RunAs, find_bindir
from db.migrate import discover
from server.runner import free_port

from .conftest import Services, debian_program, with_database
from .served import served


@dataclass(frozen=True)
class Bouncer:
    port: int
    database: str
    password: str
    direct_dsn: str  # the same database, straight to PostgreSQL
    run_dir: Path

    def url(self, database: str | None = None) -> str:
        db = database or self.database
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{db}"

    def admin(self, command: str) -> list[dict[str, str]]:
        """A command of PgBouncer's admin console (it speaks only the simple query protocol,
        which asyncpg does not use for queries: psql does)."""
        out = subprocess.run(
            [str(find_bindir() / "psql"), "-X", "-A", "-F", "\t", "-P", "footer=off",
             "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "pgbouncer",
             "-c", command],
            env={**os.environ, "PGPASSWORD": self.password},
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.splitlines()  # fmt: skip
        header = out[0].split("\t")
        return [dict(zip(header, line.split("\t"), strict=True)) for line in out[1:]]


async def _create_database(admin_dsn: str, name: str, drop: bool = False) -> None:
    con = await asyncpg.connect(admin_dsn)
    try:
        if drop:
            await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            await con.execute(f'CREATE DATABASE "{name}"')
    finally:
        await con.close()


def _pg_address(dsn: str) -> tuple[str, int]:
    """host (or Unix socket directory) and port of a libpq-style URL."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
    port = int(query.get("port", [parts.port or 5432])[0])
    return host, port


@pytest.fixture(scope="module")
def bouncer(services: Services) -> Iterator[Bouncer]:
    program = debian_program("pgbouncer")
    database = f"surge_pgb_{secrets.token_hex(3)}"  # nothing migrated it: the server must
    asyncio.run(_create_database(services.admin_dsn, database))
    run_as = RunAs.for_this_process()
    run = Path(tempfile.mkdtemp(prefix="surge-pgbouncer-"))
    run_as.own(run)
    pg_host, pg_port = _pg_address(services.admin_dsn)
    password, port = secrets.token_hex(12), free_port()
    write_pgbouncer_ini(
        run,
        pg_host=pg_host,
        pg_port=pg_port,
        listen_port=port,
        database=database,
        users={"postgres": password},
    )
    for path in run.iterdir():
        run_as.own(path)
    proc = subprocess.Popen(
        [program, str(run / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **run_as.kwargs(),  # type: ignore[call-overload]
    )
    try:
        deadline = time.monotonic() + 20
        while not accepts(port):
            assert proc.poll() is None, (run / "pgbouncer.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "PgBouncer did not listen within 20 s"
            time.sleep(0.05)
        yield Bouncer(port, database, password, with_database(services.admin_dsn, database), run)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(run, ignore_errors=True)
        asyncio.run(_create_database(services.admin_dsn, database, drop=True))


@pytest.fixture
def surge_via_pgbouncer(
    services: Services, bouncer: Bouncer, provider_url: str, tmp_path: Path
) -> Iterator[str]:
    with (
        served(
            services,
            tmp_path,
            ready_timeout=60,  # it migrates first, over the direct URL
            DATABASE_URL=bouncer.url(),
            PG_STATEMENT_CACHE_SIZE="0",
            DATABASE_MIGRATION_URL=bouncer.direct_dsn,
            MIGRATE_ON_START="true",
            REDIS_KEY_PREFIX=f"surgetest:pgb:{uuid.uuid4().hex[:8]}:",
            PAYMENTS_URL=provider_url,
            PAYMENTS_API_KEY="lt_key",
            PAYMENTS_WEBHOOK_SECRET="lt_secret",
            ACCESS_LOG="false",
            AUTH_RATE_LIMIT_PER_MINUTE="100000",
            RATE_LIMIT_RATE="100000",
            RATE_LIMIT_BURST="100000",
        ) as server
    ):
        yield server.url


def xact_count(bouncer: Bouncer) -> int:
    rows = bouncer.admin("SHOW STATS")
    return sum(int(r["total_xact_count"]) for r in rows if r["database"] == bouncer.database)


async def test_a_shop_runs_through_pgbouncer_in_transaction_mode(
    bouncer: Bouncer, surge_via_pgbouncer: str
) -> None:
    # Start-up migrated the empty database, over the direct URL.
    con = await asyncpg.connect(bouncer.direct_dsn)
    try:
        applied = await con.fetchval("SELECT count(*) FROM schema_migrations")
    finally:
        await con.close()
    assert applied == len(discover())
    before = xact_count(bouncer)
    base = surge_via_pgbouncer
    async with aiohttp.ClientSession() as http:

        async def call(
            method: str,
            path: str,
            status: int,
            token: str = "",
            json: object = None,
            headers: dict[str, str] | None = None,
        ) -> Any:
            sent = {"Authorization": f"Bearer {token}"} if token else {}
            async with http.request(
                method, base + path, json=json, headers={**sent, **(headers or {})}
            ) as resp:
                body = await resp.json(content_type=None) if resp.content_length != 0 else {}
                assert resp.status == status, (method, path, resp.status, body)
                return body

        owner = await call(
            "POST", "/v1/auth/signup", 201,
            json={"tenant_name": "Bouncer", "email": "o@example.com", "username": "owner",
                  "password": "correct horse battery"},
        )  # fmt: skip
        credentials = {"email": "o@example.com", "password": "correct horse battery"}
        login = await call(
            "POST", "/v1/auth/login", 200, json={"tenant_id": owner["tenant"]["id"], **credentials}
        )
        token = login["access_token"]
        refreshed = await call(
            "POST", "/v1/auth/refresh", 200, json={"refresh_token": login["refresh_token"]}
        )
        token = refreshed["access_token"]
        members = []
        for i in range(5):
            member = await call(
                "POST", "/v1/users", 201, token,
                json={"email": f"m{i}@example.com", "username": f"member{i}",
                      "password": "correct horse battery", "roles": ["member"]},
            )  # fmt: skip
            members.append(member)
        page = await call("GET", "/v1/users?limit=50", 200, token)
        assert {u["id"] for u in page["items"]} >= {m["id"] for m in members}
        assert (await call("GET", "/v1/users?q=member", 200, token))["items"]
        edited = await call(
            "PATCH", f"/v1/users/{members[0]['id']}", 200, token,
            json={"profile": {"theme": "dark"}}, headers={"If-Match": f'"{members[0]["version"]}"'},
        )  # fmt: skip
        assert edited["version"] == members[0]["version"] + 1
        got = await call("GET", f"/v1/users/{members[0]['id']}", 200, token)
        assert got["profile"] == {"theme": "dark"}
        await call("PUT", f"/v1/users/{members[1]['id']}/roles/admin", 204, token)
        await call("DELETE", f"/v1/users/{members[2]['id']}", 204, token)
        product = await call(
            "POST", "/v1/products", 201, token,
            json={"sku": "mug", "name": "Mug", "price_cents": 1200, "currency": "EUR", "stock": 50},
        )  # fmt: skip
        orders = []
        for i in range(3):
            order = await call(
                "POST", "/v1/orders", 201, token,
                json={"items": [{"product_id": product["id"], "quantity": 2}]},
                headers={"Idempotency-Key": f"order-{i}"},
            )  # fmt: skip
            orders.append(order)
            await call(
                "POST", f"/v1/orders/{order['id']}/pay", 202, token,
                json={"payment_method": "pm_card_visa"}, headers={"Idempotency-Key": f"pay-{i}"},
            )  # fmt: skip
        replay = await call(
            "POST", "/v1/orders", 201, token,
            json={"items": [{"product_id": product["id"], "quantity": 2}]},
            headers={"Idempotency-Key": "order-0"},
        )  # fmt: skip
        assert replay["id"] == orders[0]["id"]
        deadline = time.monotonic() + 30
        while True:  # the saga: authorize, capture, paid; its statements through PgBouncer too
            states = [
                (await call("GET", f"/v1/orders/{o['id']}", 200, token))["status"] for o in orders
            ]
            if states == ["paid"] * 3:
                break
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.2)
        assert (await call("GET", f"/v1/products/{product['id']}", 200, token))["stock"] == 44
        listed = await call("GET", "/v1/orders?status=paid", 200, token)
        assert len(listed["items"]) == 3
        accepted = await call(
            "POST", "/v1/events", 202, token,
            json={"events": [{"name": "page_view", "props": {"i": i}} for i in range(100)]},
        )  # fmt: skip
        assert accepted == {"accepted": 100}
        counts = await call("GET", "/v1/analytics/counts?name=page_view&bucket=1d", 200, token)
        assert sum(b["count"] for b in counts["buckets"]) == 100
        audit = await call("GET", "/v1/audit", 200, token)
        assert audit["items"]
        query = "{ orders(first: 10) { edges { node { id status items { quantity } } } } }"
        graph = await call("POST", "/graphql", 200, token, json={"query": query})
        assert len(graph["data"]["orders"]["edges"]) == 3
        await call(
            "POST", "/v1/auth/logout", 204, json={"refresh_token": refreshed["refresh_token"]}
        )
    # Every one of those transactions went through PgBouncer (and more: the saga, the relay).
    assert xact_count(bouncer) - before > 40
    pools = [p for p in bouncer.admin("SHOW POOLS") if p["database"] == bouncer.database]
    assert pools and pools[0]["pool_mode"] == "transaction"


async def test_pgbouncer_here_pools_per_transaction(bouncer: Bouncer) -> None:
    """Why PG_STATEMENT_CACHE_SIZE=0: with asyncpg's default cache a statement prepared on one
    server connection is executed later on another, where it does not exist."""
    a = await asyncpg.connect(bouncer.url())
    b = await asyncpg.connect(bouncer.url())
    try:
        async with a.transaction():  # `a` holds server connection S1 meanwhile
            await a.fetchval("SELECT 1")
            assert await b.fetchval("SELECT $1::int + 1", 1) == 2  # prepared on S2
        # S1 came back last, so PgBouncer hands it out first: the statement is not there.
        with pytest.raises(asyncpg.InvalidSQLStatementNameError):
            for _ in range(5):
                await b.fetchval("SELECT $1::int + 1", 1)
                async with a.transaction():
                    await a.fetchval("SELECT 1")
    finally:
        await a.close()
        await b.close()
    # The setting Surge uses behind PgBouncer: unnamed statements, nothing to lose.
    c = await asyncpg.connect(bouncer.url(), statement_cache_size=0)
    d = await asyncpg.connect(bouncer.url(), statement_cache_size=0)
    try:
        for i in range(20):
            async with c.transaction():
                await c.fetchval("SELECT 1")
                assert await d.fetchval("SELECT $1::int + 1", i) == i + 1
            assert await d.fetchval("SELECT $1::int + 1", i) == i + 1
    finally:
        await c.close()
        await d.close()

"""PostgreSQL blips (issue 18, defect 1): backends terminated under the pool, a failover.

A connection that died while idle is never handed to a request; a statement refused before
anything of it was sent is run again on a fresh connection; what still fails for a connection
reason is 503 with Retry-After, never 500; connections are replaced after a maximum lifetime and
closed when idle too long. Real PostgreSQL throughout; the timing windows of a termination (the
server's goodbye not yet read, read but the socket not yet closed, closed) are made
deterministic by a relay between the pool and PostgreSQL that holds back what the server sends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientResponse

from server.app import create_app
from server.config import Config

from .conftest import configured
from .helpers import signup

KILL_APP_BACKENDS = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1 AND pid <> pg_backend_pid()
"""
APP_BACKENDS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1 AND pid <> pg_backend_pid()
"""


async def kill_backends(dsn: str, application_name: str = "surge-primary") -> int:
    """Terminate the pool's backends and wait until PostgreSQL has let them go."""
    con = await asyncpg.connect(dsn)
    try:
        killed: int = await con.fetchval(KILL_APP_BACKENDS, application_name)
        for _ in range(500):  # each round trip lets the backends exit; bounded, no clock
            if await con.fetchval(APP_BACKENDS, application_name) == 0:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the terminated backends did not go away")
        return killed
    finally:
        await con.close()


async def assert_ok_or_unavailable(resp: ClientResponse, ok: int) -> None:
    """`ok`, or a 503 problem with Retry-After; never a 500."""
    if resp.status == 503:
        assert resp.headers["Retry-After"] == "1"
        assert resp.content_type == "application/problem+json"
        body = await resp.json()
        assert body["status"] == 503 and body["type"] == "/problems/unavailable"
    else:
        assert resp.status == ok, await resp.text()


@pytest.fixture
def app_config(config: Config) -> Config:
    return configured(config, user_cache_ttl_s=0, pg_pool_min=4, pg_pool_max=8)


async def _warm(client: Any, owner: Any, n: int) -> None:
    """Use n connections at once, so the pool holds n idle ones afterwards."""
    await asyncio.gather(
        *(client.get(f"/v1/users/{owner.id}", headers=owner.headers) for _ in range(n))
    )


async def test_after_backends_were_terminated_every_request_succeeds(
    aiohttp_client: Any, app_config: Config
) -> None:
    client = await aiohttp_client(create_app(app_config))
    owner = await signup(client)
    await _warm(client, owner, 8)
    assert app_config.database_url is not None
    assert await kill_backends(app_config.database_url) >= 4
    # Every idle connection is dead and its end already read: none may reach a request.
    for i in range(3):
        resp = await client.get(f"/v1/users/{owner.id}", headers=owner.headers)
        assert resp.status == 200, await resp.text()
        resp = await client.get("/v1/users", headers=owner.headers)
        assert resp.status == 200, await resp.text()
        product = {"sku": f"sku-{i}", "name": "n", "price_cents": 1, "currency": "EUR", "stock": 1}
        resp = await client.post("/v1/products", json=product, headers=owner.headers)
        assert resp.status == 201, await resp.text()


async def test_requests_racing_a_termination_are_answered_or_refused_with_503(
    aiohttp_client: Any, app_config: Config
) -> None:
    client = await aiohttp_client(create_app(app_config))
    owner = await signup(client)
    assert app_config.database_url is not None
    admin = await asyncpg.connect(app_config.database_url)
    try:
        for round_ in range(5):
            await _warm(client, owner, 8)
            await admin.fetchval(KILL_APP_BACKENDS, "surge-primary")
            # at once, while the goodbyes are still on their way
            reads = [client.get(f"/v1/users/{owner.id}", headers=owner.headers) for _ in range(6)]
            lists = [client.get("/v1/users", headers=owner.headers) for _ in range(3)]
            writes = [
                client.post(
                    "/v1/products",
                    json={
                        "sku": f"r{round_}-{i}",
                        "name": "n",
                        "price_cents": 1,
                        "currency": "EUR",
                        "stock": 1,
                    },
                    headers=owner.headers,
                )
                for i in range(3)
            ]
            answers = await asyncio.gather(*reads, *lists, *writes)
            for resp in answers[:9]:
                await assert_ok_or_unavailable(resp, 200)
            for resp in answers[9:]:
                await assert_ok_or_unavailable(resp, 201)
    finally:
        await admin.close()

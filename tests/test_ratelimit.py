from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from aiohttp import web

from server import metrics
from server.app import add_routes, create_app
from server.config import Config
from server.keys import PG
from server.ratelimit import Decision, LocalLimiter, TokenBucket
from server.routes import get
from server.runner import free_port

PATH = "/v1/no-such-thing"  # rate limited like every /v1 route, answers 404


async def statuses(client: Any, n: int, **headers: str) -> list[int]:
    return [(await client.get(PATH, headers=headers)).status for _ in range(n)]


@pytest.mark.parametrize("backend", ["local", "redis"])
async def test_bucket_refuses_past_the_burst(
    aiohttp_client: Any, config: Config, backend: str
) -> None:
    cfg = dataclasses.replace(
        config, rate_limit_backend=backend, rate_limit_rate=0.5, rate_limit_burst=3
    )
    client = await aiohttp_client(create_app(cfg))
    first = await client.get(PATH)
    assert first.status == 404
    assert first.headers["RateLimit-Limit"] == "3"
    assert first.headers["RateLimit-Remaining"] == "2"
    assert 1 <= int(first.headers["RateLimit-Reset"]) <= 2
    assert await statuses(client, 2) == [404, 404]
    refused = await client.get(PATH)
    assert refused.status == 429
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert 1 <= int(refused.headers["Retry-After"]) <= 2
    body = await refused.json(content_type=None)
    assert body["status"] == 429 and body["request_id"] == refused.headers["X-Request-ID"]


@pytest.mark.parametrize("backend", ["local", "redis"])
async def test_ops_endpoints_are_not_limited(
    aiohttp_client: Any, config: Config, backend: str
) -> None:
    cfg = dataclasses.replace(
        config, rate_limit_backend=backend, rate_limit_rate=0.01, rate_limit_burst=1
    )
    client = await aiohttp_client(create_app(cfg))
    assert [(await client.get("/healthz")).status for _ in range(5)] == [200] * 5
    assert "RateLimit-Limit" not in (await client.get("/healthz")).headers


async def test_principals_have_separate_buckets(aiohttp_client: Any, config: Config) -> None:
    cfg = dataclasses.replace(
        config, rate_limit_rate=0.01, rate_limit_burst=2, trust_forwarded_for=True
    )
    client = await aiohttp_client(create_app(cfg))
    assert await statuses(client, 3, **{"X-Forwarded-For": "10.0.0.1"}) == [404, 404, 429]
    assert await statuses(client, 3, **{"X-Forwarded-For": "10.0.0.2"}) == [404, 404, 429]


async def test_two_instances_share_one_redis_bucket(aiohttp_client: Any, config: Config) -> None:
    cfg = dataclasses.replace(
        config, rate_limit_backend="redis", rate_limit_rate=0.01, rate_limit_burst=4
    )
    a = await aiohttp_client(create_app(cfg))
    b = await aiohttp_client(create_app(cfg))
    assert await statuses(a, 2) == [404, 404]
    assert await statuses(b, 2) == [404, 404]
    assert await statuses(a, 1) == [429]
    assert await statuses(b, 1) == [429]


async def test_redis_down_falls_back_to_the_local_limiter(
    aiohttp_client: Any, config: Config
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    cfg = dataclasses.replace(
        config, redis_url=dead, rate_limit_backend="redis", rate_limit_rate=0.01, rate_limit_burst=2
    )
    client = await aiohttp_client(create_app(cfg))
    before = metrics.RATELIMIT_FALLBACK._value.get()
    assert await statuses(client, 3) == [404, 404, 429]
    assert metrics.RATELIMIT_FALLBACK._value.get() == before + 3


def test_token_bucket_takes_refills_and_pays_its_debt_back() -> None:
    """The local bucket's arithmetic on a clock the test moves (rate 2/s, burst 4)."""
    bucket = TokenBucket(rate=2.0, burst=4, now=100.0)
    assert bucket.take(1, 1, 100.0) == Decision(True, 4, 3, 1, 0)
    assert bucket.take(3, 3, 100.0) == Decision(True, 4, 0, 2, 0)
    assert bucket.take(1, 1, 100.0) == Decision(False, 4, 0, 2, 1)
    assert bucket.take(1, 1, 100.5) == Decision(True, 4, 0, 2, 0)  # half a second: one token
    # a cost above the burst passes only from a full bucket, and leaves it in debt
    assert bucket.take(10, 4, 103.0) == Decision(True, 4, 0, 5, 0)
    assert bucket.take(1, 1, 104.0) == Decision(False, 4, 0, 4, 3)  # -6 + 2 = -4 tokens
    assert bucket.take(1, 1, 1000.0) == Decision(True, 4, 3, 1, 0)  # never above the burst


async def test_local_limiter_refills_and_evicts() -> None:
    now = [0.0]
    limiter = LocalLimiter(max_keys=2, clock=lambda: now[0])
    assert (await limiter.take("a", 20, 1)).allowed
    refused = await limiter.take("a", 20, 1)
    assert not refused.allowed and refused.retry_after_s == 1
    now[0] += 0.05  # 20/s refills one token in 50 ms
    assert (await limiter.take("a", 20, 1)).allowed
    await limiter.take("b", 20, 1)
    await limiter.take("c", 20, 1)
    assert len(limiter._buckets) == 2
    assert (await limiter.take("a", 20, 1)).allowed, "evicted, so a new full bucket"


async def test_pool_exhaustion_is_503_not_a_hang(aiohttp_client: Any, config: Config) -> None:
    cfg = dataclasses.replace(config, pg_pool_min=1, pg_pool_max=1, pg_acquire_timeout_ms=100)
    app = create_app(cfg)
    release = asyncio.Event()

    async def hold(request: web.Request) -> web.Response:
        async with request.app[PG].connection():
            await release.wait()
        return web.json_response({})

    async def query(request: web.Request) -> web.Response:
        return web.json_response({"one": await request.app[PG].fetchval("SELECT 1")})

    add_routes(app, [get("/test/hold", hold, page=True), get("/test/query", query, page=True)])
    client = await aiohttp_client(app)
    holder = asyncio.create_task(client.get("/test/hold"))
    await asyncio.sleep(0.1)
    resp = await asyncio.wait_for(client.get("/test/query"), 5)
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert (await resp.json(content_type=None))["detail"] == "the database is busy; retry shortly"
    release.set()
    assert (await holder).status == 200
    resp = await client.get("/test/query")
    assert (resp.status, await resp.json()) == (200, {"one": 1})

"""take(key, rate, burst, cost, need): N tokens at once, on both limiters (Redis is real)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from server.ratelimit import Limiter, LocalLimiter, RedisLimiter

from .conftest import Services

RATE = 0.01  # slow enough that no refill shows within a test


@pytest.fixture(params=["local", "redis"])
async def limiter(request: pytest.FixtureRequest, clean: Services) -> AsyncIterator[Limiter]:
    if request.param == "local":
        yield LocalLimiter()
        return
    redis = Redis.from_url(clean.redis_url)
    try:
        yield RedisLimiter(redis, clean.redis_prefix)
    finally:
        await redis.aclose()


def key() -> str:
    return "u:" + secrets.token_hex(4)


async def test_a_cost_takes_that_many_tokens(limiter: Limiter) -> None:
    k = key()
    first = await limiter.take(k, RATE, 100, cost=30)
    assert (first.allowed, first.remaining, first.retry_after_s) == (True, 70, 0)
    assert (await limiter.take(k, RATE, 100)).remaining == 69
    assert (await limiter.take(k, RATE, 100, cost=69)).remaining == 0


async def test_a_refused_cost_takes_nothing(limiter: Limiter) -> None:
    k = key()
    assert (await limiter.take(k, RATE, 100, cost=60)).allowed
    refused = await limiter.take(k, RATE, 100, cost=41)
    assert (refused.allowed, refused.remaining) == (False, 40)
    assert refused.retry_after_s == 100  # one token short at 0.01 tokens/s
    assert refused.headers()["Retry-After"] == "100"
    assert (await limiter.take(k, RATE, 100, cost=40)).allowed


async def test_a_cost_above_the_burst_needs_a_full_bucket_and_leaves_debt(
    limiter: Limiter,
) -> None:
    k = key()
    assert (await limiter.take(k, RATE, 100)).allowed
    refused = await limiter.take(k, RATE, 100, cost=250)  # 99 left: not full
    assert not refused.allowed and refused.remaining == 99
    k = key()
    big = await limiter.take(k, RATE, 100, cost=250)
    assert (big.allowed, big.remaining) == (True, 0)
    assert big.reset_s == pytest.approx(250 / RATE, abs=1)  # 150 of debt + 100 to fill
    after = await limiter.take(k, RATE, 100)
    assert not after.allowed
    assert after.retry_after_s == pytest.approx(151 / RATE, abs=1)


async def test_need_sets_the_admission_threshold(limiter: Limiter) -> None:
    # The GraphQL handler takes the rest of a cost after the middleware took 1: it needs one
    # token fewer than the cost, and a full bucket less that one token for a cost past the burst.
    k = key()
    assert (await limiter.take(k, RATE, 100)).allowed
    rest = await limiter.take(k, RATE, 100, cost=149, need=99)
    assert (rest.allowed, rest.remaining) == (True, 0)
    assert not (await limiter.take(k, RATE, 100, cost=1, need=0)).allowed  # in debt


async def test_cost_one_is_the_old_behaviour(limiter: Limiter) -> None:
    k = key()
    got: list[Any] = [(await limiter.take(k, RATE, 3)).allowed for _ in range(4)]
    assert got == [True, True, True, False]

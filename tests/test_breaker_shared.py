"""The payments circuit breaker is shared through Redis: what one process (replica, worker)
finds out about the provider stops the others calling it, for the same cool-down, and one
process at a time probes it. With Redis down, each process's own breaker still works."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from bench.fake_provider import FakeProvider
from handlers.orders import provider as provider_module
from handlers.orders.keys import PAYMENTS
from handlers.orders.provider import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from server import metrics
from server.app import create_app
from server.config import Config
from server.runner import free_port

from .faults import redis_proc, wait_listening
from .helpers import signup
from .test_payments import API_KEY, SECRET, order, pay, pay_config, product, settled

RESET_S = 30.0


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    provider = FakeProvider(api_key=API_KEY, webhook_secret=SECRET)
    provider.base_url = await provider.start()  # type: ignore[attr-defined]
    try:
        yield provider
    finally:
        await provider.close()


def breakers(redis: Redis | None, prefix: str, n: int = 2) -> list[CircuitBreaker]:
    """n processes' breakers: 2 failures open, a long cool-down, probes held 5 s."""
    return [
        CircuitBreaker(2, RESET_S, redis=redis, prefix=prefix, probe_ttl_s=5.0) for _ in range(n)
    ]


async def cool_down_over(redis: Redis, *processes: CircuitBreaker) -> None:
    """As if RESET_S had passed: the shared key's lifetime is within the half-open window, and
    each process's own clock agrees."""
    await redis.pexpire(processes[0].key, int(processes[0].half_open_s * 1000) - 100)
    for p in processes:
        p.opened_at -= RESET_S


async def test_failures_seen_by_one_process_open_the_breaker_for_another(
    config: Config, redis: Redis
) -> None:
    a, b = breakers(redis, config.redis_key_prefix)
    assert await a.allow() and await b.allow()
    await a.failure()
    assert a.state == CLOSED and await b.allow()  # one failure: still closed
    await a.failure()
    assert a.state == OPEN
    assert not await b.allow()
    assert b.state == OPEN
    assert RESET_S - 5 < b.retry_after() <= RESET_S  # the same cool-down, not a fresh one
    # A third process that never called learns it from the periodic read alone.
    (c,) = breakers(redis, config.redis_key_prefix, 1)
    await c.refresh()
    assert c.state == OPEN


async def test_half_open_one_process_probes_and_its_answer_is_everyones(
    config: Config, redis: Redis
) -> None:
    a, b, c = breakers(redis, config.redis_key_prefix, 3)
    await a.failure()
    await a.failure()
    await cool_down_over(redis, a, b, c)
    allowed = [await x.allow() for x in (a, b, c)]
    assert allowed == [True, False, False]  # a probes; the others wait
    assert {b.state, c.state} == {HALF_OPEN}
    await a.failure()  # the probe failed: open again, for everyone, a full cool-down
    assert not await b.allow() and b.state == OPEN and b.retry_after() > RESET_S - 5

    await cool_down_over(redis, a, b, c)
    assert [await x.allow() for x in (b, a, c)] == [True, False, False]  # b probes this time
    await b.success()
    assert await redis.exists(a.key, a.probe_key) == 0
    assert await a.allow() and await c.allow()
    assert a.state == CLOSED and c.state == CLOSED


async def test_a_probe_whose_process_died_is_taken_over(config: Config, redis: Redis) -> None:
    a, b = breakers(redis, config.redis_key_prefix)
    await a.failure()
    await a.failure()
    await cool_down_over(redis, a, b)
    assert await a.allow()  # a probes, and dies (nothing more from it)
    assert not await b.allow()
    await redis.delete(a.probe_key)  # its probe key expired
    assert await b.allow()


async def test_without_redis_each_process_has_its_own_breaker() -> None:
    """Redis on a port nobody listens on: every decision falls back to the local breaker."""
    away = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    try:
        a, b = (CircuitBreaker(2, 0.2, redis=away, probe_ttl_s=1.0) for _ in range(2))
        errors = metrics.REGISTRY.get_sample_value("surge_payments_breaker_redis_errors_total")
        assert await a.allow()
        await a.failure()
        await a.failure()
        assert a.state == OPEN and not await a.allow()
        assert await b.allow()  # b never heard of it
        after = metrics.REGISTRY.get_sample_value("surge_payments_breaker_redis_errors_total")
        assert (after or 0) > (errors or 0)
        a.opened_at -= 0.2  # the cool-down is over: one local probe
        assert await a.allow() and a.state == HALF_OPEN
        assert not await a.allow()
        await a.success()
        assert a.state == CLOSED and await a.allow()
    finally:
        await away.aclose()


# -- two servers sharing Redis, and one that lost it --------------------------------------------


async def wait_for(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def test_app_b_does_not_call_a_provider_app_a_found_down(
    aiohttp_client: Any, config: Config, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    # B is not told by its periodic read (once an hour here): its own saga asks Redis first.
    monkeypatch.setattr(provider_module, "SYNC_INTERVAL_S", 3600.0)
    cfg = pay_config(
        config,
        fake.base_url,  # type: ignore[attr-defined]
        payments_retries=0,
        payments_breaker_failures=2,
        payments_breaker_reset_s=4.0,
        payments_saga_attempts=1000,
    )
    a = await aiohttp_client(create_app(cfg))
    b = await aiohttp_client(create_app(cfg))
    owner = await signup(a)
    pid = await product(a, owner)
    first, second, third = [await order(a, owner, pid, 1) for _ in range(3)]
    fake.set_faults([{"op": "*", "mode": "error", "status": 503}])
    assert (await pay(a, owner, first))[0] == 202
    a_breaker, b_breaker = a.app[PAYMENTS].breaker, b.app[PAYMENTS].breaker
    await wait_for(lambda: a_breaker.state == OPEN, "A's breaker did not open")
    calls = len(fake.requests)
    assert calls == 2  # the two failures that opened it

    assert b_breaker.state == CLOSED
    assert (await pay(b, owner, second))[0] == 202  # B has not heard yet; its saga asks Redis
    await wait_for(lambda: b_breaker.state == OPEN, "B's saga did not learn the breaker is open")
    status, body = await pay(b, owner, third)  # now B refuses at once, like A
    assert status == 503, body
    assert len(fake.requests) == calls  # B never called the provider

    fake.reset_faults()
    # After the cool-down one probe (from A or B) closes it for both; both orders get paid.
    assert (await settled(a, owner, first))["status"] == "paid"
    assert (await settled(b, owner, second))["status"] == "paid"
    await wait_for(lambda: b_breaker.state == CLOSED, "B's breaker did not close")
    assert a_breaker.state == CLOSED


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    port = free_port()
    proc = redis_proc(port, tmp_path)
    proc.start()
    try:
        wait_listening(proc, port)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.kill()


async def test_with_redis_stopped_the_local_breaker_still_works(
    aiohttp_client: Any, config: Config, fake: FakeProvider, private_redis: tuple[str, Any]
) -> None:
    url, redis_server = private_redis
    cfg = pay_config(
        dataclasses.replace(config, redis_url=url),
        fake.base_url,  # type: ignore[attr-defined]
        payments_retries=0,
        payments_breaker_failures=2,
        payments_breaker_reset_s=0.5,
        payments_saga_attempts=1000,
    )
    client = await aiohttp_client(create_app(cfg))
    owner = await signup(client)
    pid = await product(client, owner)
    first, second = [await order(client, owner, pid, 1) for _ in range(2)]
    breaker = client.app[PAYMENTS].breaker
    errors = metrics.REGISTRY.get_sample_value("surge_payments_breaker_redis_errors_total") or 0
    redis_server.kill()

    fake.set_faults([{"op": "*", "mode": "error", "status": 503}])
    assert (await pay(client, owner, first))[0] == 202
    await wait_for(lambda: breaker.state == OPEN, "the local breaker did not open")
    status, _ = await pay(client, owner, second)
    assert status == 503
    assert (metrics.REGISTRY.get_sample_value("surge_payments_breaker_redis_errors_total") or 0) > (
        errors
    )
    fake.reset_faults()
    assert (await settled(client, owner, first))["status"] == "paid"  # probed, closed
    assert breaker.state == CLOSED
    assert (await pay(client, owner, second))[0] == 202
    assert (await settled(client, owner, second))["status"] == "paid"


async def test_a_breaker_closed_elsewhere_closes_here_at_the_next_read(
    config: Config, redis: Redis
) -> None:
    """An operator's DEL (or another process's probe) reaches a process that knows the breaker
    open, at its next periodic read, not only when its own cool-down ends."""
    a, b = breakers(redis, config.redis_key_prefix)
    await a.failure()
    await a.failure()
    assert not await b.allow() and b.state == OPEN
    await redis.delete(a.key)
    await a.refresh()
    await b.refresh()
    assert (a.state, b.state) == (CLOSED, CLOSED)
    assert await a.allow() and await b.allow()

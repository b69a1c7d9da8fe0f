"""GET /v1/users/{id} through the Redis cache-aside entry."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from server.app import create_app
from server.config import Config
from server.keys import PG_READ
from server.runner import free_port

from .faults import Proc, redis_server_binary
from .helpers import add_user, signup


def key(config: Config, tenant_id: str, user_id: str) -> str:
    return f"{config.redis_key_prefix}user:{tenant_id}:{user_id}"


async def cached(config: Config, tenant_id: str, user_id: str) -> bytes | None:
    r = aioredis.Redis.from_url(config.redis_url or "")
    try:
        value: bytes | None = await r.get(key(config, tenant_id, user_id))
        return value
    finally:
        await r.aclose()


async def test_hit_and_miss_answer_byte_identical(aiohttp_client: Any, config: Config) -> None:
    cache_on = await aiohttp_client(create_app(config))
    cache_off = await aiohttp_client(create_app(dataclasses.replace(config, user_cache_ttl_s=0)))
    owner = await signup(cache_on)
    member = await add_user(cache_on, owner)
    r = aioredis.Redis.from_url(config.redis_url or "")
    await r.delete(key(config, owner.tenant_id, member.id))
    await r.aclose()
    miss = await cache_on.get(f"/v1/users/{member.id}", headers=owner.headers)
    assert await cached(config, owner.tenant_id, member.id) is not None
    hit = await cache_on.get(f"/v1/users/{member.id}", headers=owner.headers)
    uncached = await cache_off.get(f"/v1/users/{member.id}", headers=owner.headers)
    bodies = [await x.read() for x in (miss, hit, uncached)]
    assert [x.status for x in (miss, hit, uncached)] == [200, 200, 200]
    assert bodies[0] == bodies[1] == bodies[2]
    assert miss.headers["ETag"] == hit.headers["ETag"] == uncached.headers["ETag"] == '"1"'
    assert hit.headers["Content-Type"] == uncached.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("write", ["patch", "grant", "revoke", "delete", "password"])
async def test_every_write_refreshes_the_entry(
    aiohttp_client: Any, config: Config, write: str
) -> None:
    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    member = await add_user(client, owner, ["admin"])
    path = f"/v1/users/{member.id}"
    before = await (await client.get(path, headers=owner.headers)).json()  # now cached
    if write == "patch":
        resp = await client.patch(
            path, json={"username": "renamed"}, headers={**owner.headers, "If-Match": '"1"'}
        )
    elif write == "grant":
        resp = await client.put(f"{path}/roles/owner", headers=owner.headers)
    elif write == "revoke":
        resp = await client.delete(f"{path}/roles/admin", headers=owner.headers)
    elif write == "delete":
        resp = await client.delete(path, headers=owner.headers)
    else:
        resp = await client.put(
            "/v1/me/password",
            json={"old_password": "correct horse battery", "new_password": "another password"},
            headers=member.headers,
        )
    assert resp.status in (200, 204), await resp.text()
    after_resp = await client.get(path, headers=owner.headers)
    after = await after_resp.json()
    assert after["version"] == before["version"] + 1
    assert after_resp.headers["ETag"] == f'"{after["version"]}"'
    entry = await cached(config, owner.tenant_id, member.id)
    assert entry is not None and entry.startswith(f"{after['version']}:".encode())
    # the cached answer equals what PostgreSQL says now
    fresh = await aiohttp_client(create_app(dataclasses.replace(config, user_cache_ttl_s=0)))
    assert await (await fresh.get(path, headers=owner.headers)).read() == await after_resp.read()


async def test_a_stale_fill_never_overwrites_a_newer_entry(
    aiohttp_client: Any, config: Config
) -> None:
    from handlers.identity.keys import USER_CACHE

    app = create_app(config)
    client = await aiohttp_client(app)
    owner = await signup(client)
    cache = app[USER_CACHE]
    import uuid

    tid, uid = uuid.UUID(owner.tenant_id), uuid.UUID(owner.id)
    await cache.store(tid, uid, 5, b'{"v":5}')
    await cache.store(tid, uid, 4, b'{"v":4}')  # a slow reader's older row
    assert await cached(config, owner.tenant_id, owner.id) == b'5:{"v":5}'


async def test_concurrent_misses_share_one_query(aiohttp_client: Any, config: Config) -> None:
    app = create_app(config)
    client = await aiohttp_client(app)
    owner = await signup(client)
    r = aioredis.Redis.from_url(config.redis_url or "")
    await r.delete(key(config, owner.tenant_id, owner.id))
    await r.aclose()
    pg = app[PG_READ]
    calls = 0
    original = pg.fetchrow

    async def slow_counting(query: str, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        return await original(query, *args)

    pg.fetchrow = slow_counting  # type: ignore[method-assign]
    responses = await asyncio.gather(
        *(client.get(f"/v1/users/{owner.id}", headers=owner.headers) for _ in range(20))
    )
    assert [x.status for x in responses] == [200] * 20
    assert len({await x.read() for x in responses}) == 1
    assert calls == 1


async def test_redis_down_is_served_from_postgres(aiohttp_client: Any, config: Config) -> None:
    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    down = dataclasses.replace(config, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    degraded = await aiohttp_client(create_app(down))
    for _ in range(3):
        resp = await degraded.get(f"/v1/users/{owner.id}", headers=owner.headers)
        assert resp.status == 200
        assert (await resp.json())["id"] == owner.id
    # writes still work and say so
    resp = await degraded.patch(
        f"/v1/users/{owner.id}",
        json={"username": "still-works"},
        headers={**owner.headers, "If-Match": '"1"'},
    )
    assert resp.status == 200
    assert (await resp.json())["username"] == "still-works"


async def test_another_tenants_id_is_not_served_from_cache(
    aiohttp_client: Any, config: Config
) -> None:
    client = await aiohttp_client(create_app(config))
    a = await signup(client, "A")
    b = await signup(client, "B")
    assert (await client.get(f"/v1/users/{a.id}", headers=a.headers)).status == 200  # cached for A
    assert (await client.get(f"/v1/users/{a.id}", headers=b.headers)).status == 404


async def test_gets_in_one_iteration_leave_as_one_mget(config: Config) -> None:
    from handlers.identity.cache import GetBatcher

    r = aioredis.Redis.from_url(config.redis_url or "")
    prefix = config.redis_key_prefix
    await r.set(prefix + "a", b"1:A")
    await r.set(prefix + "b", b"2:B")
    batcher = GetBatcher(r)
    calls: list[list[str]] = []
    original = r.mget

    async def counting(keys: list[str]) -> Any:
        calls.append(list(keys))
        return await original(keys)

    r.mget = counting  # type: ignore[method-assign]
    try:
        values = await asyncio.gather(*(batcher.get(prefix + k) for k in "abca"))
        assert values == [b"1:A", b"2:B", None, b"1:A"]
        assert calls == [[prefix + k for k in "abca"]]
        assert await batcher.get(prefix + "b") == b"2:B"  # a lone get is its own batch
        assert len(calls) == 2
    finally:
        await r.aclose()


async def test_a_failed_mget_fails_every_waiter(config: Config) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from handlers.identity.cache import GetBatcher

    r = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    batcher = GetBatcher(r)
    results = await asyncio.gather(batcher.get("x"), batcher.get("y"), return_exceptions=True)
    assert all(isinstance(x, RedisConnectionError) for x in results)
    await r.aclose()


async def _answers(url: str) -> bool:
    r = aioredis.Redis.from_url(url)
    try:
        return bool(await r.ping())
    except (OSError, aioredis.RedisError):
        return False
    finally:
        await r.aclose()


async def test_a_write_while_redis_is_down_is_not_hidden_by_the_old_entry_when_it_returns(
    aiohttp_client: Any, config: Config, tmp_path: Path
) -> None:
    """Redis that keeps its data (appendonly) is stopped; a PATCH commits while the cache's
    write-through cannot reach it; Redis comes back with the user's old entry. Every read from
    then on answers the new row, and the old entry goes."""
    port = free_port()
    argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "yes", "--dir", str(tmp_path)]
    redis = Proc("redis", argv, dict(os.environ), tmp_path / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    redis.start()
    try:
        for _ in range(100):
            if await _answers(url):
                break
            await asyncio.sleep(0.05)
        cfg = dataclasses.replace(config, redis_url=url)
        client = await aiohttp_client(create_app(cfg))
        owner = await signup(client)
        member = await add_user(client, owner)
        path = f"/v1/users/{member.id}"
        assert (await client.get(path, headers=owner.headers)).status == 200
        assert await cached(cfg, owner.tenant_id, member.id) is not None  # v1 in Redis

        assert redis.stop().startswith("redis exited 0")  # SIGTERM: the AOF keeps the entry
        patched = await client.patch(
            path, json={"username": "renamed"}, headers={**owner.headers, "If-Match": '"1"'}
        )
        assert patched.status == 200, await patched.text()
        assert patched.headers["ETag"] == '"2"'

        redis.start()
        for _ in range(100):
            if await _answers(url):
                break
            await asyncio.sleep(0.05)
        seen = []
        for _ in range(12):  # past the cache's one-second back-off after a failure, twice
            got = await client.get(path, headers=owner.headers)
            seen.append((got.headers["ETag"], (await got.json())["username"]))
            await asyncio.sleep(0.2)
        assert set(seen) == {('"2"', "renamed")}, seen
        entry = await cached(cfg, owner.tenant_id, member.id)
        assert entry is None or entry.startswith(b"2:"), entry
    finally:
        redis.stop()

"""Revocation of access tokens (README, "Identity, as built"): suspending or deleting a user, a
password change, a role change and logout-all take effect on that user's access tokens within
1 s in every process, though tokens are verified in memory.

Each process keeps a per-user token generation floor in memory, learnt from PostgreSQL when it
starts (and whenever its Redis subscription is re-established) and from Redis pub/sub after;
with Redis unreachable it asks PostgreSQL instead of trusting the token.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
import uuid
from functools import partial
from typing import Any

import orjson
from aiohttp.test_utils import TestClient

from server.app import create_app
from server.config import Config
from server.keys import REVOCATIONS
from server.metrics import REGISTRY
from server.runner import free_port
from server.tokens import TokenService, header_segment
from tests.conftest import TEST_JWT_KEYS
from tests.helpers import PASSWORD, Actor, add_user, login, signup

INVALID = 'Bearer realm="surge", error="invalid_token"'
NEW_PASSWORD = "a new and better one"


async def _assert_401(client: TestClient, actor: Actor, token: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {token or actor.access_token}"}
    resp = await client.get("/v1/me", headers=headers)
    assert resp.status == 401, await resp.text()
    assert resp.headers["WWW-Authenticate"] == INVALID
    assert resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body["status"] == 401
    assert body["detail"] == "the access token is invalid or expired"


async def _me(client: TestClient, token: str) -> int:
    resp = await client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    return resp.status


async def _rejected(client: TestClient, token: str) -> bool:
    return await _me(client, token) == 401


def _db_checks() -> float:
    return REGISTRY.get_sample_value("surge_revocation_db_checks_total") or 0.0


async def _etag(client: TestClient, by: Actor, user_id: str) -> str:
    resp = await client.get(f"/v1/users/{user_id}", headers=by.headers)
    assert resp.status == 200
    return resp.headers["ETag"]


async def _suspend(client: TestClient, by: Actor, user: Actor) -> None:
    etag = await _etag(client, by, user.id)
    resp = await client.patch(
        f"/v1/users/{user.id}",
        json={"status": "suspended"},
        headers={**by.headers, "If-Match": etag},
    )
    assert resp.status == 200, await resp.text()


async def _until(deadline_s: float, check: Any) -> float:
    """Polls `check` (an async predicate) until it holds, failing at the deadline."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < deadline_s, "not within the deadline"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


# One process: each change, then the old token.


async def test_a_suspended_admin_cannot_create_an_admin(
    aiohttp_client: Any, config: Config
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(client)
    admin = await add_user(client, owner, ["admin", "member"])
    assert await _me(client, admin.access_token) == 200
    await _suspend(client, owner, admin)
    resp = await client.post(
        "/v1/users",
        json={"email": "x@example.com", "username": "x", "password": PASSWORD, "roles": ["admin"]},
        headers=admin.headers,
    )
    assert resp.status == 401, await resp.text()
    assert resp.headers["WWW-Authenticate"] == INVALID
    await _assert_401(client, admin)
    # the suspender's own token is untouched
    assert await _me(client, owner.access_token) == 200


async def test_a_deleted_member_cannot_create_an_order(aiohttp_client: Any, config: Config) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(client)
    member = await add_user(client, owner)
    resp = await client.delete(f"/v1/users/{member.id}", headers=owner.headers)
    assert resp.status == 204
    resp = await client.post("/v1/orders", json={"items": []}, headers=member.headers)
    assert resp.status == 401, await resp.text()
    assert resp.headers["WWW-Authenticate"] == INVALID
    await _assert_401(client, member)


async def test_a_password_change_revokes_and_the_next_login_works(
    aiohttp_client: Any, config: Config
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(client)
    member = await add_user(client, owner)
    resp = await client.put(
        "/v1/me/password",
        json={"old_password": PASSWORD, "new_password": NEW_PASSWORD},
        headers=member.headers,
    )
    assert resp.status == 204
    await _assert_401(client, member)
    # logged in again at once (in the same second, the same millisecond even): the new token works
    fresh = await login(client, owner.tenant_id, member.email, NEW_PASSWORD)
    assert await _me(client, fresh["access_token"]) == 200
    await _assert_401(client, member)


async def test_a_demotion_revokes_and_the_refreshed_token_has_the_new_roles(
    aiohttp_client: Any, config: Config
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(client)
    admin = await add_user(client, owner, ["admin", "member"])
    resp = await client.delete(f"/v1/users/{admin.id}/roles/admin", headers=owner.headers)
    assert resp.status == 204
    await _assert_401(client, admin)
    # the refresh token survives a role change: the next pair carries the roles of now
    resp = await client.post("/v1/auth/refresh", json={"refresh_token": admin.refresh_token})
    assert resp.status == 200, await resp.text()
    pair = await resp.json()
    resp = await client.get("/v1/me", headers={"Authorization": f"Bearer {pair['access_token']}"})
    assert resp.status == 200
    assert (await resp.json())["roles"] == ["member"]
    resp = await client.post(
        "/v1/users",
        json={"email": "y@example.com", "username": "y", "password": PASSWORD},
        headers={"Authorization": f"Bearer {pair['access_token']}"},
    )
    assert resp.status == 403
    # a re-login works too
    fresh = await login(client, owner.tenant_id, admin.email)
    assert await _me(client, fresh["access_token"]) == 200


async def test_a_grant_revokes_so_the_new_role_comes_with_the_next_token(
    aiohttp_client: Any, config: Config
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(client)
    member = await add_user(client, owner)
    resp = await client.put(f"/v1/users/{member.id}/roles/admin", headers=owner.headers)
    assert resp.status == 204
    await _assert_401(client, member)
    resp = await client.post("/v1/auth/refresh", json={"refresh_token": member.refresh_token})
    assert resp.status == 200
    token = (await resp.json())["access_token"]
    resp = await client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert (await resp.json())["roles"] == ["admin", "member"]


async def _refresh_status(client: TestClient, refresh_token: str) -> int:
    resp = await client.post("/v1/auth/refresh", json={"refresh_token": refresh_token})
    return resp.status


async def test_logout_all_ends_every_session_of_the_caller_and_no_other(
    aiohttp_client: Any, config: Config
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(client)
    member = await add_user(client, owner)  # one login: one refresh family
    second = await login(client, owner.tenant_id, member.email)  # another login, another family
    other = await add_user(client, owner)
    resp = await client.post("/v1/auth/logout-all", headers=member.headers)
    assert resp.status == 204, await resp.text()
    assert await resp.read() == b""
    await _assert_401(client, member)
    await _assert_401(client, member, second["access_token"])
    assert await _refresh_status(client, member.refresh_token) == 401
    assert await _refresh_status(client, second["refresh_token"]) == 401
    # the other users of the tenant keep their sessions
    assert await _me(client, owner.access_token) == 200
    assert await _me(client, other.access_token) == 200
    assert await _refresh_status(client, other.refresh_token) == 200
    # logged in again at once: the new pair works, and refreshes
    fresh = await login(client, owner.tenant_id, member.email)
    assert await _me(client, fresh["access_token"]) == 200
    assert await _refresh_status(client, fresh["refresh_token"]) == 200


async def test_logout_all_needs_a_valid_access_token(aiohttp_client: Any, config: Config) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(client)
    resp = await client.post("/v1/auth/logout-all")
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="surge"'
    resp = await client.post("/v1/auth/logout-all", headers=owner.headers)
    assert resp.status == 204
    # the revoked token cannot call it again, and nothing else was logged out
    resp = await client.post("/v1/auth/logout-all", headers=owner.headers)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == INVALID


async def test_a_change_that_revokes_nothing_keeps_the_token(
    aiohttp_client: Any, config: Config
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(client)
    member = await add_user(client, owner)
    etag = await _etag(client, owner, member.id)
    resp = await client.patch(
        f"/v1/users/{member.id}",
        json={"username": "renamed"},
        headers={**owner.headers, "If-Match": etag},
    )
    assert resp.status == 200
    # granting a role the user already has changes nothing
    resp = await client.put(f"/v1/users/{member.id}/roles/member", headers=owner.headers)
    assert resp.status == 204
    assert await _me(client, member.access_token) == 200


async def test_a_revoked_token_on_a_public_route_is_anonymous(
    aiohttp_client: Any, config: Config
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(client)
    member = await add_user(client, owner)
    await _suspend(client, owner, member)
    # the public route answers as it would with no token (its own rules), not 401
    resp = await client.post(
        "/v1/auth/login",
        json={"tenant_id": owner.tenant_id, "email": member.email, "password": PASSWORD},
        headers=member.headers,
    )
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="surge"'


async def test_tokens_issued_before_the_generation_claim_still_verify(
    aiohttp_client: Any, config: Config
) -> None:
    """A token of the previous release (no `gen` claim) counts as generation 0: it verifies
    until its user is first revoked."""
    client: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(client)
    member = await add_user(client, owner)
    kid, secret = TEST_JWT_KEYS.split(",")[0].split(":")
    now = int(time.time())
    claims = {
        "iss": config.jwt_issuer, "aud": config.jwt_audience, "sub": member.id,
        "tid": owner.tenant_id, "roles": ["member"], "iat": now, "exp": now + 60,
        "jti": "0123456789abcdef",
    }  # fmt: skip
    from server.tokens import sign

    legacy = sign(header_segment(kid), claims, secret.encode())
    assert "gen" not in orjson.loads(base64.urlsafe_b64decode(legacy.split(".")[1] + "=="))
    assert await _me(client, legacy) == 200
    await _suspend(client, owner, member)
    await _assert_401(client, member, legacy)


# Several processes (each create_app is one), sharing PostgreSQL and Redis.


async def test_a_revocation_reaches_another_process_within_a_second(
    aiohttp_client: Any, config: Config
) -> None:
    a: TestClient = await aiohttp_client(create_app(config))
    b_app = create_app(config)
    b: TestClient = await aiohttp_client(b_app)
    b_app[REVOCATIONS]._tasks[0].cancel()  # b's sweep: the news can only come by Redis
    owner = await signup(a)
    member = await add_user(a, owner)
    assert await _me(b, member.access_token) == 200  # b has verified (and cached) the token
    await _suspend(a, owner, member)

    async def rejected_by_b() -> bool:
        return await _me(b, member.access_token) == 401

    await _until(1.0, rejected_by_b)
    await _assert_401(b, member)


async def test_logout_all_reaches_another_process_within_a_second(
    aiohttp_client: Any, config: Config
) -> None:
    a: TestClient = await aiohttp_client(create_app(config))
    b_app = create_app(config)
    b: TestClient = await aiohttp_client(b_app)
    b_app[REVOCATIONS]._tasks[0].cancel()  # b's sweep: the news can only come by Redis
    owner = await signup(a)
    assert await _me(b, owner.access_token) == 200  # b has verified (and cached) the token
    resp = await a.post("/v1/auth/logout-all", headers=owner.headers)
    assert resp.status == 204
    await _until(1.0, partial(_rejected, b, owner.access_token))
    await _assert_401(b, owner)


async def test_with_redis_down_the_sweep_of_postgres_decides(
    aiohttp_client: Any, config: Config
) -> None:
    a: TestClient = await aiohttp_client(create_app(config))
    down = dataclasses.replace(config, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    cut_off: TestClient = await aiohttp_client(create_app(down))
    owner = await signup(a)
    member = await add_user(a, owner)
    assert await _me(cut_off, member.access_token) == 200
    resp = await a.put(
        "/v1/me/password",
        json={"old_password": PASSWORD, "new_password": NEW_PASSWORD},
        headers=member.headers,
    )
    assert resp.status == 204

    async def rejected() -> bool:
        return await _me(cut_off, member.access_token) == 401

    await _until(1.0, rejected)
    await _assert_401(cut_off, member)
    fresh = await login(cut_off, owner.tenant_id, member.email, NEW_PASSWORD)
    assert await _me(cut_off, fresh["access_token"]) == 200
    assert await _me(cut_off, owner.access_token) == 200
    # a revocation made by the cut-off process itself (its publish fails) reaches the others
    resp = await cut_off.delete(f"/v1/users/{member.id}", headers=owner.headers)
    assert resp.status == 204
    await _assert_401(cut_off, member, fresh["access_token"])

    async def rejected_by_a() -> bool:
        return await _me(a, fresh["access_token"]) == 401

    await _until(1.0, rejected_by_a)


async def test_with_redis_down_and_no_sweep_each_token_is_checked_in_postgres(
    aiohttp_client: Any, config: Config
) -> None:
    a: TestClient = await aiohttp_client(create_app(config))
    down = dataclasses.replace(config, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    app = create_app(down)
    cut_off: TestClient = await aiohttp_client(app)
    owner = await signup(a)
    member = await add_user(a, owner)
    revocations = app[REVOCATIONS]
    # The sweep stops (as when PostgreSQL is too slow to answer it): once neither source is
    # current, the list is stale and every token is checked against PostgreSQL.
    revocations._tasks[0].cancel()

    async def stale() -> bool:
        return revocations.stale

    await _until(3.0, stale)
    checks = _db_checks()
    assert await _me(cut_off, member.access_token) == 200
    assert _db_checks() == checks + 1
    resp = await a.delete(f"/v1/users/{member.id}", headers=owner.headers)
    assert resp.status == 204
    # no sweep and no message: PostgreSQL, asked again (the last answer is older than 1 s)
    await _until(2.0, partial(_rejected, cut_off, member.access_token))
    await _assert_401(cut_off, member)
    assert await _me(cut_off, owner.access_token) == 200


async def test_a_process_started_after_the_revocation_rejects_the_old_token(
    aiohttp_client: Any, config: Config
) -> None:
    a: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(a)
    admin = await add_user(a, owner, ["admin", "member"])
    await _suspend(a, owner, admin)
    late: TestClient = await aiohttp_client(create_app(config))
    await _assert_401(late, admin)
    assert await _me(late, owner.access_token) == 200


def test_a_token_carries_its_generation() -> None:
    ts = TokenService([("k", b"s" * 32)], "iss", "aud", 60)
    user, tenant = uuid.uuid4(), uuid.uuid4()
    assert ts.verify(ts.issue(user, tenant, ["member"], 7)).generation == 7
    assert ts.verify(ts.issue(user, tenant, ["member"])).generation == 0

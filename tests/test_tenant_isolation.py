"""Tenant isolation: a second tenant probing every users endpoint with the first tenant's ids.

Another tenant's user must look exactly like a user that does not exist (404, never 403 or
409), must never show up in a list, and must come out of the probing unchanged.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from db.ids import uuid7
from server.app import create_app
from server.config import Config
from tests.helpers import PASSWORD, Actor, add_user, signup

# (method, path suffix, body, If-Match): every endpoint that takes a user id
PROBES: list[tuple[str, str, dict[str, Any] | None, str | None]] = [
    ("GET", "", None, None),
    ("PATCH", "", {"username": "hijacked"}, '"1"'),
    ("PATCH", "", {"status": "suspended"}, '"1"'),
    ("PATCH", "", {"profile": {"owned": True}}, "*"),
    ("DELETE", "", None, None),
    ("PUT", "/roles/owner", None, None),
    ("PUT", "/roles/admin", None, None),
    ("PUT", "/roles/member", None, None),
    ("DELETE", "/roles/owner", None, None),
    ("DELETE", "/roles/admin", None, None),
]


async def tenant_snapshot(dsn: str, tenant_id: str) -> dict[str, Any]:
    con = await asyncpg.connect(dsn)
    try:
        tid = uuid.UUID(tenant_id)
        users = await con.fetch(
            "SELECT id, email, username, status, roles, profile, version, updated_at"
            " FROM users WHERE tenant_id = $1 ORDER BY id",
            tid,
        )
        counts = {
            t: await con.fetchval(f"SELECT count(*) FROM {t} WHERE tenant_id = $1", tid)  # noqa: S608
            for t in ("users", "audit_log", "outbox", "refresh_tokens")
        }
        revoked = await con.fetchval(
            "SELECT count(*) FROM refresh_tokens WHERE tenant_id = $1 AND revoked_at IS NOT NULL",
            tid,
        )
        return {"users": [dict(u) for u in users], "counts": counts, "revoked": revoked}
    finally:
        await con.close()


async def build(client: TestClient) -> tuple[Actor, dict[str, Actor], Actor]:
    """Tenant A (owner, admin, member) and tenant B's owner."""
    a_owner, b_owner = await asyncio.gather(signup(client, "Tenant A"), signup(client, "Tenant B"))
    a_admin, a_member = await asyncio.gather(
        add_user(client, a_owner, ["admin"]), add_user(client, a_owner, ["member"])
    )
    return b_owner, {"owner": a_owner, "admin": a_admin, "member": a_member}, a_owner


async def test_another_tenants_users_are_404_on_every_endpoint(
    aiohttp_client: Any, config: Config
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    b_owner, a_users, a_owner = await build(client)
    # A reads its users first, so they sit in the Redis cache while B probes
    originals = {}
    for name, user in a_users.items():
        resp = await client.get(f"/v1/users/{user.id}", headers=a_owner.headers)
        assert resp.status == 200
        originals[name] = await resp.read()
    before = await tenant_snapshot(config.database_url or "", a_owner.tenant_id)

    got, expected = {}, {}
    for name, user in [*a_users.items(), ("nonexistent", None)]:
        target = user.id if user else str(uuid7())
        for method, suffix, body, if_match in PROBES:
            headers = dict(b_owner.headers)
            if if_match is not None:
                headers["If-Match"] = if_match
            resp = await client.request(
                method, f"/v1/users/{target}{suffix}", json=body, headers=headers
            )
            key = (name, method, suffix, str(body))
            got[key], expected[key] = resp.status, 404
            assert resp.headers["Content-Type"] == "application/problem+json"
            problem = await resp.json(content_type=None)
            # indistinguishable from an id that exists nowhere
            assert (problem["type"], problem["title"], problem["detail"]) == (
                "/problems/not-found",
                "Not Found",
                "user not found",
            ), key
            assert "ETag" not in resp.headers
    assert got == expected

    # B's list never contains A's users, whatever the filter
    a_ids = {u.id for u in a_users.values()}
    for query in [
        "",
        "?status=active",
        "?status=suspended",
        "?status=deleted",
        "?q=user",
        "?q=owner",
        f"?q={a_owner.email}",
        "?limit=1",
    ]:
        resp = await client.get(f"/v1/users{query}", headers=b_owner.headers)
        assert resp.status == 200, query
        page = await resp.json()
        ids = {u["id"] for u in page["items"]}
        assert not ids & a_ids, query
        assert ids <= {b_owner.id}, query
        assert {u["tenant_id"] for u in page["items"]} <= {b_owner.tenant_id}
    resp = await client.get("/v1/users", headers=b_owner.headers)
    assert [u["id"] for u in (await resp.json())["items"]] == [b_owner.id]

    # A's users are untouched: same bytes from the API, same rows and no audit or outbox entry
    for name, user in a_users.items():
        resp = await client.get(f"/v1/users/{user.id}", headers=a_owner.headers)
        assert (resp.status, resp.headers["ETag"]) == (200, '"1"')
        assert await resp.read() == originals[name]
    after = await tenant_snapshot(config.database_url or "", a_owner.tenant_id)
    assert after == before
    assert all(u["version"] == 1 and u["status"] == "active" for u in after["users"])


@pytest.mark.parametrize("role", ["admin", "member"])
async def test_lower_roles_of_another_tenant_learn_nothing_either(
    aiohttp_client: Any, config: Config, role: str
) -> None:
    """An admin or member of B gets, for A's ids, exactly the answer it gets for ids that exist
    nowhere (404 for what its role may do, 403 for what it may not)."""
    client: TestClient = await aiohttp_client(create_app(config))
    b_owner, a_users, a_owner = await build(client)
    prober = await add_user(client, b_owner, [role])
    before = await tenant_snapshot(config.database_url or "", a_owner.tenant_id)
    for method, suffix, body, if_match in PROBES:
        answers = []
        for target in (a_users["member"].id, a_users["owner"].id, str(uuid7())):
            headers = dict(prober.headers)
            if if_match is not None:
                headers["If-Match"] = if_match
            resp = await client.request(
                method, f"/v1/users/{target}{suffix}", json=body, headers=headers
            )
            problem = await resp.json(content_type=None)
            answers.append((resp.status, problem["type"], problem["detail"]))
        assert answers[0] == answers[1] == answers[2], (method, suffix, body, answers)
        assert answers[0][0] in (403, 404)
        if method == "GET":
            assert answers[0][0] == 404
    assert await tenant_snapshot(config.database_url or "", a_owner.tenant_id) == before


async def test_login_to_another_tenant_with_your_credentials_is_401(
    aiohttp_client: Any, config: Config
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    b_owner, a_users, a_owner = await build(client)
    # B has a user with the same email as A's member, but its own password
    shared_email = a_users["member"].email
    resp = await client.post(
        "/v1/users",
        json={
            "email": shared_email,
            "username": "twin",
            "password": "b's own password",
        },
        headers=b_owner.headers,
    )
    assert resp.status == 201, await resp.text()
    b_twin = (await resp.json())["id"]
    before = await tenant_snapshot(config.database_url or "", a_owner.tenant_id)

    async def login(tenant_id: str, email: str, password: str) -> tuple[int, Any]:
        resp = await client.post(
            "/v1/auth/login", json={"tenant_id": tenant_id, "email": email, "password": password}
        )
        body = await resp.json(content_type=None)
        if resp.status == 401:
            assert resp.headers["Content-Type"] == "application/problem+json"
            return 401, (body["type"], body["detail"])
        return resp.status, body

    refused = (401, ("/problems/unauthorized", "wrong tenant, email or password"))
    # B's credentials against A's tenant
    assert await login(a_owner.tenant_id, b_owner.email, PASSWORD) == refused
    assert await login(a_owner.tenant_id, shared_email, "b's own password") == refused
    # ... and A's against B's
    assert await login(b_owner.tenant_id, a_owner.email, PASSWORD) == refused
    # the same answer as an unknown tenant
    assert await login(str(uuid7()), b_owner.email, PASSWORD) == refused
    # each pair works in its own tenant
    status, tokens = await login(b_owner.tenant_id, shared_email, "b's own password")
    assert status == 200
    resp = await client.get("/v1/me", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    me = await resp.json()
    assert (me["id"], me["tenant_id"]) == (b_twin, b_owner.tenant_id)
    status, _ = await login(a_owner.tenant_id, shared_email, PASSWORD)
    assert status == 200

    # A's twin is not B's: B's owner cannot reach it, and A's rows only gained A's own login
    resp = await client.get(f"/v1/users/{a_users['member'].id}", headers=b_owner.headers)
    assert resp.status == 404
    after = await tenant_snapshot(config.database_url or "", a_owner.tenant_id)
    assert after["users"] == before["users"]
    assert after["counts"]["refresh_tokens"] == before["counts"]["refresh_tokens"] + 1
    assert after["counts"]["audit_log"] == before["counts"]["audit_log"]

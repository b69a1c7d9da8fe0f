"""Every identity write appends an audit row and an outbox event in the same transaction."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
import pytest

from server.app import create_app
from server.config import Config

from .helpers import add_user, signup


async def rows(dsn: str | None, sql: str) -> list[asyncpg.Record]:
    con = await asyncpg.connect(dsn)
    try:
        return await con.fetch(sql)
    finally:
        await con.close()


async def test_writes_are_audited_and_announced(aiohttp_client: Any, config: Config) -> None:
    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    member = await add_user(client, owner)
    rid = "trace-me-1"
    h = {**owner.headers, "X-Request-ID": rid}
    path = f"/v1/users/{member.id}"
    assert (
        await client.patch(path, json={"username": "m2"}, headers={**h, "If-Match": '"1"'})
    ).status == 200
    assert (await client.put(f"{path}/roles/admin", headers=h)).status == 204
    assert (await client.delete(f"{path}/roles/admin", headers=h)).status == 204
    assert (await client.delete(path, headers=h)).status == 204
    audit = await rows(
        config.database_url,
        "SELECT action, actor_id::text, target_id::text, request_id FROM audit_log ORDER BY id",
    )
    assert [r["action"] for r in audit] == [
        "tenant.created",
        "user.created",
        "user.created",
        "user.updated",
        "user.role_granted",
        "user.role_revoked",
        "user.deleted",
    ]
    for r in audit[3:]:
        assert (r["actor_id"], r["target_id"], r["request_id"]) == (owner.id, member.id, rid)
    outbox = await rows(config.database_url, "SELECT topic, payload FROM outbox ORDER BY id")
    assert [r["topic"] for r in outbox] == [r["action"] for r in audit]
    payloads = [orjson.loads(r["payload"]) for r in outbox]  # a raw connection: jsonb as text
    assert payloads[-1]["status"] == "deleted"
    assert payloads[-1]["id"] == member.id
    assert all("password_hash" not in p for p in payloads)


async def test_ending_ones_own_sessions_is_audited_and_announced(
    aiohttp_client: Any, config: Config
) -> None:
    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    member = await add_user(client, owner)
    rid = "trace-me-2"
    resp = await client.post("/v1/auth/logout-all", headers={**member.headers, "X-Request-ID": rid})
    assert resp.status == 204
    audit = await rows(
        config.database_url,
        "SELECT action, actor_id::text, target_id::text, request_id FROM audit_log ORDER BY id",
    )
    assert [tuple(r) for r in audit[3:]] == [("user.logged_out_all", member.id, member.id, rid)]
    outbox = await rows(config.database_url, "SELECT topic, payload FROM outbox ORDER BY id")
    assert [r["topic"] for r in outbox] == [r["action"] for r in audit]
    payload = orjson.loads(outbox[-1]["payload"])
    assert (payload["id"], payload["status"], payload["version"]) == (member.id, "active", 1)
    assert "password_hash" not in payload


@pytest.mark.parametrize(
    ("method", "path_fmt", "body", "status"),
    [
        ("PATCH", "/v1/users/{id}", {"username": "x"}, 412),  # stale If-Match
        ("DELETE", "/v1/users/{owner}", None, 409),  # last owner
        (
            "POST",
            "/v1/users",
            {"email": "taken@example.com", "username": "dup", "password": "12345678"},
            409,
        ),
    ],
)
async def test_a_refused_write_leaves_no_trace(
    aiohttp_client: Any, config: Config, method: str, path_fmt: str, body: Any, status: int
) -> None:
    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    resp = await client.post(
        "/v1/users",
        json={"email": "Taken@example.com", "username": "taken", "password": "12345678"},
        headers=owner.headers,
    )
    member_id = (await resp.json())["id"]
    before = await rows(config.database_url, "SELECT count(*) AS n FROM audit_log")
    resp = await client.request(
        method,
        path_fmt.format(id=member_id, owner=owner.id),
        json=body,
        headers={**owner.headers, "If-Match": '"9"'},
    )
    assert resp.status == status, await resp.text()
    after = await rows(config.database_url, "SELECT count(*) AS n FROM audit_log")
    assert after[0]["n"] == before[0]["n"]
    outbox = await rows(config.database_url, "SELECT count(*) AS n FROM outbox")
    assert outbox[0]["n"] == before[0]["n"]

"""RBAC: every role against every /v1/me and /v1/users endpoint, with targets of every rank.

owner > admin > member. Members read; admins and owners create, update, delete users and grant
or revoke roles up to their own rank; nobody acts on a user who outranks them; the last active
owner cannot be deleted, suspended or demoted (409). Each test builds one tenant and walks its
table, so a failure shows every cell that differs at once.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from db.ids import uuid7
from server.app import create_app
from server.config import Config
from tests.helpers import PASSWORD, Actor, add_user, login, signup

ROLES = ("owner", "admin", "member")  # also the column order of every grid below
_seq = itertools.count(1)

# actor -> status of POST /v1/users with roles [owner], [admin], [member]
CREATE = {
    "owner": (201, 201, 201),
    "admin": (403, 201, 201),
    "member": (403, 403, 403),
}
# actor -> status against a target whose highest role is owner, admin, member
GET_ONE = {
    "owner": (200, 200, 200),
    "admin": (200, 200, 200),
    "member": (200, 200, 200),
}
PATCH = {
    "owner": (200, 200, 200),
    "admin": (403, 200, 200),
    "member": (403, 403, 403),
}
DELETE = {
    "owner": (204, 204, 204),
    "admin": (403, 204, 204),
    "member": (403, 403, 403),
}
# role in the path -> actor -> status against targets owner, admin, member
GRANT = {
    "owner": {"owner": (204, 204, 204), "admin": (403, 403, 403), "member": (403, 403, 403)},
    "admin": {"owner": (204, 204, 204), "admin": (403, 204, 204), "member": (403, 403, 403)},
    "member": {"owner": (204, 204, 204), "admin": (403, 204, 204), "member": (403, 403, 403)},
}
REVOKE = {
    "owner": {"owner": (204, 204, 204), "admin": (403, 403, 403), "member": (403, 403, 403)},
    "admin": {"owner": (204, 204, 204), "admin": (403, 204, 204), "member": (403, 403, 403)},
    # member is the base role: revoking it is refused for everyone
    "member": {"owner": (422, 422, 422), "admin": (422, 422, 422), "member": (422, 422, 422)},
}


def grid(table: dict[str, tuple[int, int, int]]) -> dict[tuple[str, str], int]:
    return {
        (actor, target): status
        for actor, row in table.items()
        for target, status in zip(ROLES, row, strict=True)
    }


def cube(table: dict[str, dict[str, tuple[int, int, int]]]) -> dict[tuple[str, str, str], int]:
    return {
        (role, actor, target): status
        for role, by_actor in table.items()
        for (actor, target), status in grid(by_actor).items()
    }


async def build_tenant(client: TestClient) -> dict[str, Actor]:
    owner = await signup(client, "RBAC")
    admin, member = await asyncio.gather(
        add_user(client, owner, ["admin"]), add_user(client, owner, ["member"])
    )
    return {"owner": owner, "admin": admin, "member": member}


async def new_targets(config: Config, owner: Actor, ranks: list[str]) -> list[str]:
    """Fresh users whose highest roles are `ranks`, written straight to the table: targets never
    log in, so they skip the password hash (user creation itself is covered above)."""
    rows = []
    for rank in ranks:
        n = next(_seq)
        roles = [r for r in ROLES if r in (rank, "member")]
        rows.append((uuid7(), f"rbac-target{n}@example.com", f"rbac-target{n}", roles))
    con = await asyncpg.connect(config.database_url)
    try:
        await con.executemany(
            "INSERT INTO users (tenant_id, id, email, username, password_hash, roles)"
            " VALUES ($1, $2, $3, $4, 'not-a-hash', $5)",
            [(uuid.UUID(owner.tenant_id), *row) for row in rows],
        )
    finally:
        await con.close()
    return [str(row[0]) for row in rows]


async def fetch(client: TestClient, by: Actor, user_id: str) -> dict[str, Any]:
    resp = await client.get(f"/v1/users/{user_id}", headers=by.headers)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    assert resp.headers["ETag"] == f'"{body["version"]}"'
    return body


async def assert_problem(resp: Any, status: int, slug: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Type"] == "application/problem+json"
    body: dict[str, Any] = await resp.json(content_type=None)
    assert body["status"] == status
    assert body["type"] == f"/problems/{slug}"
    assert body["request_id"] == resp.headers["X-Request-ID"]
    assert {"title", "detail"} <= body.keys()
    return body


SLUGS = {
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    409: "conflict",
    422: "validation",
}


async def test_every_role_reads_me_the_list_and_every_user(
    aiohttp_client: Any, config: Config
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    actors = await build_tenant(client)
    expected = {(a, "me"): 200 for a in ROLES} | {(a, "list"): 200 for a in ROLES} | grid(GET_ONE)
    got: dict[tuple[str, str], int] = {}
    for name, actor in actors.items():
        resp = await client.get("/v1/me", headers=actor.headers)
        got[name, "me"] = resp.status
        me = await resp.json()
        assert (me["id"], me["roles"]) == (actor.id, actor.roles)
        assert resp.headers["ETag"] == f'"{me["version"]}"'

        resp = await client.get("/v1/users", headers=actor.headers)
        got[name, "list"] = resp.status
        page = await resp.json()
        assert {u["id"] for u in page["items"]} == {a.id for a in actors.values()}
        assert page["next_cursor"] is None

        for rank in ROLES:
            resp = await client.get(f"/v1/users/{actors[rank].id}", headers=actor.headers)
            got[name, rank] = resp.status
            assert (await resp.json())["id"] == actors[rank].id
    assert got == expected


async def test_every_role_changes_its_own_password(aiohttp_client: Any, config: Config) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    actors = await build_tenant(client)
    got = {}
    for name, actor in actors.items():
        resp = await client.put(
            "/v1/me/password",
            json={"old_password": PASSWORD, "new_password": f"new {name} password"},
            headers=actor.headers,
        )
        got[name] = resp.status
        await login(client, actor.tenant_id, actor.email, f"new {name} password")
        resp = await client.post(
            "/v1/auth/login",
            json={"tenant_id": actor.tenant_id, "email": actor.email, "password": PASSWORD},
        )
        await assert_problem(resp, 401, "unauthorized")
    assert got == {"owner": 204, "admin": 204, "member": 204}


async def test_create_user_with_each_role(aiohttp_client: Any, config: Config) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    actors = await build_tenant(client)
    got = {}
    for name, actor in actors.items():
        for role in ROLES:
            n = next(_seq)
            resp = await client.post(
                "/v1/users",
                json={
                    "email": f"rbac-new{n}@example.com",
                    "username": f"rbac-new{n}",
                    "password": PASSWORD,
                    "roles": [role],
                },
                headers=actor.headers,
            )
            got[name, role] = resp.status
            if resp.status == 201:
                body = await resp.json()
                assert resp.headers["Location"] == f"/v1/users/{body['id']}"
                assert resp.headers["ETag"] == '"1"'
                assert body["roles"] == [r for r in ROLES if r == role or r == "member"]
                assert body["tenant_id"] == actor.tenant_id
            else:
                await assert_problem(resp, resp.status, SLUGS[resp.status])
    assert got == grid(CREATE)
    # exactly the 201s exist: 3 actors + 5 created
    resp = await client.get("/v1/users", headers=actors["owner"].headers)
    assert len((await resp.json())["items"]) == 3 + 5


@pytest.mark.parametrize(
    ("method", "table"),
    [("GET", GET_ONE), ("PATCH", PATCH), ("DELETE", DELETE)],
    ids=["get", "patch", "delete"],
)
async def test_act_on_a_user_of_each_rank(
    aiohttp_client: Any, config: Config, method: str, table: dict[str, tuple[int, int, int]]
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    actors = await build_tenant(client)
    owner = actors["owner"]
    targets = iter(await new_targets(config, owner, [r for _ in ROLES for r in ROLES]))
    got = {}
    for name, actor in actors.items():
        for rank in ROLES:
            target = next(targets)
            headers = dict(actor.headers)
            body = None
            if method == "PATCH":
                headers["If-Match"] = '"1"'
                body = {"username": f"renamed-{name}-{rank}"}
            resp = await client.request(method, f"/v1/users/{target}", json=body, headers=headers)
            got[name, rank] = resp.status
            after = await fetch(client, owner, target)
            if resp.status == 200 and method == "GET":
                assert await resp.json() == after
            elif resp.status == 200 and method == "PATCH":
                patched = await resp.json()
                assert resp.headers["ETag"] == '"2"'
                assert patched == after
                assert (after["username"], after["version"]) == (f"renamed-{name}-{rank}", 2)
            elif resp.status == 204:
                assert await resp.read() == b""
                assert (after["status"], after["version"]) == ("deleted", 2)
            elif resp.status != 200:
                await assert_problem(resp, resp.status, SLUGS[resp.status])
                assert (after["status"], after["version"]) == ("active", 1)
    assert got == grid(table)


@pytest.mark.parametrize(
    ("method", "table"), [("PUT", GRANT), ("DELETE", REVOKE)], ids=["grant", "revoke"]
)
async def test_grant_and_revoke_each_role_on_each_rank(
    aiohttp_client: Any,
    config: Config,
    method: str,
    table: dict[str, dict[str, tuple[int, int, int]]],
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    actors = await build_tenant(client)
    owner = actors["owner"]
    targets = iter(await new_targets(config, owner, [r for _ in range(9) for r in ROLES]))
    got = {}
    for role in ROLES:
        for name, actor in actors.items():
            for rank in ROLES:
                target = next(targets)
                before = await fetch(client, owner, target)
                resp = await client.request(
                    method, f"/v1/users/{target}/roles/{role}", headers=actor.headers
                )
                got[role, name, rank] = resp.status
                after = await fetch(client, owner, target)
                if resp.status == 204:
                    assert await resp.read() == b""
                    assert (role in after["roles"]) is (method == "PUT")
                    assert "member" in after["roles"]
                    changed = (role in before["roles"]) is not (role in after["roles"])
                    assert after["version"] == (2 if changed else 1)
                else:
                    await assert_problem(resp, resp.status, SLUGS[resp.status])
                    assert after == before
    assert got == cube(table)


LAST_OWNER_ACTIONS = {
    # action -> (method, path under /v1/users/{id}, body, success status)
    "delete": ("DELETE", "", None, 204),
    "suspend": ("PATCH", "", {"status": "suspended"}, 200),
    "revoke-owner": ("DELETE", "/roles/owner", None, 204),
}


@pytest.mark.parametrize("action", list(LAST_OWNER_ACTIONS))
async def test_last_active_owner_is_protected(
    aiohttp_client: Any, config: Config, action: str
) -> None:
    method, suffix, body, ok = LAST_OWNER_ACTIONS[action]
    client: TestClient = await aiohttp_client(create_app(config))
    first = await signup(client, "Owners")

    async def act(on: Actor) -> Any:
        headers = {**on.headers, "If-Match": "*"} if method == "PATCH" else on.headers
        return await client.request(
            method, f"/v1/users/{on.id}{suffix}", json=body, headers=headers
        )

    # alone: refused, and nothing changed
    problem = await assert_problem(await act(first), 409, "conflict")
    assert "last owner" in problem["detail"]
    me = await fetch(client, first, first.id)
    assert (me["status"], me["roles"], me["version"]) == ("active", ["owner", "member"], 1)

    # with a second owner the first can go ...
    second = await add_user(client, first, ["owner"])
    resp = await act(first)
    assert resp.status == ok, await resp.text()
    gone = await fetch(client, second, first.id)
    assert gone["version"] == 2
    assert (gone["status"], "owner" in gone["roles"]) == {
        "delete": ("deleted", True),
        "suspend": ("suspended", True),
        "revoke-owner": ("active", False),
    }[action]

    # ... and now the second one is the last active owner
    await assert_problem(await act(second), 409, "conflict")
    me = await fetch(client, second, second.id)
    assert (me["status"], me["roles"], me["version"]) == ("active", ["owner", "member"], 1)


async def test_admin_cannot_suspend_the_sole_owner_is_403(
    aiohttp_client: Any, config: Config
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(client, "Outranked")
    admin = await add_user(client, owner, ["admin"])
    resp = await client.patch(
        f"/v1/users/{owner.id}",
        json={"status": "suspended"},
        headers={**admin.headers, "If-Match": '"1"'},
    )
    await assert_problem(resp, 403, "forbidden")


async def test_an_admin_cannot_touch_a_sole_owner(aiohttp_client: Any, config: Config) -> None:
    """The protected-owner rule never shows an outranked caller anything but 403."""
    client: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(client, "Outranked")
    admin = await add_user(client, owner, ["admin"])
    for method, suffix in [("DELETE", ""), ("DELETE", "/roles/owner"), ("DELETE", "/roles/admin")]:
        resp = await client.request(method, f"/v1/users/{owner.id}{suffix}", headers=admin.headers)
        await assert_problem(resp, 403, "forbidden")
    resp = await client.patch(
        f"/v1/users/{owner.id}",
        json={"username": "pwned"},
        headers={**admin.headers, "If-Match": '"1"'},
    )
    await assert_problem(resp, 403, "forbidden")
    me = await fetch(client, owner, owner.id)
    assert (me["status"], me["roles"], me["version"]) == ("active", ["owner", "member"], 1)
    assert me["username"] != "pwned"


async def test_unknown_role_and_member_revocation_are_422(
    aiohttp_client: Any, config: Config
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(client, "Roles")
    cases = [(m, r) for r in ("superuser", "Owner", "members", "%20") for m in ("PUT", "DELETE")]
    cases.append(("DELETE", "member"))  # the base role: never revoked
    for method, role in cases:
        resp = await client.request(
            method, f"/v1/users/{owner.id}/roles/{role}", headers=owner.headers
        )
        problem = await assert_problem(resp, 422, "validation")
        assert [e["field"] for e in problem["errors"]] == ["role"], (method, role)
    me = await fetch(client, owner, owner.id)
    assert (me["roles"], me["version"]) == (["owner", "member"], 1)


_ANY_ID = str(uuid.UUID(int=1))
ENDPOINTS = [
    ("GET", "/v1/me", None),
    ("PUT", "/v1/me/password", {"old_password": PASSWORD, "new_password": "another password"}),
    ("GET", "/v1/users", None),
    ("POST", "/v1/users", {"email": "x@example.com", "username": "x", "password": PASSWORD}),
    ("GET", f"/v1/users/{_ANY_ID}", None),
    ("PATCH", f"/v1/users/{_ANY_ID}", {"username": "x"}),
    ("DELETE", f"/v1/users/{_ANY_ID}", None),
    ("PUT", f"/v1/users/{_ANY_ID}/roles/admin", None),
    ("DELETE", f"/v1/users/{_ANY_ID}/roles/admin", None),
]


@pytest.mark.parametrize(
    ("authorization", "error"),
    [
        (None, None),
        ("Bearer not-a-jwt", "invalid_token"),
        ("Bearer ", "invalid_token"),
        ("Basic dXNlcjpwYXNz", "invalid_token"),
    ],
    ids=["missing", "garbage", "empty-bearer", "basic"],
)
async def test_no_valid_token_is_401_everywhere(
    aiohttp_client: Any, config: Config, authorization: str | None, error: str | None
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    headers = {"If-Match": '"1"'}
    if authorization is not None:
        headers["Authorization"] = authorization
    got = {}
    for method, path, body in ENDPOINTS:
        resp = await client.request(method, path, json=body, headers=headers)
        got[method, path] = resp.status
        challenge = resp.headers.get("WWW-Authenticate", "")
        assert challenge.startswith("Bearer"), (method, path, challenge)
        if error is None:
            assert "error=" not in challenge
        else:
            assert f'error="{error}"' in challenge
        await assert_problem(resp, 401, "unauthorized")
    assert got == {(m, p): 401 for m, p, _ in ENDPOINTS}

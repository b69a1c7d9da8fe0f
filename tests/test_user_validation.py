"""Request validation of the identity endpoints: every field's bounds and JSON types, unknown and
missing fields, malformed JSON; 422 answers name the offending field in `errors[]`, and a
refused request writes nothing (no user, tenant, token, audit row or outbox event).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.identity.api import SCHEMAS
from server.app import create_app
from server.config import Config
from tests.helpers import PASSWORD, Actor, add_user, signup

T = TypeVar("T")
MISSING: Any = object()  # a field left out of the body
TABLES = ("users", "tenants", "audit_log", "outbox", "refresh_tokens")
UUID = str(uuid.UUID(int=7))
USERNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


async def row_counts(dsn: str | None) -> dict[str, int]:
    con = await asyncpg.connect(dsn)
    try:
        return {t: await con.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}  # noqa: S608
    finally:
        await con.close()


def body_with(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    body = {**base, **changes}
    return {k: v for k, v in body.items() if v is not MISSING}


async def send(
    client: TestClient, method: str, path: str, body: Any, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    resp = await client.request(
        method,
        path,
        data=orjson.dumps(body),
        headers={**headers, "Content-Type": "application/json"},
    )
    if resp.status >= 400:
        assert resp.headers["Content-Type"] == "application/problem+json"
    payload: dict[str, Any] = await resp.json(content_type=None) if resp.status != 204 else {}
    if resp.status == 422:
        assert payload["status"] == 422
        assert payload["type"] == "/problems/validation"
        assert payload["request_id"] == resp.headers["X-Request-ID"]
        for error in payload.get("errors", []):
            assert error.keys() == {"field", "message"}
            assert isinstance(error["message"], str) and error["message"]
    return resp.status, payload


def fields_of(status: int, payload: dict[str, Any]) -> tuple[int, list[str] | None]:
    errors = payload.get("errors")
    return status, None if errors is None else [e["field"] for e in errors]


# (changes to a valid body, or a whole non-object body) -> the fields errors[] must name
SIGNUP_BASE = {
    "tenant_name": "Acme",
    "email": "founder@example.com",
    "username": "founder",
    "password": "p" * 8,
}
EMAIL_CASES: list[tuple[Any, list[str]]] = [
    ({"email": ""}, ["email"]),
    ({"email": "ab"}, ["email"]),
    ({"email": "a@b"}, ["email"]),
    ({"email": "no-at.example.com"}, ["email"]),
    ({"email": "two@@example.com"}, ["email"]),
    ({"email": "sp ace@example.com"}, ["email"]),
    ({"email": "x" * 243 + "@example.com"}, ["email"]),  # 255 characters
    ({"email": True}, ["email"]),
    ({"email": None}, ["email"]),
    ({"email": 1}, ["email"]),
    ({"email": ["a@example.com"]}, ["email"]),
    ({"email": MISSING}, ["email"]),
]
USERNAME_CASES: list[tuple[Any, list[str]]] = [
    ({"username": ""}, ["username"]),
    ({"username": "x" * 65}, ["username"]),
    ({"username": "-lead"}, ["username"]),
    ({"username": ".lead"}, ["username"]),
    ({"username": "sp ace"}, ["username"]),
    ({"username": "slash/y"}, ["username"]),
    ({"username": "trailing\n"}, ["username"]),
    ({"username": "ünïcode"}, ["username"]),
    ({"username": True}, ["username"]),
    ({"username": None}, ["username"]),
    ({"username": 1.5}, ["username"]),
]
PASSWORD_CASES: list[tuple[Any, list[str]]] = [
    ({"password": ""}, ["password"]),
    ({"password": "p" * 7}, ["password"]),
    ({"password": "p" * 129}, ["password"]),
    ({"password": True}, ["password"]),
    ({"password": None}, ["password"]),
    ({"password": 12345678}, ["password"]),
    ({"password": MISSING}, ["password"]),
]
WHOLE_BODY_CASES: list[tuple[Any, list[str]]] = [
    ([], [""]),
    ("a string", [""]),
    (None, [""]),
    (42, [""]),
    (True, [""]),
]
SIGNUP_CASES: list[tuple[Any, list[str]]] = [
    ({"tenant_name": ""}, ["tenant_name"]),
    ({"tenant_name": "x" * 101}, ["tenant_name"]),
    ({"tenant_name": True}, ["tenant_name"]),
    ({"tenant_name": None}, ["tenant_name"]),
    ({"tenant_name": 7}, ["tenant_name"]),
    ({"tenant_name": {"name": "Acme"}}, ["tenant_name"]),
    ({"tenant_name": MISSING}, ["tenant_name"]),
    *EMAIL_CASES,
    *USERNAME_CASES,
    ({"username": MISSING}, ["username"]),
    *PASSWORD_CASES,
    ({"role": "owner"}, ["role"]),
    ({"tenant_id": UUID, "roles": ["owner"]}, ["tenant_id", "roles"]),
    ({k: MISSING for k in SIGNUP_BASE}, ["tenant_name", "email", "username", "password"]),
    *WHOLE_BODY_CASES,
]
LOGIN_CASES: list[tuple[Any, list[str]]] = [
    ({"tenant_id": ""}, ["tenant_id"]),
    ({"tenant_id": "not-a-uuid"}, ["tenant_id"]),
    ({"tenant_id": UUID[:-1]}, ["tenant_id"]),
    ({"tenant_id": UUID + "0"}, ["tenant_id"]),
    ({"tenant_id": True}, ["tenant_id"]),
    ({"tenant_id": None}, ["tenant_id"]),
    ({"tenant_id": 7}, ["tenant_id"]),
    ({"tenant_id": MISSING}, ["tenant_id"]),
    ({"email": ""}, ["email"]),
    ({"email": "x" * 255}, ["email"]),
    ({"email": True}, ["email"]),
    ({"email": None}, ["email"]),
    ({"email": MISSING}, ["email"]),
    ({"password": ""}, ["password"]),
    ({"password": "p" * 129}, ["password"]),
    ({"password": True}, ["password"]),
    ({"password": None}, ["password"]),
    ({"password": 12345678}, ["password"]),
    ({"password": MISSING}, ["password"]),
    ({"remember_me": True}, ["remember_me"]),
    (
        {"tenant_id": MISSING, "email": MISSING, "password": MISSING},
        ["tenant_id", "email", "password"],
    ),
    *WHOLE_BODY_CASES,
]
CREATE_BASE = {
    "email": "created@example.com",
    "username": "created",
    "password": "p" * 8,
    "roles": ["member"],
    "profile": {},
}
BIG_PROFILE = {"k": "x" * 4089}  # {"k":"..."} is 4097 bytes of JSON
PROFILE_CASES: list[tuple[Any, list[str]]] = [
    ({"profile": []}, ["profile"]),
    ({"profile": "text"}, ["profile"]),
    ({"profile": True}, ["profile"]),
    ({"profile": None}, ["profile"]),
    ({"profile": 1}, ["profile"]),
    ({"profile": {f"k{i}": i for i in range(51)}}, ["profile"]),
    ({"profile": BIG_PROFILE}, ["profile"]),
    ({"profile": {"nested": {"deep": ["é" * 2100]}}}, ["profile"]),  # 4200+ bytes, 2100 chars
]
CREATE_CASES: list[tuple[Any, list[str]]] = [
    *EMAIL_CASES,
    *USERNAME_CASES,
    ({"username": MISSING}, ["username"]),
    *PASSWORD_CASES,
    ({"roles": []}, ["roles"]),
    ({"roles": ["root"]}, ["roles[0]"]),
    ({"roles": ["member", "Admin"]}, ["roles[1]"]),
    ({"roles": ["member", "member"]}, ["roles"]),
    ({"roles": ["owner", "admin", "member", "owner"]}, ["roles"]),
    ({"roles": "admin"}, ["roles"]),
    ({"roles": [True]}, ["roles[0]"]),
    ({"roles": ["member", None]}, ["roles[1]"]),
    ({"roles": None}, ["roles"]),
    ({"roles": True}, ["roles"]),
    *PROFILE_CASES,
    ({"status": "active"}, ["status"]),
    ({"id": UUID}, ["id"]),
    ({"tenant_id": UUID}, ["tenant_id"]),
    ({"version": 1}, ["version"]),
    ({k: MISSING for k in CREATE_BASE}, ["email", "username", "password"]),
    *WHOLE_BODY_CASES,
]
PATCH_CASES: list[tuple[Any, list[str]]] = [
    ({}, [""]),  # nothing to change
    *USERNAME_CASES,
    *PROFILE_CASES,
    ({"status": "deleted"}, ["status"]),
    ({"status": "ACTIVE"}, ["status"]),
    ({"status": ""}, ["status"]),
    ({"status": True}, ["status"]),
    ({"status": None}, ["status"]),
    ({"status": 1}, ["status"]),
    ({"email": "new@example.com"}, ["email"]),
    ({"username": "fine", "roles": ["owner"]}, ["roles"]),
    ({"version": 5}, ["version"]),
    ({"password": "p" * 8}, ["password"]),
    ({"id": UUID}, ["id"]),
    *WHOLE_BODY_CASES,
]
PASSWORD_BASE = {"old_password": PASSWORD, "new_password": "n" * 8}
PASSWORD_CHANGE_CASES: list[tuple[Any, list[str]]] = [
    ({"old_password": ""}, ["old_password"]),
    ({"old_password": "x" * 129}, ["old_password"]),
    ({"old_password": True}, ["old_password"]),
    ({"old_password": None}, ["old_password"]),
    ({"old_password": MISSING}, ["old_password"]),
    ({"old_password": "not the password"}, ["old_password"]),  # well formed, but wrong
    ({"new_password": ""}, ["new_password"]),
    ({"new_password": "n" * 7}, ["new_password"]),
    ({"new_password": "n" * 129}, ["new_password"]),
    ({"new_password": True}, ["new_password"]),
    ({"new_password": None}, ["new_password"]),
    ({"new_password": 123456789}, ["new_password"]),
    ({"new_password": MISSING}, ["new_password"]),
    ({"confirm_password": "n" * 8}, ["confirm_password"]),
    ({"old_password": MISSING, "new_password": MISSING}, ["old_password", "new_password"]),
    *WHOLE_BODY_CASES,
]

ENDPOINTS = {
    # name -> (method, path, base body, cases); {target} is a member of the owner's tenant
    "signup": ("POST", "/v1/auth/signup", SIGNUP_BASE, SIGNUP_CASES),
    "login": ("POST", "/v1/auth/login", {}, LOGIN_CASES),
    "create_user": ("POST", "/v1/users", CREATE_BASE, CREATE_CASES),
    "patch_user": ("PATCH", "/v1/users/{target}", {}, PATCH_CASES),
    "change_password": ("PUT", "/v1/me/password", PASSWORD_BASE, PASSWORD_CHANGE_CASES),
}
SCHEMA_OF = {
    "signup": "SignupRequest",
    "login": "LoginRequest",
    "create_user": "CreateUserRequest",
    "patch_user": "PatchUserRequest",
    "change_password": "PasswordChangeRequest",
}


async def setup(client: TestClient) -> tuple[Actor, Actor]:
    owner = await signup(client, "Validation")
    return owner, await add_user(client, owner, ["member"])


def headers_for(name: str, owner: Actor) -> dict[str, str]:
    if name in ("signup", "login"):
        return {}
    if name == "patch_user":
        return {**owner.headers, "If-Match": '"1"'}
    return owner.headers


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_invalid_bodies_are_422_naming_the_field_and_write_nothing(
    aiohttp_client: Any, config: Config, endpoint: str
) -> None:
    method, path, base, cases = ENDPOINTS[endpoint]
    client: TestClient = await aiohttp_client(create_app(config))
    owner, target = await setup(client)
    if endpoint == "login":
        base = {"tenant_id": owner.tenant_id, "email": owner.email, "password": PASSWORD}
    path = path.format(target=target.id)
    headers = headers_for(endpoint, owner)
    known = SCHEMAS[SCHEMA_OF[endpoint]]["properties"]
    before = await row_counts(config.database_url)
    got, want = {}, {}
    for changes, fields in cases:
        body = body_with(base, changes) if isinstance(changes, dict) else changes
        status, payload = await send(client, method, path, body, headers)
        key = repr(changes)[:80]
        got[key], want[key] = fields_of(status, payload), (422, fields)
        for error in payload.get("errors", []) if isinstance(changes, dict) else []:
            if changes.get(error["field"], None) is MISSING:
                assert error["message"] == "is required", key
            elif error["field"] in changes and error["field"] not in known:
                assert error["message"] == "unknown field", key
    assert got == want
    assert await row_counts(config.database_url) == before
    # the target and the owner (whose password change would bump its version) are untouched
    resp = await client.get(f"/v1/users/{target.id}", headers=owner.headers)
    assert (resp.status, resp.headers["ETag"]) == (200, '"1"')
    resp = await client.get("/v1/me", headers=owner.headers)
    assert resp.headers["ETag"] == '"1"'


MALFORMED = [b"", b"{", b'{"email": }', b"{'single': 1}", b"[1,]", b"\xff\xfe", b"NaN", b"{} {}"]


async def test_malformed_json_is_400_everywhere(aiohttp_client: Any, config: Config) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner, target = await setup(client)
    before = await row_counts(config.database_url)
    got = {}
    for name, (method, path, _, _) in ENDPOINTS.items():
        for raw in MALFORMED:
            resp = await client.request(
                method,
                path.format(target=target.id),
                data=raw,
                headers={**headers_for(name, owner), "Content-Type": "application/json"},
            )
            got[name, raw] = resp.status
            assert resp.headers["Content-Type"] == "application/problem+json"
            problem = await resp.json(content_type=None)
            assert problem["type"] == "/problems/bad-request", (name, raw)
            assert problem["request_id"] == resp.headers["X-Request-ID"]
            assert "errors" not in problem
    assert got == {(name, raw): 400 for name in ENDPOINTS for raw in MALFORMED}
    assert await row_counts(config.database_url) == before


async def test_values_at_the_bounds_are_accepted(aiohttp_client: Any, config: Config) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    longest = {
        "tenant_name": "T" * 100,
        "email": "e" * 242 + "@example.com",  # 254
        "username": "u" * 64,
        "password": "p" * 128,
    }
    status, body = await send(client, "POST", "/v1/auth/signup", longest, {})
    assert status == 201, body
    assert body["tenant"]["name"] == longest["tenant_name"]
    assert body["user"]["email"] == longest["email"]
    owner = {"Authorization": f"Bearer {body['access_token']}"}
    shortest = {"tenant_name": "T", "email": "a@b.c", "username": "u", "password": "p" * 8}
    status, body = await send(client, "POST", "/v1/auth/signup", shortest, {})
    assert status == 201, body

    exactly_4096 = {"k": "x" * 4088}
    assert len(orjson.dumps(exactly_4096)) == 4096
    created = {
        "email": "MiXeD.Case+tag@Example.com",
        "username": "A.b_c-1",
        "password": "p" * 128,
        "roles": ["admin", "member"],
        "profile": exactly_4096,
    }
    status, user = await send(client, "POST", "/v1/users", created, owner)
    assert status == 201, user
    assert (user["email"], user["roles"], user["profile"]) == (
        created["email"],
        ["admin", "member"],
        exactly_4096,
    )
    headers = {**owner, "If-Match": '"1"'}
    patch = {"username": "9" * 64, "profile": {f"k{i}": i for i in range(50)}, "status": "active"}
    status, user = await send(client, "PATCH", f"/v1/users/{user['id']}", patch, headers)
    assert status == 200, user
    assert (user["username"], user["version"], len(user["profile"])) == ("9" * 64, 2, 50)

    status, _ = await send(
        client,
        "PUT",
        "/v1/me/password",
        {"old_password": longest["password"], "new_password": "n" * 128},
        owner,
    )
    assert status == 204


async def test_duplicate_email_is_409_case_insensitively(
    aiohttp_client: Any, config: Config
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner, member = await setup(client)
    before = await row_counts(config.database_url)
    got = {}
    for email in [member.email, member.email.upper(), owner.email.title()]:
        body = {"email": email, "username": "dup", "password": PASSWORD}
        status, problem = await send(client, "POST", "/v1/users", body, owner.headers)
        got[email] = (status, problem.get("type"), problem.get("detail"))
    conflict = (409, "/problems/conflict", "a user with this email already exists in this tenant")
    assert got == dict.fromkeys(got, conflict) and len(got) == 3
    assert await row_counts(config.database_url) == before
    # the same address is free in another tenant
    other = await signup(client, "Other")
    body = {"email": member.email.upper(), "username": "dup", "password": PASSWORD}
    status, _ = await send(client, "POST", "/v1/users", body, other.headers)
    assert status == 201


def in_thread(loop: asyncio.AbstractEventLoop) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine on the test's loop from hypothesis' (synchronous) worker thread."""

    def run(coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=30)

    return run


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


async def test_any_wrong_json_type_is_422_naming_the_field(
    aiohttp_client: Any, config: Config
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner, _ = await setup(client)
    run = in_thread(asyncio.get_running_loop())
    before = await row_counts(config.database_url)
    expected_type = {
        "email": str,
        "username": str,
        "password": str,
        "roles": list,
        "profile": dict,
    }

    @settings(max_examples=30, deadline=None)
    @given(field=st.sampled_from(sorted(expected_type)), value=JSON_VALUES)
    def wrong_type(field: str, value: Any) -> None:
        if isinstance(value, expected_type[field]):
            return
        tried.append(field)
        body = {**CREATE_BASE, field: value}
        status, payload = run(send(client, "POST", "/v1/users", body, owner.headers))
        status, fields = fields_of(status, payload)
        assert status == 422
        # A card number or NUL inside the value is named where it is, before the type.
        assert fields == [field] or (
            fields is not None
            and len(fields) == 1
            and fields[0].startswith((f"{field}[", f"{field}."))
        )

    tried: list[str] = []
    await asyncio.to_thread(wrong_type)
    assert len(tried) > 10  # hypothesis really sent wrong types
    assert await row_counts(config.database_url) == before


async def test_usernames_are_accepted_exactly_when_they_match_the_schema(
    aiohttp_client: Any, config: Config
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner, target = await setup(client)
    run = in_thread(asyncio.get_running_loop())
    headers = {**owner.headers, "If-Match": "*"}

    @settings(max_examples=30, deadline=None)
    @given(
        st.text(max_size=70)
        | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,70}", fullmatch=True)
        | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._\-\n /@]{0,66}", fullmatch=True)
    )
    def username(name: str) -> None:
        status, payload = run(
            send(client, "PATCH", f"/v1/users/{target.id}", {"username": name}, headers)
        )
        valid = bool(USERNAME_RE.fullmatch(name)) and len(name) <= 64
        outcomes.add(valid)
        if valid:
            assert (status, payload["username"]) == (200, name)
        else:
            assert fields_of(status, payload) == (422, ["username"])

    outcomes: set[bool] = set()
    await asyncio.to_thread(username)
    assert outcomes == {True, False}


NUL_CASES = [
    # (endpoint, body changes, field): PostgreSQL text and jsonb cannot hold U+0000
    ("signup", {"tenant_name": "Ac\u0000me"}, "tenant_name"),
    ("signup", {"email": "fou\u0000nder@example.com"}, "email"),
    ("create_user", {"email": "cre\u0000ated@example.com"}, "email"),
    ("create_user", {"profile": {"bio": "a\u0000b"}}, "profile.bio"),
    ("patch_user", {"profile": {"a\u0000b": 1}}, "profile"),
]


@pytest.mark.parametrize(("endpoint", "changes", "field"), NUL_CASES)
async def test_nul_characters_are_422_naming_the_field(
    aiohttp_client: Any, config: Config, endpoint: str, changes: dict[str, Any], field: str
) -> None:
    method, path, base, _ = ENDPOINTS[endpoint]
    client: TestClient = await aiohttp_client(create_app(config))
    owner, target = await setup(client)
    before = await row_counts(config.database_url)
    status, payload = await send(
        client,
        method,
        path.format(target=target.id),
        body_with(base, changes),
        headers_for(endpoint, owner),
    )
    assert await row_counts(config.database_url) == before  # passes: the transaction rolls back
    assert status == 422
    assert [e["field"] for e in payload.get("errors", [])] == [field]
    assert payload["title"] == "Unprocessable Content"


@pytest.mark.parametrize(
    ("if_match", "status"),
    [
        (None, 428),
        ('"2"', 412),
        ('"abc"', 412),
        ("", 428),  # names no ETag: the precondition is missing
        ('"\u00b2"', 412),
    ],
    ids=["missing", "stale", "not-a-number", "empty", "superscript-two"],
)
async def test_if_match_must_name_the_current_version(
    aiohttp_client: Any, config: Config, if_match: str | None, status: int
) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(client, "Locks")
    headers = dict(owner.headers)
    if if_match is not None:
        headers["If-Match"] = if_match
    before = await row_counts(config.database_url)
    got, payload = await send(
        client, "PATCH", f"/v1/users/{owner.id}", {"username": "renamed"}, headers
    )
    assert (got, payload["status"]) == (status, status)
    assert await row_counts(config.database_url) == before

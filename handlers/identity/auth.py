"""Signup, login, refresh, logout.

Refresh tokens are opaque 256-bit random strings; only their SHA-256 is stored. Each login
starts a family; every refresh rotates the token within its family. Presenting a token that was
already rotated revokes the whole family (it was stolen, or the client is confused), except
within REFRESH_REUSE_GRACE_S of its rotation, so two tabs refreshing at once both succeed.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from typing import Any

from aiohttp import web
from asyncpg import Connection

from db import audit, tokens, users
from db.ids import parse_uuid, uuid7
from handlers.identity.keys import HASHER, USER_CACHE
from handlers.identity.users import user_body, user_view
from server import metrics
from server.errors import TooManyRequests, Unauthorized
from server.http import client_ip, json_response, timestamp
from server.keys import CONFIG, LIMITER, PG, RATELIMIT_HEADERS, REQUEST_ID
from server.tokens import TOKENS
from server.validation import read_json


def _hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def enforce_auth_limit(request: web.Request, email: str | None = None) -> None:
    """The brute-force limit on top of the general one: AUTH_RATE_LIMIT_PER_MINUTE per client
    IP and, for credentials, per email."""
    config = request.app[CONFIG]
    per_minute = config.auth_rate_limit_per_minute
    keys = [f"auth-ip:{client_ip(request, config.trust_forwarded_for)}"]
    if email is not None:
        keys.append(f"auth-email:{email.lower()}")
    for key in keys:
        decision = await request.app[LIMITER].take(key, per_minute / 60, per_minute)
        if not decision.allowed:
            metrics.RATELIMITED.labels("auth").inc()
            request[RATELIMIT_HEADERS] = decision.headers()
            raise TooManyRequests("too many attempts; retry after the Retry-After delay")


async def _issue_pair(
    request: web.Request,
    con: Connection,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    roles: list[str],
    family_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    config = request.app[CONFIG]
    refresh = secrets.token_urlsafe(32)  # 256 bits
    await tokens.insert_refresh_token(
        con,
        _hash_token(refresh),
        tenant_id,
        user_id,
        family_id or uuid7(),
        float(config.refresh_token_ttl_s),
    )
    return {
        "access_token": request.app[TOKENS].issue(user_id, tenant_id, roles),
        "refresh_token": refresh,
        "expires_in": config.access_token_ttl_s,
    }


async def signup(request: web.Request) -> web.Response:
    await enforce_auth_limit(request)
    body = await read_json(request, "SignupRequest")
    password_hash = await request.app[HASHER].hash(body["password"])
    tenant_id, user_id = uuid7(), uuid7()
    roles = ["owner", "member"]
    async with request.app[PG].transaction() as con:
        tenant = await users.insert_tenant(con, tenant_id, body["tenant_name"])
        user = await users.insert_user(
            con, tenant_id, user_id, body["email"], body["username"], password_hash, roles, {}
        )
        view = user_view(user)
        await audit.record_audit(
            con, tenant_id, user_id, "tenant.created", "tenant", tenant_id,
            request[REQUEST_ID], {"name": body["tenant_name"]},
            event={"id": str(tenant_id), "name": body["tenant_name"]},
        )  # fmt: skip
        await audit.record_audit(
            con, tenant_id, user_id, "user.created", "user", user_id,
            request[REQUEST_ID], {"roles": roles}, event=view,
        )  # fmt: skip
        pair = await _issue_pair(request, con, tenant_id, user_id, roles)
    await request.app[USER_CACHE].store(tenant_id, user_id, user["version"], user_body(view))
    tenant_view = {
        "id": str(tenant["id"]),
        "name": tenant["name"],
        "created_at": timestamp(tenant["created_at"]),
    }
    return json_response({"tenant": tenant_view, "user": view, **pair}, status=201)


async def login(request: web.Request) -> web.Response:
    body = await read_json(request, "LoginRequest")
    await enforce_auth_limit(request, body["email"])
    tenant_id = parse_uuid(body["tenant_id"])
    pg = request.app[PG]
    row = await users.get_login(pg, tenant_id, body["email"]) if tenant_id else None
    stored = row["password_hash"] if row is not None and row["status"] == "active" else None
    hasher = request.app[HASHER]
    # Unknown email, unknown tenant, inactive user: the same verification work, the same answer.
    ok = await hasher.verify(stored, body["password"])
    if not ok or row is None or tenant_id is None:
        metrics.AUTH_FAILURES.labels("login").inc()
        raise Unauthorized("wrong tenant, email or password", error="")
    if hasher.needs_rehash(row["password_hash"]):
        new_hash = await hasher.hash(body["password"])
        await users.rehash_password(pg, tenant_id, row["id"], new_hash, row["password_hash"])
    async with pg.transaction() as con:
        pair = await _issue_pair(request, con, tenant_id, row["id"], list(row["roles"]))
    return json_response(pair)


async def refresh(request: web.Request) -> web.Response:
    await enforce_auth_limit(request)
    body = await read_json(request, "RefreshRequest")
    token_hash = _hash_token(body["refresh_token"])
    grace = request.app[CONFIG].refresh_reuse_grace_s
    reused = False
    async with request.app[PG].transaction() as con:
        row = await tokens.take_refresh_token(con, token_hash)
        if (
            row is None
            or row["revoked_at"] is not None
            or row["expires_at"] <= row["now"]
            or row["status"] != "active"
        ):
            pair = None
        elif row["used_at"] is None:
            await tokens.mark_refresh_token_used(con, token_hash)
            pair = await _issue_pair(
                request, con, row["tenant_id"], row["user_id"], list(row["roles"]), row["family_id"]
            )
        elif (row["now"] - row["used_at"]).total_seconds() <= grace:
            # Two tabs refreshed with the same token at once: both get a working pair.
            pair = await _issue_pair(
                request, con, row["tenant_id"], row["user_id"], list(row["roles"]), row["family_id"]
            )
        else:
            reused = True
            pair = None
            await tokens.revoke_family(con, row["tenant_id"], row["family_id"])
    if pair is None:
        metrics.AUTH_FAILURES.labels("refresh_reuse" if reused else "refresh").inc()
        raise Unauthorized("the refresh token is invalid, expired or revoked")
    return json_response(pair)


async def logout(request: web.Request) -> web.Response:
    body = await read_json(request, "LogoutRequest")
    # 204 whether or not the token existed: logout reveals nothing about tokens.
    await tokens.revoke_family_of_token(request.app[PG], _hash_token(body["refresh_token"]))
    return web.Response(status=204)

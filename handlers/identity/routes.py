"""The identity routes: /v1/auth/*, /v1/me and /v1/users, each scoped to the caller's tenant.

Each handler reads its input, calls one function of service.py and answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from uuid import UUID

from aiohttp import web

from db.users import STATUSES, prefix_pattern
from handlers.identity import service
from handlers.identity.emails import fold, normal_email, visible
from handlers.identity.keys import HASHER, USER_CACHE, USER_VIEWS
from server import metrics, rbac
from server.errors import TooManyRequests, ValidationFailed
from server.http import (
    client_ip,
    decode_cursor,
    etag,
    if_match,
    json_response,
    path_uuid,
    query_limit,
    raw_json_response,
)
from server.keys import (
    CONFIG,
    PG,
    RATELIMIT_HEADERS,
    REQUEST_ID,
    REVOCATIONS,
    SHARED_LIMITER,
)
from server.replica import note_write, read_pool, writes
from server.tokens import TOKENS
from server.validation import CARD_MESSAGE, looks_like_card, read_json


async def _limit_attempts(request: web.Request, email: str | None = None) -> None:
    """The brute-force limit on top of the general one: AUTH_RATE_LIMIT_PER_MINUTE per client
    IP and, for credentials, per email, counted across workers and replicas (in Redis; in
    each process while Redis is down)."""
    config = request.app[CONFIG]
    per_minute = config.auth_rate_limit_per_minute
    keys = [f"auth-ip:{client_ip(request, config.trust_forwarded_for)}"]
    if email is not None:
        keys.append(f"auth-email:{email.lower()}")
    for key in keys:
        decision = await request.app[SHARED_LIMITER].take(key, per_minute / 60, per_minute)
        if not decision.allowed:
            metrics.RATELIMITED.labels("auth").inc()
            request[RATELIMIT_HEADERS] = decision.headers()
            raise TooManyRequests("too many attempts; retry after the Retry-After delay")


async def signup(request: web.Request) -> web.Response:
    await _limit_attempts(request)
    body = await read_json(request, "SignupRequest")
    body["email"] = normal_email(body["email"])
    body["tenant_name"] = visible(body["tenant_name"], "tenant_name")
    app = request.app
    answer = await service.signup(
        app[PG], app[HASHER], app[USER_CACHE], app[TOKENS], app[CONFIG], body, request[REQUEST_ID]
    )
    await note_write(request, UUID(answer["tenant"]["id"]))  # no token yet: the new tenant
    return json_response(answer, status=201)


async def login(request: web.Request) -> web.Response:
    body = await read_json(request, "LoginRequest")
    body["email"] = normal_email(body["email"])
    await _limit_attempts(request, body["email"])
    app = request.app
    return json_response(await service.login(app[PG], app[HASHER], app[TOKENS], app[CONFIG], body))


async def refresh(request: web.Request) -> web.Response:
    await _limit_attempts(request)
    body = await read_json(request, "RefreshRequest")
    app = request.app
    return json_response(
        await service.refresh(app[PG], app[TOKENS], app[CONFIG], body["refresh_token"])
    )


async def logout(request: web.Request) -> web.Response:
    body = await read_json(request, "LogoutRequest")
    await service.logout(request.app[PG], body["refresh_token"])
    return web.Response(status=204)


@writes  # the audit entry
async def logout_all(request: web.Request) -> web.Response:
    """Authenticated, so the general per-user bucket limits it: no brute-force limit needed."""
    app = request.app
    await service.logout_all(app[PG], app[REVOCATIONS], rbac.caller(request), request[REQUEST_ID])
    return web.Response(status=204)


async def get_me(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    pg = await read_pool(request, p.tenant_id)
    version, body = await service.read_user(pg, request.app[USER_CACHE], p, p.user_id)
    return raw_json_response(body, headers={"ETag": etag(version)})


async def get_user(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    user_id = path_uuid(request, "user_id", "user")
    pg = await read_pool(request, p.tenant_id)
    version, body = await service.read_user(pg, request.app[USER_CACHE], p, user_id)
    return raw_json_response(body, headers={"ETag": etag(version)})


@writes
async def change_password(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    body = await read_json(request, "PasswordChangeRequest")
    app = request.app
    await service.change_password(
        app[PG], app[HASHER], app[USER_CACHE], app[REVOCATIONS], p, body["old_password"],
        body["new_password"], request[REQUEST_ID],
    )  # fmt: skip
    return web.Response(status=204)


def _search(request: web.Request) -> tuple[str | None, str | None]:
    """?q= (a literal prefix of username or email) as a LIKE pattern, and ?status=."""
    q = request.query.get("q")
    status = request.query.get("status")
    errors = []
    if q is not None and not 1 <= len(q) <= 254:
        errors.append({"field": "q", "message": "must be 1 to 254 characters"})
    elif q is not None and "\x00" in q:
        errors.append({"field": "q", "message": "must not contain NUL characters"})
    elif q is not None and looks_like_card(q):
        errors.append({"field": "q", "message": CARD_MESSAGE})
    if status is not None and status not in STATUSES:
        errors.append({"field": "status", "message": f"must be one of {', '.join(STATUSES)}"})
    if errors:
        raise ValidationFailed(errors, "invalid query parameter")
    return (prefix_pattern(fold(q)) if q else None), status


async def list_users(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    limit = query_limit(request)
    after = decode_cursor(request)
    pattern, status = _search(request)
    pg = await read_pool(request, p.tenant_id)
    body = await service.list_users(
        pg, request.app[USER_VIEWS], p.tenant_id, after, pattern, status, limit
    )
    return raw_json_response(body)


@writes
async def create_user(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    rbac.require_admin(p)
    body = await read_json(request, "CreateUserRequest")
    body["email"] = normal_email(body["email"])
    app = request.app
    row, answer = await service.create_user(
        app[PG], app[HASHER], app[USER_CACHE], p, body, request[REQUEST_ID]
    )
    headers = {"ETag": etag(row["version"]), "Location": f"/v1/users/{row['id']}"}
    return raw_json_response(answer, status=201, headers=headers)


@writes
async def patch_user(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    rbac.require_admin(p)
    user_id = path_uuid(request, "user_id", "user")
    # An invalid body is a 422 whatever If-Match says: a precondition is judged on a request
    # that could otherwise succeed.
    body = await read_json(request, "PatchUserRequest")
    version = if_match(request)
    app = request.app
    row, answer = await service.patch_user(
        app[PG], app[USER_CACHE], app[REVOCATIONS], p, user_id, version, body, request[REQUEST_ID]
    )
    return raw_json_response(answer, headers={"ETag": etag(row["version"])})


@writes
async def delete_user(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    rbac.require_admin(p)
    user_id = path_uuid(request, "user_id", "user")
    app = request.app
    await service.delete_user(
        app[PG], app[USER_CACHE], app[REVOCATIONS], p, user_id, request[REQUEST_ID]
    )
    return web.Response(status=204)


def _role(request: web.Request) -> str:
    role = request.match_info["role"]
    if role not in rbac.RANK:
        raise ValidationFailed(
            [{"field": "role", "message": f"must be one of {', '.join(rbac.ROLES)}"}],
            "unknown role",
        )
    return role


@writes
async def grant_role(request: web.Request) -> web.Response:
    return await _change_role(request, service.grant_role)


@writes
async def revoke_role(request: web.Request) -> web.Response:
    return await _change_role(request, service.revoke_role)


async def _change_role(
    request: web.Request, change: Callable[..., Awaitable[None]]
) -> web.Response:
    p = rbac.caller(request)
    user_id = path_uuid(request, "user_id", "user")
    role = _role(request)
    app = request.app
    await change(app[PG], app[USER_CACHE], app[REVOCATIONS], p, user_id, role, request[REQUEST_ID])
    return web.Response(status=204)

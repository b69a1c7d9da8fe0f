"""Identity's rules and transactions: sessions (signup, login, refresh, logout, logout-all) and
users.

Refresh tokens are opaque 256-bit random strings; only their SHA-256 is stored. Each login
starts a family; every refresh rotates the token within its family. Presenting a token that was
already rotated revokes the whole family (it was stolen, or the client is confused), except
within REFRESH_REUSE_GRACE_S of its rotation, so two tabs refreshing at once both succeed.

Every write of a user records an audit row (and its outbox event) in its transaction, then
stores the new body in the user cache after the commit (write-through).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, cast

import orjson
from asyncpg import Connection, Record

from db import audit, tokens, users
from db.ids import parse_uuid, uuid7
from db.pool import Database, Executor
from handlers.identity.api import MAX_PROFILE_BYTES
from handlers.identity.cache import Entry, UserCache
from handlers.identity.passwords import Hasher
from handlers.identity.views import PageKey, ViewMemo, page_body, tenant_view, user_body, user_view
from server import metrics, rbac
from server.config import Config
from server.errors import NotFound, PreconditionFailed, Unauthorized, ValidationFailed
from server.principal import Principal
from server.revocation import Revocations
from server.tokens import TokenService

Body = dict[str, Any]

# Sessions


def _hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def _issue_pair(
    con: Connection,
    issuer: TokenService,
    config: Config,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    roles: list[str],
    generation: int,
    family_id: uuid.UUID | None = None,
) -> Body:
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
        "access_token": issuer.issue(user_id, tenant_id, roles, generation),
        "refresh_token": refresh,
        "expires_in": config.access_token_ttl_s,
    }


async def _rotate(con: Connection, issuer: TokenService, config: Config, row: Record) -> Body:
    """The next pair of the refresh token `row`'s family."""
    roles = list(row["roles"])
    return await _issue_pair(
        con, issuer, config, row["tenant_id"], row["user_id"], roles, row["token_generation"],
        row["family_id"],
    )  # fmt: skip


async def signup(
    pg: Database,
    hasher: Hasher,
    cache: UserCache,
    issuer: TokenService,
    config: Config,
    body: Body,
    request_id: str,
) -> Body:
    """A new tenant with its first user (owner), and that user's first token pair."""
    password_hash = await hasher.hash(body["password"])
    tenant_id, user_id = uuid7(), uuid7()
    roles = ["owner", "member"]
    async with pg.transaction() as con:
        tenant = await users.insert_tenant(con, tenant_id, body["tenant_name"])
        user = await users.insert_user(
            con, tenant_id, user_id, body["email"], body["username"], password_hash, roles, {}
        )
        view = user_view(user)
        await audit.record_audit(
            con, tenant_id, user_id, "tenant.created", "tenant", tenant_id,
            request_id, {"name": body["tenant_name"]},
            event={"id": str(tenant_id), "name": body["tenant_name"]},
        )  # fmt: skip
        await audit.record_audit(
            con, tenant_id, user_id, "user.created", "user", user_id,
            request_id, {"roles": roles}, event=view,
        )  # fmt: skip
        pair = await _issue_pair(con, issuer, config, tenant_id, user_id, roles, 0)
    await cache.store(tenant_id, user_id, user["version"], user_body(view))
    return {"tenant": tenant_view(tenant), "user": view, **pair}


async def login(
    pg: Database, hasher: Hasher, issuer: TokenService, config: Config, body: Body
) -> Body:
    tenant_id = parse_uuid(body["tenant_id"])
    row = await users.get_login(pg, tenant_id, body["email"]) if tenant_id else None
    stored = row["password_hash"] if row is not None and row["status"] == "active" else None
    # Unknown email, unknown tenant, inactive user: the same verification work, the same answer.
    ok = await hasher.verify(stored, body["password"])
    if not ok or row is None or tenant_id is None:
        metrics.AUTH_FAILURES.labels("login").inc()
        raise Unauthorized("wrong tenant, email or password", error="")
    if hasher.needs_rehash(row["password_hash"]):
        new_hash = await hasher.hash(body["password"])
        await users.rehash_password(pg, tenant_id, row["id"], new_hash, row["password_hash"])
    async with pg.transaction() as con:
        return await _issue_pair(
            con, issuer, config, tenant_id, row["id"], list(row["roles"]), row["token_generation"]
        )


async def refresh(pg: Database, issuer: TokenService, config: Config, refresh_token: str) -> Body:
    """A new pair for a valid refresh token, rotated within its family; reuse revokes the family."""
    token_hash = _hash_token(refresh_token)
    reused = False
    async with pg.transaction() as con:
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
            pair = await _rotate(con, issuer, config, row)
        elif (row["now"] - row["used_at"]).total_seconds() <= config.refresh_reuse_grace_s:
            # Two tabs refreshed with the same token at once: both get a working pair.
            pair = await _rotate(con, issuer, config, row)
        else:
            reused = True
            pair = None
            await tokens.revoke_family(con, row["tenant_id"], row["family_id"])
    if pair is None:
        metrics.AUTH_FAILURES.labels("refresh_reuse" if reused else "refresh").inc()
        raise Unauthorized("the refresh token is invalid, expired or revoked")
    return pair


async def logout(pg: Database, refresh_token: str) -> None:
    """Revokes the token's family, whether or not the token exists: logout reveals nothing."""
    await tokens.revoke_family_of_token(pg, _hash_token(refresh_token))


async def _end_sessions(
    con: Connection, revocations: Revocations, tenant_id: uuid.UUID, user_id: uuid.UUID
) -> int:
    """Revokes every refresh token of the user (all families) and their access tokens, in the
    caller's transaction; the generation to `announce` after the commit."""
    await tokens.revoke_user_tokens(con, tenant_id, user_id)
    return await revocations.revoke(con, tenant_id, user_id)


async def logout_all(pg: Database, revocations: Revocations, p: Principal, request_id: str) -> None:
    """Ends every session of the caller, on every device: the next request logs in again."""
    async with pg.transaction() as con:
        row = await users.get_user(con, p.tenant_id, p.user_id)
        if row is None:
            raise NotFound("user")
        generation = await _end_sessions(con, revocations, p.tenant_id, p.user_id)
        await _record(con, p, request_id, "user.logged_out_all", row)
    await revocations.announce(p.user_id, generation)


# Reads


async def _load_user(pg: Executor, tenant_id: uuid.UUID, user_id: uuid.UUID) -> Entry | None:
    row = await users.get_user(pg, tenant_id, user_id)
    return None if row is None else (row["version"], user_body(user_view(row)))


async def read_user(pg: Executor, cache: UserCache, caller: Principal, user_id: uuid.UUID) -> Entry:
    """(version, body) of a user of the caller's tenant: from the cache, else PostgreSQL."""
    load = partial(_load_user, pg, caller.tenant_id, user_id)
    entry = await cache.get_or_load(caller.tenant_text, user_id, load)
    if entry is None:
        raise NotFound("user")
    return entry


async def list_users(
    pg: Executor,
    memo: ViewMemo,
    tenant_id: uuid.UUID,
    after: uuid.UUID | None,
    pattern: str | None,
    status: str | None,
    limit: int,
) -> bytes:
    """A page's whole JSON body: its users' bodies joined, and the cursor when more rows follow.

    Every body is of the state one query saw: the (id, version) page, with the missing bodies
    fetched at exactly those versions; if any was written in between, the whole page is read
    again in one query. A page whose (id, version) list is the one the memo saw last is served
    from the memo whole.
    """
    if memo.size:
        keys = await users.list_user_versions(pg, tenant_id, after, pattern, status, limit + 1)
        page_key: PageKey = (tenant_id, after, pattern, status, limit)
        body = memo.page(page_key, keys)
        if body is not None:
            return body
        bodies = await _bodies_at(pg, memo, tenant_id, keys[:limit])
        if bodies is not None:
            body = page_body(bodies, keys[limit - 1]["id"] if len(keys) > limit else None)
            memo.keep_page(page_key, keys, body)
            return body
    rows = await users.list_users(pg, tenant_id, after, pattern, status, limit + 1)
    last = rows[limit - 1]["id"] if len(rows) > limit else None
    return page_body([memo.body(r) for r in rows[:limit]], last)


async def _bodies_at(
    pg: Executor, memo: ViewMemo, tenant_id: uuid.UUID, keys: list[Record]
) -> list[bytes] | None:
    """The bodies of these (id, version)s, from the memo or read at exactly those versions;
    None when one of them was written since."""
    bodies = memo.lookup(tenant_id, keys)
    missing = [k for k, b in zip(keys, bodies, strict=True) if b is None]
    if not missing:
        return cast(list[bytes], bodies)
    ids = [k["id"] for k in missing]
    rows = await users.get_users_at_versions(pg, tenant_id, ids, [k["version"] for k in missing])
    if len(rows) != len(missing):
        return None
    fetched = {r["id"]: memo.body(r) for r in rows}
    return [b if b is not None else fetched[k["id"]] for k, b in zip(keys, bodies, strict=True)]


# Writes


def _check_profile(profile: Any) -> None:
    if profile is not None and len(orjson.dumps(profile)) > MAX_PROFILE_BYTES:
        raise ValidationFailed(
            [{"field": "profile", "message": f"must be at most {MAX_PROFILE_BYTES} bytes of JSON"}]
        )


async def _record(
    con: Connection, p: Principal, request_id: str, action: str, row: Record, **details: Any
) -> Body:
    view = user_view(row)
    await audit.record_audit(
        con, p.tenant_id, p.user_id, action, "user", row["id"], request_id, details, event=view
    )
    return view


async def _written(cache: UserCache, row: Record, view: Body) -> bytes:
    """After a commit: the new row goes to the cache (write-through) and to the client."""
    body = user_body(view)
    await cache.write_through(row["tenant_id"], row["id"], row["version"], body)
    return body


@asynccontextmanager
async def _changing(
    pg: Database, cache: UserCache, tenant_id: uuid.UUID, user_id: uuid.UUID
) -> AsyncIterator[Connection]:
    """A transaction that changes a user's row. If it fails, it may still have committed (the
    answer to COMMIT lost with the connection), so the user's cache entry is forgotten."""
    try:
        async with pg.transaction() as con:
            yield con
    except BaseException:
        cache.forget(tenant_id, user_id)
        raise


async def _target(con: Connection, p: Principal, user_id: uuid.UUID) -> Record:
    """The user a write acts on, locked: 404 if gone, 403 if they outrank the caller."""
    target = await users.get_user_for_update(con, p.tenant_id, user_id)
    if target is None or target["status"] == "deleted":
        raise NotFound("user")
    rbac.require_outranks_or_equals(p, target["roles"])
    return target


async def _keep_an_owner(con: Connection, p: Principal, target: Record) -> None:
    """409 if taking `target` out of the active owners would leave the tenant without one.
    Callers hold the tenant lock (users.lock_tenant), so two removals cannot both pass."""
    if "owner" in target["roles"] and target["status"] == "active":
        rbac.require_not_last_owner(await users.count_active_owners(con, p.tenant_id))


async def create_user(
    pg: Database, hasher: Hasher, cache: UserCache, p: Principal, body: Body, request_id: str
) -> tuple[Record, bytes]:
    roles = rbac.normalize(body.get("roles", ["member"]))
    rbac.require_can_grant(p, roles)
    _check_profile(body.get("profile"))
    password_hash = await hasher.hash(body["password"])
    async with pg.transaction() as con:
        row = await users.insert_user(
            con, p.tenant_id, uuid7(), body["email"], body["username"], password_hash, roles,
            body.get("profile", {}),
        )  # fmt: skip
        view = await _record(con, p, request_id, "user.created", row, roles=roles)
    return row, await _written(cache, row, view)


async def _diagnose(
    con: Connection,
    p: Principal,
    user_id: uuid.UUID,
    version: int | None,
    raise_if_ok: bool = True,
) -> None:
    """Why a conditional UPDATE touched (or would touch) no row: 404, 403 or 412, in that order."""
    row = await users.get_user(con, p.tenant_id, user_id)
    if row is None or row["status"] == "deleted":
        raise NotFound("user")
    rbac.require_outranks_or_equals(p, row["roles"])
    if version is not None and row["version"] != version:
        raise PreconditionFailed(f"the user has changed (now version {row['version']})")
    if raise_if_ok:  # the row is there and allowed: it changed between the UPDATE and now
        raise PreconditionFailed("the user changed while this request ran; read it again")


async def patch_user(
    pg: Database,
    cache: UserCache,
    revocations: Revocations,
    p: Principal,
    user_id: uuid.UUID,
    version: int | None,
    changes: Body,
    request_id: str,
) -> tuple[Record, bytes]:
    """Username, profile and status at `version` (None: any). Suspending keeps an owner and
    revokes the user's refresh and access tokens."""
    _check_profile(changes.get("profile"))
    status = changes.get("status")
    generation = None
    async with _changing(pg, cache, p.tenant_id, user_id) as con:
        if status is not None and status != "active":
            await users.lock_tenant(con, p.tenant_id)
            await _diagnose(con, p, user_id, version, raise_if_ok=False)  # 404/403/412 before 409
            target = await users.get_user(con, p.tenant_id, user_id)
            if target is not None:
                await _keep_an_owner(con, p, target)
        row = await users.patch_user(
            con, p.tenant_id, user_id, version, changes.get("username"), changes.get("profile"),
            status, rbac.rank(p.roles),
        )  # fmt: skip
        if row is None:
            await _diagnose(con, p, user_id, version)
            raise NotFound("user")  # unreachable: _diagnose raises
        if status == "suspended":
            generation = await _end_sessions(con, revocations, p.tenant_id, user_id)
        view = await _record(con, p, request_id, "user.updated", row, changed=sorted(changes))
    if generation is not None:
        await revocations.announce(user_id, generation)
    return row, await _written(cache, row, view)


async def delete_user(
    pg: Database,
    cache: UserCache,
    revocations: Revocations,
    p: Principal,
    user_id: uuid.UUID,
    request_id: str,
) -> None:
    """Marks the user deleted (the row stays for the audit trail) and revokes their tokens."""
    async with _changing(pg, cache, p.tenant_id, user_id) as con:
        await users.lock_tenant(con, p.tenant_id)
        target = await _target(con, p, user_id)
        await _keep_an_owner(con, p, target)
        row = await users.set_status(con, p.tenant_id, user_id, "deleted")
        assert row is not None
        generation = await _end_sessions(con, revocations, p.tenant_id, user_id)
        view = await _record(con, p, request_id, "user.deleted", row)
    await revocations.announce(user_id, generation)
    await _written(cache, row, view)


async def grant_role(
    pg: Database,
    cache: UserCache,
    revocations: Revocations,
    p: Principal,
    user_id: uuid.UUID,
    role: str,
    request_id: str,
) -> None:
    """A role change revokes the user's access tokens: the next one (refresh) carries it."""
    rbac.require_can_grant(p, [role])
    async with _changing(pg, cache, p.tenant_id, user_id) as con:
        target = await _target(con, p, user_id)
        if role in target["roles"]:
            return
        roles = rbac.normalize([*target["roles"], role])
        row = await users.set_roles(con, p.tenant_id, user_id, roles)
        assert row is not None
        generation = await revocations.revoke(con, p.tenant_id, user_id)
        view = await _record(con, p, request_id, "user.role_granted", row, role=role)
    await revocations.announce(user_id, generation)
    await _written(cache, row, view)


async def revoke_role(
    pg: Database,
    cache: UserCache,
    revocations: Revocations,
    p: Principal,
    user_id: uuid.UUID,
    role: str,
    request_id: str,
) -> None:
    if role == "member":
        raise ValidationFailed(
            [{"field": "role", "message": "member is the base role and cannot be revoked"}]
        )
    rbac.require_can_grant(p, [role])
    async with _changing(pg, cache, p.tenant_id, user_id) as con:
        await users.lock_tenant(con, p.tenant_id)
        target = await _target(con, p, user_id)
        if role not in target["roles"]:
            return
        if role == "owner":
            await _keep_an_owner(con, p, target)
        remaining = [r for r in target["roles"] if r != role]
        row = await users.set_roles(con, p.tenant_id, user_id, rbac.normalize(remaining))
        assert row is not None
        generation = await revocations.revoke(con, p.tenant_id, user_id)
        view = await _record(con, p, request_id, "user.role_revoked", row, role=role)
    await revocations.announce(user_id, generation)
    await _written(cache, row, view)


async def change_password(
    pg: Database,
    hasher: Hasher,
    cache: UserCache,
    revocations: Revocations,
    p: Principal,
    old_password: str,
    new_password: str,
    request_id: str,
) -> None:
    """The caller's own password, checked against the current one; revokes their refresh and
    access tokens (the client logs in again with the new password)."""
    stored = await users.get_password_hash(pg, p.tenant_id, p.user_id)
    if not await hasher.verify(stored, old_password):
        raise ValidationFailed(
            [{"field": "old_password", "message": "is not the current password"}]
        )
    new_hash = await hasher.hash(new_password)
    async with _changing(pg, cache, p.tenant_id, p.user_id) as con:
        row = await users.change_password(con, p.tenant_id, p.user_id, new_hash)
        if row is None:
            raise NotFound("user")
        generation = await _end_sessions(con, revocations, p.tenant_id, p.user_id)
        view = await _record(con, p, request_id, "user.password_changed", row)
    await revocations.announce(p.user_id, generation)
    await _written(cache, row, view)

"""/v1/me and /v1/users: reads, CRUD and roles, scoped to the caller's tenant."""

from __future__ import annotations

import uuid
from collections import OrderedDict
from typing import Any, cast

import orjson
from aiohttp import web
from asyncpg import Connection, Record

from db import audit, tokens, users
from db.ids import uuid7
from db.pool import Database
from handlers.identity.keys import HASHER, USER_CACHE, USER_VIEWS
from server import rbac
from server.errors import NotFound, PreconditionFailed, ValidationFailed
from server.http import (
    decode_cursor,
    encode_cursor,
    etag,
    if_match,
    path_uuid,
    query_limit,
    raw_json_response,
    timestamp,
)
from server.keys import PG, PG_READ, REQUEST_ID
from server.principal import Principal
from server.validation import read_json

MAX_PROFILE_BYTES = 4096
STATUSES = ("active", "suspended", "deleted")


def user_view(row: Record) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "tenant_id": str(row["tenant_id"]),
        "email": row["email"],
        "username": row["username"],
        "status": row["status"],
        "roles": list(row["roles"]),
        "profile": row["profile"],
        "version": row["version"],
        "created_at": timestamp(row["created_at"]),
        "updated_at": timestamp(row["updated_at"]),
    }


def user_body(view: dict[str, Any]) -> bytes:
    return orjson.dumps(view)


# A page's query: tenant, cursor, search pattern, status filter, limit.
PageKey = tuple[uuid.UUID, uuid.UUID | None, str | None, str | None, int]


class ViewMemo:
    """Users' JSON bodies by id, each with the tenant and version it was written at, kept in
    this process for list pages.

    Decoding a page's rows and building each user's view (two UUIDs and two timestamps to text)
    was most of a page of 50's CPU. A body changes only with its row's version (every UPDATE of
    a visible column bumps it), so a body is never served stale: it is used only at the version
    it was written at. A page therefore asks PostgreSQL for its (id, version) pairs and fetches
    whole rows only for the bodies it lacks. Oldest entries go first past `size`; 0 turns the
    memo off.

    Keyed by the id alone (asyncpg's UUID hashes in C) with the tenant compared as an int: a
    (tenant, id, version) tuple key hashed the caller's stdlib UUID in Python and compared two
    UUID types per hit, 3x the cost of a page's 50 lookups (24 -> 8 us in-process, and the
    lookups were a fifth of a page's CPU in the server's profile).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._bodies: OrderedDict[uuid.UUID, tuple[int, int, bytes]] = OrderedDict()
        # Whole pages, each with the (id, version) list it was built from: comparing a page's
        # fresh list with the kept one (C, ~2 us for 51 records) replaces 50 lookups and the
        # join. Bounded by size, not count: PAGE_BYTES_PER_BODY per memoized body (5 MB for
        # 10,000; a page of 50 is ~21 kB with its list, one of 200 ~85 kB).
        self.max_page_bytes = size * self.PAGE_BYTES_PER_BODY
        self._page_bytes = 0
        self._pages: OrderedDict[PageKey, tuple[list[Record], bytes, int]] = OrderedDict()

    PAGE_BYTES_PER_BODY = 500
    RECORD_BYTES = 120  # an (id, version) asyncpg Record, roughly

    def page(self, key: PageKey, keys: list[Record]) -> bytes | None:
        """The page body kept under `key`, if it was built from exactly these (id, version)s."""
        entry = self._pages.get(key)
        return entry[1] if entry is not None and entry[0] == keys else None

    def keep_page(self, key: PageKey, keys: list[Record], body: bytes) -> None:
        cost = len(body) + self.RECORD_BYTES * len(keys)
        if cost > self.max_page_bytes:
            return
        old = self._pages.pop(key, None)
        if old is not None:
            self._page_bytes -= old[2]
        self._pages[key] = (keys, body, cost)
        self._page_bytes += cost
        while self._page_bytes > self.max_page_bytes:
            self._page_bytes -= self._pages.popitem(last=False)[1][2]

    def lookup(self, tenant_id: uuid.UUID, keys: list[Record]) -> list[bytes | None]:
        """The body of each (id, version) record of `keys` at that version, else None."""
        tenant = tenant_id.int
        get = self._bodies.get
        bodies: list[bytes | None] = []
        for user_id, version in keys:
            entry = get(user_id)
            if entry is not None and entry[1] == version and entry[0] == tenant:
                bodies.append(entry[2])
            else:
                bodies.append(None)
        return bodies

    def body(self, row: Record) -> bytes:
        user_id, tenant, version = row["id"], row["tenant_id"].int, row["version"]
        entry = self._bodies.get(user_id)
        if entry is not None and entry[1] == version and entry[0] == tenant:
            return entry[2]
        body = user_body(user_view(row))
        if self.size:
            # orjson's bytes keep the 4 KiB buffer they were written into: a copy of a
            # ~300-byte body is what stays (10,000 entries: 41 MB -> ~4 MB).
            body = bytes(memoryview(body))
            self._bodies.pop(user_id, None)
            self._bodies[user_id] = (tenant, version, body)
            if len(self._bodies) > self.size:
                self._bodies.popitem(last=False)
        return body


async def _page_bodies(
    pg: Database,
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
            body = _page_json(bodies, keys[limit - 1]["id"] if len(keys) > limit else None)
            memo.keep_page(page_key, keys, body)
            return body
    rows = await users.list_users(pg, tenant_id, after, pattern, status, limit + 1)
    last = rows[limit - 1]["id"] if len(rows) > limit else None
    return _page_json([memo.body(r) for r in rows[:limit]], last)


async def _bodies_at(
    pg: Database, memo: ViewMemo, tenant_id: uuid.UUID, keys: list[Record]
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


def _page_json(bodies: list[bytes], last: uuid.UUID | None) -> bytes:
    # Joined from each user's body: byte for byte what orjson.dumps(page(...)) would write.
    cursor = encode_cursor(last) if last is not None else None
    return b'{"items":[%b],"next_cursor":%b}' % (b",".join(bodies), orjson.dumps(cursor))


async def _record(
    con: Connection, p: Principal, request: web.Request, action: str, row: Record, **details: Any
) -> dict[str, Any]:
    view = user_view(row)
    await audit.record_audit(
        con, p.tenant_id, p.user_id, action, "user", row["id"], request[REQUEST_ID], details,
        event=view,
    )  # fmt: skip
    return view


async def _written(request: web.Request, row: Record, view: dict[str, Any]) -> bytes:
    """After a commit: the new row goes to the cache (write-through) and to the client."""
    body = user_body(view)
    await request.app[USER_CACHE].store(row["tenant_id"], row["id"], row["version"], body)
    return body


async def _cached_user(request: web.Request, p: Principal, user_id: uuid.UUID) -> web.Response:
    async def load() -> tuple[int, bytes] | None:
        row = await users.get_user(request.app[PG_READ], p.tenant_id, user_id)
        return None if row is None else (row["version"], user_body(user_view(row)))

    entry = await request.app[USER_CACHE].get_or_load(p.tenant_text, user_id, load)
    if entry is None:
        raise NotFound("user")
    version, body = entry
    return raw_json_response(body, headers={"ETag": etag(version)})


async def get_me(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    return await _cached_user(request, p, p.user_id)


async def get_user(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    return await _cached_user(request, p, path_uuid(request, "user_id", "user"))


def _prefix_pattern(q: str) -> str:
    # Lower-cased by PostgreSQL (lower($3)), like the column: Python and the database fold
    # some characters (U+0130) differently.
    escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


async def list_users(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    limit = query_limit(request)
    after = decode_cursor(request)
    q = request.query.get("q")
    status = request.query.get("status")
    errors = []
    if q is not None and not 1 <= len(q) <= 254:
        errors.append({"field": "q", "message": "must be 1 to 254 characters"})
    elif q is not None and "\x00" in q:
        errors.append({"field": "q", "message": "must not contain NUL characters"})
    if status is not None and status not in STATUSES:
        errors.append({"field": "status", "message": f"must be one of {', '.join(STATUSES)}"})
    if errors:
        raise ValidationFailed(errors, "invalid query parameter")
    pattern = _prefix_pattern(q) if q else None
    body = await _page_bodies(
        request.app[PG_READ], request.app[USER_VIEWS], p.tenant_id, after, pattern, status, limit
    )
    return raw_json_response(body)


def _check_profile(profile: Any) -> None:
    if profile is not None and len(orjson.dumps(profile)) > MAX_PROFILE_BYTES:
        raise ValidationFailed(
            [{"field": "profile", "message": f"must be at most {MAX_PROFILE_BYTES} bytes of JSON"}]
        )


async def create_user(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    rbac.require_admin(p)
    body = await read_json(request, "CreateUserRequest")
    roles = rbac.normalize(body.get("roles", ["member"]))
    rbac.require_can_grant(p, roles)
    _check_profile(body.get("profile"))
    password_hash = await request.app[HASHER].hash(body["password"])
    async with request.app[PG].transaction() as con:
        row = await users.insert_user(
            con, p.tenant_id, uuid7(), body["email"], body["username"], password_hash, roles,
            body.get("profile", {}),
        )  # fmt: skip
        view = await _record(con, p, request, "user.created", row, roles=roles)
    body_bytes = await _written(request, row, view)
    return raw_json_response(
        body_bytes,
        status=201,
        headers={"ETag": etag(row["version"]), "Location": f"/v1/users/{row['id']}"},
    )


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


async def patch_user(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    rbac.require_admin(p)
    user_id = path_uuid(request, "user_id", "user")
    version = if_match(request)
    body = await read_json(request, "PatchUserRequest")
    _check_profile(body.get("profile"))
    status = body.get("status")
    async with request.app[PG].transaction() as con:
        if status is not None and status != "active":
            await users.lock_tenant(con, p.tenant_id)
            await _diagnose(con, p, user_id, version, raise_if_ok=False)  # 404/403/412 before 409
            target = await users.get_user(con, p.tenant_id, user_id)
            if target is not None and "owner" in target["roles"] and target["status"] == "active":
                rbac.require_not_last_owner(await users.count_active_owners(con, p.tenant_id))
        row = await users.patch_user(
            con, p.tenant_id, user_id, version, body.get("username"), body.get("profile"), status,
            rbac.rank(p.roles),
        )  # fmt: skip
        if row is None:
            await _diagnose(con, p, user_id, version)
            raise NotFound("user")  # unreachable: _diagnose raises
        if status == "suspended":
            await tokens.revoke_user_tokens(con, p.tenant_id, user_id)
        view = await _record(con, p, request, "user.updated", row, changed=sorted(body))
    body_bytes = await _written(request, row, view)
    return raw_json_response(body_bytes, headers={"ETag": etag(row["version"])})


async def delete_user(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    rbac.require_admin(p)
    user_id = path_uuid(request, "user_id", "user")
    async with request.app[PG].transaction() as con:
        await users.lock_tenant(con, p.tenant_id)
        target = await users.get_user_for_update(con, p.tenant_id, user_id)
        if target is None or target["status"] == "deleted":
            raise NotFound("user")
        rbac.require_outranks_or_equals(p, target["roles"])
        if "owner" in target["roles"] and target["status"] == "active":
            rbac.require_not_last_owner(await users.count_active_owners(con, p.tenant_id))
        row = await users.set_status(con, p.tenant_id, user_id, "deleted")
        assert row is not None
        await tokens.revoke_user_tokens(con, p.tenant_id, user_id)
        view = await _record(con, p, request, "user.deleted", row)
    await _written(request, row, view)
    return web.Response(status=204)


def _role(request: web.Request) -> str:
    role = request.match_info["role"]
    if role not in rbac.RANK:
        raise ValidationFailed(
            [{"field": "role", "message": f"must be one of {', '.join(rbac.ROLES)}"}],
            "unknown role",
        )
    return role


async def grant_role(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    user_id = path_uuid(request, "user_id", "user")
    role = _role(request)
    rbac.require_can_grant(p, [role])
    async with request.app[PG].transaction() as con:
        target = await users.get_user_for_update(con, p.tenant_id, user_id)
        if target is None or target["status"] == "deleted":
            raise NotFound("user")
        rbac.require_outranks_or_equals(p, target["roles"])
        if role in target["roles"]:
            return web.Response(status=204)
        row = await users.set_roles(
            con, p.tenant_id, user_id, rbac.normalize([*target["roles"], role])
        )
        assert row is not None
        view = await _record(con, p, request, "user.role_granted", row, role=role)
    await _written(request, row, view)
    return web.Response(status=204)


async def revoke_role(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    user_id = path_uuid(request, "user_id", "user")
    role = _role(request)
    if role == "member":
        raise ValidationFailed(
            [{"field": "role", "message": "member is the base role and cannot be revoked"}]
        )
    rbac.require_can_grant(p, [role])
    async with request.app[PG].transaction() as con:
        await users.lock_tenant(con, p.tenant_id)
        target = await users.get_user_for_update(con, p.tenant_id, user_id)
        if target is None or target["status"] == "deleted":
            raise NotFound("user")
        rbac.require_outranks_or_equals(p, target["roles"])
        if role not in target["roles"]:
            return web.Response(status=204)
        if role == "owner" and target["status"] == "active":
            rbac.require_not_last_owner(await users.count_active_owners(con, p.tenant_id))
        remaining = [r for r in target["roles"] if r != role]
        row = await users.set_roles(con, p.tenant_id, user_id, rbac.normalize(remaining))
        assert row is not None
        view = await _record(con, p, request, "user.role_revoked", row, role=role)
    await _written(request, row, view)
    return web.Response(status=204)


async def change_password(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    body = await read_json(request, "PasswordChangeRequest")
    hasher = request.app[HASHER]
    stored = await users.get_password_hash(request.app[PG], p.tenant_id, p.user_id)
    if not await hasher.verify(stored, body["old_password"]):
        raise ValidationFailed(
            [{"field": "old_password", "message": "is not the current password"}]
        )
    new_hash = await hasher.hash(body["new_password"])
    async with request.app[PG].transaction() as con:
        row = await users.change_password(con, p.tenant_id, p.user_id, new_hash)
        if row is None:
            raise NotFound("user")
        await tokens.revoke_user_tokens(con, p.tenant_id, p.user_id)
        view = await _record(con, p, request, "user.password_changed", row)
    await _written(request, row, view)
    return web.Response(status=204)

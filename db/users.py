"""Users and tenants: one function per statement in sql/users.sql."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from asyncpg import Record

from db import queries
from db.pool import Executor

_Q = queries.load("users.sql")

# users.status, as its CHECK constraint allows (sql/migrations/0002_identity.sql).
STATUSES = ("active", "suspended", "deleted")


def prefix_pattern(q: str) -> str:
    """The LIKE pattern list_users takes for a case-insensitive literal prefix: %, _ and \\
    escaped. Not lower-cased here: PostgreSQL folds it (lower($3)) as it folds the column, and
    Python folds some characters (U+0130) differently."""
    escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


async def insert_tenant(pg: Executor, tenant_id: UUID, name: str) -> Record:
    row = await pg.fetchrow(_Q["insert_tenant"], tenant_id, name)
    assert row is not None
    return row


async def lock_tenant(pg: Executor, tenant_id: UUID) -> None:
    await pg.fetchval(_Q["lock_tenant"], tenant_id)


async def insert_user(
    pg: Executor,
    tenant_id: UUID,
    user_id: UUID,
    email: str,
    username: str,
    password_hash: str,
    roles: list[str],
    profile: dict[str, Any],
) -> Record:
    row = await pg.fetchrow(
        _Q["insert_user"], tenant_id, user_id, email, username, password_hash, roles, profile
    )
    assert row is not None
    return row


async def get_user(pg: Executor, tenant_id: UUID, user_id: UUID) -> Record | None:
    return await pg.fetchrow(_Q["get_user"], tenant_id, user_id)


async def get_user_for_update(pg: Executor, tenant_id: UUID, user_id: UUID) -> Record | None:
    return await pg.fetchrow(_Q["get_user_for_update"], tenant_id, user_id)


async def get_login(pg: Executor, tenant_id: UUID, email: str) -> Record | None:
    return await pg.fetchrow(_Q["get_login"], tenant_id, email)


async def get_password_hash(pg: Executor, tenant_id: UUID, user_id: UUID) -> str | None:
    value: str | None = await pg.fetchval(_Q["get_password_hash"], tenant_id, user_id)
    return value


async def rehash_password(
    pg: Executor, tenant_id: UUID, user_id: UUID, new_hash: str, old_hash: str
) -> None:
    await pg.execute(_Q["rehash_password"], tenant_id, user_id, new_hash, old_hash)


async def change_password(
    pg: Executor, tenant_id: UUID, user_id: UUID, password_hash: str
) -> Record | None:
    return await pg.fetchrow(_Q["change_password"], tenant_id, user_id, password_hash)


async def list_users(
    pg: Executor,
    tenant_id: UUID,
    after: UUID | None,
    prefix_pattern: str | None,
    status: str | None,
    limit: int,
) -> list[Record]:
    return await pg.fetch(_Q["list_users"], tenant_id, after, prefix_pattern, status, limit)


async def list_user_versions(
    pg: Executor,
    tenant_id: UUID,
    after: UUID | None,
    prefix_pattern: str | None,
    status: str | None,
    limit: int,
) -> list[Record]:
    return await pg.fetch(_Q["list_user_versions"], tenant_id, after, prefix_pattern, status, limit)


async def get_users_at_versions(
    pg: Executor, tenant_id: UUID, ids: list[UUID], versions: list[int]
) -> list[Record]:
    return await pg.fetch(_Q["get_users_at_versions"], tenant_id, ids, versions)


async def patch_user(
    pg: Executor,
    tenant_id: UUID,
    user_id: UUID,
    version: int | None,
    username: str | None,
    profile: dict[str, Any] | None,
    status: str | None,
    max_rank: int,
) -> Record | None:
    return await pg.fetchrow(
        _Q["patch_user"], tenant_id, user_id, version, username, profile, status, max_rank
    )


async def set_status(pg: Executor, tenant_id: UUID, user_id: UUID, status: str) -> Record | None:
    return await pg.fetchrow(_Q["set_status"], tenant_id, user_id, status)


async def set_roles(
    pg: Executor, tenant_id: UUID, user_id: UUID, roles: list[str]
) -> Record | None:
    return await pg.fetchrow(_Q["set_roles"], tenant_id, user_id, roles)


async def count_active_owners(pg: Executor, tenant_id: UUID) -> int:
    count: int = await pg.fetchval(_Q["count_active_owners"], tenant_id)
    return count

"""Refresh tokens: one function per statement in sql/tokens.sql."""

from __future__ import annotations

from uuid import UUID

from asyncpg import Record

from db import queries
from db.pool import Executor

_Q = queries.load("tokens.sql")


async def insert_refresh_token(
    pg: Executor, token_hash: bytes, tenant_id: UUID, user_id: UUID, family_id: UUID, ttl_s: float
) -> None:
    await pg.execute(_Q["insert_refresh_token"], token_hash, tenant_id, user_id, family_id, ttl_s)


async def take_refresh_token(pg: Executor, token_hash: bytes) -> Record | None:
    """The token row locked FOR UPDATE, joined with its user's status and roles."""
    return await pg.fetchrow(_Q["take_refresh_token"], token_hash)


async def mark_refresh_token_used(pg: Executor, token_hash: bytes) -> None:
    await pg.execute(_Q["mark_refresh_token_used"], token_hash)


async def revoke_family(pg: Executor, tenant_id: UUID, family_id: UUID) -> None:
    await pg.execute(_Q["revoke_family"], tenant_id, family_id)


async def revoke_family_of_token(pg: Executor, token_hash: bytes) -> None:
    await pg.execute(_Q["revoke_family_of_token"], token_hash)


async def revoke_user_tokens(pg: Executor, tenant_id: UUID, user_id: UUID) -> None:
    await pg.execute(_Q["revoke_user_tokens"], tenant_id, user_id)


async def revoke_access_tokens(pg: Executor, tenant_id: UUID, user_id: UUID) -> int:
    """Bumps the user's token generation: their access tokens issued before stop working."""
    generation: int = await pg.fetchval(_Q["revoke_access_tokens"], tenant_id, user_id)
    return generation


async def token_generation(pg: Executor, tenant_id: UUID, user_id: UUID) -> int | None:
    generation: int | None = await pg.fetchval(_Q["token_generation"], tenant_id, user_id)
    return generation


async def revoked_since(pg: Executor, seconds: float) -> list[Record]:
    """(id, token_generation) of every user revoked in the last `seconds`, in any tenant."""
    return await pg.fetch(_Q["revoked_since"], seconds)

"""The GraphQL loaders' batch reads: one function per statement in sql/graphql.sql."""

from __future__ import annotations

from uuid import UUID

from asyncpg import Record

from db import queries
from db.pool import Executor

_Q = queries.load("graphql.sql")


async def users_by_ids(pg: Executor, tenant_id: UUID, ids: list[UUID]) -> list[Record]:
    return await pg.fetch(_Q["users_by_ids"], tenant_id, ids)


async def products_by_ids(pg: Executor, tenant_id: UUID, ids: list[UUID]) -> list[Record]:
    return await pg.fetch(_Q["products_by_ids"], tenant_id, ids)


async def orders_by_ids(pg: Executor, tenant_id: UUID, ids: list[UUID]) -> list[Record]:
    return await pg.fetch(_Q["orders_by_ids"], tenant_id, ids)

"""Idempotency keys of order-changing requests: sql/idempotency.sql."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from asyncpg import Record

from db import queries
from db.pool import Executor

_Q = queries.load("idempotency.sql")


async def claim_idempotency_key(
    pg: Executor, tenant_id: UUID, user_id: UUID, key: str, fingerprint: bytes, abandon_s: float
) -> Record:
    for _ in range(3):
        row = await pg.fetchrow(
            _Q["claim_idempotency_key"], tenant_id, user_id, key, fingerprint, abandon_s
        )
        if row is not None:
            return row
        # A concurrent first request committed the key after this statement's snapshot was
        # taken: the INSERT saw the conflict, the SELECT could not see the row. Look again.
    raise RuntimeError("idempotency key neither claimed nor found")


async def complete_idempotency_key(
    pg: Executor,
    tenant_id: UUID,
    user_id: UUID,
    key: str,
    status: int,
    body: bytes,
    headers: dict[str, Any],
) -> None:
    await pg.execute(_Q["complete_idempotency_key"], tenant_id, user_id, key, status, body, headers)


async def drop_idempotency_key(pg: Executor, tenant_id: UUID, user_id: UUID, key: str) -> None:
    await pg.execute(_Q["drop_idempotency_key"], tenant_id, user_id, key)


async def prune_idempotency_keys(pg: Executor) -> None:
    await pg.execute(_Q["prune_idempotency_keys"])

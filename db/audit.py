"""The audit log and the outbox: one function per statement in sql/audit.sql."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from asyncpg import Record

from db import queries
from db.ids import uuid7
from db.pool import Executor

_Q = queries.load("audit.sql")


async def record_audit(
    pg: Executor,
    tenant_id: UUID,
    actor_id: UUID | None,
    action: str,
    target_type: str,
    target_id: UUID | None,
    request_id: str | None,
    details: dict[str, Any],
    *,
    event: dict[str, Any] | None = None,
) -> None:
    """An audit row, in the caller's transaction; given `event`, also an outbox event (topic =
    action, payload = event) in the same statement."""
    row = (tenant_id, actor_id, action, target_type, target_id, request_id, details)
    if event is None:
        await pg.execute(_Q["record_audit"], *row, uuid7())
    else:
        await pg.execute(_Q["record_event"], *row, event, uuid7())


async def list_audit(
    pg: Executor, tenant_id: UUID, before: UUID | None, limit: int
) -> list[Record]:
    return await pg.fetch(_Q["list_audit"], tenant_id, before, limit)

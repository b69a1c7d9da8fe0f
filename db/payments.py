"""The pay saga's rows and webhook events: sql/payments.sql."""

from __future__ import annotations

from uuid import UUID

from asyncpg import Record

from db import queries
from db.pool import Executor

_Q = queries.load("payments.sql")

# The steps of payments.step (the CHECK of sql/migrations/0004_orders.sql).
PAYMENT_STEPS = (
    "authorizing",
    "capturing",
    "captured",
    "voiding",
    "voided",
    "refunding",
    "refunded",
    "failed",
)


async def insert_payment(
    pg: Executor,
    tenant_id: UUID,
    order_id: UUID,
    payment_method: str,
    amount_cents: int,
    currency: str,
    lease_s: float,
) -> Record:
    row = await pg.fetchrow(
        _Q["insert_payment"], tenant_id, order_id, payment_method, amount_cents, currency, lease_s
    )
    assert row is not None
    return row


async def claim_payment(
    pg: Executor, tenant_id: UUID, order_id: UUID, lease_s: float, *, renew: bool = False
) -> Record | None:
    """The saga's row with its lease taken (or renewed); None when it is settled or leased."""
    return await pg.fetchrow(_Q["claim_payment"], tenant_id, order_id, lease_s, renew)


async def release_payment(pg: Executor, tenant_id: UUID, order_id: UUID) -> None:
    await pg.execute(_Q["release_payment"], tenant_id, order_id)


async def get_payment(pg: Executor, tenant_id: UUID, order_id: UUID) -> Record | None:
    return await pg.fetchrow(_Q["get_payment"], tenant_id, order_id)


async def payment_by_authorization(pg: Executor, authorization_id: str) -> Record | None:
    return await pg.fetchrow(_Q["payment_by_authorization"], authorization_id)


async def move_payment(
    pg: Executor,
    tenant_id: UUID,
    order_id: UUID,
    from_steps: list[str],
    to_step: str,
    *,
    authorization_id: str | None = None,
    outcome: str | None = None,
) -> Record | None:
    return await pg.fetchrow(
        _Q["move_payment"], tenant_id, order_id, from_steps, to_step, authorization_id, outcome
    )


async def stale_payments(pg: Executor, limit: int) -> list[Record]:
    return await pg.fetch(_Q["stale_payments"], limit)


async def insert_webhook_event(
    pg: Executor,
    event_id: str,
    event_type: str,
    tenant_id: UUID | None,
    order_id: UUID | None,
) -> bool:
    """False when the event id was seen before."""
    return (
        await pg.fetchval(_Q["insert_webhook_event"], event_id, event_type, tenant_id, order_id)
        is not None
    )


async def prune_webhook_events(pg: Executor, days: int) -> None:
    await pg.execute(_Q["prune_webhook_events"], days)

"""Products, orders and order items: one function per statement in sql/orders.sql."""

from __future__ import annotations

from uuid import UUID

from asyncpg import Record

from db import queries
from db.pool import Executor

_Q = queries.load("orders.sql")

# The states of orders.status, in the order an order moves through them (the CHECK of
# sql/migrations/0004_orders.sql).
ORDER_STATUSES = ("pending", "paying", "paid", "payment_failed", "cancelled")


async def insert_product(
    pg: Executor,
    tenant_id: UUID,
    product_id: UUID,
    sku: str,
    name: str,
    price_cents: int,
    currency: str,
    stock: int,
) -> Record:
    row = await pg.fetchrow(
        _Q["insert_product"], tenant_id, product_id, sku, name, price_cents, currency, stock
    )
    assert row is not None
    return row


async def get_product(pg: Executor, tenant_id: UUID, product_id: UUID) -> Record | None:
    return await pg.fetchrow(_Q["get_product"], tenant_id, product_id)


async def list_products(
    pg: Executor, tenant_id: UUID, after: UUID | None, limit: int
) -> list[Record]:
    return await pg.fetch(_Q["list_products"], tenant_id, after, limit)


async def lock_products(pg: Executor, tenant_id: UUID, product_ids: list[UUID]) -> list[Record]:
    return await pg.fetch(_Q["lock_products"], tenant_id, product_ids)


async def reserve_stock(
    pg: Executor, tenant_id: UUID, product_ids: list[UUID], quantities: list[int]
) -> int:
    """How many products had enough stock (and were decremented)."""
    return len(await pg.fetch(_Q["reserve_stock"], tenant_id, product_ids, quantities))


async def release_stock(pg: Executor, tenant_id: UUID, order_id: UUID) -> None:
    await pg.execute(_Q["release_stock"], tenant_id, order_id)


async def insert_order(
    pg: Executor,
    tenant_id: UUID,
    order_id: UUID,
    user_id: UUID,
    total_cents: int,
    currency: str,
) -> Record:
    row = await pg.fetchrow(_Q["insert_order"], tenant_id, order_id, user_id, total_cents, currency)
    assert row is not None
    return row


async def insert_items(
    pg: Executor,
    tenant_id: UUID,
    order_id: UUID,
    product_ids: list[UUID],
    quantities: list[int],
    prices: list[int],
) -> None:
    await pg.execute(_Q["insert_items"], tenant_id, order_id, product_ids, quantities, prices)


async def get_order(pg: Executor, tenant_id: UUID, order_id: UUID) -> Record | None:
    return await pg.fetchrow(_Q["get_order"], tenant_id, order_id)


async def list_orders(
    pg: Executor, tenant_id: UUID, after: UUID | None, status: str | None, limit: int
) -> list[Record]:
    return await pg.fetch(_Q["list_orders"], tenant_id, after, status, limit)


async def items_of_orders(pg: Executor, tenant_id: UUID, order_ids: list[UUID]) -> list[Record]:
    return await pg.fetch(_Q["items_of_orders"], tenant_id, order_ids)


async def move_order(
    pg: Executor, tenant_id: UUID, order_id: UUID, from_states: list[str], to_state: str
) -> Record | None:
    return await pg.fetchrow(_Q["move_order"], tenant_id, order_id, from_states, to_state)

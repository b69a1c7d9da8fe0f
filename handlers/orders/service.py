"""The catalog's and the orders' rules and transactions: products, orders, pay and cancel,
and the audit log's pages. The payment itself runs in the saga (saga.py); pay and cancel
start it after their transaction commits."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from typing import Any
from uuid import UUID

from asyncpg import Connection, Record

from db import audit, orders, payments
from db.ids import uuid7
from db.pool import Database, Executor
from handlers.orders import idempotency, saga
from handlers.orders.idempotency import Answer, Scope
from handlers.orders.provider import OPEN, not_configured
from handlers.orders.views import audit_view, order_view, product_view
from server.errors import Conflict, NotFound, ServiceUnavailable, ValidationFailed
from server.http import etag, page
from server.principal import Principal

CHANGED = "the order changed while this request ran; read it again"


def _page(
    rows: list[Record], limit: int, view: Callable[[Record], dict[str, Any]]
) -> dict[str, Any]:
    """One page of `limit` views from `limit + 1` rows (the extra one says more follow)."""
    last = rows[limit - 1]["id"] if len(rows) > limit else None
    return page([view(r) for r in rows], limit, last)


# -- catalog --


async def create_product(
    pg: Database,
    actor: Principal,
    sku: str,
    name: str,
    price_cents: int,
    currency: str,
    stock: int,
    request_id: str,
) -> dict[str, Any]:
    async with pg.transaction() as con:
        row = await orders.insert_product(
            con, actor.tenant_id, uuid7(), sku, name, price_cents, currency, stock
        )
        view = product_view(row)
        await audit.record_audit(
            con, actor.tenant_id, actor.user_id, "product.created", "product", row["id"],
            request_id, {}, event=view,
        )  # fmt: skip
    return view


async def get_product(pg: Database, tenant_id: UUID, product_id: UUID) -> dict[str, Any]:
    row = await orders.get_product(pg, tenant_id, product_id)
    if row is None:
        raise NotFound("product")
    return product_view(row)


async def list_products(
    pg: Database, tenant_id: UUID, after: UUID | None, limit: int
) -> dict[str, Any]:
    rows = await orders.list_products(pg, tenant_id, after, limit + 1)
    return _page(rows, limit, product_view)


# -- orders --


async def get_order(pg: Executor, tenant_id: UUID, order_id: UUID) -> dict[str, Any]:
    row = await orders.get_order(pg, tenant_id, order_id)
    if row is None:
        raise NotFound("order")
    return order_view(row, await orders.items_of_orders(pg, tenant_id, [order_id]))


async def list_orders(
    pg: Database, tenant_id: UUID, after: UUID | None, status: str | None, limit: int
) -> dict[str, Any]:
    rows = await orders.list_orders(pg, tenant_id, after, status, limit + 1)
    lines: dict[UUID, list[Record]] = defaultdict(list)
    if rows:
        for item in await orders.items_of_orders(pg, tenant_id, [r["id"] for r in rows[:limit]]):
            lines[item["order_id"]].append(item)
    return _page(rows, limit, lambda r: order_view(r, lines[r["id"]]))


def _currency(ids: list[UUID], products: dict[UUID, Record]) -> str:
    """The order's one currency; 422 names every product that does not exist."""
    missing = [
        {"field": f"items[{i}].product_id", "message": "no such product"}
        for i, pid in enumerate(ids)
        if pid not in products
    ]
    if missing:
        raise ValidationFailed(missing)
    currencies: set[str] = {products[pid]["currency"] for pid in ids}
    if len(currencies) > 1:
        raise ValidationFailed(
            [{"field": "items", "message": "all items must be priced in one currency"}]
        )
    return currencies.pop()


async def _reserve(
    con: Connection,
    tenant_id: UUID,
    ids: list[UUID],
    quantities: list[int],
    products: dict[UUID, Record],
) -> None:
    """Take the stock of every line, or refuse the whole order (409 names what is short)."""
    if await orders.reserve_stock(con, tenant_id, ids, quantities) != len(ids):
        short = [
            str(pid) for pid, q in zip(ids, quantities, strict=True) if products[pid]["stock"] < q
        ]
        raise Conflict(f"not enough stock for product {', '.join(short)}")


async def create_order(
    pg: Database,
    actor: Principal,
    ids: list[UUID],
    quantities: list[int],
    request_id: str,
    scope: Scope | None,
) -> Answer:
    tenant_id, order_id = actor.tenant_id, uuid7()
    async with pg.transaction() as con:
        products = {r["id"]: r for r in await orders.lock_products(con, tenant_id, sorted(ids))}
        currency = _currency(ids, products)
        await _reserve(con, tenant_id, ids, quantities, products)
        prices = [products[pid]["price_cents"] for pid in ids]
        total = sum(pr * q for pr, q in zip(prices, quantities, strict=True))
        row = await orders.insert_order(con, tenant_id, order_id, actor.user_id, total, currency)
        await orders.insert_items(con, tenant_id, order_id, ids, quantities, prices)
        view = order_view(row, await orders.items_of_orders(con, tenant_id, [order_id]))
        await audit.record_audit(
            con, tenant_id, actor.user_id, "order.created", "order", order_id, request_id, {},
            event=view,
        )  # fmt: skip
        headers = {"ETag": etag(row["version"]), "Location": f"/v1/orders/{order_id}"}
        answer = Answer(201, view, headers)
        await idempotency.store(con, scope, answer)
    return answer


# -- pay and cancel --


def _provider_ready(runner: saga.SagaRunner) -> None:
    breaker = runner.breaker
    if breaker is None:
        raise not_configured()
    if breaker.state == OPEN and breaker.retry_after() > 0:  # fail fast, pile nothing up
        raise ServiceUnavailable(
            "the payment provider is unavailable; try again later",
            retry_after=max(1, int(breaker.retry_after() + 0.999)),
        )


async def pay_order(
    pg: Database,
    runner: saga.SagaRunner,
    actor: Principal,
    order_id: UUID,
    payment_method: str,
    request_id: str,
    scope: Scope | None,
) -> Answer:
    """Move the order to `paying` and start its saga: 202, and the saga finishes it."""
    tenant_id = actor.tenant_id
    order = await orders.get_order(pg, tenant_id, order_id)
    if order is None:
        raise NotFound("order")
    if order["status"] in ("paid", "payment_failed", "paying"):
        view = await get_order(pg, tenant_id, order_id)
        return Answer(202 if order["status"] == "paying" else 200, view)
    if order["status"] == "cancelled":
        raise Conflict("the order is cancelled")
    _provider_ready(runner)
    async with pg.transaction() as con:
        moved = await orders.move_order(con, tenant_id, order_id, ["pending"], "paying")
        if moved is None:  # another pay (or a cancel) got there first
            raise Conflict(CHANGED)
        payment = await payments.insert_payment(
            con, tenant_id, order_id, payment_method, moved["total_cents"], moved["currency"],
            runner.lease_s,
        )  # fmt: skip
        await audit.record_audit(
            con, tenant_id, actor.user_id, "order.paying", "order", order_id, request_id, {}
        )
        items = await orders.items_of_orders(con, tenant_id, [order_id])
        answer = Answer(
            202, order_view(moved, items, payment), {"Location": f"/v1/orders/{order_id}"}
        )
        await idempotency.store(con, scope, answer)
    runner.start(tenant_id, order_id, owned=True)
    return answer


async def _void_authorization(
    con: Connection, runner: saga.SagaRunner, tenant_id: UUID, order_id: UUID, step: str
) -> bool:
    """Authorized, not captured: void it. While authorizing, nothing can be voided yet."""
    voiding = step == "capturing" and await saga.compensate(
        con, tenant_id, order_id, ["capturing"], "voiding", saga.CANCELLED, "api"
    )
    if not voiding:
        raise Conflict("the payment is being authorized; try again in a moment")
    await payments.claim_payment(con, tenant_id, order_id, runner.lease_s, renew=True)
    return True


async def _refund_capture(
    con: Connection, runner: saga.SagaRunner, tenant_id: UUID, order_id: UUID
) -> bool:
    """Paid: refund it. False when a refund already runs."""
    if runner.client is None:
        raise not_configured()
    refund = await saga.compensate(
        con, tenant_id, order_id, ["captured"], "refunding", saga.CANCELLED, "api"
    )
    await payments.claim_payment(con, tenant_id, order_id, runner.lease_s, renew=True)
    return refund


async def _cancel_unpaid(
    con: Connection, actor: Principal, order_id: UUID, status: str, request_id: str
) -> None:
    tenant_id = actor.tenant_id
    moved = await orders.move_order(con, tenant_id, order_id, [status], "cancelled")
    if moved is None:
        raise Conflict(CHANGED)
    if status == "pending":  # a failed payment already gave its stock back
        await orders.release_stock(con, tenant_id, order_id)
    items = await orders.items_of_orders(con, tenant_id, [order_id])
    view = order_view(moved, items, await payments.get_payment(con, tenant_id, order_id))
    await audit.record_audit(
        con, tenant_id, actor.user_id, "order.cancelled", "order", order_id, request_id,
        {"from": status}, event=view,
    )  # fmt: skip


async def cancel_order(
    pg: Database, runner: saga.SagaRunner, actor: Principal, order_id: UUID, request_id: str
) -> dict[str, Any]:
    """Cancel an unpaid order at once; a paid (or authorized) one once its money is back,
    which the saga does: the order as it stands when that is done or after a short wait."""
    tenant_id = actor.tenant_id
    refund = False
    async with pg.transaction() as con:
        order = await orders.get_order(con, tenant_id, order_id)
        if order is None:
            raise NotFound("order")
        status = order["status"]
        if status == "paying":
            refund = await _void_authorization(
                con, runner, tenant_id, order_id, order["payment_step"]
            )
        if status in ("pending", "payment_failed"):
            await _cancel_unpaid(con, actor, order_id, status, request_id)
        elif status == "paid":
            refund = await _refund_capture(con, runner, tenant_id, order_id)
    if refund or status == "paid":  # a refund or void to run (or already running)
        task = runner.start(tenant_id, order_id, owned=refund)
        if task is not None:
            # Most refunds take one provider round trip: answer with the outcome when it comes
            # quickly, else 202 and the refund finishes in the background.
            await asyncio.wait({task}, timeout=runner.answer_wait_s)
    return await get_order(pg, tenant_id, order_id)


# -- audit log --


async def list_audit(
    pg: Database, tenant_id: UUID, before: UUID | None, limit: int
) -> dict[str, Any]:
    rows = await audit.list_audit(pg, tenant_id, before, limit + 1)
    return _page(rows, limit, audit_view)

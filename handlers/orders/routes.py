"""Products, orders, pay and cancel, and the tenant's audit log: /v1/products, /v1/orders,
/v1/audit. The pay saga itself is handlers/order_saga.py."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any
from uuid import UUID

import orjson
from aiohttp import web

from db import audit, orders, payments
from db.ids import parse_uuid, uuid7
from handlers.orders import saga as order_saga
from handlers.orders.idempotency import idempotent, store_with
from handlers.orders.keys import PAYMENTS
from handlers.orders.webhooks import payments_webhook as payments_webhook
from server import rbac
from server.errors import Conflict, NotFound, ServiceUnavailable, ValidationFailed
from server.http import (
    decode_cursor,
    etag,
    json_response,
    page,
    path_uuid,
    query_limit,
    raw_json_response,
    timestamp,
)
from server.keys import CONFIG, PG, PG_READ, REQUEST_ID
from server.validation import read_json

ORDER_STATUSES = ("pending", "paying", "paid", "payment_failed", "cancelled")


def product_view(row: Any) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "tenant_id": str(row["tenant_id"]),
        "sku": row["sku"],
        "name": row["name"],
        "price_cents": row["price_cents"],
        "currency": row["currency"],
        "stock": row["stock"],
        "version": row["version"],
        "created_at": timestamp(row["created_at"]),
        "updated_at": timestamp(row["updated_at"]),
    }


async def create_product(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    rbac.require_admin(p)
    body = await read_json(request, "CreateProductRequest")
    async with request.app[PG].transaction() as con:
        row = await orders.insert_product(
            con, p.tenant_id, uuid7(), body["sku"], body["name"], body["price_cents"],
            body["currency"], body["stock"],
        )  # fmt: skip
        view = product_view(row)
        await audit.record_audit(
            con, p.tenant_id, p.user_id, "product.created", "product", row["id"],
            request[REQUEST_ID], {}, event=view,
        )  # fmt: skip
    return json_response(
        view, 201, {"ETag": etag(row["version"]), "Location": f"/v1/products/{row['id']}"}
    )


async def get_product(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    row = await orders.get_product(
        request.app[PG_READ], p.tenant_id, path_uuid(request, "product_id", "product")
    )
    if row is None:
        raise NotFound("product")
    return json_response(product_view(row), headers={"ETag": etag(row["version"])})


async def list_products(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    limit = query_limit(request)
    rows = await orders.list_products(
        request.app[PG_READ], p.tenant_id, decode_cursor(request), limit + 1
    )
    last = rows[limit - 1]["id"] if len(rows) > limit else None
    return json_response(page([product_view(r) for r in rows], limit, last))


def _order_lines(items: list[dict[str, Any]]) -> tuple[list[UUID], list[int]]:
    """Product ids and quantities, one line per item as sent; 422 names the bad item."""
    ids: list[UUID] = []
    errors = []
    for i, item in enumerate(items):
        product_id = parse_uuid(item["product_id"])
        if product_id is None:
            errors.append({"field": f"items[{i}].product_id", "message": "not a product id"})
        elif product_id in ids:
            errors.append(
                {"field": f"items[{i}].product_id", "message": "appears twice; add the quantities"}
            )
        else:
            ids.append(product_id)
    if errors:
        raise ValidationFailed(errors)
    return ids, [item["quantity"] for item in items]


@idempotent
async def create_order(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    body = await read_json(request, "CreateOrderRequest")
    ids, quantities = _order_lines(body["items"])
    order_id = uuid7()
    async with request.app[PG].transaction() as con:
        products = {r["id"]: r for r in await orders.lock_products(con, p.tenant_id, sorted(ids))}
        missing = [
            {"field": f"items[{i}].product_id", "message": "no such product"}
            for i, pid in enumerate(ids)
            if pid not in products
        ]
        if missing:
            raise ValidationFailed(missing)
        currencies = {products[pid]["currency"] for pid in ids}
        if len(currencies) > 1:
            raise ValidationFailed(
                [{"field": "items", "message": "all items must be priced in one currency"}]
            )
        if await orders.reserve_stock(con, p.tenant_id, ids, quantities) != len(ids):
            short = [
                str(pid)
                for pid, q in zip(ids, quantities, strict=True)
                if products[pid]["stock"] < q
            ]
            raise Conflict(f"not enough stock for product {', '.join(short)}")
        prices = [products[pid]["price_cents"] for pid in ids]
        total = sum(pr * q for pr, q in zip(prices, quantities, strict=True))
        row = await orders.insert_order(
            con, p.tenant_id, order_id, p.user_id, total, currencies.pop()
        )
        await orders.insert_items(con, p.tenant_id, order_id, ids, quantities, prices)
        items = await orders.items_of_orders(con, p.tenant_id, [order_id])
        view = order_saga.order_view(row, items)
        await audit.record_audit(
            con, p.tenant_id, p.user_id, "order.created", "order", order_id, request[REQUEST_ID],
            {}, event=view,
        )  # fmt: skip
        response = json_response(
            view, 201, {"ETag": etag(row["version"]), "Location": f"/v1/orders/{order_id}"}
        )
        await store_with(con, request, response)
    return response


async def get_order(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    view = await order_saga.load_order_view(
        request.app[PG_READ], p.tenant_id, path_uuid(request, "order_id", "order")
    )
    if view is None:
        raise NotFound("order")
    return json_response(view, headers={"ETag": etag(view["version"])})


async def list_orders(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    limit = query_limit(request)
    after = decode_cursor(request)
    status = request.query.get("status")
    if status is not None and status not in ORDER_STATUSES:
        raise ValidationFailed(
            [{"field": "status", "message": f"must be one of {', '.join(ORDER_STATUSES)}"}],
            "invalid query parameter",
        )
    pg = request.app[PG_READ]
    rows = await orders.list_orders(pg, p.tenant_id, after, status, limit + 1)
    lines: dict[UUID, list[Any]] = defaultdict(list)
    if rows:
        for item in await orders.items_of_orders(pg, p.tenant_id, [r["id"] for r in rows[:limit]]):
            lines[item["order_id"]].append(item)
    last = rows[limit - 1]["id"] if len(rows) > limit else None
    return json_response(
        page([order_saga.order_view(r, lines[r["id"]]) for r in rows], limit, last)
    )


@idempotent
async def pay_order(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    order_id = path_uuid(request, "order_id", "order")
    body = await read_json(request, "PayOrderRequest")
    runner = request.app[PAYMENTS]
    pg = request.app[PG]
    order = await orders.get_order(pg, p.tenant_id, order_id)
    if order is None:
        raise NotFound("order")
    if order["status"] in ("paid", "payment_failed", "paying"):
        view = await order_saga.load_order_view(pg, p.tenant_id, order_id)
        return json_response(view, 202 if order["status"] == "paying" else 200)
    if order["status"] == "cancelled":
        raise Conflict("the order is cancelled")
    breaker = runner.breaker
    if breaker is None:
        raise ServiceUnavailable("payments are not configured on this server", retry_after=60)
    if breaker.state == 2 and breaker.retry_after() > 0:  # open: fail fast, pile nothing up
        raise ServiceUnavailable(
            "the payment provider is unavailable; try again later",
            retry_after=max(1, int(breaker.retry_after() + 0.999)),
        )
    lease_s = request.app[CONFIG].payments_saga_lease_s
    async with pg.transaction() as con:
        moved = await orders.move_order(con, p.tenant_id, order_id, ["pending"], "paying")
        if moved is None:  # another pay (or a cancel) got there first
            raise Conflict("the order changed while this request ran; read it again")
        payment = await payments.insert_payment(
            con, p.tenant_id, order_id, body["payment_method"], moved["total_cents"],
            moved["currency"], lease_s,
        )  # fmt: skip
        await audit.record_audit(
            con, p.tenant_id, p.user_id, "order.paying", "order", order_id, request[REQUEST_ID], {}
        )
        items = await orders.items_of_orders(con, p.tenant_id, [order_id])
        response = json_response(
            order_saga.order_view(moved, items, payment),
            202,
            {"Location": f"/v1/orders/{order_id}"},
        )
        await store_with(con, request, response)
    runner.start(p.tenant_id, order_id, owned=True)
    return response


async def cancel_order(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    order_id = path_uuid(request, "order_id", "order")
    pg = request.app[PG]
    runner = request.app[PAYMENTS]
    refund = False
    async with pg.transaction() as con:
        order = await orders.get_order(con, p.tenant_id, order_id)
        if order is None:
            raise NotFound("order")
        status = order["status"]
        if status == "paying":
            # Authorized, not captured: void it. While authorizing, nothing can be voided yet.
            refund = order["payment_step"] == "capturing" and await order_saga.compensate(
                con, p.tenant_id, order_id, ["capturing"], "voiding", order_saga.CANCELLED, "api"
            )
            if not refund:
                raise Conflict("the payment is being authorized; try again in a moment")
            await payments.claim_payment(con, p.tenant_id, order_id, runner.lease_s, renew=True)
        if status in ("pending", "payment_failed"):
            moved = await orders.move_order(con, p.tenant_id, order_id, [status], "cancelled")
            if moved is None:
                raise Conflict("the order changed while this request ran; read it again")
            if status == "pending":  # a failed payment already gave its stock back
                await orders.release_stock(con, p.tenant_id, order_id)
            items = await orders.items_of_orders(con, p.tenant_id, [order_id])
            view = order_saga.order_view(
                moved, items, await payments.get_payment(con, p.tenant_id, order_id)
            )
            await audit.record_audit(
                con, p.tenant_id, p.user_id, "order.cancelled", "order", order_id,
                request[REQUEST_ID], {"from": status}, event=view,
            )  # fmt: skip
        elif status == "paid":
            if runner.client is None:
                raise ServiceUnavailable(
                    "payments are not configured on this server", retry_after=60
                )
            refund = await order_saga.compensate(
                con, p.tenant_id, order_id, ["captured"], "refunding", order_saga.CANCELLED, "api"
            )
            await payments.claim_payment(con, p.tenant_id, order_id, runner.lease_s, renew=True)
    if refund or order["status"] == "paid":  # a refund or void to run (or already running)
        task = runner.start(p.tenant_id, order_id, owned=refund)
        if task is not None:
            # Most refunds take one provider round trip: answer with the outcome when it comes
            # quickly, else 202 and the refund finishes in the background.
            await asyncio.wait({task}, timeout=request.app[CONFIG].payments_timeout_s)
    final = await order_saga.load_order_view(pg, p.tenant_id, order_id)
    assert final is not None
    return json_response(final, 200 if final["status"] == "cancelled" else 202)


async def list_audit(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    rbac.require_admin(p)
    limit = query_limit(request)
    rows = await audit.list_audit(
        request.app[PG_READ], p.tenant_id, decode_cursor(request), limit + 1
    )
    items = [
        {
            "id": str(r["id"]),
            "actor_id": None if r["actor_id"] is None else str(r["actor_id"]),
            "action": r["action"],
            "target_type": r["target_type"],
            "target_id": None if r["target_id"] is None else str(r["target_id"]),
            "request_id": r["request_id"],
            "details": r["details"],
            "created_at": timestamp(r["created_at"]),
        }
        for r in rows
    ]
    last = rows[limit - 1]["id"] if len(rows) > limit else None
    return raw_json_response(orjson.dumps(page(items, limit, last)))

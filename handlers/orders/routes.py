"""Products, orders, pay and cancel, the provider's webhook and the tenant's audit log:
/v1/products, /v1/orders, /v1/webhooks/payments, /v1/audit. Each handler reads its input and
calls one function of service.py (webhooks.py for the webhook)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from aiohttp import web

from db.ids import parse_uuid
from db.orders import ORDER_STATUSES
from handlers.orders import service, webhooks
from handlers.orders.idempotency import Answer, idempotent, scope_of
from handlers.orders.keys import PAYMENTS
from server import rbac
from server.errors import ValidationFailed
from server.http import decode_cursor, etag, json_response, path_uuid, query_limit
from server.keys import CONFIG, LIMITER, PG, REQUEST_ID
from server.replica import read_pool, writes
from server.validation import read_json


def _answer(answer: Answer) -> web.Response:
    return json_response(answer.data, answer.status, answer.headers)


@writes
async def create_product(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    rbac.require_admin(p)
    body = await read_json(request, "CreateProductRequest")
    view = await service.create_product(
        request.app[PG], p, body["sku"], body["name"], body["price_cents"], body["currency"],
        body["stock"], request[REQUEST_ID],
    )  # fmt: skip
    headers = {"ETag": etag(view["version"]), "Location": f"/v1/products/{view['id']}"}
    return json_response(view, 201, headers)


async def get_product(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    product_id = path_uuid(request, "product_id", "product")
    view = await service.get_product(await read_pool(request, p.tenant_id), p.tenant_id, product_id)
    return json_response(view, headers={"ETag": etag(view["version"])})


async def list_products(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    limit = query_limit(request)
    after = decode_cursor(request)
    return json_response(
        await service.list_products(
            await read_pool(request, p.tenant_id), p.tenant_id, after, limit
        )
    )


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


@writes
@idempotent
async def create_order(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    body = await read_json(request, "CreateOrderRequest")
    ids, quantities = _order_lines(body["items"])
    answer = await service.create_order(
        request.app[PG], p, ids, quantities, request[REQUEST_ID], scope_of(request)
    )
    return _answer(answer)


async def get_order(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    order_id = path_uuid(request, "order_id", "order")
    view = await service.get_order(await read_pool(request, p.tenant_id), p.tenant_id, order_id)
    return json_response(view, headers={"ETag": etag(view["version"])})


def _status_filter(request: web.Request) -> str | None:
    status = request.query.get("status")
    if status is not None and status not in ORDER_STATUSES:
        raise ValidationFailed(
            [{"field": "status", "message": f"must be one of {', '.join(ORDER_STATUSES)}"}],
            "invalid query parameter",
        )
    return status


async def list_orders(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    limit = query_limit(request)
    after = decode_cursor(request)
    status = _status_filter(request)
    return json_response(
        await service.list_orders(
            await read_pool(request, p.tenant_id), p.tenant_id, after, status, limit
        )
    )


@writes
@idempotent
async def pay_order(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    order_id = path_uuid(request, "order_id", "order")
    body = await read_json(request, "PayOrderRequest")
    answer = await service.pay_order(
        request.app[PG], request.app[PAYMENTS], p, order_id, body["payment_method"],
        request[REQUEST_ID], scope_of(request),
    )  # fmt: skip
    return _answer(answer)


@writes
async def cancel_order(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    order_id = path_uuid(request, "order_id", "order")
    view = await service.cancel_order(
        request.app[PG], request.app[PAYMENTS], p, order_id, request[REQUEST_ID]
    )
    return json_response(view, 200 if view["status"] == "cancelled" else 202)


async def payments_webhook(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    secrets = webhooks.webhook_secrets(config)
    body = await request.read()
    result = await webhooks.receive(
        request.app[PG], request.app[PAYMENTS], request.app[LIMITER], config, secrets,
        request.headers.get("Surge-Signature"), body,
    )  # fmt: skip
    return json_response({"received": True, "result": result})


async def list_audit(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    rbac.require_admin(p)
    limit = query_limit(request)
    after = decode_cursor(request)
    pg = await read_pool(request, p.tenant_id)
    return json_response(await service.list_audit(pg, p.tenant_id, after, limit))

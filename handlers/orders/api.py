"""OpenAPI paths and schemas of the Catalog, orders, payments section (request schemas are the
validators)."""

from __future__ import annotations

import copy

from db.orders import ORDER_STATUSES
from db.payments import PAYMENT_STEPS
from server.openapi import (
    COMMON,
    EXAMPLE_TENANT_ID,
    EXAMPLE_USER_ID,
    RATELIMIT_HEADERS,
    SPACE_OR_CONTROL,
    UUID_PATTERN,
    Json,
    example,
    json_content,
    op,
    problem,
    query_param,
    ref,
    response_ref,
    retry_problem,
    with_headers,
)

STR_UUID = {"type": "string", "format": "uuid"}
DATE = {"type": "string", "format": "date-time"}
CURRENCY = {"type": "string", "pattern": "^[A-Z]{3}$", "description": "ISO 4217, e.g. USD"}
ORDER_STATUS = {"type": "string", "enum": list(ORDER_STATUSES)}
PAYMENT_STATUS = {"type": "string", "enum": list(PAYMENT_STEPS)}


def _obj(required: list[str], props: Json) -> Json:
    return {
        "type": "object",
        "required": required,
        "properties": props,
        "additionalProperties": False,
    }


def _page(item: str) -> Json:
    return {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": ref(item)},
            "next_cursor": {"type": ["string", "null"]},
        },
    }


SCHEMAS: Json = {
    "CreateProductRequest": _obj(
        ["sku", "name", "price_cents", "currency", "stock"],
        {
            "sku": {
                "type": "string",
                "minLength": 1,
                "maxLength": 64,
                "pattern": f"^[^{SPACE_OR_CONTROL}]+$",
            },
            "name": {"type": "string", "minLength": 1, "maxLength": 200},
            "price_cents": {"type": "integer", "minimum": 0, "maximum": 100_000_000_000},
            "currency": CURRENCY,
            "stock": {"type": "integer", "minimum": 0, "maximum": 1_000_000_000},
        },
    ),
    "Product": {
        "type": "object",
        "required": ["id", "tenant_id", "sku", "name", "price_cents", "currency", "stock"],
        "properties": {
            "id": STR_UUID,
            "tenant_id": STR_UUID,
            "sku": {"type": "string"},
            "name": {"type": "string"},
            "price_cents": {"type": "integer"},
            "currency": CURRENCY,
            "stock": {"type": "integer", "description": "Available after reservations"},
            "version": {"type": "integer"},
            "created_at": DATE,
            "updated_at": DATE,
        },
    },
    "ProductPage": _page("Product"),
    "CreateOrderRequest": _obj(
        ["items"],
        {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 100,
                "items": _obj(
                    ["product_id", "quantity"],
                    {
                        "product_id": {"type": "string", "format": "uuid", "pattern": UUID_PATTERN},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                ),
            }
        },
    ),
    "PayOrderRequest": _obj(
        ["payment_method"],
        {
            "payment_method": {
                "type": "string",
                "minLength": 1,
                "maxLength": 255,
                "pattern": r"^[A-Za-z0-9_.:-]+$",
                "description": "The provider's payment method token (never card data)",
            }
        },
    ),
    "OrderItem": {
        "type": "object",
        "required": ["product_id", "quantity", "unit_price_cents"],
        "properties": {
            "product_id": STR_UUID,
            "quantity": {"type": "integer"},
            "unit_price_cents": {"type": "integer"},
        },
    },
    "Order": {
        "type": "object",
        "required": ["id", "tenant_id", "user_id", "status", "items", "total_cents", "currency"],
        "properties": {
            "id": STR_UUID,
            "tenant_id": STR_UUID,
            "user_id": STR_UUID,
            "status": ORDER_STATUS,
            "items": {"type": "array", "items": ref("OrderItem")},
            "total_cents": {"type": "integer"},
            "currency": CURRENCY,
            "payment": {
                "type": ["object", "null"],
                "properties": {
                    "status": PAYMENT_STATUS,
                    "failure_code": {"type": ["string", "null"]},
                },
            },
            "version": {"type": "integer"},
            "created_at": DATE,
            "updated_at": DATE,
        },
    },
    "OrderPage": _page("Order"),
    "AuditEntry": {
        "type": "object",
        "required": ["id", "action", "target_type", "created_at"],
        "properties": {
            "id": STR_UUID,
            "actor_id": {"type": ["string", "null"], "format": "uuid"},
            "action": {"type": "string", "description": "e.g. order.created, payment.authorized"},
            "target_type": {"type": "string"},
            "target_id": {"type": ["string", "null"], "format": "uuid"},
            "request_id": {"type": ["string", "null"]},
            "details": {"type": "object", "additionalProperties": True},
            "created_at": DATE,
        },
    },
    "AuditPage": _page("AuditEntry"),
    "WebhookReceived": {
        "type": "object",
        "required": ["received", "result"],
        "properties": {
            "received": {"type": "boolean", "enum": [True]},
            "result": {
                "type": "string",
                "enum": ["applied", "duplicate", "ignored"],
                "description": (
                    "applied: the payment moved on; duplicate: this event id was seen before;"
                    " ignored: nothing to change (an unknown authorization, a late or"
                    " out-of-order event)"
                ),
            },
        },
    },
    "PaymentWebhookEvent": {
        "type": "object",
        "required": ["id", "type", "data"],
        "additionalProperties": True,
        "properties": {
            "id": {"type": "string", "description": "Unique per event; repeats are ignored"},
            "type": {
                "type": "string",
                "enum": [
                    "authorization.authorized",
                    "authorization.declined",
                    "authorization.captured",
                    "authorization.voided",
                    "authorization.refunded",
                ],
            },
            "created": {"type": "integer"},
            "data": {
                "type": "object",
                "required": ["authorization_id"],
                "properties": {
                    "authorization_id": {"type": "string"},
                    "reference": {"type": "string", "description": "<tenant_id>:<order_id>"},
                    "amount": {"type": "integer"},
                    "currency": CURRENCY,
                    "status": {"type": "string"},
                },
            },
        },
    },
}


def _path(name: str, description: str) -> Json:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": STR_UUID,
        "description": description,
    }


IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    "description": "Replays within 24 h return the stored answer (with Idempotent-Replayed: true);"
    " the same key with another body is 422; a replay while the first runs is 409",
}
PAGE_PARAMS = [
    query_param(
        "limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}, "Page size"
    ),
    query_param("cursor", {"type": "string"}, "next_cursor of the previous page"),
]

PRODUCT_ID = "01a24e1a-5db8-7d8e-bc71-0d9f4a76052e"
ORDER_ID = "01a24e1a-5dcd-796e-9067-1b1975ff7621"
PRODUCT = {
    "id": PRODUCT_ID,
    "tenant_id": EXAMPLE_TENANT_ID,
    "sku": "mug-1",
    "name": "Mug",
    "price_cents": 1250,
    "currency": "EUR",
    "stock": 10,
    "version": 1,
    "created_at": "2026-11-21T10:12:03.503Z",
    "updated_at": "2026-11-21T10:12:03.503Z",
}
ORDER = {
    "id": ORDER_ID,
    "tenant_id": EXAMPLE_TENANT_ID,
    "user_id": EXAMPLE_USER_ID,
    "status": "pending",
    "items": [{"product_id": PRODUCT_ID, "quantity": 2, "unit_price_cents": 1250}],
    "total_cents": 2500,
    "currency": "EUR",
    "payment": None,
    "version": 1,
    "created_at": "2026-11-21T10:20:40.526Z",
    "updated_at": "2026-11-21T10:20:40.526Z",
}
PAYING = ORDER | {
    "status": "paying",
    "payment": {"status": "authorizing", "failure_code": None},
    "version": 2,
    "updated_at": "2026-11-21T10:21:02.118Z",
}
PAID = PAYING | {
    "status": "paid",
    "payment": {"status": "captured", "failure_code": None},
    "version": 3,
    "updated_at": "2026-11-21T10:21:02.871Z",
}
CANCELLED = ORDER | {"status": "cancelled", "version": 2, "updated_at": "2026-11-21T10:25:00.575Z"}
REFUNDING = PAID | {
    "status": "cancelled",
    "payment": {"status": "refunding", "failure_code": None},
    "version": 4,
    "updated_at": "2026-11-21T10:30:00.000Z",
}


EXAMPLES: Json = {
    "CreateProductRequest": example(
        "A mug, ten in stock",
        {"sku": "mug-1", "name": "Mug", "price_cents": 1250, "currency": "EUR", "stock": 10},
    ),
    "Product": example("A mug, ten available", PRODUCT),
    "ProductPage": example("The last page", {"items": [PRODUCT], "next_cursor": None}),
    "CreateOrderRequest": example(
        "Two mugs", {"items": [{"product_id": PRODUCT_ID, "quantity": 2}]}
    ),
    "PendingOrder": example("Created; its stock is reserved", ORDER),
    "PayOrderRequest": example("The provider's token", {"payment_method": "pm_card_visa"}),
    "PayingOrder": example("The payment is being authorized", PAYING),
    "PaidOrder": example("Paid: the payment is captured", PAID),
    "CancelledOrder": example("Cancelled before payment; its stock is released", CANCELLED),
    "RefundingOrder": example("Cancelled after payment; the refund is on its way", REFUNDING),
    "OrderPage": example(
        "A page of one order, more to follow",
        {"items": [ORDER], "next_cursor": "AaJOGl3NeW6QZxsZdf92IQ"},
    ),
    "AuditPage": example(
        "The newest entries",
        {
            "items": [
                {
                    "id": "01a24e1a-5e06-7487-820a-7c4c313373ec",
                    "actor_id": EXAMPLE_USER_ID,
                    "action": "order.cancelled",
                    "target_type": "order",
                    "target_id": ORDER_ID,
                    "request_id": "80c5fadd0fd4000000000008",
                    "details": {"from": "pending"},
                    "created_at": "2026-11-21T10:25:00.575Z",
                },
                {
                    "id": "01a24e1a-5de7-7d96-b073-b05729297387",
                    "actor_id": EXAMPLE_USER_ID,
                    "action": "order.created",
                    "target_type": "order",
                    "target_id": ORDER_ID,
                    "request_id": "80c5fadd0fd4000000000005",
                    "details": {},
                    "created_at": "2026-11-21T10:20:40.526Z",
                },
            ],
            "next_cursor": "AaJOGl3nfZawc7BXKSlzhw",
        },
    ),
    "PaymentWebhookEvent": example(
        "The provider captured an authorization",
        {
            "id": "evt_3f9a1c2b7d",
            "type": "authorization.captured",
            "created": 1795082462,
            "data": {
                "authorization_id": "auth_8c41e0a9f2",
                "reference": f"{EXAMPLE_TENANT_ID}:{ORDER_ID}",
                "amount": 2500,
                "currency": "EUR",
                "status": "captured",
            },
        },
    ),
    "WebhookReceived": example(
        "Applied: the order moved on", {"received": True, "result": "applied"}
    ),
}

RESPONSES: Json = {
    "OrderNotFound": problem(404, "No such order in your tenant", "order not found"),
}
FORBIDDEN = response_ref("Forbidden")
NOT_FOUND = response_ref("OrderNotFound")
UNAVAILABLE = retry_problem(
    503,
    "The payment provider is unavailable (circuit open), payments are not configured, or the"
    " server is overloaded; see Retry-After",
    "the payment provider is unavailable; try again later",
)
IDEMPOTENT_REFUSED = problem(
    422,
    "Validation failed (`errors` names each offending field), or the Idempotency-Key was used"
    " with another request",
    "this Idempotency-Key belongs to another request",
    errors=[{"field": "Idempotency-Key", "message": "was already used with a different request"}],
)
REPLAYABLE = ("Idempotent-Replayed",)

PATHS: Json = {
    "/v1/products": {
        "get": op(
            "List the tenant's products",
            "catalog",
            {"200": json_content("A page", ref("ProductPage"), "ProductPage")},
            params=PAGE_PARAMS,
        ),
        "post": op(
            "Create a product (admin)",
            "catalog",
            {
                "201": json_content(
                    "Created", ref("Product"), "Product", headers=("ETag", "Location")
                ),
                "403": FORBIDDEN,
                "409": problem(
                    409,
                    "The sku is taken in this tenant",
                    "a product with this sku already exists in this tenant",
                ),
            },
            body="CreateProductRequest",
        ),
    },
    "/v1/products/{product_id}": {
        "get": op(
            "A product; stock is what is still available after reservations",
            "catalog",
            {
                "200": json_content("The product", ref("Product"), "Product", headers=("ETag",)),
                "404": problem(404, "No such product in your tenant", "product not found"),
            },
            params=[_path("product_id", "The product's id")],
        )
    },
    "/v1/orders": {
        "get": op(
            "List the tenant's orders",
            "orders",
            {"200": json_content("A page", ref("OrderPage"), "OrderPage")},
            params=[*PAGE_PARAMS, query_param("status", ORDER_STATUS, "Only orders in this state")],
        ),
        "post": op(
            "Create an order; its stock is reserved at once",
            "orders",
            {
                "201": json_content(
                    "Created, pending",
                    ref("Order"),
                    "PendingOrder",
                    headers=("ETag", "Location", *REPLAYABLE),
                ),
                "409": problem(
                    409,
                    "Not enough stock, or the Idempotency-Key is in use",
                    f"not enough stock for product {PRODUCT_ID}",
                ),
                "422": IDEMPOTENT_REFUSED,
            },
            body="CreateOrderRequest",
            params=[IDEMPOTENCY_KEY],
        ),
    },
    "/v1/orders/{order_id}": {
        "get": op(
            "An order",
            "orders",
            {
                "200": json_content("The order", ref("Order"), "PaidOrder", headers=("ETag",)),
                "404": NOT_FOUND,
            },
            params=[_path("order_id", "The order's id")],
        )
    },
    "/v1/orders/{order_id}/pay": {
        "post": op(
            "Pay an order: starts the pay saga (authorize, capture)",
            "orders",
            {
                "202": json_content(
                    "The saga runs; poll the order",
                    ref("Order"),
                    "PayingOrder",
                    headers=REPLAYABLE,
                ),
                "200": json_content(
                    "Already settled (paid or payment_failed)",
                    ref("Order"),
                    "PaidOrder",
                    headers=REPLAYABLE,
                ),
                "404": NOT_FOUND,
                "409": problem(
                    409, "Cancelled, or the Idempotency-Key is in use", "the order is cancelled"
                ),
                "422": IDEMPOTENT_REFUSED,
                "503": UNAVAILABLE,
            },
            body="PayOrderRequest",
            params=[_path("order_id", "The order's id"), IDEMPOTENCY_KEY],
        )
    },
    "/v1/orders/{order_id}/cancel": {
        "post": op(
            "Cancel an order: releases its stock, refunds a captured payment",
            "orders",
            {
                "200": json_content("Cancelled", ref("Order"), "CancelledOrder"),
                "202": json_content(
                    "Cancelled once the refund completes", ref("Order"), "RefundingOrder"
                ),
                "404": NOT_FOUND,
                "409": problem(
                    409,
                    "The payment is in progress",
                    "the payment is being authorized; try again in a moment",
                ),
                "503": UNAVAILABLE,
            },
            params=[_path("order_id", "The order's id")],
        )
    },
    "/v1/webhooks/payments": {
        "post": op(
            "Payment provider events, signed with Surge-Signature",
            "payments",
            {
                "200": json_content(
                    "Received (also for an event id seen before)",
                    ref("WebhookReceived"),
                    "WebhookReceived",
                ),
                "400": problem(
                    400,
                    "Bad or stale signature, malformed JSON, or not an event",
                    "the signature does not match",
                ),
                # The body is the provider's, checked for its signature, not validated: 422
                # only for an X-Request-ID as any operation.
                "422": copy.deepcopy(COMMON["RequestIdRefused"]),
                # Not the general per-address bucket: the webhooks' own, taken only by
                # deliveries whose signature checked out (an unsigned one is a 400).
                "429": with_headers(
                    retry_problem(
                        429,
                        "Signed deliveries past WEBHOOK_RATE_LIMIT_RATE a second; see Retry-After",
                        "webhook rate limit exceeded; retry after the Retry-After delay",
                    ),
                    *RATELIMIT_HEADERS,
                ),
                "503": retry_problem(
                    503,
                    "Overloaded, or payments not configured; see Retry-After",
                    "payments are not configured on this server",
                ),
            },
            body="PaymentWebhookEvent",
            auth=False,
            ratelimited=False,
            params=[
                {
                    "name": "Surge-Signature",
                    "in": "header",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": 't=<unix>,v1=<hex HMAC-SHA256 of "t.body">',
                }
            ],
        )
    },
    "/v1/audit": {
        "get": op(
            "The tenant's audit log, newest first (admin)",
            "audit",
            {"200": json_content("A page", ref("AuditPage"), "AuditPage"), "403": FORBIDDEN},
            params=PAGE_PARAMS,
        )
    },
}

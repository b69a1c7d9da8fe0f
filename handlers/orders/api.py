"""OpenAPI paths and schemas of the Catalog, orders, payments section (request schemas are the
validators)."""

from __future__ import annotations

from db.orders import ORDER_STATUSES
from db.payments import PAYMENT_STEPS
from server.openapi import (
    SPACE_OR_CONTROL,
    UUID_PATTERN,
    Json,
    json_content,
    op,
    problem,
    query_param,
    ref,
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


def _path(name: str) -> Json:
    return {"name": name, "in": "path", "required": True, "schema": STR_UUID}


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
FORBIDDEN = problem("This needs the admin or owner role")
NOT_FOUND = problem("No such order in your tenant")
UNAVAILABLE = problem("The payment provider is unavailable (circuit open): see Retry-After")

PATHS: Json = {
    "/v1/products": {
        "get": op(
            "List the tenant's products",
            "catalog",
            {"200": json_content("A page", ref("ProductPage"))},
            params=PAGE_PARAMS,
        ),
        "post": op(
            "Create a product (admin)",
            "catalog",
            {
                "201": json_content(
                    "Created", ref("Product"), ETag='"<version>"', Location="/v1/products/{id}"
                ),
                "403": FORBIDDEN,
                "409": problem("The sku is taken in this tenant"),
            },
            body="CreateProductRequest",
        ),
    },
    "/v1/products/{product_id}": {
        "get": op(
            "A product; stock is what is still available after reservations",
            "catalog",
            {
                "200": json_content("The product", ref("Product"), ETag='"<version>"'),
                "404": problem("No such product"),
            },
            params=[_path("product_id")],
        )
    },
    "/v1/orders": {
        "get": op(
            "List the tenant's orders",
            "orders",
            {"200": json_content("A page", ref("OrderPage"))},
            params=[*PAGE_PARAMS, query_param("status", ORDER_STATUS, "Only orders in this state")],
        ),
        "post": op(
            "Create an order; its stock is reserved at once",
            "orders",
            {
                "201": json_content(
                    "Created, pending", ref("Order"), ETag='"<version>"', Location="/v1/orders/{id}"
                ),
                "409": problem("Not enough stock, or the Idempotency-Key is in use"),
            },
            body="CreateOrderRequest",
            params=[IDEMPOTENCY_KEY],
        ),
    },
    "/v1/orders/{order_id}": {
        "get": op(
            "An order",
            "orders",
            {"200": json_content("The order", ref("Order"), ETag='"<version>"'), "404": NOT_FOUND},
            params=[_path("order_id")],
        )
    },
    "/v1/orders/{order_id}/pay": {
        "post": op(
            "Pay an order: starts the pay saga (authorize, capture)",
            "orders",
            {
                "202": json_content("The saga runs; poll the order", ref("Order")),
                "200": json_content("Already settled (paid or payment_failed)", ref("Order")),
                "404": NOT_FOUND,
                "409": problem("Cancelled, or the Idempotency-Key is in use"),
                "503": UNAVAILABLE,
            },
            body="PayOrderRequest",
            params=[_path("order_id"), IDEMPOTENCY_KEY],
        )
    },
    "/v1/orders/{order_id}/cancel": {
        "post": op(
            "Cancel an order: releases its stock, refunds a captured payment",
            "orders",
            {
                "200": json_content("Cancelled", ref("Order")),
                "202": json_content("Cancelled once the refund completes", ref("Order")),
                "404": NOT_FOUND,
                "409": problem("The payment is in progress"),
            },
            params=[_path("order_id")],
        )
    },
    "/v1/webhooks/payments": {
        "post": op(
            "Payment provider events, signed with Surge-Signature",
            "payments",
            {
                "200": json_content(
                    "Received (also for an event id seen before)",
                    {"type": "object", "additionalProperties": True},
                ),
                "400": problem("Bad or stale signature, or not an event"),
                "413": problem("Body larger than MAX_BODY_BYTES"),
                "422": problem("Validation failed; `errors` names each offending field"),
                # Not the general per-address bucket: the webhooks' own, taken only by
                # deliveries whose signature checked out (an unsigned one is a 400).
                "429": problem(
                    "Signed deliveries past WEBHOOK_RATE_LIMIT_RATE a second; see Retry-After"
                ),
                "503": problem("Overloaded, or payments not configured; see Retry-After"),
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
            {"200": json_content("A page", ref("AuditPage")), "403": FORBIDDEN},
            params=PAGE_PARAMS,
        )
    },
}

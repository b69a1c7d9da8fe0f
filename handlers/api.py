"""The OpenAPI document (GET /openapi.json), assembled from each domain's section in order.

Request bodies are validated against the same document (server/validation.py), so what it
says and what the server accepts cannot drift apart.
"""

from __future__ import annotations

from handlers import swagger_ui
from handlers.events import api as events_api
from handlers.graphql import api as graphql_api
from handlers.identity import api as identity_api
from handlers.orders import api as orders_api
from server.openapi import Json, document, json_content, op, problem, ref
from server.validation import Validators

OPS_SCHEMAS: Json = {
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok"]}},
    },
    "Readiness": {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "unavailable", "draining"]},
            "checks": {
                "type": "object",
                "properties": {
                    "postgres": {"type": "string", "enum": ["ok", "error"]},
                    # degraded: Redis does not answer; the replica still serves (local
                    # rate limits, no cache), so this alone never makes /readyz 503.
                    "redis": {"type": "string", "enum": ["ok", "degraded"]},
                },
            },
        },
    },
}

OPS_PATHS: Json = {
    "/healthz": {
        "get": op(
            "Liveness: 200 while the process runs",
            "ops",
            {"200": json_content("Alive", ref("Health"))},
            auth=False,
            ratelimited=False,
        )
    },
    "/readyz": {
        "get": op(
            "Readiness: PostgreSQL answers and the process is not draining",
            "ops",
            {
                "200": json_content(
                    "Ready; `checks.redis` is `degraded` while Redis does not answer",
                    ref("Readiness"),
                ),
                "503": json_content(
                    "Not ready: PostgreSQL does not answer (`checks.postgres` is `error`), or"
                    " the process is draining on shutdown",
                    ref("Readiness"),
                ),
            },
            auth=False,
            ratelimited=False,
        )
    },
    "/metrics": {
        "get": op(
            "Prometheus text exposition",
            "ops",
            {
                "200": {
                    "description": "Metrics",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
            auth=False,
            ratelimited=False,
        )
    },
    "/openapi.json": {
        "get": op(
            "This document",
            "ops",
            {"200": json_content("OpenAPI 3.1", {"type": "object"})},
            auth=False,
            ratelimited=False,
        )
    },
    "/docs": {
        "get": op(
            "A browsable API reference rendered from this document",
            "ops",
            {
                "200": {
                    "description": "HTML",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                }
            },
            auth=False,
            ratelimited=False,
        )
    },
    "/docs/{asset}": {
        "get": op(
            "A file of the /docs page (Swagger UI), cacheable for a year: its name carries its"
            " version",
            "ops",
            {
                "200": {
                    "description": "The file, gzipped when the request's Accept-Encoding takes it",
                    "content": {
                        "text/css": {"schema": {"type": "string"}},
                        "text/javascript": {"schema": {"type": "string"}},
                    },
                },
                "404": problem("No such file"),
            },
            auth=False,
            params=[
                {
                    "name": "asset",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": sorted(swagger_ui.ASSETS)},
                }
            ],
            ratelimited=False,
        )
    },
}

# Each operation's operationId: what generated clients name their functions, so once
# published, an id never changes (document() refuses an operation without one).
OPERATION_IDS = {
    ("get", "/healthz"): "getHealthz",
    ("get", "/readyz"): "getReadyz",
    ("get", "/metrics"): "getMetrics",
    ("get", "/openapi.json"): "getOpenApiDocument",
    ("get", "/docs"): "getDocs",
    ("get", "/docs/{asset}"): "getDocsAsset",
    ("post", "/v1/auth/signup"): "signup",
    ("post", "/v1/auth/login"): "login",
    ("post", "/v1/auth/refresh"): "refreshTokens",
    ("post", "/v1/auth/logout"): "logout",
    ("post", "/v1/auth/logout-all"): "logoutAll",
    ("get", "/v1/me"): "getMe",
    ("put", "/v1/me/password"): "changePassword",
    ("get", "/v1/users"): "listUsers",
    ("post", "/v1/users"): "createUser",
    ("get", "/v1/users/{user_id}"): "getUser",
    ("patch", "/v1/users/{user_id}"): "updateUser",
    ("delete", "/v1/users/{user_id}"): "deleteUser",
    ("put", "/v1/users/{user_id}/roles/{role}"): "grantRole",
    ("delete", "/v1/users/{user_id}/roles/{role}"): "revokeRole",
    ("post", "/v1/events"): "postEvents",
    ("get", "/v1/analytics/counts"): "getAnalyticsCounts",
    ("get", "/v1/analytics/live"): "streamAnalytics",
    ("get", "/v1/products"): "listProducts",
    ("post", "/v1/products"): "createProduct",
    ("get", "/v1/products/{product_id}"): "getProduct",
    ("get", "/v1/orders"): "listOrders",
    ("post", "/v1/orders"): "createOrder",
    ("get", "/v1/orders/{order_id}"): "getOrder",
    ("post", "/v1/orders/{order_id}/pay"): "payOrder",
    ("post", "/v1/orders/{order_id}/cancel"): "cancelOrder",
    ("post", "/v1/webhooks/payments"): "receivePaymentWebhook",
    ("get", "/v1/audit"): "listAuditEntries",
    ("post", "/graphql"): "graphql",
    ("get", "/graphql"): "getGraphqlExplorer",
    ("get", "/graphql/schema.graphql"): "getGraphqlSchema",
}

SPEC: Json = document(
    [
        (OPS_PATHS, OPS_SCHEMAS),
        (events_api.PATHS, events_api.SCHEMAS),
        (graphql_api.PATHS, graphql_api.SCHEMAS),
        (identity_api.PATHS, identity_api.SCHEMAS),
        (orders_api.PATHS, orders_api.SCHEMAS),
    ],
    OPERATION_IDS,
)

# Compiled once per process, shared by every app create_app builds.
validators = Validators(SPEC["components"]["schemas"])

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
from server.openapi import (
    Json,
    Section,
    document,
    example_ref,
    json_content,
    op,
    problem,
    ref,
    text_content,
)
from server.validation import Validators
from server.version import version

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

READY = {"status": "ready", "checks": {"postgres": "ok", "redis": "ok"}}
OPS_EXAMPLES: Json = {
    "Ready": {"summary": "Both dependencies answer", "value": READY},
    "Degraded": {
        "summary": "Redis does not answer: still ready",
        "value": {"status": "ready", "checks": {"postgres": "ok", "redis": "degraded"}},
    },
}
METRICS_EXAMPLE = (
    "# HELP surge_http_requests_total HTTP requests answered, by route template and status\n"
    "# TYPE surge_http_requests_total counter\n"
    "surge_http_requests_total"
    '{method="GET",route="/v1/users/{user_id}",status="200"} 1024.0\n'
)


def _ops(summary: str, responses: Json) -> Json:
    """An ops operation: never authenticated, rate limited or shed."""
    return op(summary, "ops", responses, auth=False, ratelimited=False, shed=False)


OPS_PATHS: Json = {
    "/healthz": {
        "get": _ops(
            "Liveness: 200 while the process runs",
            {"200": json_content("Alive", ref("Health"), {"status": "ok"})},
        )
    },
    "/readyz": {
        "get": _ops(
            "Readiness: PostgreSQL answers and the process is not draining",
            {
                "200": {
                    "description": (
                        "Ready; `checks.redis` is `degraded` while Redis does not answer"
                    ),
                    "content": {
                        "application/json": {
                            "schema": ref("Readiness"),
                            "examples": {
                                "Ready": example_ref("Ready"),
                                "Degraded": example_ref("Degraded"),
                            },
                        }
                    },
                },
                "503": json_content(
                    "Not ready: PostgreSQL does not answer (`checks.postgres` is `error`), or"
                    " the process is draining on shutdown",
                    ref("Readiness"),
                    {"status": "draining", "checks": {"postgres": "ok", "redis": "ok"}},
                ),
            },
        )
    },
    "/metrics": {
        "get": _ops(
            "Prometheus text exposition",
            {"200": text_content("Metrics", "text/plain", METRICS_EXAMPLE)},
        )
    },
    "/openapi.json": {
        "get": _ops(
            "This document",
            {
                "200": json_content(
                    "OpenAPI 3.1",
                    {
                        "type": "object",
                        "required": ["openapi", "info", "paths"],
                        "properties": {
                            "openapi": {"type": "string"},
                            "info": {"type": "object", "additionalProperties": True},
                            "paths": {"type": "object", "additionalProperties": True},
                        },
                        "additionalProperties": True,
                    },
                    {
                        "openapi": "3.1.0",
                        "info": {"title": "Surge API", "version": version()},
                        "paths": {},
                    },
                )
            },
        )
    },
    "/docs": {
        "get": _ops(
            "A browsable API reference rendered from this document",
            {
                "200": text_content(
                    "HTML",
                    "text/html",
                    '<!doctype html>\n<html lang="en">\n<title>Surge API reference</title>\n...',
                )
            },
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
                        "text/css": {"schema": {"type": "string"}, "example": ".swagger-ui{}"},
                        "text/javascript": {
                            "schema": {"type": "string"},
                            "example": "/*! Swagger UI */",
                        },
                    },
                },
                "404": problem(404, "No such file", "not found"),
            },
            auth=False,
            params=[
                {
                    "name": "asset",
                    "in": "path",
                    "required": True,
                    "description": "A file name of the /docs page, with its version",
                    "schema": {"type": "string", "enum": sorted(swagger_ui.ASSETS)},
                }
            ],
            ratelimited=False,
            shed=False,
        )
    },
}

# Each tag, described: the sections of the reference, in this order.
TAGS = {
    "ops": "Probes, metrics and this document: never authenticated, rate limited or shed",
    "auth": (
        "Sign-up, login, refresh and logout; signup, login and refresh are also limited per"
        " client IP (AUTH_RATE_LIMIT_PER_MINUTE)"
    ),
    "users": "The caller and the tenant's users; roles owner > admin > member",
    "events": "Analytics events in; counts and a live stream of them out",
    "catalog": "The tenant's products; stock is what is available after reservations",
    "orders": "Orders, the pay saga (authorize, capture) and cancellation",
    "payments": "The payment provider's signed webhook",
    "audit": "The tenant's audit log",
    "graphql": "A read-only GraphQL view of users and orders, with depth and cost limits",
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
        Section(OPS_PATHS, OPS_SCHEMAS, OPS_EXAMPLES),
        Section(events_api.PATHS, events_api.SCHEMAS, events_api.EXAMPLES),
        Section(graphql_api.PATHS, graphql_api.SCHEMAS, graphql_api.EXAMPLES),
        Section(
            identity_api.PATHS, identity_api.SCHEMAS, identity_api.EXAMPLES, identity_api.RESPONSES
        ),
        Section(orders_api.PATHS, orders_api.SCHEMAS, orders_api.EXAMPLES, orders_api.RESPONSES),
    ],
    OPERATION_IDS,
    TAGS,
)

# Compiled once per process, shared by every app create_app builds.
validators = Validators(SPEC["components"]["schemas"])

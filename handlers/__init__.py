"""The whole URL map on one screen."""

from __future__ import annotations

from aiohttp import web

from handlers import (
    analytics,
    auth,
    events,
    events_api,
    graphql,
    graphql_api,
    identity_api,
    ops,
    orders,
    payments_api,
    users,
    webhooks,
)
from server.middleware import plain

assert identity_api.PATHS  # importing it registers the Auth and Users sections of /openapi.json
assert events_api.PATHS  # and this the Events and analytics section
assert payments_api.PATHS  # and this the Catalog, orders, payments section
assert graphql_api.PATHS  # and this the GraphQL section

routes = [
    web.get("/healthz", plain(ops.healthz)),
    web.get("/readyz", ops.readyz),
    web.get("/metrics", plain(ops.metrics_endpoint)),
    web.get("/openapi.json", plain(ops.openapi_json)),
    web.get("/docs", plain(ops.docs)),
    web.post("/v1/auth/signup", auth.signup),
    web.post("/v1/auth/login", auth.login),
    web.post("/v1/auth/refresh", auth.refresh),
    web.post("/v1/auth/logout", auth.logout),
    web.get("/v1/me", users.get_me),
    web.put("/v1/me/password", users.change_password),
    web.get("/v1/users", users.list_users),
    web.post("/v1/users", users.create_user),
    web.get("/v1/users/{user_id}", users.get_user),
    web.patch("/v1/users/{user_id}", users.patch_user),
    web.delete("/v1/users/{user_id}", users.delete_user),
    web.put("/v1/users/{user_id}/roles/{role}", users.grant_role),
    web.delete("/v1/users/{user_id}/roles/{role}", users.revoke_role),
    web.post("/v1/events", events.post_events),
    web.get("/v1/analytics/counts", analytics.get_counts),
    web.get("/v1/analytics/live", analytics.live),
    web.get("/v1/products", orders.list_products),
    web.post("/v1/products", orders.create_product),
    web.get("/v1/products/{product_id}", orders.get_product),
    web.get("/v1/orders", orders.list_orders),
    web.post("/v1/orders", orders.create_order),
    web.get("/v1/orders/{order_id}", orders.get_order),
    web.post("/v1/orders/{order_id}/pay", orders.pay_order),
    web.post("/v1/orders/{order_id}/cancel", orders.cancel_order),
    web.post("/v1/webhooks/payments", webhooks.payments_webhook),
    web.get("/v1/audit", orders.list_audit),
    web.post("/graphql", graphql.graphql_post),
    web.get("/graphql", graphql.graphql_explorer),
    web.get("/graphql/schema.graphql", graphql.graphql_schema),
]

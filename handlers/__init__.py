"""The whole URL map on one screen, each route with its policy (server/routes.py):

    (default)    an API call: shed under overload, rate limited, needs an access token
    public=True  no access token needed; still shed and rate limited
    page=True    a page for a browser: shed, no token, no rate limit
    ops=True     probes, scrape, docs: never shed, rate limited or authenticated
    stream=True  long-lived: not shed (capped by its own limit)
    plain=True   the handler is a plain function that never waits

`contexts` lists each domain's resources and workers, installed in this order after the pools.
"""

from __future__ import annotations

from handlers import ops
from handlers.api import SPEC
from handlers.events import contexts as events_contexts
from handlers.events import routes as events
from handlers.graphql import routes as graphql
from handlers.identity import contexts as identity_contexts
from handlers.identity import routes as identity
from handlers.orders import contexts as orders_contexts
from handlers.orders import routes as orders
from server.routes import delete, get, patch, post, put

routes = [
    get("/healthz", ops.healthz, ops=True, plain=True),
    get("/readyz", ops.readyz, ops=True),
    get("/metrics", ops.metrics_endpoint, ops=True, plain=True),
    get("/openapi.json", ops.openapi_json, ops=True, plain=True),
    get("/docs", ops.docs, ops=True, plain=True),
    post("/v1/auth/signup", identity.signup, public=True),
    post("/v1/auth/login", identity.login, public=True),
    post("/v1/auth/refresh", identity.refresh, public=True),
    post("/v1/auth/logout", identity.logout, public=True),
    get("/v1/me", identity.get_me),
    put("/v1/me/password", identity.change_password),
    get("/v1/users", identity.list_users),
    post("/v1/users", identity.create_user),
    get("/v1/users/{user_id}", identity.get_user),
    patch("/v1/users/{user_id}", identity.patch_user),
    delete("/v1/users/{user_id}", identity.delete_user),
    put("/v1/users/{user_id}/roles/{role}", identity.grant_role),
    delete("/v1/users/{user_id}/roles/{role}", identity.revoke_role),
    post("/v1/events", events.post_events),
    get("/v1/analytics/counts", events.get_counts),
    get("/v1/analytics/live", events.live, stream=True),
    get("/v1/products", orders.list_products),
    post("/v1/products", orders.create_product),
    get("/v1/products/{product_id}", orders.get_product),
    get("/v1/orders", orders.list_orders),
    post("/v1/orders", orders.create_order),
    get("/v1/orders/{order_id}", orders.get_order),
    post("/v1/orders/{order_id}/pay", orders.pay_order),
    post("/v1/orders/{order_id}/cancel", orders.cancel_order),
    post("/v1/webhooks/payments", orders.payments_webhook, public=True),
    get("/v1/audit", orders.list_audit),
    post("/graphql", graphql.graphql_post),
    get("/graphql", graphql.graphql_explorer, page=True),
    get("/graphql/schema.graphql", graphql.graphql_schema, page=True),
]

__all__ = ["SPEC", "contexts", "routes"]

contexts = [identity_contexts.contexts, events_contexts.contexts, orders_contexts.contexts]

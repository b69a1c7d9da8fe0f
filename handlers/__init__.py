"""The whole URL map on one screen, each route with its policy (server/routes.py):

    (default)    an API call: shed under overload, rate limited, needs an access token
    public=True  no access token needed; still shed and rate limited
    own_limit=True  public, not in the general per-address bucket: the handler limits itself
    page=True    a page for a browser: shed, no token, no rate limit
    ops=True     probes, scrape, docs: never shed, rate limited or authenticated
    stream=True  long-lived: not shed (capped by its own limit)
    plain=True   the handler is a plain function that never waits
    encoded=True takes a gzip, deflate or br body (server/encoding.py); the rest refuse one, 415

`contexts` lists each domain's resources and workers, installed in this order after the pools.
"""

from __future__ import annotations

from handlers import ops
from handlers.api import SPEC, validators
from handlers.events import contexts as events_contexts
from handlers.events import routes as events_routes
from handlers.graphql import routes as graphql_routes
from handlers.identity import contexts as identity_contexts
from handlers.identity import routes as identity_routes
from handlers.orders import contexts as orders_contexts
from handlers.orders import routes as orders_routes
from server.routes import delete, get, patch, post, put

routes = [
    get("/healthz", ops.healthz, ops=True, plain=True),
    get("/readyz", ops.readyz, ops=True),
    get("/metrics", ops.metrics_endpoint, ops=True, plain=True),
    get("/openapi.json", ops.openapi_json, ops=True, plain=True),
    get("/docs", ops.docs, ops=True, plain=True),
    get("/docs/{asset}", ops.docs_asset, ops=True),
    post("/v1/auth/signup", identity_routes.signup, public=True),
    post("/v1/auth/login", identity_routes.login, public=True),
    post("/v1/auth/refresh", identity_routes.refresh, public=True),
    post("/v1/auth/logout", identity_routes.logout, public=True),
    post("/v1/auth/logout-all", identity_routes.logout_all),
    get("/v1/me", identity_routes.get_me),
    put("/v1/me/password", identity_routes.change_password),
    get("/v1/users", identity_routes.list_users),
    post("/v1/users", identity_routes.create_user),
    get("/v1/users/{user_id}", identity_routes.get_user),
    patch("/v1/users/{user_id}", identity_routes.patch_user),
    delete("/v1/users/{user_id}", identity_routes.delete_user),
    put("/v1/users/{user_id}/roles/{role}", identity_routes.grant_role),
    delete("/v1/users/{user_id}/roles/{role}", identity_routes.revoke_role),
    post("/v1/events", events_routes.post_events, encoded=True),
    get("/v1/analytics/counts", events_routes.get_counts),
    get("/v1/analytics/live", events_routes.live, stream=True),
    get("/v1/products", orders_routes.list_products),
    post("/v1/products", orders_routes.create_product),
    get("/v1/products/{product_id}", orders_routes.get_product),
    get("/v1/orders", orders_routes.list_orders),
    post("/v1/orders", orders_routes.create_order),
    get("/v1/orders/{order_id}", orders_routes.get_order),
    post("/v1/orders/{order_id}/pay", orders_routes.pay_order),
    post("/v1/orders/{order_id}/cancel", orders_routes.cancel_order),
    post("/v1/webhooks/payments", orders_routes.payments_webhook, own_limit=True),
    get("/v1/audit", orders_routes.list_audit),
    post("/graphql", graphql_routes.graphql_post),
    get("/graphql", graphql_routes.graphql_explorer, page=True),
    get("/graphql/schema.graphql", graphql_routes.graphql_schema, page=True),
]

__all__ = ["SPEC", "contexts", "routes", "validators"]

contexts = [identity_contexts.contexts, events_contexts.contexts, orders_contexts.contexts]

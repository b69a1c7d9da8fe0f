"""The whole URL map on one screen."""

from __future__ import annotations

from aiohttp import web

from handlers import ops

routes = [
    web.get("/healthz", ops.healthz),
    web.get("/readyz", ops.readyz),
    web.get("/metrics", ops.metrics_endpoint),
    web.get("/openapi.json", ops.openapi_json),
    web.get("/docs", ops.docs),
]

"""The orders domain's shared resources, filled by its contexts (handlers/orders/contexts.py)."""

from __future__ import annotations

from aiohttp import web

from handlers.orders.saga import SagaRunner

PAYMENTS = web.AppKey("payments", SagaRunner)

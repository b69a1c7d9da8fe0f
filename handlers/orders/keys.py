"""The orders domain's shared resources, filled by its contexts (handlers/orders/contexts.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:  # temporary: these modules import this one
    from handlers.orders.saga import SagaRunner


PAYMENTS: web.AppKey[SagaRunner] = web.AppKey("payments")

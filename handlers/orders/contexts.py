"""The orders domain's workers: the payment saga runner and its sweeper."""

from __future__ import annotations

from handlers.orders import saga

contexts = [saga.payments_ctx]

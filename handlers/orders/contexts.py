"""The orders domain's resources: the payment provider's client and the saga runner (with its
sweeper), which resumes sagas left mid-way as soon as it starts."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from handlers.orders.keys import PAYMENTS
from handlers.orders.provider import CircuitBreaker, PaymentsClient
from handlers.orders.saga import SagaRunner
from server.keys import CONFIG, PG
from server.replica import READS


async def payments_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    client = None
    if config.payments_url:
        assert config.payments_api_key is not None
        client = PaymentsClient(
            config.payments_url,
            config.payments_api_key,
            timeout_s=config.payments_timeout_s,
            retries=config.payments_retries,
            backoff_s=config.payments_backoff_ms / 1000,
            breaker=CircuitBreaker(
                config.payments_breaker_failures, config.payments_breaker_reset_s
            ),
        )
        await client.start()
    runner = SagaRunner(app[PG], client, config, wrote=app[READS].wrote)
    app[PAYMENTS] = runner
    runner.start_sweeper()
    try:
        yield
    finally:
        await runner.close()
        if client is not None:
            await client.close()


contexts = [payments_ctx]

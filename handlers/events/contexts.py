"""The events domain's workers, started in this order after the pools; closed in reverse, so
the writer commits what is pending before the pools close."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from db.pool import open_copy_pool
from handlers.events.counters import EventCounters
from handlers.events.keys import EVENT_COUNTERS, EVENT_NAMES, EVENT_WRITER, LIVE_HUB
from handlers.events.live import LiveHub
from handlers.events.names import EventNames
from handlers.events.partitions import start_maintenance
from handlers.events.relay import OutboxRelay, UserEventsConsumer, Worker, stream_key
from handlers.events.writer import EventWriter
from server import metrics
from server.keys import CONFIG, LIFECYCLE, PG, REDIS


async def partitions_ctx(app: web.Application) -> AsyncIterator[None]:
    """Partitions exist before the writer starts, and are kept up hourly."""
    task = await start_maintenance(app[PG], app[CONFIG].events_retention_days)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def counters_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    app[EVENT_NAMES] = EventNames(
        app[REDIS], config.redis_key_prefix, config.events_max_names_per_tenant
    )
    app[EVENT_COUNTERS] = EventCounters(app[REDIS], config.redis_key_prefix)
    try:
        yield
    finally:
        await app[EVENT_COUNTERS].close()


async def writer_ctx(app: web.Application) -> AsyncIterator[None]:
    """The writer and its own connections. Closed before the pools, so a clean shutdown
    commits every pending event first."""
    config = app[CONFIG]
    assert config.database_url is not None
    pool = await open_copy_pool(
        config.database_url,
        max_size=config.events_writers,
        acquire_timeout=config.pg_acquire_timeout_ms / 1000,
        command_timeout=config.pg_command_timeout_s,
        statement_cache_size=config.pg_statement_cache_size,
        max_lifetime=config.pg_max_lifetime_s,
        max_idle=config.pg_max_idle_s,
        name="events",
        on_event=metrics.pool_events("events"),
    )
    metrics.POOLS.sources["events"] = pool.stats
    try:
        app[EVENT_WRITER] = EventWriter(
            pool,
            app[EVENT_COUNTERS],
            app[PG],
            flush_ms=config.events_flush_ms,
            batch_size=config.events_batch_size,
            max_pending=config.events_max_pending,
            writers=config.events_writers,
        )
        try:
            yield
        finally:
            await app[EVENT_WRITER].close()
    finally:
        metrics.POOLS.sources.pop("events", None)
        await pool.close(config.shutdown_grace_s)


async def live_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    app[LIVE_HUB] = LiveHub(
        app[REDIS],
        config.redis_key_prefix,
        app[LIFECYCLE],
        max_clients=config.events_live_max_clients,
        max_per_tenant=config.events_live_max_per_tenant,
        max_per_user=config.events_live_max_per_user,
        buffer_bytes=config.events_live_buffer_bytes,
        top_names=config.events_live_top_names,
    )
    try:
        yield
    finally:
        await app[LIVE_HUB].close()


async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    if not config.outbox_relay:
        yield
        return
    relay = OutboxRelay(
        app[PG],
        app[REDIS],
        stream_key(config.redis_key_prefix),
        batch=config.outbox_relay_batch,
        poll_s=config.outbox_relay_poll_ms / 1000,
        maxlen=config.outbox_stream_maxlen,
        retention_h=config.outbox_retention_h,
    )
    worker = Worker(relay)
    try:
        yield
    finally:
        await worker.close(config.shutdown_grace_s)


async def consumer_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    if not config.analytics_consumer:
        yield
        return
    consumer = UserEventsConsumer(
        app[PG],
        app[REDIS],
        stream_key(config.redis_key_prefix),
        app[EVENT_COUNTERS],
        retention_days=config.events_retention_days,
    )
    worker = Worker(consumer)
    try:
        yield
    finally:
        await worker.close(config.shutdown_grace_s)
        await consumer.leave()


contexts = [partitions_ctx, counters_ctx, writer_ctx, live_ctx, relay_ctx, consumer_ctx]

"""create_app(config) -> web.Application: middlewares, resource contexts, routes. No I/O here."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable

from aiohttp import web
from opentelemetry.trace import Tracer
from redis.asyncio import Redis

import handlers
from db.gate import FairGate
from db.pool import open_database
from server import metrics
from server.access_log import AccessLog
from server.admission import Admission, GradientLimit
from server.chain import UNMATCHED, Chain
from server.config import Config
from server.cors import Cors
from server.keys import (
    CONFIG,
    LIFECYCLE,
    LIMITER,
    PG,
    PG_READ,
    REDIS,
    REVOCATIONS,
    SHARED_LIMITER,
    TRACING,
)
from server.ratelimit import LocalLimiter, RedisLimiter
from server.replica import READS, ReadRouting
from server.revocation import Revocations
from server.routes import Route
from server.state import Lifecycle
from server.tokens import TOKENS, TokenService
from server.tracing import Tracing, instrument_redis
from server.validation import VALIDATORS

# The chain that wraps each route's handler; add_routes reads it.
CHAIN = web.AppKey("chain", Chain)


def tracer_of(app: web.Application) -> Tracer | None:
    """The app's tracer once its Tracing has started, else None (tracing off)."""
    tracing = app.get(TRACING)
    return tracing.tracer if tracing is not None else None


async def _postgres(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    assert config.database_url is not None, "DATABASE_URL is resolved before the app starts"
    pool_args = {
        "min_size": config.pg_pool_min,
        "max_size": config.pg_pool_max,
        "acquire_timeout": config.pg_acquire_timeout_ms / 1000,
        "command_timeout": config.pg_command_timeout_s,
        "statement_cache_size": config.pg_statement_cache_size,
        "max_lifetime": config.pg_max_lifetime_s,
        "max_idle": config.pg_max_idle_s,
        "tracer": tracer_of(app),
    }
    app[PG] = await open_database(
        config.database_url,
        name="primary",
        on_event=metrics.pool_events("primary"),
        **pool_args,  # type: ignore[arg-type]
    )
    metrics.POOLS.sources["primary"] = app[PG].stats
    try:
        if config.database_read_url:
            app[PG_READ] = await open_database(
                config.database_read_url,
                name="replica",
                on_event=metrics.pool_events("replica"),
                **pool_args,  # type: ignore[arg-type]
            )
            metrics.POOLS.sources["replica"] = app[PG_READ].stats
        else:
            app[PG_READ] = app[PG]
        yield
    finally:
        if app.get(PG_READ) is not None and app[PG_READ] is not app[PG]:
            await app[PG_READ].close()
        await app[PG].close()


def redis_client(url: str) -> Redis:
    # Short timeouts: a Redis that does not answer must degrade (rate-limit fallback, cache
    # bypass), never stall requests.
    return Redis.from_url(
        url,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        health_check_interval=30,
        max_connections=256,
        driver_info=None,  # no CLIENT SETINFO round trip on every new connection
    )


async def _redis(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    assert config.redis_url is not None, "REDIS_URL is resolved before the app starts"
    app[REDIS] = redis_client(config.redis_url)
    if (tracer := tracer_of(app)) is not None:
        instrument_redis(app[REDIS], tracer)
    try:
        yield
    finally:
        closing = asyncio.ensure_future(app[REDIS].aclose())
        await asyncio.wait({closing}, timeout=2.0)


async def _reads(app: web.Application) -> AsyncIterator[None]:
    """Where each read goes (server/replica.py): after the pools and Redis, which it uses."""
    config = app[CONFIG]
    replica = app[PG_READ] if app[PG_READ] is not app[PG] else None
    reads = ReadRouting(
        app[PG],
        replica,
        app[REDIS],
        config.redis_key_prefix,
        primary_dsn=config.database_url or "",
        replica_dsn=config.database_read_url or "",
        max_lag_s=config.replica_max_lag_s,
        poll_s=config.replica_poll_ms / 1000,
    )
    app[READS] = reads
    await reads.start()
    try:
        yield
    finally:
        await reads.close()


async def _limiter(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    # Redis is always there (embedded when REDIS_URL is unset), so the limits that must hold
    # across workers use it even with the local backend.
    app[SHARED_LIMITER] = RedisLimiter(app[REDIS], config.redis_key_prefix)
    if config.rate_limit_backend == "redis":
        app[LIMITER] = app[SHARED_LIMITER]
    else:
        app[LIMITER] = LocalLimiter()
    yield


async def _revocations(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    app[REVOCATIONS] = Revocations(config.access_token_ttl_s)
    await app[REVOCATIONS].start(app[PG], app[REDIS], config.redis_key_prefix)
    try:
        yield
    finally:
        await app[REVOCATIONS].stop()


def _flushed_at_exit(access_log: AccessLog) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        flusher = asyncio.create_task(access_log.run())
        try:
            yield
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            access_log.flush()

    return ctx


def admission_of(config: Config) -> Admission | FairGate:
    """The shed layer's gate (server/admission.py), its figures the admission metrics'. The
    adaptive limit's floor is CONCURRENCY_MIN, by default the pool's size (server/config.py)."""
    gate: Admission | FairGate
    if config.adaptive_concurrency:
        limit = GradientLimit(
            config.concurrency_initial,
            config.concurrency_floor,
            config.max_in_flight,
            config.concurrency_tolerance,
            time.perf_counter(),
        )
        gate = Admission(limit, config.max_in_flight, config.queue_deadline_s)
        admission = gate

        def figures() -> dict[str, int]:
            return {
                "limit": admission.limit,
                "in_flight": admission.in_flight,
                "queued": admission.queued,
            }
    else:
        gate = fixed = FairGate(config.max_in_flight, config.queue_deadline_s)

        def figures() -> dict[str, int]:
            return {"limit": fixed.capacity, "in_flight": fixed.in_use, "queued": fixed.waiting}

    metrics.ADMISSION.source = figures
    return gate


def create_app(config: Config, *, access_log: AccessLog | None = None) -> web.Application:
    if access_log is None and config.access_log:
        access_log = AccessLog()
    tracing = Tracing(config) if config.otel_exporter_otlp_endpoint else None
    app = web.Application(client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[VALIDATORS] = handlers.validators
    # Only with origins to allow: without, no answer pays for CORS (server/cors.py).
    cors = Cors(config.cors_allow_origins) if config.cors_allow_origins else None
    if cors is not None:
        app.on_response_prepare.append(cors.on_prepare)
    app[CHAIN] = Chain(
        access_log,
        admission_of(config),
        tracing,
        body_read_timeout_s=config.body_read_timeout_s,
        cors=cors,
        trust_forwarded_for=config.trust_forwarded_for,
    )
    app[LIFECYCLE] = Lifecycle()
    app[TOKENS] = TokenService.from_config(config)
    if access_log is not None:
        app.cleanup_ctx.append(_flushed_at_exit(access_log))  # first in, so closed last
    if tracing is not None:  # before the pools: they trace with it; flushed after they close
        app[TRACING] = tracing
        app.cleanup_ctx.append(tracing.ctx)
    app.cleanup_ctx.extend([_postgres, _redis, _reads, _limiter, _revocations])
    # After the pools, in the URL map's order: closed in reverse, so a domain's workers finish
    # (the event writer commits what is pending) before the pools close.
    for contexts in handlers.contexts:
        app.cleanup_ctx.extend(contexts)
    add_routes(app, handlers.routes)
    # Last, so every route is tried before it (aiohttp tries the longest path prefix first).
    app.router.add_route("*", UNMATCHED, app[CHAIN].unmatched())
    return app


def add_routes(app: web.Application, routes: Iterable[Route]) -> None:
    """Each route's handler inside the chain (server/chain.py); GET routes answer HEAD too."""
    chain = app[CHAIN]
    for route in routes:
        resource = app.router.add_resource(route.path)
        if route.method == "GET":
            # its own wrapper: a wrapper knows its method (the metrics' and log's label)
            resource.add_route("HEAD", chain.wrap(route, "HEAD"))
        resource.add_route(route.method, chain.wrap(route, route.method))

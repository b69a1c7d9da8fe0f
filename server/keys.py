"""Every typed key: app-wide resources (web.AppKey) and per-request values (web.RequestKey)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from redis.asyncio import Redis

from db.pool import Database
from server.config import Config
from server.principal import Principal
from server.ratelimit import Limiter
from server.state import Lifecycle

if TYPE_CHECKING:  # these modules import this one
    from handlers.analytics import LiveHub
    from handlers.events import EventCounters, EventWriter
    from handlers.order_saga import SagaRunner
    from handlers.passwords import Hasher
    from handlers.user_cache import UserCache
    from handlers.users import ViewMemo
    from server.middleware import Wrap
    from server.tracing import Tracing

CONFIG = web.AppKey("config", Config)
PG = web.AppKey("pg", Database)
PG_READ = web.AppKey("pg_read", Database)  # the replica pool, or PG itself when none is set
REDIS = web.AppKey("redis", Redis)
LIMITER: web.AppKey[Limiter] = web.AppKey("limiter")
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
HASHER: web.AppKey[Hasher] = web.AppKey("hasher")
USER_CACHE: web.AppKey[UserCache] = web.AppKey("user_cache")
USER_VIEWS: web.AppKey[ViewMemo] = web.AppKey("user_views")
EVENT_WRITER: web.AppKey[EventWriter] = web.AppKey("event_writer")
EVENT_COUNTERS: web.AppKey[EventCounters] = web.AppKey("event_counters")
LIVE_HUB: web.AppKey[LiveHub] = web.AppKey("live_hub")
PAYMENTS: web.AppKey[SagaRunner] = web.AppKey("payments")
# Puts a handler inside the middleware chain: server.app.add_routes uses it.
PIPELINE: web.AppKey[Wrap] = web.AppKey("pipeline")
TRACING: web.AppKey[Tracing] = web.AppKey("tracing")  # only when OTEL_EXPORTER_OTLP_ENDPOINT is set

REQUEST_ID = web.RequestKey("request_id", str)
# The verified access token's claims; None when the request carries no valid token.
PRINCIPAL: web.RequestKey[Principal | None] = web.RequestKey("principal")
RATELIMIT_HEADERS: web.RequestKey[dict[str, str]] = web.RequestKey("ratelimit_headers")

"""The typed keys of shared resources (web.AppKey) and per-request values (web.RequestKey).

Only what the HTTP machinery and every domain share lives here; each domain declares its own
resources in handlers/<domain>/keys.py.
"""

from __future__ import annotations

from aiohttp import web
from redis.asyncio import Redis

from db.pool import Database
from server.config import Config
from server.principal import Principal
from server.ratelimit import Limiter
from server.revocation import Revocations
from server.state import Lifecycle
from server.tracing import Tracing

CONFIG = web.AppKey("config", Config)
PG = web.AppKey("pg", Database)
PG_READ = web.AppKey("pg_read", Database)  # the replica pool, or PG itself when none is set
REDIS = web.AppKey("redis", Redis)
LIMITER: web.AppKey[Limiter] = web.AppKey("limiter")  # RATE_LIMIT_BACKEND's
# Buckets kept in Redis whatever RATE_LIMIT_BACKEND says (each process's own while Redis is
# down): for limits that must hold per client across workers and replicas (auth attempts).
SHARED_LIMITER: web.AppKey[Limiter] = web.AppKey("shared_limiter")
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
REVOCATIONS = web.AppKey("revocations", Revocations)
TRACING = web.AppKey("tracing", Tracing)  # only when OTEL_EXPORTER_OTLP_ENDPOINT is set

REQUEST_ID = web.RequestKey("request_id", str)
# The verified access token's claims; None when the request carries no valid token.
PRINCIPAL: web.RequestKey[Principal | None] = web.RequestKey("principal")
RATELIMIT_HEADERS: web.RequestKey[dict[str, str]] = web.RequestKey("ratelimit_headers")
# When the request reached the process (time.perf_counter(): its head's arrival on a Connection,
# else the chain's start; for a request with a body, when the body was in): admission counts
# a request's wait from here.
ARRIVED = web.RequestKey("arrived", float)

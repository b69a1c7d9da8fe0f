"""The middleware chain, outermost first: context/log -> metrics -> shed -> errors -> ratelimit
-> auth. Each is a small function; `errors` owns every status code and the problem+json shape.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any

import asyncpg
import orjson
from aiohttp import web
from aiohttp.web_urldispatcher import MatchInfoError

from db.gate import FairGate, GateTimeout
from db.pool import PoolTimeout
from server import metrics
from server.errors import ApiError, TooManyRequests, Unauthorized, problem_response
from server.keys import CONFIG, LIMITER, PRINCIPAL, RATELIMIT_HEADERS, REQUEST_ID
from server.principal import Principal
from server.tokens import TOKENS, TokenError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger("surge")

_RID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Ops endpoints are never shed, rate limited or authenticated: an overloaded process must
# still answer its probes and its scrape.
OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"})
# /v1 routes that need no access token.
PUBLIC_PATHS = frozenset(
    {
        "/v1/auth/signup",
        "/v1/auth/login",
        "/v1/auth/refresh",
        "/v1/auth/logout",
        "/v1/webhooks/payments",
    }
)
# Long-lived streams would hold a shed slot for their whole life, so a few hundred open
# dashboards would shed every other request; they are capped by their own limit instead
# (EVENTS_LIVE_MAX_CLIENTS).
STREAM_PATHS = frozenset({"/v1/analytics/live"})


# Request ids need to be unique, not unguessable: a random per-process prefix and a counter
# cost a fraction of an os.urandom() system call per request.
_RID_PREFIX = os.urandom(6).hex()
_rid_counter = itertools.count()


def new_request_id() -> str:
    return f"{_RID_PREFIX}{next(_rid_counter) & 0xFFFFFFFFFFFF:012x}"


def route_of(request: web.Request) -> str:
    """The route template (/v1/users/{user_id}), never the raw path: bounded label values."""
    info = request.match_info
    if isinstance(info, MatchInfoError):
        return "unmatched"
    resource = info.route.resource
    return resource.canonical if resource is not None else "unmatched"


class AccessLog:
    """One JSON line per request, without the logging module's overhead.

    Lines collect in a buffer written out every FLUSH_S or at MAX_BUFFER bytes, and at
    shutdown: with PYTHONUNBUFFERED (usual in containers) a write per request was one system
    call per request, 9 % of a /healthz profile.
    """

    FLUSH_S = 0.5
    MAX_BUFFER = 64 * 1024

    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout.buffer
        self._buf = bytearray()
        self._timer: asyncio.TimerHandle | None = None

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._buf:
            self.stream.write(bytes(self._buf))
            self.stream.flush()
            self._buf.clear()

    def write(self, request: web.Request, status: int, duration: float) -> None:
        principal = request.get(PRINCIPAL)
        record = {
            "ts": time.time(),
            "msg": "request",
            "method": request.method,
            "route": route_of(request),
            "path": request.path,
            "status": status,
            "duration_ms": round(duration * 1000, 3),
            "request_id": request.get(REQUEST_ID),
            "tenant": str(principal.tenant_id) if principal is not None else None,
        }
        self._buf += orjson.dumps(record)
        self._buf += b"\n"
        if len(self._buf) >= self.MAX_BUFFER:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_S, self.flush)


def context_middleware(access_log: AccessLog | None) -> web.middleware:  # type: ignore[valid-type]
    @web.middleware
    async def context(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request.headers.get("X-Request-ID")
        if rid is None or _RID.fullmatch(rid) is None:
            rid = new_request_id()
        request[REQUEST_ID] = rid
        start = time.perf_counter()
        status = 499  # the client went away before an answer
        try:
            resp = await handler(request)
            status = resp.status
            if not resp.prepared:
                resp.headers["X-Request-ID"] = rid
            return resp
        finally:
            if access_log is not None:
                access_log.write(request, status, time.perf_counter() - start)

    return context


# prometheus_client's .labels() takes a lock and builds a key tuple on every call; the children
# for a (method, route, status) never change, so look each up once. Bounded: routes are
# templates and methods and statuses are few.
_latency_children: dict[tuple[str, str], Any] = {}
_request_children: dict[tuple[str, str, int], Any] = {}


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    metrics.IN_FLIGHT.inc()
    status = 499
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    finally:
        metrics.IN_FLIGHT.dec()
        key = (request.method, route_of(request))
        latency = _latency_children.get(key)
        if latency is None:
            latency = _latency_children[key] = metrics.LATENCY.labels(*key)
        latency.observe(time.perf_counter() - start)
        counter = _request_children.get((*key, status))
        if counter is None:
            counter = metrics.REQUESTS.labels(*key, str(status))
            _request_children[(*key, status)] = counter
        counter.inc()


def shed_middleware(gate: FairGate) -> web.middleware:  # type: ignore[valid-type]
    @web.middleware
    async def shed(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPS_PATHS or request.path in STREAM_PATHS:
            return await handler(request)
        try:
            await gate.acquire()
        except TimeoutError:
            metrics.SHED.inc()
            return problem_response(
                503,
                "the server is at capacity; retry shortly",
                request[REQUEST_ID],
                headers={"Retry-After": "1"},
                slug="overloaded",
            )
        try:
            return await handler(request)
        finally:
            gate.release()

    return shed


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        resp = problem_response(
            exc.status,
            exc.detail,
            request[REQUEST_ID],
            headers=exc.headers,
            slug=exc.slug,
            title=exc.title,
            errors=exc.errors,
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = _HTTP_DETAILS.get(exc.status) or exc.reason
        if exc.status == 413:
            detail = f"the request body is larger than {request.app[CONFIG].max_body_bytes} bytes"
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        resp = problem_response(exc.status, detail, request[REQUEST_ID], headers=headers)
    except asyncpg.UniqueViolationError as exc:
        detail = CONSTRAINT_DETAILS.get(exc.constraint_name or "", "the resource already exists")
        resp = problem_response(409, detail, request[REQUEST_ID], slug="conflict")
    except (asyncpg.ForeignKeyViolationError, asyncpg.CheckViolationError, asyncpg.DataError):
        log.warning("constraint refused a write", exc_info=True)
        resp = problem_response(
            422,
            "the request conflicts with the data's constraints",
            request[REQUEST_ID],
            slug="validation",
            title="Unprocessable Content",
            errors=[{"field": "", "message": "a value was refused by the database"}],
        )
    except (PoolTimeout, GateTimeout):
        metrics.POOL_TIMEOUTS.inc()
        resp = problem_response(
            503,
            "the database is busy; retry shortly",
            request[REQUEST_ID],
            headers={"Retry-After": "1"},
            slug="overloaded",
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error", extra={"request_id": request.get(REQUEST_ID)})
        resp = problem_response(500, "an internal error occurred", request[REQUEST_ID])
    rl = request.get(RATELIMIT_HEADERS)
    if rl:
        resp.headers.update(rl)
    return resp


# Unique constraints whose violation is a client's 409, with what to tell the client.
CONSTRAINT_DETAILS = {
    "users_tenant_email_key": "a user with this email already exists in this tenant",
}

_HTTP_DETAILS = {
    404: "no such route",
    405: "method not allowed on this route",
}


def client_ip(request: web.Request, trust_forwarded_for: bool) -> str:
    if trust_forwarded_for:
        fwd = request.headers.get("X-Forwarded-For")
        if fwd:
            return fwd.split(",", 1)[0].strip()
    return request.remote or "unknown"


@web.middleware
async def ratelimit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)
    config = request.app[CONFIG]
    principal = _resolve_principal(request)
    key = (
        f"u:{principal.user_id}"
        if principal is not None
        else f"ip:{client_ip(request, config.trust_forwarded_for)}"
    )
    decision = await request.app[LIMITER].take(key, config.rate_limit_rate, config.rate_limit_burst)
    headers = decision.headers()
    request[RATELIMIT_HEADERS] = headers
    if not decision.allowed:
        metrics.RATELIMITED.labels("general").inc()
        raise TooManyRequests("rate limit exceeded; retry after the Retry-After delay")
    resp = await handler(request)
    if not resp.prepared:
        resp.headers.update(headers)
    return resp


def _resolve_principal(request: web.Request) -> Principal | None:
    """Verify the bearer token once per request (in memory, no database round trip)."""
    if PRINCIPAL in request:
        return request[PRINCIPAL]
    principal = None
    auth = request.headers.get("Authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token:
            try:
                principal = request.app[TOKENS].verify(token.strip())
            except TokenError:
                principal = None
    request[PRINCIPAL] = principal
    return principal


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if (
        request.path.startswith("/v1/")
        and request.path not in PUBLIC_PATHS
        and not isinstance(request.match_info, MatchInfoError)  # unknown routes are 404/405
    ):
        principal = _resolve_principal(request)
        if principal is None:
            if "Authorization" not in request.headers:
                raise Unauthorized("an access token is required", error="")
            raise Unauthorized("the access token is invalid or expired")
    return await handler(request)

"""The middleware chain, outermost first: context/log -> metrics -> shed -> errors -> ratelimit
-> auth, run by one aiohttp middleware (`pipeline`); `_problem_for` owns every status code and
the problem+json shape.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from typing import IO, NoReturn, cast
from uuid import UUID

import asyncpg
import msgspec
from aiohttp import web
from multidict import istr

from db.gate import FairGate, GateTimeout
from db.pool import PoolTimeout
from server import metrics
from server.errors import ApiError, TooManyRequests, Unauthorized, problem_response
from server.keys import CONFIG, LIMITER, PRINCIPAL, RATELIMIT_HEADERS, REQUEST_ID
from server.principal import Principal
from server.tokens import TOKENS, TokenError
from server.tracing import TRACEPARENT, Tracing, trace_id_of

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A handler that never waits may be a plain function: the pipeline calls it without a coroutine
# of its own (callgrind: ~1k instructions less per /healthz).
PlainHandler = Callable[[web.Request], web.StreamResponse]


def plain(handler: PlainHandler) -> Handler:
    """Marks a plain-function handler, and types it for aiohttp's route table (which expects
    coroutine functions). The pipeline refuses any other handler that is not a coroutine
    function (a class-based view, a callable object): it would be called without an await."""
    handler.__surge_plain__ = True  # type: ignore[attr-defined]
    return cast(Handler, handler)


def _plain_or_none(handler: Handler | PlainHandler) -> PlainHandler | None:
    if inspect.iscoroutinefunction(handler):
        return None
    if getattr(handler, "__surge_plain__", False):
        return cast(PlainHandler, handler)
    raise TypeError(f"{handler!r} is neither a coroutine function nor marked with plain()")


log = logging.getLogger("surge")

_RID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The header's name as istr, like aiohttp's hdrs: a lookup or a set skips case-folding it.
X_REQUEST_ID = istr("X-Request-ID")
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
# cost a fraction of an os.urandom() system call per request. The counter's 12 hex digits come
# from itertools.product over two-digit strings, joined in C: formatting an int per request
# (f"{prefix}{n:x}") cost 2.3k instructions, this 1.2k (callgrind). 16**12 ids: 89 years at
# 100k requests/s.
_HEX2 = [f"{i:02x}" for i in range(256)]
_rids = map("".join, itertools.product((os.urandom(6).hex(),), *[_HEX2] * 6))


class AccessLine(msgspec.Struct, omit_defaults=True, gc=False):
    """One access-log line; its fields are the line's keys, in this order. Untracked by the
    garbage collector: its fields are strings, numbers and None, which cannot make a cycle."""

    ts: float  # when the answer was done, seconds since the epoch
    msg: str  # always "request": tells these lines from the application's log lines
    method: str
    route: str  # the route's template ("unmatched" for no route)
    path: str
    status: int
    duration_ms: float
    request_id: str
    tenant: UUID | None
    trace_id: str | None = None  # left out when there is none


class AccessLog:
    """One JSON line per request, without the logging module's overhead.

    A request only appends its AccessLine; the lines are encoded and written together every
    flush_s (`run`, started with the app), at max_pending lines, and at shutdown. With
    PYTHONUNBUFFERED (usual in containers) a write per request was one system call per request
    (9 % of a /healthz profile), and formatting a line inside each request cost ~6 us of its CPU
    in the server (bench A/B against ACCESS_LOG=false). msgspec encodes a batch of Structs in one
    call: 2.3k instructions per line, against 8.4k for a dict per line given to orjson.dumps and
    5.3k for Structs built here from tuples (callgrind; docs/PERFORMANCE.md notes), so the Struct
    is built in the request.
    """

    def __init__(
        self, stream: IO[bytes] | None = None, *, max_pending: int = 1024, flush_s: float = 0.5
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout.buffer
        self.max_pending = max_pending
        self.flush_s = flush_s
        self.pending: list[AccessLine] = []  # the pipeline appends to this very list
        # Requests read perf_counter(); their wall-clock time is that plus this offset, read
        # again at every flush instead of a time.time() call per request.
        self.wall = time.time() - time.perf_counter()
        self._encode_lines = msgspec.json.Encoder().encode_lines

    def flush(self) -> None:
        self.wall = time.time() - time.perf_counter()
        pending = self.pending
        if not pending:
            return
        lines = self._encode_lines(pending)
        pending.clear()
        try:
            self.stream.write(lines)
            self.stream.flush()
        except (OSError, ValueError) as exc:  # stdout closed or gone: the requests go on
            log.error("%d access log lines could not be written: %s", lines.count(b"\n"), exc)

    async def run(self) -> None:
        """Flush every flush_s until cancelled."""
        while True:
            await asyncio.sleep(self.flush_s)
            self.flush()


Wrap = Callable[[Handler | PlainHandler, str, str], Handler]


def pipeline(
    access_log: AccessLog | None, shed_gate: FairGate, tracing: Tracing | None = None
) -> Wrap:
    """The middleware chain of ARCHITECTURE.md, in its order, around each route's handler:

    request id + access log + trace span -> metrics -> shed -> errors -> rate limit -> auth ->
    handler. `pipeline(...)(handler, method, path)` is the handler registered for the route
    (server/app.py add_routes); UNMATCHED as the path wraps the catch-all route that answers
    404/405. With tracing off (`tracing` None) the span costs one `is None` test per step.

    Not an aiohttp middleware: a route knows its label (its path template), whether it is shed,
    rate limited and authenticated before any request arrives, so a request pays none of those
    lookups, nor aiohttp's middleware wrapper. In the server the chain cost ~20 us per /healthz
    (A/B with aiohttp's middleware list emptied: 22.9k vs 13.5k requests/s), 2-3x what the same
    code costs in a loop in-process; aiohttp's wrapper alone was ~3 us of it.
    """

    clock = time.perf_counter
    http = metrics.HTTP
    route_meter = http.route
    if access_log is not None:
        pending, max_pending, flush = access_log.pending, access_log.max_pending, access_log.flush

    def wrap(any_handler: Handler | PlainHandler, method: str, path: str) -> Handler:
        handler = cast(Handler, any_handler)
        plain_handler = _plain_or_none(any_handler)
        unmatched = path == UNMATCHED
        route = "unmatched" if unmatched else path
        # A route without parameters matches one path, its template (aiohttp compared them for
        # equality): the log line takes the template instead of asking the request to decode
        # its path again.
        fixed_path = "{" not in path
        meter = None if unmatched else route_meter(method, route)
        # Ops endpoints are never shed, rate limited or authenticated; POST /graphql is an API call
        # like any /v1 one (its handler charges the rest of a query's cost), while GET /graphql
        # and the SDL are pages, like /docs.
        gated = path not in OPS_PATHS and path not in STREAM_PATHS
        api = path.startswith("/v1/") or (path == "/graphql" and method == "POST")
        public = unmatched or path in PUBLIC_PATHS  # unknown routes answer 404/405, not 401
        # Handlers that audit or stream read the request id from the request; ops endpoints and
        # the catch-all never do (their errors get it from here), so they skip aiohttp's
        # Python-level request.__setitem__.
        keep_rid = not unmatched and path not in OPS_PATHS

        async def surge(request: web.Request) -> web.StreamResponse:
            headers = request.headers
            rid = headers.get(X_REQUEST_ID)
            if rid is None or _RID.fullmatch(rid) is None:
                rid = next(_rids)
            if keep_rid:
                request[REQUEST_ID] = rid
            span = None if tracing is None else tracing.start_request(request, route, rid)
            start = clock()
            # the catch-all answers every method: its meter is looked up per request
            req_meter = meter if meter is not None else route_meter(request.method, route)
            http.in_flight += 1
            status = 499  # the client went away before an answer
            principal: Principal | None = None
            is_gated, is_api = gated, api
            if unmatched:  # a path, not a route: decided per request
                is_gated = request.path not in OPS_PATHS
                is_api = request.path.startswith("/v1/")
            try:
                if is_gated:
                    try:
                        await shed_gate.acquire()
                    except TimeoutError:
                        metrics.SHED.inc()
                        resp: web.StreamResponse = problem_response(
                            503,
                            "the server is at capacity; retry shortly",
                            rid,
                            headers={"Retry-After": "1"},
                            slug="overloaded",
                        )
                        is_gated = False
                        status = resp.status
                        resp.headers[X_REQUEST_ID] = rid
                        if span is not None:
                            resp.headers[TRACEPARENT] = span.traceparent
                        return resp
                try:
                    if is_api:
                        principal = request[PRINCIPAL] = _verify_bearer(request)
                        limits = await _rate_limit(request, principal)
                        if principal is None and not public:
                            _unauthorized(request)
                    resp = (
                        plain_handler(request)
                        if plain_handler is not None
                        else await handler(request)
                    )
                    if is_api:
                        # A response the handler prepared itself (a stream) has sent its
                        # headers: these changes are then no-ops, cheaper than asking.
                        resp.headers.update(limits)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    resp = _problem_for(request, exc, rid)
                    if span is not None and resp.status >= 500:
                        span.error(exc)
                finally:
                    if is_gated:
                        shed_gate.release()
                status = resp.status
                resp.headers[X_REQUEST_ID] = rid
                if span is not None:
                    resp.headers[TRACEPARENT] = span.traceparent
                return resp
            finally:
                end = clock()
                elapsed = end - start
                http.in_flight -= 1
                req_meter.finished(status, elapsed)
                if span is not None:
                    span.end(status)
                if access_log is not None:
                    trace_id: str | None
                    if span is not None:
                        trace_id = span.trace_id
                    elif (traceparent := headers.get(TRACEPARENT)) is not None:
                        trace_id = trace_id_of(traceparent)
                    else:
                        trace_id = None
                    pending.append(
                        AccessLine(
                            end + access_log.wall, "request", req_meter.method, route,
                            route if fixed_path else request.path, status,
                            int(elapsed * 1_000_000) / 1000,  # round(x, 3) costs 3x more
                            rid, None if principal is None else principal.tenant_id, trace_id,
                        )
                    )  # fmt: skip
                    if len(pending) >= max_pending:
                        flush()

        return surge

    return wrap


# The catch-all route's path; its handler answers what aiohttp's router would have: 405 with
# Allow when another method has the path, else 404.
UNMATCHED = "/{unmatched:.*}"


async def unmatched(request: web.Request) -> web.StreamResponse:
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.canonical != "/{unmatched}":
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def _problem_for(request: web.Request, exc: Exception, rid: str) -> web.Response:
    """Every exception as application/problem+json; the one place that owns status codes."""
    if isinstance(exc, ApiError):
        resp = problem_response(
            exc.status,
            exc.detail,
            rid,
            headers=exc.headers,
            slug=exc.slug,
            title=exc.title,
            errors=exc.errors,
        )
    elif isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        detail = _HTTP_DETAILS.get(exc.status) or exc.reason
        if exc.status == 413:
            detail = f"the request body is larger than {request.app[CONFIG].max_body_bytes} bytes"
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        resp = problem_response(exc.status, detail, rid, headers=headers)
    elif isinstance(exc, asyncpg.UniqueViolationError):
        detail = CONSTRAINT_DETAILS.get(exc.constraint_name or "", "the resource already exists")
        resp = problem_response(409, detail, rid, slug="conflict")
    elif isinstance(
        exc, asyncpg.ForeignKeyViolationError | asyncpg.CheckViolationError | asyncpg.DataError
    ):
        log.warning("constraint refused a write", exc_info=exc)
        resp = problem_response(
            422,
            "the request conflicts with the data's constraints",
            rid,
            slug="validation",
            title="Unprocessable Content",
            errors=[{"field": "", "message": "a value was refused by the database"}],
        )
    elif isinstance(exc, PoolTimeout | GateTimeout):
        metrics.POOL_TIMEOUTS.inc()
        resp = problem_response(
            503,
            "the database is busy; retry shortly",
            rid,
            headers={"Retry-After": "1"},
            slug="overloaded",
        )
    else:
        log.error("unhandled error", exc_info=exc, extra={"request_id": rid})
        resp = problem_response(500, "an internal error occurred", rid)
    limits = request.get(RATELIMIT_HEADERS)
    if limits:
        resp.headers.update(limits)
    return resp


# Unique constraints whose violation is a client's 409, with what to tell the client.
CONSTRAINT_DETAILS = {
    "users_tenant_email_key": "a user with this email already exists in this tenant",
    "products_tenant_sku_key": "a product with this sku already exists in this tenant",
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


async def _rate_limit(request: web.Request, principal: Principal | None) -> dict[str, str]:
    """Token bucket per principal (the user, else the client IP); the RateLimit-* headers."""
    config = request.app[CONFIG]
    key = (
        principal.rate_key
        if principal is not None
        else f"ip:{client_ip(request, config.trust_forwarded_for)}"
    )
    decision = await request.app[LIMITER].take(key, config.rate_limit_rate, config.rate_limit_burst)
    headers = decision.headers()
    request[RATELIMIT_HEADERS] = headers
    if not decision.allowed:
        metrics.RATELIMITED.labels("general").inc()
        raise TooManyRequests("rate limit exceeded; retry after the Retry-After delay")
    return headers


def _verify_bearer(request: web.Request) -> Principal | None:
    """The principal of a valid bearer token (verified in memory, no database round trip)."""
    auth = request.headers.get("Authorization")
    if auth is None:
        return None
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    try:
        return request.app[TOKENS].verify(token.strip())
    except TokenError:
        return None


def _unauthorized(request: web.Request) -> NoReturn:
    """A /v1 route that needs an access token, called without a valid one."""
    if "Authorization" not in request.headers:
        raise Unauthorized("an access token is required", error="")
    raise Unauthorized("the access token is invalid or expired")

"""The chain around every route's handler, built once per route from its policy (server/routes.py).

Outermost first, as each request meets it:

    observe  request id, trace span, latency and status metrics, access-log line, every
             exception rendered as problem+json (server/problems.py), the headers every
             answer carries (nosniff; no-store on API answers)
    body     a request's body read into memory within BODY_READ_TIMEOUT_S (408 past it, 413
             past MAX_BODY_BYTES), so a body that trickles in holds a connection, never a slot;
             a body in a Content-Encoding its route does not take is refused 415 unread
    shed     a bounded, fair gate; a request that waits too long for a slot is refused 503
    api      access token verified in memory (and not revoked), token-bucket rate limit,
             RateLimit-* headers
    handler

A route leaves out what its policy says it does not need (ops routes are only observed), so
a request pays for no lookup of its own policy. The chain is not an aiohttp middleware: the
route's label, its meter and its layers are fixed when the route is added.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import Callable
from typing import NoReturn

from aiohttp import web
from multidict import istr

from db.gate import FairGate
from server import metrics
from server.access_log import AccessLine, AccessLog
from server.encoding import check_coding
from server.errors import ApiError, TooManyRequests, Unauthorized, ValidationFailed
from server.http import client_ip
from server.keys import CONFIG, LIMITER, PRINCIPAL, RATELIMIT_HEADERS, REQUEST_ID, REVOCATIONS
from server.principal import Principal
from server.problems import problem_for
from server.routes import Handler, Route, handler_of, plain_handler_of
from server.tokens import TOKENS, TokenError
from server.tracing import TRACEPARENT, Tracing, trace_id_of
from server.validation import CARD_MESSAGE, looks_like_card

log = logging.getLogger("surge")

_RID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
X_REQUEST_ID = istr("X-Request-ID")  # istr, as aiohttp's hdrs: no case-folding per lookup
X_CONTENT_TYPE_OPTIONS = istr("X-Content-Type-Options")
CACHE_CONTROL = istr("Cache-Control")
# Every answer: a browser must not guess a type other than the one declared (a JSON body
# rendered as HTML, say).
NOSNIFF = "nosniff"

# Request ids need to be unique, not unguessable: a random per-process prefix and a 12-hex
# counter (16**12 ids: 89 years at 100k requests/s), its digits joined in C.
_HEX2 = [f"{i:02x}" for i in range(256)]
_rids = map("".join, itertools.product((os.urandom(6).hex(),), *[_HEX2] * 6))


def new_request_id() -> str:
    """A request id for an answer given outside the chain (server/connections.py)."""
    return next(_rids)


# The catch-all route: it answers what aiohttp's router would have (405 with Allow when
# another method has the path, else 404), inside the chain like any route.
UNMATCHED = "/{unmatched:.*}"
# An unknown path under the API's prefix is still an API call: rate limited, with headers.
API_PREFIX = "/v1/"


class Overloaded(ApiError):
    status, slug, title = 503, "overloaded", "Service Unavailable"

    def __init__(self) -> None:
        super().__init__("the server is at capacity; retry shortly", headers={"Retry-After": "1"})


class RequestTimeout(ApiError):
    status, slug, title = 408, "request-timeout", "Request Timeout"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request body did not arrive within {timeout_s:g} s")


class ClientClosedRequest(ApiError):
    """The client hung up before its request was read: nobody is left to answer (nginx's 499)."""

    status, slug, title = 499, "client-closed-request", "Client Closed Request"


class Chain:
    """Builds the handler aiohttp runs for each route (`wrap`)."""

    def __init__(
        self,
        access_log: AccessLog | None,
        shed_gate: FairGate,
        tracing: Tracing | None = None,
        *,
        body_read_timeout_s: float = 10.0,
    ) -> None:
        self.access_log = access_log
        self.shed_gate = shed_gate
        self.tracing = tracing
        self.body_read_timeout_s = body_read_timeout_s
        self.ops_paths: frozenset[str] = frozenset()

    def wrap(self, route: Route, method: str) -> Handler:
        """The handler registered for `route` under `method` (GET routes answer HEAD too)."""
        if route.ops:
            self.ops_paths |= {route.path}
        inner: Handler | None = None
        if not route.plain:
            # observe -> api (token, rate limit) -> body -> shed -> handler: a request refused
            # for its token or its rate has its body left unread; a body trickles in before
            # the request takes a slot, never while it holds one.
            inner = handler_of(route)
            if route.shed:
                inner = _body(
                    _shed(inner, self.shed_gate), self.body_read_timeout_s, encoded=route.encoded
                )
            if route.api:
                inner = _api(inner, public=route.public, limited=not route.own_limit)
        return self._observe(
            inner,
            None if inner is not None else plain_handler_of(route),
            method,
            route.path,
            keep_rid=not route.ops,
            no_store=route.api,
        )

    def unmatched(self) -> Handler:
        """The catch-all's handler: whether it is shed and rate limited follows the path asked
        for (an ops path is never shed; an API path answers with RateLimit-* headers)."""
        timeout_s = self.body_read_timeout_s
        # No route, no content coding to check: the body is read as sent, never decoded.
        api = _api(_body(_shed(_unmatched, self.shed_gate), timeout_s, None), public=True)
        page = _body(_shed(_unmatched, self.shed_gate), timeout_s, None)

        async def dispatch(request: web.Request) -> web.StreamResponse:
            path = request.path
            if path in self.ops_paths:
                return await _unmatched(request)
            return await (api if path.startswith(API_PREFIX) else page)(request)

        return self._observe(dispatch, None, "*", UNMATCHED, keep_rid=False, no_store=None)

    def _observe(
        self,
        handler: Handler | None,
        plain: Callable[[web.Request], web.StreamResponse] | None,
        method: str,
        path: str,
        *,
        keep_rid: bool,
        no_store: bool | None,
    ) -> Handler:
        """`no_store`: the route's answers are the API's (per user, or carrying tokens), never
        to be kept by a cache; None: as the path asked for says (the catch-all)."""
        clock = time.perf_counter
        http = metrics.HTTP
        tracing = self.tracing
        access_log = self.access_log
        if access_log is not None:
            pending, max_pending, flush = (
                access_log.pending,
                access_log.max_pending,
                access_log.flush,
            )
        unmatched = path == UNMATCHED
        route = "unmatched" if unmatched else path
        # A route without parameters matches one path, its template: the log line takes it
        # instead of asking the request to decode its path again.
        fixed_path = "{" not in path
        meter = None if unmatched else http.route(method, route)
        call = handler if handler is not None else _never

        async def observe(request: web.Request) -> web.StreamResponse:
            # the head is in: the connection's header deadline no longer applies
            if (head_arrived := getattr(request.protocol, "head_arrived", None)) is not None:
                head_arrived()
            headers = request.headers
            rid = headers.get(X_REQUEST_ID)
            refused = None
            if rid is None or _RID.fullmatch(rid) is None:
                rid = next(_rids)
            elif len(rid) >= 13 and looks_like_card(rid):  # never echoed nor logged: refused
                rid, refused = next(_rids), _card_request_id()
            if keep_rid:  # for handlers that audit or stream; ops never read it
                request[REQUEST_ID] = rid
            span = None if tracing is None else tracing.start_request(request, route, rid)
            start = clock()
            # the catch-all answers every method: its meter is looked up per request
            req_meter = meter if meter is not None else http.route(request.method, route)
            http.in_flight += 1
            status = 499  # the client went away before an answer
            try:
                try:
                    if refused is not None:
                        raise refused
                    resp = plain(request) if plain is not None else await call(request)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    resp = problem_for(request, exc, rid)
                    if isinstance(exc, RequestTimeout):
                        resp.force_close()  # the rest of the body may still be on its way
                    elif isinstance(exc, ClientClosedRequest):
                        log.warning(
                            "the client hung up mid-body: %s %s (request %s)",
                            request.method, route, rid,
                        )  # fmt: skip
                    if span is not None and resp.status >= 500 and not isinstance(exc, Overloaded):
                        span.error(exc)
                status = resp.status
                resp_headers = resp.headers
                resp_headers[X_REQUEST_ID] = rid
                resp_headers[X_CONTENT_TYPE_OPTIONS] = NOSNIFF
                if no_store if no_store is not None else request.path.startswith(API_PREFIX):
                    resp_headers[CACHE_CONTROL] = "no-store"
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
                    principal = request.get(PRINCIPAL) if keep_rid or unmatched else None
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
                            int(elapsed * 1_000_000) / 1000,  # ms to 3 places, cheaper than round()
                            rid, None if principal is None else principal.tenant_id, trace_id,
                        )
                    )  # fmt: skip
                    if len(pending) >= max_pending:
                        flush()

        return observe


def _card_request_id() -> ValidationFailed:
    return ValidationFailed(
        [{"field": "X-Request-ID", "message": CARD_MESSAGE}], "invalid X-Request-ID header"
    )


async def _never(request: web.Request) -> web.StreamResponse:
    raise AssertionError("a plain route's handler is called directly")


def _body(handler: Handler, timeout_s: float, encoded: bool | None) -> Handler:
    """The request's body in memory before `handler` (the shed gate) runs: a body that trickles
    in holds its connection, never a slot. request.read() keeps the bytes, so the handler's own
    read returns them at once. (A refusal that needs no body, such as an overload check, would
    go before this layer.)

    The bytes are kept as sent (the server does not decompress: server/encoding.py): a body in
    a Content-Encoding its route does not take (`encoded`) is refused 415 unread; one it takes
    is decoded by the handler, inside its slot. `encoded` None: not checked (the catch-all)."""

    async def body(request: web.Request) -> web.StreamResponse:
        if request.body_exists:
            if encoded is not None:
                check_coding(request, encoded)
            try:
                async with asyncio.timeout(timeout_s):
                    await request.read()  # 413 past client_max_size (MAX_BODY_BYTES)
            except TimeoutError:
                raise RequestTimeout(timeout_s) from None
            except ConnectionResetError:
                raise ClientClosedRequest() from None
        return await handler(request)

    return body


def _shed(handler: Handler, gate: FairGate) -> Handler:
    async def shed(request: web.Request) -> web.StreamResponse:
        try:
            await gate.acquire()
        except TimeoutError:
            metrics.SHED.inc()
            raise Overloaded() from None
        try:
            return await handler(request)
        finally:
            gate.release()

    return shed


def _api(handler: Handler, *, public: bool, limited: bool = True) -> Handler:
    async def api(request: web.Request) -> web.StreamResponse:
        principal = bearer_principal(request)
        if principal is not None:
            # A revoked token counts as none (server/revocation.py): a dict lookup, unless the
            # token is revoked or the revocation list is stale.
            revocations = request.app[REVOCATIONS]
            if not revocations.allows(principal) and not await revocations.confirm(principal):
                principal = None
        request[PRINCIPAL] = principal
        limits = await _rate_limit(request, principal) if limited else {}
        if principal is None and not public:
            _unauthorized(request)
        resp = await handler(request)
        # A response its handler prepared itself (a stream) has sent its headers: this is
        # then a no-op.
        resp.headers.update(limits)
        return resp

    return api


async def _unmatched(request: web.Request) -> web.StreamResponse:
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.canonical != "/{unmatched}":
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def rate_key(request: web.Request, principal: Principal | None) -> str:
    """The token bucket a request draws from: its user's, else its client address's."""
    if principal is not None:
        return principal.rate_key
    return f"ip:{client_ip(request, request.app[CONFIG].trust_forwarded_for)}"


async def _rate_limit(request: web.Request, principal: Principal | None) -> dict[str, str]:
    config = request.app[CONFIG]
    decision = await request.app[LIMITER].take(
        rate_key(request, principal), config.rate_limit_rate, config.rate_limit_burst
    )
    headers = decision.headers()
    request[RATELIMIT_HEADERS] = headers
    if not decision.allowed:
        metrics.RATELIMITED.labels("general").inc()
        raise TooManyRequests("rate limit exceeded; retry after the Retry-After delay")
    return headers


def bearer_principal(request: web.Request) -> Principal | None:
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
    if "Authorization" not in request.headers:
        raise Unauthorized("an access token is required", error="")
    raise Unauthorized("the access token is invalid or expired")


__all__ = [
    "NOSNIFF",
    "UNMATCHED",
    "Chain",
    "ClientClosedRequest",
    "Overloaded",
    "RequestTimeout",
    "bearer_principal",
    "new_request_id",
    "rate_key",
]

"""The chain around every route's handler, built once per route from its policy (server/routes.py).

Outermost first, as each request meets it:

    observe  request id, trace span, latency and status metrics, access-log line, every
             exception rendered as problem+json (server/problems.py), the headers every
             answer carries (nosniff; no-store on API answers)
    api      access token verified in memory (and not revoked), token-bucket rate limit,
             RateLimit-* headers; first, under overload, a request the shed layer would refuse
             whatever its tenant (already too late for any wait) is answered 503 at once
    body     a request's body read into memory within BODY_READ_TIMEOUT_S (408 past it, 413
             past MAX_BODY_BYTES), so a body that trickles in holds a connection, never a slot;
             a request the shed layer would refuse anyway is refused before its body is read;
             a body in a Content-Encoding its route does not take is refused 415 unread
    shed     admission (server/admission.py): an adaptive limit of requests served at once, a
             queue per tenant served round-robin, a deadline on the wait counted from the
             request's arrival; a request refused is answered 503 + Retry-After, a body
             serialised once (`overloaded`): under a flood most answers are refusals
    conditional  (GET, HEAD) a 200 whose ETag If-None-Match names becomes 304, no body
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

import orjson
from aiohttp import hdrs, web
from multidict import CIMultiDict, istr

from db.gate import FairGate
from server import metrics
from server.access_log import AccessLine, AccessLog
from server.admission import DEADLINE, QUEUE_FULL, TENANT_SHARE, Admission, Refused
from server.cors import Cors
from server.encoding import check_coding
from server.errors import (
    PROBLEM_JSON,
    ApiError,
    TooManyRequests,
    Unauthorized,
    ValidationFailed,
    problem_body,
)
from server.http import client_ip, not_modified
from server.keys import (
    ARRIVED,
    CONFIG,
    LIMITER,
    PRINCIPAL,
    RATELIMIT_HEADERS,
    REQUEST_ID,
    REVOCATIONS,
)
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
IF_NONE_MATCH = istr("If-None-Match")
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


# The refusal's answer, the same as problem_for renders for Overloaded, in parts serialised
# once: under a flood most answers are refusals, and a refusal rendered through an exception and
# the problem table cost about as much as serving the request (docs/PERFORMANCE.md, notes of
# 2026-12-07). Request ids are [A-Za-z0-9._:-] (_RID): nothing in one needs escaping in JSON.
_RID_MARK = "\x01rid\x01"
_OVERLOADED_HEAD, _OVERLOADED_TAIL = problem_body(
    503, Overloaded().detail, _RID_MARK, slug=Overloaded.slug, title=Overloaded.title
).split(orjson.dumps(_RID_MARK)[1:-1])
_OVERLOADED_HEADERS = CIMultiDict({hdrs.CONTENT_TYPE: PROBLEM_JSON, hdrs.RETRY_AFTER: "1"})


def overloaded(request: web.Request) -> web.StreamResponse:
    """The 503 + Retry-After of a request the shed layer refused (counted by the caller)."""
    rid = request.get(REQUEST_ID)
    if rid is None:  # the catch-all keeps no id on the request: its observe renders it
        raise Overloaded()
    return web.Response(
        body=b"".join((_OVERLOADED_HEAD, rid.encode(), _OVERLOADED_TAIL)),
        status=503,
        headers=_OVERLOADED_HEADERS,
    )


class RequestTimeout(ApiError):
    status, slug, title = 408, "request-timeout", "Request Timeout"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request body did not arrive within {timeout_s:g} s")


class ClientClosedRequest(ApiError):
    """The client hung up before its answer was complete: nobody is left to answer (nginx's
    499). Mid-body it is worth a warning; `quiet` for a stream, which ends that way as a rule
    (a dashboard closed): the access line's 499 is then all there is."""

    status, slug, title = 499, "client-closed-request", "Client Closed Request"

    def __init__(self, detail: str | None = None, *, quiet: bool = False) -> None:
        super().__init__(detail)
        self.quiet = quiet


class Chain:
    """Builds the handler aiohttp runs for each route (`wrap`)."""

    def __init__(
        self,
        access_log: AccessLog | None,
        shed_gate: Admission | FairGate,
        tracing: Tracing | None = None,
        *,
        body_read_timeout_s: float = 10.0,
        cors: Cors | None = None,
        trust_forwarded_for: bool = False,
    ) -> None:
        """`shed_gate`: an Admission (ADAPTIVE_CONCURRENCY), else the fixed FairGate."""
        self.access_log = access_log
        self.shed_gate = shed_gate
        self.tracing = tracing
        self.body_read_timeout_s = body_read_timeout_s
        self.cors = cors
        self.trust_forwarded_for = trust_forwarded_for
        self.ops_paths: frozenset[str] = frozenset()
        # the adaptive gate, asked before the token whether a request is refused anyway
        self._admission = shed_gate if isinstance(shed_gate, Admission) else None

    def _gated(self, handler: Handler, encoded: bool | None) -> Handler:
        """`handler` behind the body and shed layers (`encoded`: see _body)."""
        gate, timeout_s = self.shed_gate, self.body_read_timeout_s
        if isinstance(gate, FairGate):
            return _body(_shed(handler, gate), timeout_s, None, False, encoded)
        trust = self.trust_forwarded_for
        return _body(_admit(handler, gate, trust), timeout_s, gate, trust, encoded)

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
            if method in ("GET", "HEAD") and not route.stream:
                inner = _conditional(inner)
            if route.shed:
                inner = self._gated(inner, route.encoded)
            if route.api:
                early = self._admission if route.shed else None
                inner = _api(inner, public=route.public, limited=not route.own_limit, early=early)
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
        # No route, no content coding to check: the body is read as sent, never decoded.
        api = _api(self._gated(_unmatched, None), public=True, early=self._admission)
        page = self._gated(_unmatched, None)
        cors = self.cors

        async def dispatch(request: web.Request) -> web.StreamResponse:
            # A preflight carries no token and is sent before each new kind of request: it is
            # neither rate limited nor shed.
            if cors is not None and cors.is_preflight(request):
                return cors.preflight(request, await allowed_methods(request))
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
            # the head is in: the connection's header deadline no longer applies; when the
            # head came in is the request's arrival (server/connections.py)
            head_arrived = getattr(request.protocol, "head_arrived", None)
            arrived = head_arrived() if head_arrived is not None else 0.0
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
            request[ARRIVED] = arrived or start
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
                    elif isinstance(exc, ClientClosedRequest) and not exc.quiet:
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
                            end + access_log.wall, "error" if status >= 500 else "info",
                            "surge.access", "request", req_meter.method, route,
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


def _body(
    handler: Handler,
    timeout_s: float,
    admission: Admission | None,
    trust_forwarded_for: bool,
    encoded: bool | None,
) -> Handler:
    """The request's body in memory before `handler` (the shed gate) runs: a body that trickles
    in holds its connection, never a slot. request.read() keeps the bytes, so the handler's own
    read returns them at once. While the admission queue is full, a request whose tenant holds
    its share of it is refused before its body is read. A request with a body arrives, for
    admission, once its body is in: an upload's time on the wire is not a wait for a slot.

    The bytes are kept as sent (the server does not decompress: server/encoding.py): a body in
    a Content-Encoding its route does not take (`encoded`) is refused 415 unread; one it takes
    is decoded by the handler, inside its slot. `encoded` None: not checked (the catch-all)."""
    clock = time.perf_counter

    async def body(request: web.Request) -> web.StreamResponse:
        if request.body_exists:
            if encoded is not None:
                check_coding(request, encoded)
            if (
                admission is not None
                and admission.queued
                and admission.queued >= admission.max_queue
            ):
                try:
                    admission.precheck(tenant_of(request, trust_forwarded_for))
                except Refused as exc:
                    _SHED[exc.reason].inc()
                    return overloaded(request)
            try:
                async with asyncio.timeout(timeout_s):
                    await request.read()  # 413 past client_max_size (MAX_BODY_BYTES)
            except TimeoutError:
                raise RequestTimeout(timeout_s) from None
            except ConnectionResetError:
                raise ClientClosedRequest() from None
            request[ARRIVED] = clock()
        return await handler(request)

    return body


_SHED = {reason: metrics.SHED.labels(reason) for reason in (QUEUE_FULL, DEADLINE, TENANT_SHARE)}


def tenant_of(request: web.Request, trust_forwarded_for: bool) -> str:
    """Whose share of the admission queue a request draws on: its principal's tenant, else its
    client address (each address a tenant of its own)."""
    principal: Principal | None = request.get(PRINCIPAL)
    if principal is not None:
        return principal.tenant_text
    return f"ip:{client_ip(request, trust_forwarded_for)}"


def _admit(handler: Handler, admission: Admission, trust_forwarded_for: bool) -> Handler:
    """A slot of `admission` around `handler`. A free slot and no queue (no load): two
    comparisons and an increment, the wait into its histogram, the latency into the limiter;
    else the queue (Admission.wait). The limiter also learns how long the request waited for
    the event loop before it got here (arrival to this layer, before any queue): the loop's
    backlog, which its latency counts too and a lower limit cannot shorten."""
    clock = admission.clock
    observe_wait = metrics.ADMISSION.observe

    async def admit(request: web.Request) -> web.StreamResponse:
        arrived = request[ARRIVED]
        if admission.in_flight < admission.limit and not admission.queued:
            # A free slot and nobody waiting: served, however late (a slow rate-limit check,
            # a lagging loop); the deadline is on waiting for a slot, as CoDel's on queueing.
            admission.in_flight += 1
            start = reached = clock()
        else:
            reached = clock()
            try:
                await admission.wait(tenant_of(request, trust_forwarded_for), arrived)
            except Refused as exc:
                _SHED[exc.reason].inc()
                return overloaded(request)
            start = clock()
        observe_wait(start - arrived)
        try:
            return await handler(request)
        finally:
            admission.release(start, reached - arrived)

    return admit


def _shed(handler: Handler, gate: FairGate) -> Handler:
    """The fixed gate (ADAPTIVE_CONCURRENCY=false): MAX_IN_FLIGHT slots, one FIFO queue, the
    wait bounded from when the request reaches the gate."""
    observe_wait = metrics.ADMISSION.observe

    async def shed(request: web.Request) -> web.StreamResponse:
        try:
            await gate.acquire()
        except TimeoutError:
            _SHED[DEADLINE].inc()
            return overloaded(request)
        observe_wait(time.perf_counter() - request[ARRIVED])
        try:
            return await handler(request)
        finally:
            gate.release()

    return shed


def _api(
    handler: Handler, *, public: bool, limited: bool = True, early: Admission | None = None
) -> Handler:
    """The token, revocation and rate-limit layer. `early`: the adaptive gate of a shed route;
    while it has no free slot, a request it would refuse whatever its tenant is refused here,
    before the token is verified, the revocation looked up and the rate-limit bucket charged,
    with no RateLimit-* headers: the limit was not consulted."""

    async def api(request: web.Request) -> web.StreamResponse:
        if early is not None and (early.queued or early.in_flight >= early.limit):
            reason = early.refuses_anyone(None if request.body_exists else request[ARRIVED])
            if reason is not None:
                _SHED[reason].inc()
                return overloaded(request)
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


def _conditional(handler: Handler) -> Handler:
    """A GET's answer with an ETag becomes 304 when If-None-Match names it (server/http.py)."""

    async def conditional(request: web.Request) -> web.StreamResponse:
        resp = await handler(request)
        condition = request.headers.get(IF_NONE_MATCH)
        return resp if condition is None else not_modified(resp, condition)

    return conditional


async def allowed_methods(request: web.Request) -> set[str]:
    """The methods the routes of the request's path answer (none: no route has the path)."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.canonical != "/{unmatched}":
            allowed |= (await resource.resolve(request))[1]
    return allowed


async def _unmatched(request: web.Request) -> web.StreamResponse:
    allowed = await allowed_methods(request)
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
    except TokenError as exc:  # only a refusal pays for the count, never a valid token
        metrics.AUTH_FAILURES.labels(exc.reason).inc()
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
    "overloaded",
    "rate_key",
    "tenant_of",
]

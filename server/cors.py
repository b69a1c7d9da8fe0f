"""CORS: browser apps on the origins in CORS_ALLOW_ORIGINS may call the API.

Two parts, both installed only when the setting names an origin, so a server without it runs
exactly the code it ran before:

- every answer (errors included: a browser app must be able to read a 401 or a 429 and its
  Retry-After) gets `Access-Control-Allow-Origin` and `Access-Control-Expose-Headers` when the
  request's Origin is allowed, from aiohttp's on_response_prepare signal, which also reaches
  streams that send their headers themselves;
- a preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered by the
  catch-all route (server/chain.py) before any token check, rate limit or shed gate: it
  carries no credentials, and a browser sends one before each new kind of request.

Surge's credential is a bearer token the app puts in `Authorization`, never a cookie, so no
answer says `Access-Control-Allow-Credentials`; with `*` the answer is `*`.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import hdrs, web

from server.errors import Forbidden

# What a frontend sends beyond the CORS-safelisted headers: the token, JSON bodies, the
# preconditions, the idempotency key, its own request id and a trace context.
ALLOW_HEADERS = (
    "Authorization, Content-Type, If-Match, If-None-Match, Idempotency-Key, X-Request-ID,"
    " traceparent"
)
# What a frontend needs to read from an answer: a browser hides every other header.
EXPOSE_HEADERS = (
    "ETag, Location, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, Retry-After,"
    " X-Request-ID"
)
# How long a browser may reuse a preflight's answer: a changed setting reaches browsers
# within ten minutes.
MAX_AGE = "600"
ANY = "*"


class Cors:
    def __init__(self, origins: Iterable[str]) -> None:
        self.origins = frozenset(origins)
        self.any = ANY in self.origins

    def allow_origin(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin an answer to `origin` carries; None: none."""
        if origin is None:
            return None
        if self.any:
            return ANY
        return origin if origin in self.origins else None

    async def on_prepare(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        headers = response.headers
        if not self.any:
            # The answer depends on Origin: a shared cache must not hand one origin's answer
            # (with or without the header) to another.
            vary = headers.get(hdrs.VARY)
            if vary is None:
                headers[hdrs.VARY] = hdrs.ORIGIN
            elif "origin" not in vary.lower():
                headers[hdrs.VARY] = f"{vary}, {hdrs.ORIGIN}"
        allowed = self.allow_origin(request.headers.get(hdrs.ORIGIN))
        if allowed is not None:
            headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allowed
            headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSE_HEADERS

    @staticmethod
    def is_preflight(request: web.Request) -> bool:
        headers = request.headers
        return (
            request.method == hdrs.METH_OPTIONS
            and hdrs.ORIGIN in headers
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in headers
        )

    def preflight(self, request: web.Request, methods: set[str]) -> web.Response:
        """204 with what the path allows; 404 for a path that does not exist. An origin not
        allowed is 403 without CORS headers: the browser fails the preflight either way, and
        the status says why to whoever reads the network panel or a curl."""
        if self.allow_origin(request.headers.get(hdrs.ORIGIN)) is None:
            raise Forbidden("this origin is not in CORS_ALLOW_ORIGINS")
        if not methods:
            raise web.HTTPNotFound()
        resp = web.Response(status=204)
        resp.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = ", ".join(sorted(methods))
        resp.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ALLOW_HEADERS
        resp.headers[hdrs.ACCESS_CONTROL_MAX_AGE] = MAX_AGE
        return resp


__all__ = ["ALLOW_HEADERS", "EXPOSE_HEADERS", "MAX_AGE", "Cors"]

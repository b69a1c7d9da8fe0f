"""A route and its policy: what the chain (server/chain.py) does around its handler.

Every route is an API call unless it says otherwise: shed under overload, rate limited, and
refused without a valid access token. The URL map (handlers/__init__.py) declares the
exceptions next to each route, so no other place needs to know which paths are which.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import cast

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A handler that never waits may be a plain function: the chain calls it without a coroutine.
PlainHandler = Callable[[web.Request], web.StreamResponse]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler | PlainHandler
    # No access token needed; still shed and rate limited (signup, login, the webhook).
    public: bool = False
    # Probes, the scrape and the docs: never shed, rate limited or authenticated, so an
    # overloaded process still answers its load balancer and its Prometheus.
    ops: bool = False
    # A page for a browser (the GraphQL explorer, the SDL): shed, but no token and no limit.
    page: bool = False
    # A long-lived stream: not shed (it would hold a slot for its whole life); its own limit
    # caps it (EVENTS_LIVE_MAX_CLIENTS).
    stream: bool = False
    # The handler is a plain function that never waits (see PlainHandler).
    plain: bool = False
    # Public, and kept out of the general per-address bucket: the handler takes from a bucket
    # of its own once it knows who calls (the payment webhook, after its signature check), so
    # neither a shop's load from a shared address nor an unsigned flood spends the provider's.
    own_limit: bool = False
    # Takes a body in a Content-Encoding (server/encoding.py CODINGS), decoded by its handler
    # once shed admitted it; every other route refuses an encoded body with 415.
    encoded: bool = False

    @property
    def api(self) -> bool:
        """Rate limited, authenticated unless public, and answered with RateLimit-* headers."""
        return not (self.ops or self.page)

    @property
    def shed(self) -> bool:
        return not (self.ops or self.stream)


def route(
    method: str,
    path: str,
    handler: Handler | PlainHandler,
    *,
    public: bool = False,
    ops: bool = False,
    page: bool = False,
    stream: bool = False,
    plain: bool = False,
    own_limit: bool = False,
    encoded: bool = False,
) -> Route:
    if plain == inspect.iscoroutinefunction(handler):
        kind = "a plain function" if plain else "a coroutine function (or mark it plain=True)"
        raise TypeError(f"{method} {path}: {handler!r} is not {kind}")
    if sum((public, ops, page, own_limit)) > 1:
        raise TypeError(f"{method} {path}: public, ops, page and own_limit exclude each other")
    return Route(
        method, path, handler, own_limit or public, ops, page, stream, plain, own_limit, encoded
    )


def handler_of(route: Route) -> Handler:
    """The route's handler typed as a coroutine function; only for a route that is not plain."""
    assert not route.plain
    return cast(Handler, route.handler)


def plain_handler_of(route: Route) -> PlainHandler:
    assert route.plain
    return cast(PlainHandler, route.handler)


get = partial(route, "GET")
post = partial(route, "POST")
put = partial(route, "PUT")
patch = partial(route, "PATCH")
delete = partial(route, "DELETE")


__all__ = ["Handler", "PlainHandler", "Route", "delete", "get", "patch", "post", "put", "route"]

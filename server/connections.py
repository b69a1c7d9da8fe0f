"""The listener and its connections: aiohttp's RequestHandler with the bounds it lacks.

aiohttp bounds an idle keep-alive connection (KEEPALIVE_TIMEOUT_S) but has no deadline for a
request head and no cap per client address. `Connection` adds both, and answers a malformed
head itself (problem+json, one warning) instead of aiohttp's text/plain 400 and traceback:

- HEADER_TIMEOUT_S: a connection whose first request head is not in this long after it opened
  (after the TLS handshake, which has the same deadline) is closed. The chain tells the
  connection when a head is in (`head_arrived`); later heads on a kept-alive connection are
  bounded by the keep-alive timeout, which aiohttp applies between requests.
- MAX_CONNECTIONS_PER_IP: a connection from an address that already holds that many in this
  process is closed at once, before anything is read or written: answering it would spend
  work on the address that is over its share, and a 503 written while its request is unread
  can be lost to the reset the close then sends. Off when the peer is a trusted proxy
  (TRUST_FORWARDED_FOR): every connection then comes from the proxy's few addresses.

`Listener` is aiohttp's TCPSite with `Connection` as the protocol: the one public way to
choose the protocol a site serves with is a site of one's own (web.BaseSite).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from ssl import SSLContext
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod
from aiohttp.web_request import BaseRequest
from yarl import URL

from server import metrics
from server.chain import NOSNIFF, X_CONTENT_TYPE_OPTIONS, X_REQUEST_ID, new_request_id
from server.errors import problem_response

log = logging.getLogger("surge")

WARN_EVERY_S = 60.0


class ConnectionLimits:
    """One process's connection bounds and its count of open connections per address."""

    def __init__(self, header_timeout_s: float, max_per_address: int) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_per_address = max_per_address  # 0: no cap
        self.open: dict[str, int] = {}
        # when each address at its cap was last warned about: once a minute at most, so an
        # address that keeps reconnecting at its cap cannot flood the log
        self.warned: dict[str, float] = {}


class Connection(web.RequestHandler):
    """One client connection (aiohttp's RequestHandler, with the bounds above)."""

    __slots__ = ("_address", "_head_timer", "_last_read", "_limits", "_refused")

    def __init__(self, manager: web.Server, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._address: str | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._last_read = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._limits.max_per_address and not self._admit(transport):
            self._refused = True
            cast(asyncio.Transport, transport).abort()
            return
        super().connection_made(transport)
        self._head_timer = asyncio.get_running_loop().call_later(
            self._limits.header_timeout_s, self._head_too_late
        )

    def _admit(self, transport: asyncio.BaseTransport) -> bool:
        """Count this connection against its address's cap; False when the address is at it."""
        peer = transport.get_extra_info("peername")
        if not isinstance(peer, tuple):
            return True  # not an IP connection: no address to count
        address, limits = peer[0], self._limits
        count = limits.open.get(address, 0)
        if count >= limits.max_per_address:
            metrics.CONNECTIONS_DROPPED.labels("per_address_cap").inc()
            now = time.monotonic()
            if now - limits.warned.get(address, -WARN_EVERY_S) >= WARN_EVERY_S:
                limits.warned[address] = now
                log.warning(
                    "connections from %s: %s open, MAX_CONNECTIONS_PER_IP reached;"
                    " its new ones are closed at once",
                    address,
                    count,
                )
            return False
        limits.open[address] = count + 1
        self._address = address
        return True

    def data_received(self, data: bytes) -> None:
        # When the bytes read last came in: the earliest public point at which a request is
        # known to have reached the process (aiohttp keeps no arrival time of its own).
        self._last_read = time.perf_counter()
        super().data_received(data)

    def head_arrived(self) -> float:
        """Called by the chain for every request it gets: a head came in whole. Returns when
        the last bytes were read (time.perf_counter()): the head came in at that read or an
        earlier one, so it is never earlier than the head's arrival (with no pipelining, and
        the body in the head's packet, it is the arrival); the time the request waited in the
        event loop before the chain ran counts in its admission wait."""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        return self._last_read

    def _head_too_late(self) -> None:
        self._head_timer = None
        metrics.CONNECTIONS_DROPPED.labels("header_timeout").inc()
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._refused:
            return  # aiohttp never saw this connection
        address = self._address
        if address is not None:
            self._address = None
            limits = self._limits
            left = limits.open[address] - 1
            if left:
                limits.open[address] = left
            else:  # the address is gone: forget it
                del limits.open[address]
                limits.warned.pop(address, None)
        super().connection_lost(exc)

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """aiohttp's, then: an answer that closes its connection (a 408) while the body is
        still coming closes it now. aiohttp would first go on reading that body for up to
        lingering_time, from a client already found too slow."""
        answer = await super().finish_response(request, resp, start_time)
        if resp.keep_alive is False and not request.content.is_eof():
            self.force_close()  # the answer is written: the transport flushes it, then closes
        return answer

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not hand to the app. A head that does not
        parse is the client's fault: a problem+json 400 and one warning that repeats none of it
        (it may hold anything, card numbers included). Anything else stays aiohttp's."""
        if status != 400:
            return super().handle_error(request, status, exc, message)
        rid = new_request_id()
        # Not HTTP at all (TLS to the plain port, a scanner's probe): noise on any public
        # address, as aiohttp itself judges it; a debug line only.
        level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.WARNING
        log.log(
            level,
            "malformed request head from %s (%s): answered 400 (request %s)",
            request.remote,
            type(exc).__name__ if exc is not None else "unknown",
            rid,
        )
        resp = problem_response(400, "the request head is malformed", rid)
        resp.headers[X_REQUEST_ID] = rid
        resp.headers[X_CONTENT_TYPE_OPTIONS] = NOSNIFF
        resp.headers["Connection"] = "close"  # said even to HTTP/1.0, which aiohttp assumes
        resp.force_close()
        return resp


class Listener(web.BaseSite):
    """A TCP listener serving each connection with `Connection`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        limits: ConnectionLimits,
        handler_args: dict[str, Any],
        *,
        ssl_context: SSLContext | None = None,
        backlog: int = 2048,
        reuse_port: bool | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._limits = limits
        self._handler_args = handler_args  # as given to the AppRunner: aiohttp's own handler's
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return str(URL.build(scheme=scheme, host=self._host, port=self._port))

    @property
    def sockets(self) -> list[socket.socket]:
        return list(cast(asyncio.Server, self._server).sockets) if self._server is not None else []

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None, "the runner is set up first"
        loop = asyncio.get_running_loop()
        limits, kwargs = self._limits, self._handler_args

        def protocol() -> Connection:
            return Connection(server, limits, loop=loop, **kwargs)

        self._server = await loop.create_server(
            protocol,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
            ssl_handshake_timeout=limits.header_timeout_s if self._ssl_context else None,
        )
        if self._port == 0:
            self._port = self.sockets[0].getsockname()[1]

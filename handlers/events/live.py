"""The live stream (GET /v1/analytics/live) and its hub: one poller per tenant per process. Each
second it reads the tenant's per-second counts from Redis once and fans the message out to
every open stream of that tenant, so a thousand dashboards cost one Redis read a second, not a
thousand queries.

What a stream may cost is bounded (docs/EVENTS.md): streams per process, per tenant and per
user; names per message (the most frequent EVENTS_LIVE_TOP_NAMES); and unsent bytes per stream
(EVENTS_LIVE_BUFFER_BYTES, also its socket's send buffer): a consumer that falls behind it, or
whose write does not complete within WRITE_TIMEOUT_S, is dropped, not buffered for. A stream
also ends when its access token expires or is revoked, with a `reauthenticate` event first."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any
from uuid import UUID

import orjson
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from handlers.events.counters import second_key
from server import metrics
from server.chain import NOSNIFF, ClientClosedRequest, bearer_principal
from server.errors import ServiceUnavailable, TooManyRequests
from server.http import timestamp
from server.keys import RATELIMIT_HEADERS, REQUEST_ID, REVOCATIONS
from server.principal import Principal
from server.state import Lifecycle

log = logging.getLogger("surge.events")

# The live poller reads second s at s + 1.25: commits that started within s have reached
# Redis by then (a flush takes milliseconds), even with a little clock skew between replicas.
LIVE_DELAY_S = 1.25
LIVE_QUEUE = 8  # messages a slow client may fall behind before the oldest are dropped
# A stream's token (expiry, revocation) is checked with each message, and at least this often.
AUTHORITY_CHECK_S = 1.0
# A write waits only while the socket is full: past this the consumer is stalled.
WRITE_TIMEOUT_S = 5.0
RETRY_AFTER_S = 5
RETRY = b"retry: 2000\n\n"

Subscriber = asyncio.Queue[bytes | None]  # None: the stream is over


class SlowConsumer(Exception):
    """The client does not read fast enough: it is dropped rather than buffered for."""


def _offer(queue: Subscriber, message: bytes | None) -> None:
    """Never block the poller on a slow client: drop its oldest message instead."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(message)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def counts_message(at: str, counts: dict[str, int], top: int) -> bytes:
    """An `event: counts` message: the `top` most frequent names; what is left out is summed
    in `omitted`, so a message's size does not grow with a tenant's names."""
    data: dict[str, Any] = {"ts": at, "counts": counts}
    if len(counts) > top:
        kept = heapq.nlargest(top, counts.items(), key=itemgetter(1))
        data["counts"] = dict(kept)
        data["omitted"] = {
            "names": len(counts) - top,
            "count": sum(counts.values()) - sum(n for _, n in kept),
        }
    return b"event: counts\ndata: " + orjson.dumps(data) + b"\n\n"


def reauthenticate_message(reason: str) -> bytes:
    """The last message of a stream whose token expired or was revoked: reconnect with a fresh
    access token (refresh, or log in again)."""
    return b"event: reauthenticate\ndata: " + orjson.dumps({"reason": reason}) + b"\n\n"


class _Feed:
    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()
        self.task: asyncio.Task[None] | None = None


class LiveHub:
    """Per-second counts by event name, fanned out to every live stream of a tenant."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        lifecycle: Lifecycle,
        *,
        max_clients: int,
        max_per_tenant: int,
        max_per_user: int,
        buffer_bytes: int,
        top_names: int,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.lifecycle = lifecycle
        self.max_clients = max_clients
        self.max_per_tenant = max_per_tenant
        self.max_per_user = max_per_user
        self.buffer_bytes = buffer_bytes
        self.top_names = top_names
        self.clients = 0
        self.per_user: dict[UUID, int] = {}
        self.feeds: dict[UUID, _Feed] = {}

    async def serve(self, request: web.Request, p: Principal) -> web.StreamResponse:
        """The stream of `p`'s tenant, until the client leaves, the server drains, the consumer
        falls behind or `p`'s token lapses."""
        queue = self.subscribe(p)
        resp = web.StreamResponse(headers=_stream_headers(request))
        try:
            with _client_gone():
                await resp.prepare(request)
                transport = request.transport
                if transport is None:
                    raise ConnectionResetError("gone before the first message")
            _bound_send_buffer(transport, self.buffer_bytes)
            await self._pump(request, p, resp, transport, queue)
        except SlowConsumer as exc:
            metrics.LIVE_CLOSED.labels("slow").inc()
            log.warning(
                "live stream dropped, its client is not reading: %s (tenant %s, request %s)",
                exc, p.tenant_id, request[REQUEST_ID],
            )  # fmt: skip
            if request.transport is not None:
                request.transport.abort()  # its unsent bytes are freed now, not flushed
        finally:
            self.unsubscribe(p, queue)
        return resp

    async def _pump(
        self,
        request: web.Request,
        p: Principal,
        resp: web.StreamResponse,
        transport: asyncio.Transport,
        queue: Subscriber,
    ) -> None:
        await self._write(resp, transport, RETRY)
        while True:
            message: bytes | None = b""
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(AUTHORITY_CHECK_S):
                    message = await queue.get()
            lapsed = await _lapsed(request, p)
            if lapsed is not None:
                metrics.LIVE_CLOSED.labels(lapsed).inc()
                await self._write(resp, transport, reauthenticate_message(lapsed))
                break
            if message is None:
                break
            if message:
                await self._write(resp, transport, message)
        with _client_gone():
            await resp.write_eof()

    async def _write(
        self, resp: web.StreamResponse, transport: asyncio.Transport, data: bytes
    ) -> None:
        try:
            with _client_gone():
                async with asyncio.timeout(WRITE_TIMEOUT_S):
                    await resp.write(data)
        except TimeoutError:
            raise SlowConsumer(f"a write did not complete within {WRITE_TIMEOUT_S:g} s") from None
        if transport.get_write_buffer_size() > self.buffer_bytes:
            raise SlowConsumer(f"more than {self.buffer_bytes} bytes unsent")

    def subscribe(self, p: Principal) -> Subscriber:
        """A queue of the tenant's messages; 429 past the caller's or its tenant's share of
        streams (theirs to close), 503 past the process's (the server's capacity)."""
        tenant_id = p.tenant_id
        feed = self.feeds.get(tenant_id)
        if self.per_user.get(p.user_id, 0) >= self.max_per_user:
            metrics.LIVE_REFUSED.labels("user").inc()
            raise TooManyRequests(
                f"you have {self.max_per_user} live streams open, the most allowed; close one "
                "or retry later",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        if feed is not None and len(feed.subscribers) >= self.max_per_tenant:
            metrics.LIVE_REFUSED.labels("tenant").inc()
            raise TooManyRequests(
                f"your tenant has {self.max_per_tenant} live streams open on this server, the "
                "most allowed; close one or retry later",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        if self.clients >= self.max_clients or self.lifecycle.draining:
            metrics.LIVE_REFUSED.labels("process").inc()
            raise ServiceUnavailable(
                "too many live streams are open; retry later", retry_after=RETRY_AFTER_S
            )
        queue: Subscriber = asyncio.Queue(LIVE_QUEUE)
        if feed is None:
            feed = self.feeds[tenant_id] = _Feed()
            feed.task = asyncio.create_task(self._poll(tenant_id, feed))
        feed.subscribers.add(queue)
        self.per_user[p.user_id] = self.per_user.get(p.user_id, 0) + 1
        self.clients += 1
        metrics.LIVE_CLIENTS.set(self.clients)
        return queue

    def unsubscribe(self, p: Principal, queue: Subscriber) -> None:
        feed = self.feeds.get(p.tenant_id)
        if feed is None or queue not in feed.subscribers:
            return
        feed.subscribers.discard(queue)
        if (left := self.per_user[p.user_id] - 1) > 0:
            self.per_user[p.user_id] = left
        else:
            del self.per_user[p.user_id]
        self.clients -= 1
        metrics.LIVE_CLIENTS.set(self.clients)
        if not feed.subscribers:
            del self.feeds[p.tenant_id]
            if feed.task is not None:
                feed.task.cancel()

    async def _poll(self, tenant_id: UUID, feed: _Feed) -> None:
        tenant = str(tenant_id)
        second = int(time.time())  # the second whose counts go out next
        while not self.lifecycle.draining:
            await asyncio.sleep(max(0.0, second + LIVE_DELAY_S - time.time()))
            if self.lifecycle.draining:
                break
            try:
                raw = await self.redis.hgetall(second_key(self.prefix, tenant, second))
            except (RedisError, OSError):
                metrics.EVENT_COUNTER_ERRORS.inc()
                raw = {}
            counts = {_text(k): int(v) for k, v in raw.items()}
            at = timestamp(datetime.fromtimestamp(second, UTC))
            message = counts_message(at, counts, self.top_names)
            for queue in feed.subscribers:
                _offer(queue, message)
            # After a stall (a paused process) resume at the present, not replay every second.
            second = max(second + 1, int(time.time() - LIVE_DELAY_S))
        for queue in feed.subscribers:
            _offer(queue, None)

    async def close(self) -> None:
        feeds, self.feeds = list(self.feeds.values()), {}
        for feed in feeds:
            if feed.task is not None:
                feed.task.cancel()
            for queue in feed.subscribers:
                _offer(queue, None)
        for feed in feeds:
            if feed.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await feed.task


@contextlib.contextmanager
def _client_gone() -> Iterator[None]:
    """A write to a client that has gone: aiohttp raises ConnectionResetError, or
    ConnectionError("Connection lost") when the write was waiting for the socket to drain.
    A stream ends this way as a rule (a dashboard closed): a quiet 499."""
    try:
        yield
    except ConnectionError:
        raise ClientClosedRequest("the client hung up mid-stream", quiet=True) from None


async def _lapsed(request: web.Request, p: Principal) -> str | None:
    """Why the stream's authority has lapsed ("expired", "revoked"), or None: its token is
    verified again (from the token cache, until it expires) and checked against revocations as
    a new request's would be."""
    if bearer_principal(request) is None:
        return "expired"
    revocations = request.app[REVOCATIONS]
    if not revocations.allows(p) and not await revocations.confirm(p):
        return "revoked"
    return None


def _bound_send_buffer(transport: asyncio.Transport, size: int) -> None:
    """A fixed kernel send buffer: left to autotuning, a socket nobody reads from grows its
    buffer to megabytes of kernel memory."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _stream_headers(request: web.Request) -> dict[str, str]:
    return {
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # proxies must pass each message on at once
        "X-Content-Type-Options": NOSNIFF,
        # The chain sets these on the response it gets back, when a stream has long sent its
        # headers; this one is prepared here, so it carries them itself.
        "X-Request-ID": request[REQUEST_ID],
        **request.get(RATELIMIT_HEADERS, {}),
    }

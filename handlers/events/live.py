"""The live stream's hub (GET /v1/analytics/live): one poller per tenant per process. Each
second it reads the tenant's per-second counts from Redis once and fans the message out to
every open stream of that tenant, so a thousand dashboards cost one Redis read a second, not a
thousand queries."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from uuid import UUID

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from handlers.events.counters import second_key
from server import metrics
from server.errors import ServiceUnavailable
from server.http import timestamp
from server.state import Lifecycle

# The live poller reads second s at s + 1.25: commits that started within s have reached
# Redis by then (a flush takes milliseconds), even with a little clock skew between replicas.
LIVE_DELAY_S = 1.25
LIVE_QUEUE = 8  # messages a slow client may fall behind before the oldest are dropped

Subscriber = asyncio.Queue[bytes | None]  # None: the stream is over


def _offer(queue: Subscriber, message: bytes | None) -> None:
    """Never block the poller on a slow client: drop its oldest message instead."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(message)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Feed:
    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()
        self.task: asyncio.Task[None] | None = None


class LiveHub:
    """Per-second counts by event name, fanned out to every live stream of a tenant."""

    def __init__(self, redis: Redis, prefix: str, lifecycle: Lifecycle, max_clients: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.lifecycle = lifecycle
        self.max_clients = max_clients
        self.clients = 0
        self.feeds: dict[UUID, _Feed] = {}

    def subscribe(self, tenant_id: UUID) -> Subscriber:
        if self.clients >= self.max_clients or self.lifecycle.draining:
            raise ServiceUnavailable("too many live streams are open; retry later", retry_after=5)
        queue: Subscriber = asyncio.Queue(LIVE_QUEUE)
        feed = self.feeds.get(tenant_id)
        if feed is None:
            feed = self.feeds[tenant_id] = _Feed()
            feed.task = asyncio.create_task(self._poll(tenant_id, feed))
        feed.subscribers.add(queue)
        self.clients += 1
        metrics.LIVE_CLIENTS.set(self.clients)
        return queue

    def unsubscribe(self, tenant_id: UUID, queue: Subscriber) -> None:
        feed = self.feeds.get(tenant_id)
        if feed is None or queue not in feed.subscribers:
            return
        feed.subscribers.discard(queue)
        self.clients -= 1
        metrics.LIVE_CLIENTS.set(self.clients)
        if not feed.subscribers:
            del self.feeds[tenant_id]
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
            data = orjson.dumps({"ts": at, "counts": counts})
            message = b"event: counts\ndata: " + data + b"\n\n"
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

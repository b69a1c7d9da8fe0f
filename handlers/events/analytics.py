"""GET /v1/analytics/counts and GET /v1/analytics/live.

Counts come from one-minute rollups: Redis answers for the last hour (the minutes a dashboard
polls), PostgreSQL's event_counts for everything else, and for all of it when Redis fails.

The live stream is one poller per tenant per process: each second it reads the tenant's
per-second counts from Redis once and fans the message out to every open stream of that
tenant, so a thousand dashboards cost one Redis read a second, not a thousand queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

import orjson
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from db import events
from db.pool import Database
from handlers.events.api import NAME_RE
from handlers.events.ingest import MINUTE_WINDOW_S, minute_key, parse_ts, second_key
from handlers.events.keys import LIVE_HUB
from server import metrics, rbac
from server.errors import ServiceUnavailable, ValidationFailed
from server.http import json_response, timestamp
from server.keys import CONFIG, LIFECYCLE, PG_READ, RATELIMIT_HEADERS, REDIS, REQUEST_ID
from server.state import Lifecycle

log = logging.getLogger("surge.analytics")

BUCKETS = {"1m": 60, "1h": 3600, "1d": 86400}
MAX_BUCKETS = 1440  # a day of minutes, two months of hours, four years of days
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")

# The live poller reads second s at s + 1.25: commits that started within s have reached
# Redis by then (a flush takes milliseconds), even with a little clock skew between replicas.
LIVE_DELAY_S = 1.25
LIVE_QUEUE = 8  # messages a slow client may fall behind before the oldest are dropped


# --- counts ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CountsQuery:
    name: str
    start: int  # epoch seconds, aligned to the bucket
    end: int  # exclusive, aligned
    bucket: int  # seconds


def _epoch(raw: str | None, field: str, errors: list[dict[str, str]]) -> int | None:
    if raw is None:
        return None
    # A '+' of an offset arrives as a space unless the client escaped it; RFC 3339 as
    # accepted here has no space, so it can only be that.
    parsed = parse_ts(raw.replace(" ", "+"))
    if parsed is None:
        errors.append({"field": field, "message": "must be an RFC 3339 timestamp"})
        return None
    return int(parsed.timestamp())


def parse_counts_query(request: web.Request, now: float) -> CountsQuery:
    q = request.query
    errors: list[dict[str, str]] = []
    name = q.get("name")
    if name is None:
        errors.append({"field": "name", "message": "is required"})
    elif not (1 <= len(name) <= 64 and name[0].isalpha() and set(name) <= _NAME_CHARS):
        errors.append({"field": "name", "message": f"must match ^{NAME_RE}$"})
    bucket_raw = q.get("bucket", "1m")
    bucket = BUCKETS.get(bucket_raw)
    if bucket is None:
        errors.append({"field": "bucket", "message": "must be one of 1m, 1h, 1d"})
        bucket = 60
    end = _epoch(q.get("to"), "to", errors)
    start = _epoch(q.get("from"), "from", errors)
    if errors:
        raise ValidationFailed(errors, "invalid query parameter")
    assert name is not None
    end = int(now) if end is None else end
    end = -(-end // bucket) * bucket  # the bucket holding `to` is included
    start = end - 60 * bucket if start is None else start - start % bucket
    if start >= end:
        raise ValidationFailed(
            [{"field": "from", "message": "must be before to"}], "invalid query parameter"
        )
    if (end - start) // bucket > MAX_BUCKETS:
        raise ValidationFailed(
            [{"field": "from", "message": f"the range spans more than {MAX_BUCKETS} buckets"}],
            "invalid query parameter",
        )
    return CountsQuery(name, start, end, bucket)


def _dt(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


async def _redis_minutes(
    redis: Redis, prefix: str, tenant: str, name: str, minutes: range
) -> list[int]:
    async with redis.pipeline(transaction=False) as pipe:
        for m in minutes:
            pipe.hget(minute_key(prefix, tenant, m), name)
        values = await pipe.execute()
    return [int(v) if v is not None else 0 for v in values]


async def bucket_counts(
    pg: Database, redis: Redis, prefix: str, tenant_id: UUID, q: CountsQuery, now: float
) -> list[tuple[int, int]]:
    """[(bucket start, count)] for every bucket of the query, zeros included."""
    window_end = int(now) - int(now) % 60 + 60  # the current minute is the window's last
    window_start = window_end - MINUTE_WINDOW_S
    lo, hi = max(q.start, window_start), min(q.end, window_end)
    totals: dict[int, int] = {}
    skip = (window_start, window_start)  # nothing left to Redis: PostgreSQL counts everything
    if lo < hi:
        minutes = range(lo, hi, 60)
        try:
            values = await _redis_minutes(redis, prefix, str(tenant_id), q.name, minutes)
        except (RedisError, OSError):
            metrics.EVENT_COUNTER_ERRORS.inc()
            log.warning("live counts unavailable from Redis; reading PostgreSQL", exc_info=True)
        else:
            skip = (lo, hi)
            for m, c in zip(minutes, values, strict=True):
                b = m - m % q.bucket
                totals[b] = totals.get(b, 0) + c
    rows = await events.count_buckets(
        pg,
        tenant_id,
        q.name,
        _dt(q.start),
        timedelta(seconds=q.bucket),
        _dt(q.end),
        _dt(skip[0]),
        _dt(skip[1]),
    )
    for row in rows:
        b = int(row["bucket"].timestamp())
        totals[b] = totals.get(b, 0) + row["count"]
    return [(b, totals.get(b, 0)) for b in range(q.start, q.end, q.bucket)]


async def get_counts(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    now = time.time()
    q = parse_counts_query(request, now)
    config = request.app[CONFIG]
    buckets = await bucket_counts(
        request.app[PG_READ], request.app[REDIS], config.redis_key_prefix, p.tenant_id, q, now
    )
    return json_response({"buckets": [{"ts": timestamp(_dt(b)), "count": c} for b, c in buckets]})


# --- live ------------------------------------------------------------------------------------

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
            data = orjson.dumps({"ts": timestamp(_dt(second)), "counts": counts})
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


async def live(request: web.Request) -> web.StreamResponse:
    p = rbac.caller(request)
    hub = request.app[LIVE_HUB]
    queue = hub.subscribe(p.tenant_id)
    try:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # proxies must pass each message on at once
                # The pipeline sets these on the response it gets back, when a stream has long
                # sent its headers; this one is prepared here, so it carries them itself.
                "X-Request-ID": request[REQUEST_ID],
                **request.get(RATELIMIT_HEADERS, {}),
            }
        )
        await resp.prepare(request)
        await resp.write(b"retry: 2000\n\n")
        while (message := await queue.get()) is not None:
            await resp.write(message)
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client went away: nothing left to tell it
    finally:
        hub.unsubscribe(p.tenant_id, queue)
    return resp


async def live_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    app[LIVE_HUB] = LiveHub(
        app[REDIS], config.redis_key_prefix, app[LIFECYCLE], config.events_live_max_clients
    )
    try:
        yield
    finally:
        await app[LIVE_HUB].close()

"""The Redis counters fed after each commit: per-second counts (for GET /v1/analytics/live) and
per-minute counts for the last hour (GET /v1/analytics/counts), and their keys."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from db.events import MinuteCounts
from server import metrics

log = logging.getLogger("surge.events")

# Per-second counts are by arrival, kept two minutes; per-minute counts are by event time for
# the last hour, kept an hour past their minute plus a margin for clock skew between replicas.
SECOND_TTL_S = 120
MINUTE_WINDOW_S = 3600
MINUTE_KEEP_S = MINUTE_WINDOW_S + 300


def second_key(prefix: str, tenant_id: str, second: int) -> str:
    return f"{prefix}ev:s:{tenant_id}:{second}"


def minute_key(prefix: str, tenant_id: str, minute: int) -> str:
    return f"{prefix}ev:m:{tenant_id}:{minute}"


class EventCounters:
    """Per-second and per-minute counts in Redis, updated after each commit.

    `add` merges into dicts and returns a future that is done once those counts have been
    sent; one task pushes whatever has accumulated in one pipeline, so under load many commits
    share one round trip. The writer answers its requests when that future is done, so a read
    after a 202 sees the events (read-your-writes); the client's socket timeouts bound how long
    a slow Redis can hold it. What fails to reach Redis is lost to Redis only: the rollups in
    PostgreSQL have it, and reads fall back to them while Redis fails.
    """

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._seconds: dict[tuple[str, int, str], int] = {}
        self._minutes: MinuteCounts = {}
        self._sent: asyncio.Future[None] | None = None  # done once the dicts' counts are sent
        # The last push failed: 202s do not wait on a Redis that is away (reads fall back to
        # PostgreSQL then), until a push gets through again.
        self._failing = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task = asyncio.create_task(self._run())

    def add(self, counts: MinuteCounts) -> asyncio.Future[None]:
        now = time.time()
        second = int(now)
        oldest = now - MINUTE_KEEP_S  # older minutes are answered by PostgreSQL only
        for (tenant, name, minute), n in counts.items():
            skey = (tenant, second, name)
            self._seconds[skey] = self._seconds.get(skey, 0) + n
            if minute.timestamp() >= oldest:
                mkey = (tenant, name, minute)
                self._minutes[mkey] = self._minutes.get(mkey, 0) + n
        if self._sent is None:
            self._sent = asyncio.get_running_loop().create_future()
            if self._failing or self._task.done():  # no 202 waits on a failing or closed Redis
                _resolve(self._sent)
        self._idle.clear()
        self._wake.set()
        return self._sent

    async def flushed(self) -> None:
        """Wait until everything added so far has been sent (or has failed to be)."""
        await self._idle.wait()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            seconds, self._seconds = self._seconds, {}
            minutes, self._minutes = self._minutes, {}
            sent, self._sent = self._sent, None
            try:
                await self._push(seconds, minutes)
                self._failing = False
            except (RedisError, OSError):
                self._failing = True
                metrics.EVENT_COUNTER_ERRORS.inc()
                log.warning("event counters not updated in Redis", exc_info=True)
            except Exception:  # the loop must live on: the writer's requests wait for it
                self._failing = True
                metrics.EVENT_COUNTER_ERRORS.inc()
                log.exception("event counters not updated in Redis")
            finally:
                _resolve(sent)
            if not self._wake.is_set():
                self._idle.set()

    async def _push(self, seconds: dict[tuple[str, int, str], int], minutes: MinuteCounts) -> None:
        expiries: dict[str, int] = {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for (tenant, second, name), n in seconds.items():
                key = second_key(self.prefix, tenant, second)
                pipe.hincrby(key, name, n)
                expiries[key] = second + SECOND_TTL_S
            for (tenant, name, minute), n in minutes.items():
                m = int(minute.timestamp())
                key = minute_key(self.prefix, tenant, m)
                pipe.hincrby(key, name, n)
                expiries[key] = m + MINUTE_KEEP_S
            for key, at in expiries.items():
                pipe.expireat(key, at)
            await pipe.execute()

    async def close(self) -> None:
        if self._seconds or self._minutes:
            self._wake.set()
        # Also when nothing is left to send: a push may be in flight, and a cancellation that
        # lands inside redis-py's pipeline can be swallowed, leaving the task waiting forever.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flushed(), 2.0)
        self._task.cancel()
        await asyncio.wait({self._task}, timeout=1.0)
        _resolve(self._sent)  # nobody waits for a push that will not come


def _resolve(sent: asyncio.Future[None] | None) -> None:
    if sent is not None and not sent.done():
        sent.set_result(None)

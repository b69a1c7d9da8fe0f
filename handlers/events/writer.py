"""The group-commit writer behind POST /v1/events.

A 202 means committed. Requests hand their events to one EventWriter per process and wait;
the writer's connections each take whatever is pending, COPY it in one transaction with its
one-minute rollups, commit, and wake every request whose events rode along. The pending
buffer is bounded (EVENTS_MAX_PENDING): past it a request is refused with 503 before anything
of it is buffered, so memory cannot grow with a stalled database.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import asyncpg

from db import events
from db.events import CopyRecord, MinuteCounts
from db.pool import Database, unavailable
from handlers.events.counters import EventCounters
from handlers.events.partitions import maintain_partitions
from server import metrics
from server.errors import ServiceUnavailable

log = logging.getLogger("surge.events")


class EventWriter:
    """Group commit: every request's events join the pending batch; each of the writer's
    connections takes the whole batch when it is due (EVENTS_FLUSH_MS after its first event, or
    at once past EVENTS_BATCH_SIZE) and commits it with one COPY. While a COPY runs the next
    batch grows, so batches get bigger exactly when the database is the bottleneck.

    `pool` is db.pool.open_copy_pool's: its connections carry the codecs COPY is fed with."""

    def __init__(
        self,
        pool: Database,
        counters: EventCounters,
        pg: Database,
        *,
        flush_ms: int,
        batch_size: int,
        max_pending: int,
        writers: int,
    ) -> None:
        self.pool = pool
        self.counters = counters
        self.pg = pg
        self.flush_s = flush_ms / 1000
        self.batch_size = batch_size
        self.max_pending = max_pending
        # Rollup rows are per shard, so replicas rarely update the same row (0003_events.sql).
        self.shard = random.randrange(32)
        self.pending = 0  # accepted and not yet committed: waiting in the batch or being written
        self._records: list[CopyRecord] = []
        self._counts: MinuteCounts = {}
        self._done: asyncio.Future[bool] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = asyncio.Event()
        self._closing = False
        self._workers = [asyncio.create_task(self._work()) for _ in range(writers)]

    def check_room(self, n: int = 1) -> None:
        """ServiceUnavailable unless `n` more events may be buffered now."""
        if self._closing:
            metrics.EVENTS_REFUSED.labels("closing").inc(n)
            raise ServiceUnavailable("the server is shutting down; retry on another instance")
        if self.pending + n > self.max_pending:
            metrics.EVENTS_REFUSED.labels("full").inc(n)
            raise ServiceUnavailable("too many events are waiting to be written; retry shortly")

    async def submit(self, records: list[CopyRecord], counts: MinuteCounts) -> None:
        """Return once `records` are committed; ServiceUnavailable when they cannot be."""
        n = len(records)
        self.check_room(n)
        done = self._done
        if done is None:
            loop = asyncio.get_running_loop()
            done = self._done = loop.create_future()
            self._timer = loop.call_later(self.flush_s, self._due.set)
        self._records += records
        for key, c in counts.items():
            self._counts[key] = self._counts.get(key, 0) + c
        self.pending += n
        metrics.EVENTS_PENDING.set(self.pending)
        if len(self._records) >= self.batch_size:
            self._due.set()
        # Shielded: a request that goes away must not cancel the commit others wait on.
        if not await asyncio.shield(done):
            raise ServiceUnavailable("the events could not be stored; retry shortly")

    def _take(self) -> tuple[list[CopyRecord], MinuteCounts, asyncio.Future[bool]]:
        assert self._done is not None
        batch = (self._records, self._counts, self._done)
        self._records, self._counts, self._done = [], {}, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._closing:
            self._due.clear()
        return batch

    async def _work(self) -> None:
        while True:
            await self._due.wait()
            if self._done is None:  # another connection took the batch
                if self._closing:
                    return
                self._due.clear()
                continue
            await self._write(*self._take())

    async def _write(
        self, records: list[CopyRecord], counts: MinuteCounts, done: asyncio.Future[bool]
    ) -> None:
        start = time.perf_counter()
        ok = False
        try:
            await self._commit(records, counts)
            ok = True
        except Exception:
            log.exception("writing %d events failed", len(records))
            metrics.EVENTS_REFUSED.labels("error").inc(len(records))
        finally:
            self.pending -= len(records)
            metrics.EVENTS_PENDING.set(self.pending)
            if not done.done():
                done.set_result(ok)
        if ok:
            metrics.EVENTS_INGESTED.inc(len(records))
            metrics.EVENTS_FLUSH.observe(time.perf_counter() - start)
            metrics.EVENTS_FLUSH_SIZE.observe(len(records))
            self.counters.add(counts)

    async def _commit(self, records: list[CopyRecord], counts: MinuteCounts) -> None:
        """One transaction of the batch. Tried once more when the partition is missing, and
        when the connection was lost before COMMIT went out: nothing of the batch was stored
        then. Lost during COMMIT, the batch may have been stored: its requests are refused
        (503) rather than the events risk being stored twice."""
        made_partitions = retried = False
        while True:
            copied = False
            try:
                async with self.pool.transaction() as con:
                    await events.copy_events(con, records, counts, self.shard)
                    copied = True
                return
            except asyncpg.CheckViolationError:
                # "no partition of relation events found for row": maintenance fell behind
                # (or the clock jumped); make the partitions and try once more.
                if made_partitions:
                    raise
                made_partitions = True
                log.warning("events arrived for a missing partition; creating it")
                await maintain_partitions(self.pg, None)
            except Exception as exc:
                if copied or retried or not unavailable(exc):
                    raise
                retried = True
                log.warning("the connection was lost while writing events; writing them again")

    async def close(self) -> None:
        """Refuse new events, commit what is pending, stop the connections' tasks."""
        self._closing = True
        self._due.set()
        await asyncio.gather(*self._workers)

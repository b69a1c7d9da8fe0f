"""The group-commit writer behind POST /v1/events.

A 202 means committed and counted. Requests hand their events to one EventWriter per process
and wait; the writer's connections each take whatever is pending, COPY it in one transaction
with its one-minute rollups, commit, push the group's counts to the Redis counters in one
pipeline, and then wake every request whose events rode along: a client that reads
GET /v1/analytics/counts after its 202 finds its events there (read-your-writes). The pending
buffer is bounded (EVENTS_MAX_PENDING): past it a request is refused with 503 before anything
of it is buffered, so memory cannot grow with a stalled database.

A group whose commit fails on something in its rows (a data or constraint error) is written
again one request at a time, so only the request that cannot be stored is refused.
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

# SQLSTATE classes that a row can cause (data exception, integrity constraint violation,
# program limit exceeded): a group failing with one of them is retried request by request.
_ROW_CLASSES = frozenset({"22", "23", "54"})

# One request in a group: (its number of events, its counts, the future its handler awaits).
_Request = tuple[int, MinuteCounts, asyncio.Future[bool]]


def caused_by_rows(exc: BaseException) -> bool:
    """Whether `exc` may come from some rows of a batch rather than from the database."""
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(exc, asyncpg.PostgresError) and str(sqlstate)[:2] in _ROW_CLASSES


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
        self.pending = 0  # accepted and not yet answered: waiting, being written or counted
        self._records: list[CopyRecord] = []
        self._counts: MinuteCounts = {}
        self._requests: list[_Request] = []
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
        loop = asyncio.get_running_loop()
        if not self._requests:
            self._timer = loop.call_later(self.flush_s, self._due.set)
        done: asyncio.Future[bool] = loop.create_future()
        self._requests.append((n, counts, done))
        self._records += records
        for key, c in counts.items():
            self._counts[key] = self._counts.get(key, 0) + c
        self.pending += n
        metrics.EVENTS_PENDING.set(self.pending)
        if len(self._records) >= self.batch_size:
            self._due.set()
        # A request that goes away cancels only its own future: the group commits regardless.
        if not await done:
            raise ServiceUnavailable("the events could not be stored; retry shortly")

    def _take(self) -> tuple[list[CopyRecord], MinuteCounts, list[_Request]]:
        batch = (self._records, self._counts, self._requests)
        self._records, self._counts, self._requests = [], {}, []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._closing:
            self._due.clear()
        return batch

    async def _work(self) -> None:
        while True:
            await self._due.wait()
            if not self._requests:  # another connection took the batch
                if self._closing:
                    return
                self._due.clear()
                continue
            await self._write(*self._take())

    async def _write(
        self, records: list[CopyRecord], counts: MinuteCounts, requests: list[_Request]
    ) -> None:
        start = time.perf_counter()
        try:
            await self._commit(records, counts)
        except asyncio.CancelledError:
            self._settle(requests, False)  # nobody may be left waiting
            raise
        except Exception as exc:
            if len(requests) > 1 and caused_by_rows(exc):
                log.warning(
                    "a group commit of %d requests failed (%s: %s); writing each on its own",
                    len(requests),
                    type(exc).__name__,
                    exc,
                )
                await self._write_each(records, requests)
            else:
                log.exception("writing %d events failed", len(records))
                self._settle(requests, False)
            return
        metrics.EVENTS_FLUSH.observe(time.perf_counter() - start)
        metrics.EVENTS_FLUSH_SIZE.observe(len(records))
        self._stored(len(records), counts, requests)

    async def _write_each(self, records: list[CopyRecord], requests: list[_Request]) -> None:
        at = 0
        for request in requests:
            n, counts, _done = request
            part, at = records[at : at + n], at + n
            try:
                # The group already made any missing partition: no second round of that.
                await self._commit(part, counts, make_partitions=False)
            except Exception:
                log.exception("writing a request's %d events failed", n)
                self._settle([request], False)
            else:
                self._stored(n, counts, [request])

    def _stored(self, n: int, counts: MinuteCounts, requests: list[_Request]) -> None:
        """Committed: the requests are answered once the Redis counters include them (or
        failed to: then reads fall back to PostgreSQL's rollups, committed with the events)."""
        metrics.EVENTS_INGESTED.inc(n)
        self.counters.add(counts).add_done_callback(lambda _: self._settle(requests, True))

    def _settle(self, requests: list[_Request], ok: bool) -> None:
        for n, _counts, done in requests:
            self.pending -= n
            if not ok:
                metrics.EVENTS_REFUSED.labels("error").inc(n)
            if not done.done():
                done.set_result(ok)
        metrics.EVENTS_PENDING.set(self.pending)

    async def _commit(
        self, records: list[CopyRecord], counts: MinuteCounts, *, make_partitions: bool = True
    ) -> None:
        """One transaction of the batch. Tried once more when the partition is missing, and
        when the connection was lost before COMMIT went out: nothing of the batch was stored
        then. Lost during COMMIT, the batch may have been stored: its requests are refused
        (503) rather than the events risk being stored twice."""
        made_partitions, retried = not make_partitions, False
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

"""The outbox relay, and an example consumer of the stream it feeds.

OutboxRelay moves outbox rows to the Redis stream `<REDIS_KEY_PREFIX>outbox` in id order, at
least once. Each round runs in one transaction holding the stream's position row
(FOR UPDATE SKIP LOCKED): the replica that gets it publishes, the others skip the round. The
position advances in the same transaction, after the XADDs; a relay dying in between leaves
the position where it was, and the next round (on any replica) publishes those rows again.

Rows are published only up to a "safe" id: one no unfinished transaction can still commit
below (see the outbox_writer_lock trigger in 0003_events.sql). Without it, a transaction that
drew id 10 and committed after id 11 had been relayed would be skipped for good.

Relayed rows are kept OUTBOX_RETENTION_H hours, for `surge outbox replay` (server/outbox_stream.py)
to publish again after Redis lost them; every relaying process then deletes them in small
batches (prune_once), never a row some stream has not been fed yet.

UserEventsConsumer reads the stream in the consumer group "analytics" and counts `user.*`
events into the event analytics (event name = the topic). Delivery is at least once, so it
records each event id in stream_consumed in the same transaction as the counted event: a
redelivered or duplicated message finds its id there and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from uuid import UUID

import asyncpg
import orjson
from asyncpg import Record
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from db import events, outbox
from db.events import MinuteCounts
from db.pool import Database, unavailable
from handlers.events.counters import EventCounters
from handlers.events.partitions import maintain_partitions
from server import metrics, outbox_stream
from server.outbox_stream import stream_key as stream_key  # its home since the replay

log = logging.getLogger("surge.relay")


def _log_failure(exc: Exception, message: str, *args: object) -> None:
    """An outage of Redis or PostgreSQL, which retrying outlasts, is one warning line per retry
    (the metrics count them); anything else is an error with its traceback."""
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)) or unavailable(exc):
        log.warning(message + " (%s: %s)", *args, type(exc).__name__, exc)
    else:
        log.error(message, *args, exc_info=exc)


LAG_INTERVAL_S = 1.0
# Pruning: one short transaction per batch (its locks and WAL stay small, a replica running
# it at the same time takes other rows), rounds this far apart; the oldest row's age is
# measured every round.
PRUNE_INTERVAL_S = 60.0
PRUNE_BATCH = 1000

Message = tuple[bytes, dict[bytes, bytes] | None]  # (stream id, fields); None: trimmed
MAX_BACKOFF_S = 5.0
# While a round finds nothing, the pause before the next doubles from poll_s up to this, so an
# idle process does not spend its core polling PostgreSQL and Redis. The first event after a
# quiet spell waits up to this long; under steady traffic the pause stays at poll_s.
IDLE_MAX_S = 1.0


def next_pause(pause: float, poll_s: float, found: int) -> float:
    """The pause after a round that found `found` items (poll_s again once there is work)."""
    if found:
        return poll_s
    return min(pause * 2, max(poll_s, IDLE_MAX_S))


class OutboxRelay:
    def __init__(
        self,
        pg: Database,
        redis: Redis,
        stream: str,
        *,
        batch: int = 500,
        poll_s: float = 0.1,
        maxlen: int = 1_000_000,
        retention_h: int = 0,
    ) -> None:
        self.pg = pg
        self.redis = redis
        self.stream = stream
        self.batch = batch
        self.poll_s = poll_s
        self.maxlen = maxlen
        # Ids at or below `safe` are final. `horizon` is a pending (last id, writers) sample:
        # once those writer transactions are gone, its last id is safe too.
        self.safe = 0
        self.horizon: tuple[int, list[str]] | None = None
        self.lag_interval_s = LAG_INTERVAL_S
        self.retention = timedelta(hours=retention_h) if retention_h else None
        self.prune_batch = PRUNE_BATCH
        self.prune_interval_s = PRUNE_INTERVAL_S

    async def _advance_safe(self, con: asyncpg.Connection) -> int:
        if self.horizon is not None:
            last_id, writers = self.horizon
            if await outbox.count_writers_running(con, writers) == 0:
                self.safe = max(self.safe, last_id)
                self.horizon = None
        if self.horizon is None:
            # The order matters: an id drawn before this read belongs to a transaction that
            # took the writer lock before drawing it, so it is in the list read next (or over).
            last_id = await outbox.last_outbox_id(con)
            if last_id > self.safe:
                writers = await outbox.outbox_writers(con)
                if writers:
                    self.horizon = (last_id, writers)
                else:
                    self.safe = last_id
        return self.safe

    async def relay_once(self) -> int:
        """One round: publish up to `batch` rows; the number published (0: nothing to do, or
        another replica holds the position)."""
        async with self.pg.transaction() as con:
            position = await outbox.lock_position(con, self.stream)
            if position is None:
                return 0
            safe = await self._advance_safe(con)
            if safe <= position:
                return 0
            rows = await outbox.fetch_outbox(con, position, safe, self.batch)
            if rows:
                await self.publish(rows)
                await outbox.advance_position(con, self.stream, rows[-1]["id"])
        metrics.OUTBOX_RELAYED.inc(len(rows))
        return len(rows)

    async def publish(self, rows: Sequence[Record]) -> None:
        await outbox_stream.publish(self.redis, self.stream, rows, self.maxlen)

    async def update_lag(self) -> None:
        ids, seconds = await outbox.outbox_lag(self.pg, self.stream)
        metrics.OUTBOX_LAG.set(ids)
        metrics.OUTBOX_LAG_SECONDS.set(seconds)

    async def measure_lag(self, stop: asyncio.Event) -> None:
        """The lag, read from PostgreSQL every lag_interval_s by its own task: it must keep
        rising while rounds fail (Redis away) or hang, which is when its alert matters."""
        while not stop.is_set():
            try:
                await self.update_lag()
            except Exception as exc:  # PostgreSQL away: the gauge keeps its last reading
                _log_failure(exc, "outbox lag not measured; retrying in %.1fs", self.lag_interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.lag_interval_s)

    async def prune_once(self) -> int:
        """Delete the relayed rows older than the retention, a batch per transaction, until a
        batch finds none; how many. Then measure the oldest row kept."""
        pruned = 0
        while self.retention is not None:
            n = await outbox.prune_outbox(self.pg, self.retention, self.prune_batch)
            metrics.OUTBOX_PRUNED.inc(n)
            pruned += n
            # Not `n < batch`: a row still young near the head of the table (its transaction
            # began later than the next ones') keeps every batch short until it ages.
            if n == 0:
                break
        if pruned:
            log.info("pruned %d relayed outbox rows older than %s", pruned, self.retention)
        metrics.OUTBOX_OLDEST_SECONDS.set(await outbox.oldest_outbox_age(self.pg))
        return pruned

    async def prune(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.prune_once()
            except Exception as exc:
                _log_failure(exc, "outbox prune failed; retrying in %.0fs", self.prune_interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.prune_interval_s)

    async def run(self, stop: asyncio.Event) -> None:
        lag = asyncio.create_task(self.measure_lag(stop))
        prune = asyncio.create_task(self.prune(stop))
        try:
            await self._relay(stop)
        finally:
            # A read, and deletes of one batch per transaction: nothing is left half done.
            lag.cancel()
            prune.cancel()
            await asyncio.wait({lag, prune}, timeout=1.0)

    async def _relay(self, stop: asyncio.Event) -> None:
        pause = self.poll_s
        ready = False
        while not stop.is_set():
            published = 0
            try:
                if not ready:
                    await outbox.ensure_position(self.pg, self.stream)
                    ready = True
                published = await self.relay_once()
                pause = next_pause(pause, self.poll_s, published)
            except Exception as exc:
                metrics.OUTBOX_RELAY_ERRORS.inc()
                _log_failure(exc, "outbox relay round failed; retrying in %.1fs", pause)
                pause = min(pause * 2, MAX_BACKOFF_S)
            if published < self.batch:  # a full batch means more is waiting: go on at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)


class UserEventsConsumer:
    """Consumer group "analytics": `user.*` outbox events become analytics events."""

    group = "analytics"
    topic_prefix = "user."
    # A message another consumer read and did not acknowledge for this long is taken over.
    claim_idle_ms = 30_000
    claim_every_s = 10.0

    def __init__(
        self,
        pg: Database,
        redis: Redis,
        stream: str,
        counters: EventCounters | None,
        *,
        name: str | None = None,
        batch: int = 100,
        poll_s: float = 0.2,
        retention_days: int = 30,
    ) -> None:
        self.pg = pg
        self.redis = redis
        self.stream = stream
        self.counters = counters
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.batch = batch
        self.poll_s = poll_s
        self.retention = timedelta(days=retention_days)
        self.shard = random.randrange(32)
        self._claimed_at = 0.0

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read(self) -> list[Message]:
        messages: list[Message] = []
        try:
            if time.monotonic() - self._claimed_at >= self.claim_every_s:
                self._claimed_at = time.monotonic()
                claimed = await self.redis.xautoclaim(
                    self.stream, self.group, self.name, self.claim_idle_ms, "0-0", count=self.batch
                )
                messages += cast(list[Message], claimed[1])
            reply = await self.redis.xreadgroup(
                self.group, self.name, {self.stream: ">"}, count=self.batch
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream was deleted (a flushed Redis): the group reads the new one from its
            # start, where the relay's next rows and a replay (surge outbox replay) arrive.
            await self.ensure_group()
            return messages
        for _stream, entries in cast(list[tuple[bytes, list[Message]]], reply or []):
            messages += entries
        return messages

    async def consume_once(self) -> int:
        """Read, apply and acknowledge one batch; the number of messages handled."""
        messages = await self._read()
        if not messages:
            return 0
        await self.apply(messages)
        await self.redis.xack(self.stream, self.group, *[mid for mid, _ in messages])
        return len(messages)

    async def apply(self, messages: Sequence[Message]) -> int:
        """Count the batch's user.* events that were not counted before; how many were."""
        wanted: dict[UUID, tuple[UUID, datetime, str, UUID | None, str]] = {}
        skipped = 0
        oldest = datetime.now(UTC) - self.retention
        for mid, fields in messages:
            if fields is None:  # trimmed from the stream before it was claimed
                skipped += 1
                continue
            try:
                topic = fields[b"topic"].decode()
                if not topic.startswith(self.topic_prefix):
                    skipped += 1
                    continue
                event_id = UUID(fields[b"event_id"].decode())
                ts = datetime.fromisoformat(fields[b"created_at"].decode())
                aggregate = fields[b"aggregate_id"].decode()
                row = (
                    UUID(fields[b"tenant_id"].decode()),
                    ts,
                    topic,
                    UUID(aggregate) if aggregate else None,
                    orjson.dumps({"event_id": str(event_id)}).decode(),
                )
            except (KeyError, ValueError):
                # Not something the relay wrote: acknowledged and dropped, or it would come
                # back every claim interval forever.
                log.warning("stream message %r is malformed; skipped", mid)
                skipped += 1
                continue
            if ts < oldest or event_id in wanted:
                skipped += 1
                continue
            wanted[event_id] = row
        applied = 0
        if wanted:
            for attempt in (1, 2):
                try:
                    applied, counts = await self._apply(wanted)
                    break
                except asyncpg.CheckViolationError:
                    if attempt == 2:
                        raise
                    await self._ensure_partitions(wanted.values())
            if applied and self.counters is not None:
                self.counters.add(counts)
        duplicates = len(wanted) - applied
        metrics.STREAM_CONSUMED.labels(self.group, "applied").inc(applied)
        metrics.STREAM_CONSUMED.labels(self.group, "duplicate").inc(duplicates)
        metrics.STREAM_CONSUMED.labels(self.group, "skipped").inc(skipped)
        return applied

    async def _apply(
        self, wanted: dict[UUID, tuple[UUID, datetime, str, UUID | None, str]]
    ) -> tuple[int, MinuteCounts]:
        async with self.pg.transaction() as con:
            fresh = await outbox.claim_consumed(con, self.group, list(wanted))
            rows = [row for event_id, row in wanted.items() if event_id in fresh]
            counts: MinuteCounts = {}
            for tenant, ts, name, _user, _props in rows:
                key = (str(tenant), name, ts.replace(second=0, microsecond=0))
                counts[key] = counts.get(key, 0) + 1
            if rows:
                await events.insert_events(con, rows, counts, self.shard)
        return len(rows), counts

    async def _ensure_partitions(self, rows: Any) -> None:
        # Old outbox rows (a relay that was down, a first start over a long history) can
        # predate the partitions made at start-up.
        for day in sorted({row[1].date() for row in rows}):
            await maintain_partitions(self.pg, None, today=day)

    async def run(self, stop: asyncio.Event) -> None:
        pause = self.poll_s
        ready = False
        while not stop.is_set():
            handled = 0
            try:
                if not ready:
                    await self.ensure_group()
                    ready = True
                handled = await self.consume_once()
                pause = next_pause(pause, self.poll_s, handled)
            except Exception as exc:  # Redis or PostgreSQL away: the messages stay pending
                _log_failure(exc, "stream consumer %s failed; retrying in %.1fs", self.group, pause)
                pause = min(pause * 2, MAX_BACKOFF_S)
            if handled < self.batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)

    async def leave(self) -> None:
        """Remove this consumer from the group when it holds no unacknowledged message, so
        the group does not collect one dead consumer per restart."""
        with contextlib.suppress(RedisError, OSError):
            pending = await self.redis.xpending_range(
                self.stream, self.group, min="-", max="+", count=1, consumername=self.name
            )
            if not pending:
                await self.redis.xgroup_delconsumer(self.stream, self.group, self.name)


class Worker:
    """A relay or consumer running as a task that finishes its round when asked to stop."""

    def __init__(self, worker: OutboxRelay | UserEventsConsumer) -> None:
        self.name = type(worker).__name__
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(worker.run(self.stop))

    async def close(self, grace_s: float) -> None:
        self.stop.set()
        # asyncio.wait never waits past its timeout (wait_for would wait for the cancellation).
        done, _ = await asyncio.wait({self.task}, timeout=grace_s)
        if not done:
            log.warning("%s did not stop within %.1fs; cancelled", self.name, grace_s)
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=1.0)

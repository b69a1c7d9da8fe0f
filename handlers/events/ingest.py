"""POST /v1/events and what stands behind it: validation, the group-commit writer, the Redis
counters fed after each commit, and the day-partition maintenance.

A 202 means committed. Requests hand their events to one EventWriter per process and wait;
the writer's connections each take whatever is pending, COPY it in one transaction with its
one-minute rollups, commit, and wake every request whose events rode along. The pending
buffer is bounded (EVENTS_MAX_PENDING): past it a request is refused with 503 before anything
of it is buffered, so memory cannot grow with a stalled database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import struct
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any, NoReturn

import asyncpg
import orjson
from aiohttp import web
from asyncpg import Connection
from asyncpg.pool import Pool
from redis.asyncio import Redis
from redis.exceptions import RedisError

from db import events, outbox
from db.events import MinuteCounts, pg_micros
from db.ids import UUID_RE
from db.pool import Database
from handlers.events.api import MAX_EVENTS, MAX_PROPS_BYTES, MAX_PROPS_KEYS, NAME_RE, SCHEMAS, TS_RE
from handlers.events.keys import EVENT_COUNTERS, EVENT_WRITER
from server import metrics, rbac
from server.errors import BadRequest, ServiceUnavailable, ValidationFailed
from server.http import raw_json_response
from server.keys import CONFIG, PG, REDIS
from server.validation import UnsupportedMediaType, Validators

log = logging.getLogger("surge.events")

MAX_SKEW = timedelta(hours=24)

_NAME = re.compile(NAME_RE)
_TS = re.compile(TS_RE)
_UUID = re.compile(UUID_RE)
_SCHEMAS = Validators(SCHEMAS)
_EMPTY_PROPS = b"\x01{}"  # binary jsonb: a version byte, then the JSON text

# Partitions exist from yesterday (ts may be 24 h old) to three days ahead, so ingestion keeps
# working through two days of failed maintenance rounds.
PARTITION_DAYS_BEHIND = 1
PARTITION_DAYS_AHEAD = 3
MAINTENANCE_INTERVAL_S = 3600.0
MAINTENANCE_RETRY_S = 30.0
MAINTENANCE_START_S = 5.0

# Redis keys: per-second counts (for /v1/analytics/live) by arrival, kept two minutes; per-minute
# counts by event time for the last hour (GET /v1/analytics/counts), kept an hour past their
# minute plus a margin for clock skew between replicas.
SECOND_TTL_S = 120
MINUTE_WINDOW_S = 3600
MINUTE_KEEP_S = MINUTE_WINDOW_S + 300

# (tenant_id, ts as pg_micros, name, user_id, props as binary jsonb): what
# db.events.copy_events takes.
Record = tuple[str, int, str, str | None, bytes]


def second_key(prefix: str, tenant_id: str, second: int) -> str:
    return f"{prefix}ev:s:{tenant_id}:{second}"


def minute_key(prefix: str, tenant_id: str, minute: int) -> str:
    return f"{prefix}ev:m:{tenant_id}:{minute}"


def parse_ts(raw: str) -> datetime | None:
    """An RFC 3339 timestamp with an offset, as an aware datetime in UTC; else None."""
    if _TS.fullmatch(raw) is None:
        return None
    try:
        return datetime.fromisoformat(raw).astimezone(UTC)
    except ValueError:  # matches the pattern but is no date (2026-02-30)
        return None


# --- request parsing -------------------------------------------------------------------------


def parse_batch(data: Any, tenant_id: str, now: datetime) -> tuple[list[Record], MinuteCounts]:
    """COPY records and per-minute counts for a POST /v1/events body, or ValidationFailed.

    The accepting path is one hand-written loop: the 100k events/s budget leaves ~10 us per
    event for everything, and the compiled schema alone costs 3-4. It accepts nothing the
    EventBatch schema refuses: when it balks, the schema validator runs to name the field,
    and what the schema lets through is then refused by the checks it cannot express.
    """
    events_ = data.get("events") if type(data) is dict and len(data) == 1 else None
    if type(events_) is not list or not 1 <= len(events_) <= MAX_EVENTS:
        _refuse(data)
    lo, hi = now - MAX_SKEW, now + MAX_SKEW
    now_us = pg_micros(now)
    names, users = _NAMES_SEEN, _USERS_SEEN
    records: list[Record] = []
    append = records.append
    counts: MinuteCounts = {}
    untimed: dict[str, int] = {}  # events stamped `now`, by name
    for event in events_:
        if type(event) is not dict:
            _refuse(data)
        name = event.get("name")
        if type(name) is not str or (name not in names and not _learn(names, _NAME, name)):
            _refuse(data)
        raw_ts = event.get("ts")
        user_id = event.get("user_id")
        props = event.get("props")
        # Every key is a known one exactly when the known ones present add up to them all;
        # a null ts or props is not counted, so it is refused here as the schema does.
        known = 1 + (raw_ts is not None) + (props is not None) + ("user_id" in event)
        if known != len(event):
            _refuse(data)
        if user_id is not None and (
            type(user_id) is not str or (user_id not in users and not _learn(users, _UUID, user_id))
        ):
            _refuse(data)
        if props is None:
            props_json = _EMPTY_PROPS
        else:
            if type(props) is not dict or len(props) > MAX_PROPS_KEYS:
                _refuse(data)
            # The version byte of binary jsonb goes in front here, which also leaves a bytes
            # object of the right size: orjson's own result keeps a 4 KB buffer, far too much
            # to hold for every pending event.
            try:
                props_json = b"\x01" + orjson.dumps(props)
            except orjson.JSONEncodeError:  # an int past 64 bits; orjson.loads never makes one
                _refuse(data)
            if len(props_json) > MAX_PROPS_BYTES + 1 or (
                b"\\u0000" in props_json and _has_nul(props)
            ):
                _refuse(data)
        if raw_ts is None:
            append((tenant_id, now_us, name, user_id, props_json))
            untimed[name] = untimed.get(name, 0) + 1
        else:
            ts = parse_ts(raw_ts) if type(raw_ts) is str else None
            if ts is None or not lo <= ts <= hi:
                _refuse(data)
            append((tenant_id, pg_micros(ts), name, user_id, props_json))
            key = (tenant_id, name, ts.replace(second=0, microsecond=0))
            counts[key] = counts.get(key, 0) + 1
    minute = now.replace(second=0, microsecond=0)
    for name, n in untimed.items():
        key = (tenant_id, name, minute)
        counts[key] = counts.get(key, 0) + n
    return records, counts


# Event names come from a small vocabulary and user ids repeat, so each distinct valid string
# is matched against its pattern once per process, not once per event (a regex match costs
# more than the rest of an event's checks). Bounded: cleared when full.
_SEEN_MAX = 4096
_NAMES_SEEN: set[str] = set()
_USERS_SEEN: set[str] = set()


def _learn(seen: set[str], pattern: re.Pattern[str], value: str) -> bool:
    if pattern.fullmatch(value) is None:
        return False
    if len(seen) >= _SEEN_MAX:
        seen.clear()
    seen.add(value)
    return True


def _has_nul(value: Any) -> bool:
    """PostgreSQL text (and jsonb) cannot hold U+0000: one would fail a whole group commit."""
    if type(value) is str:
        return "\x00" in value
    if type(value) is dict:
        return any("\x00" in k or _has_nul(v) for k, v in value.items())
    if type(value) is list:
        return any(_has_nul(v) for v in value)
    return False


def _refuse(data: Any) -> NoReturn:
    _SCHEMAS.validate("EventBatch", data)  # raises with the schema's own field path when it applies
    now = datetime.now(UTC)
    errors = []
    for i, event in enumerate(data["events"]):
        raw_ts = event.get("ts")
        if raw_ts is not None:
            parsed = parse_ts(raw_ts)
            if parsed is None:
                errors.append({"field": f"events[{i}].ts", "message": "is not a valid timestamp"})
            elif abs(parsed - now) > MAX_SKEW:
                errors.append(
                    {"field": f"events[{i}].ts", "message": "must be within 24 hours of now"}
                )
        props = event.get("props")
        try:
            size = len(orjson.dumps(props))
        except orjson.JSONEncodeError:
            errors.append({"field": f"events[{i}].props", "message": "holds a number out of range"})
            continue
        if props is not None and size > MAX_PROPS_BYTES:
            errors.append(
                {
                    "field": f"events[{i}].props",
                    "message": f"must be at most {MAX_PROPS_BYTES} bytes of JSON",
                }
            )
        elif props is not None and _has_nul(props):
            errors.append(
                {"field": f"events[{i}].props", "message": "must not contain NUL characters"}
            )
    # Nothing left to blame would mean the fast path refused what the schema accepts.
    raise ValidationFailed(errors or [{"field": "events", "message": "is not valid"}])


async def _read_body(request: web.Request) -> Any:
    # server.validation.read_json, minus its schema pass: parse_batch validates in its loop.
    ctype = request.content_type
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType("the request body must be application/json")
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc.args[0] if exc.args else 'parse error'}") from None


async def post_events(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    writer = request.app[EVENT_WRITER]
    writer.check_room()  # before the body is read: a refusal under overload costs no parsing
    # No name for the parsed body: its dicts are freed here, not kept through the wait for the
    # commit, where they would survive into the cyclic GC's oldest generation and make every
    # full collection (which scans the whole heap) come sooner.
    records, counts = parse_batch(await _read_body(request), str(p.tenant_id), datetime.now(UTC))
    await writer.submit(records, counts)
    return raw_json_response(b'{"accepted":%d}' % len(records), status=202)


# --- Redis counters --------------------------------------------------------------------------


class EventCounters:
    """Per-second and per-minute counts in Redis, updated after commits and off their path.

    `add` only merges into dicts; one task pushes what has accumulated in one pipeline, so a
    slow or absent Redis never delays a 202, and under load many commits share one round
    trip. What fails to reach Redis is lost to Redis only: the rollups in PostgreSQL have it.
    """

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._seconds: dict[tuple[str, int, str], int] = {}
        self._minutes: MinuteCounts = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task = asyncio.create_task(self._run())

    def add(self, counts: MinuteCounts) -> None:
        now = time.time()
        second = int(now)
        oldest = now - MINUTE_KEEP_S  # older minutes are answered by PostgreSQL only
        for (tenant, name, minute), n in counts.items():
            skey = (tenant, second, name)
            self._seconds[skey] = self._seconds.get(skey, 0) + n
            if minute.timestamp() >= oldest:
                mkey = (tenant, name, minute)
                self._minutes[mkey] = self._minutes.get(mkey, 0) + n
        self._idle.clear()
        self._wake.set()

    async def flushed(self) -> None:
        """Wait until everything added so far has been sent (or has failed to be)."""
        await self._idle.wait()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            seconds, self._seconds = self._seconds, {}
            minutes, self._minutes = self._minutes, {}
            try:
                await self._push(seconds, minutes)
            except (RedisError, OSError):
                metrics.EVENT_COUNTER_ERRORS.inc()
                log.warning("event counters not updated in Redis", exc_info=True)
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flushed(), 2.0)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# --- the group-commit writer -----------------------------------------------------------------


_INT64 = struct.Struct("!q")


async def _writer_codecs(con: Connection) -> None:
    # The forms db.events.copy_events needs. Binary jsonb is a version byte and the JSON text:
    # records carry it ready-made (parse_batch produced it to check the size), so props are
    # serialised once. Binary timestamptz is int64 microseconds since 2000: an int per record
    # (one per request for events stamped now) instead of a datetime asyncpg converts per row.
    await con.set_type_codec(
        "jsonb",
        encoder=bytes,
        decoder=lambda value: orjson.loads(value[1:]),
        schema="pg_catalog",
        format="binary",
    )
    await con.set_type_codec(
        "timestamptz",
        encoder=_INT64.pack,
        decoder=lambda value: _INT64.unpack(value)[0],
        schema="pg_catalog",
        format="binary",
    )


class EventWriter:
    """Group commit: every request's events join the pending batch; each of the writer's
    connections takes the whole batch when it is due (EVENTS_FLUSH_MS after its first event, or
    at once past EVENTS_BATCH_SIZE) and commits it with one COPY. While a COPY runs the next
    batch grows, so batches get bigger exactly when the database is the bottleneck."""

    def __init__(
        self,
        pool: Pool,
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
        self._records: list[Record] = []
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

    async def submit(self, records: list[Record], counts: MinuteCounts) -> None:
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

    def _take(self) -> tuple[list[Record], MinuteCounts, asyncio.Future[bool]]:
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
        self, records: list[Record], counts: MinuteCounts, done: asyncio.Future[bool]
    ) -> None:
        start = time.perf_counter()
        ok = False
        try:
            for attempt in (1, 2):
                try:
                    async with self.pool.acquire() as con, con.transaction():
                        await events.copy_events(con, records, counts, self.shard)
                    ok = True
                    break
                except asyncpg.CheckViolationError:
                    # "no partition of relation events found for row": maintenance fell
                    # behind (or the clock jumped); make the partitions and try once more.
                    if attempt == 2:
                        raise
                    log.warning("events arrived for a missing partition; creating it")
                    await maintain_partitions(self.pg, None)
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

    async def close(self) -> None:
        """Refuse new events, commit what is pending, stop the connections' tasks."""
        self._closing = True
        self._due.set()
        await asyncio.gather(*self._workers)


# --- day partitions --------------------------------------------------------------------------


async def maintain_partitions(
    pg: Database, retention_days: int | None, today: date | None = None
) -> tuple[list[str], list[str]]:
    """Create the day partitions around `today` (UTC) and, with a retention, drop those older
    than it; returns (created, dropped). Safe to run from every replica at once."""
    today = today or datetime.now(UTC).date()
    created: list[str] = []
    dropped: list[str] = []
    first = today - timedelta(days=PARTITION_DAYS_BEHIND)
    last = today + timedelta(days=PARTITION_DAYS_AHEAD)
    for table in events.PARTITIONED:
        async with pg.transaction() as con:
            created += await events.create_partitions(con, table, first, last)
    if retention_days is not None:
        cutoff = today - timedelta(days=retention_days)
        for table in events.PARTITIONED:
            async with pg.transaction() as con:
                dropped += await events.drop_partitions(con, table, cutoff)
        await outbox.prune_consumed(pg, datetime.combine(cutoff, datetime.min.time(), tzinfo=UTC))
    metrics.EVENT_PARTITIONS.labels("created").inc(len(created))
    metrics.EVENT_PARTITIONS.labels("dropped").inc(len(dropped))
    for name in created:
        log.info("created partition %s", name)
    for name in dropped:
        log.info("dropped partition %s", name)
    return created, dropped


async def _maintenance_loop(pg: Database, retention_days: int, ok: bool) -> None:
    while True:
        await asyncio.sleep(MAINTENANCE_INTERVAL_S if ok else MAINTENANCE_RETRY_S)
        ok = await _maintain_logged(pg, retention_days)


async def _maintain_logged(pg: Database, retention_days: int) -> bool:
    try:
        await maintain_partitions(pg, retention_days)
    except Exception:  # the database is down, a lock timed out: the next round tries again
        log.warning("partition maintenance failed", exc_info=True)
        return False
    return True


# --- resource contexts (server/app.py registers them after _postgres and _redis) -------------


async def partitions_ctx(app: web.Application) -> AsyncIterator[None]:
    """Partitions exist before the writer starts, and are kept up hourly. A database that is
    down at start-up does not stop the process (/readyz reports it); the writer makes missing
    partitions itself should events arrive first."""
    config = app[CONFIG]
    try:
        ok = await asyncio.wait_for(
            _maintain_logged(app[PG], config.events_retention_days), MAINTENANCE_START_S
        )
    except TimeoutError:
        ok = False
    task = asyncio.create_task(_maintenance_loop(app[PG], config.events_retention_days, ok))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def counters_ctx(app: web.Application) -> AsyncIterator[None]:
    app[EVENT_COUNTERS] = EventCounters(app[REDIS], app[CONFIG].redis_key_prefix)
    try:
        yield
    finally:
        await app[EVENT_COUNTERS].close()


async def writer_ctx(app: web.Application) -> AsyncIterator[None]:
    """The writer and its own connections: they carry the codecs COPY is fed with
    (_writer_codecs), and ingestion neither waits behind nor starves the request pool.
    Closed before the pools, so a clean shutdown commits every pending event first."""
    config = app[CONFIG]
    assert config.database_url is not None
    pool = await asyncpg.create_pool(
        config.database_url,
        min_size=0,  # connect on first use: a database down at start-up is not fatal
        max_size=config.events_writers,
        command_timeout=config.pg_command_timeout_s,
        statement_cache_size=config.pg_statement_cache_size,
        init=_writer_codecs,
        server_settings={"application_name": "surge-events"},
    )
    assert pool is not None
    try:
        app[EVENT_WRITER] = EventWriter(
            pool,
            app[EVENT_COUNTERS],
            app[PG],
            flush_ms=config.events_flush_ms,
            batch_size=config.events_batch_size,
            max_pending=config.events_max_pending,
            writers=config.events_writers,
        )
        try:
            yield
        finally:
            await app[EVENT_WRITER].close()
    finally:
        closing = asyncio.ensure_future(pool.close())
        done, _ = await asyncio.wait({closing}, timeout=config.shutdown_grace_s)
        if not done:
            pool.terminate()
            closing.cancel()

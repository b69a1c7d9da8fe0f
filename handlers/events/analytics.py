"""GET /v1/analytics/counts: the query, the counts behind it, the answer's shape.

Counts come from one-minute rollups: Redis answers for the last hour (the minutes a dashboard
polls), PostgreSQL's event_counts for everything else, and for all of it when Redis fails.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from redis.asyncio import Redis
from redis.exceptions import RedisError

from db import events
from db.pool import Database
from handlers.events.api import NAME_RE
from handlers.events.counters import MINUTE_WINDOW_S, minute_key
from handlers.events.ingest import is_event_name, parse_ts
from server import metrics
from server.errors import ValidationFailed
from server.http import timestamp
from server.validation import CARD_MESSAGE, looks_like_card

log = logging.getLogger("surge.analytics")

BUCKETS = {"1m": 60, "1h": 3600, "1d": 86400}
MAX_BUCKETS = 1440  # a day of minutes, two months of hours, four years of days
LAST_END = int(datetime(9999, 12, 31, tzinfo=UTC).timestamp())  # aligned to every bucket


@dataclass(frozen=True, slots=True)
class CountsQuery:
    name: str
    start: int  # epoch seconds, aligned to the bucket
    end: int  # exclusive, aligned
    bucket: int  # seconds


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = 1_000_000


def _epoch_us(raw: str | None, field: str, errors: list[dict[str, str]]) -> int | None:
    """The timestamp in whole microseconds since the epoch: exact, so rounding it to a bucket
    keeps its fraction of a second (truncated to seconds first, a `to` in the first second
    of a bucket lost that bucket)."""
    if raw is None:
        return None
    # A '+' of an offset arrives as a space unless the client escaped it; RFC 3339 as
    # accepted here has no space, so it can only be that.
    parsed = parse_ts(raw.replace(" ", "+"))
    if parsed is None:
        errors.append({"field": field, "message": "must be an RFC 3339 timestamp"})
        return None
    return (parsed - _EPOCH) // timedelta(microseconds=1)


def parse_counts_query(q: Mapping[str, str], now: float) -> CountsQuery:
    """The query string of GET /v1/analytics/counts, or ValidationFailed naming each field."""
    errors: list[dict[str, str]] = []
    name = q.get("name")
    if name is None:
        errors.append({"field": "name", "message": "is required"})
    elif not is_event_name(name):
        errors.append({"field": "name", "message": f"must match ^{NAME_RE}$"})
    elif looks_like_card(name):
        errors.append({"field": "name", "message": CARD_MESSAGE})
    bucket_raw = q.get("bucket", "1m")
    bucket = BUCKETS.get(bucket_raw)
    if bucket is None:
        errors.append({"field": "bucket", "message": "must be one of 1m, 1h, 1d"})
        bucket = 60
    to_us = _epoch_us(q.get("to"), "to", errors)
    from_us = _epoch_us(q.get("from"), "from", errors)
    if errors:
        raise ValidationFailed(errors, "invalid query parameter")
    assert name is not None
    bucket_us = bucket * _US
    if to_us is None:
        # Up to now, the bucket holding now included even at its very first microsecond: an
        # event stamped at that instant was acknowledged before this read.
        end = (int(now * _US) // bucket_us + 1) * bucket
    else:
        # [from, to) rounded out to whole buckets: `to` up (a `to` inside a bucket, by even a
        # microsecond, includes it), `from` down.
        end = -(-to_us // bucket_us) * bucket
    start = end - 60 * bucket if from_us is None else from_us // bucket_us * bucket
    if start >= end:
        raise ValidationFailed(
            [{"field": "from", "message": "must be before to"}], "invalid query parameter"
        )
    if (end - start) // bucket > MAX_BUCKETS:
        raise ValidationFailed(
            [{"field": "from", "message": f"the range spans more than {MAX_BUCKETS} buckets"}],
            "invalid query parameter",
        )
    if end > LAST_END:  # the buckets' times must be datetimes, which stop at year 9999
        raise ValidationFailed(
            [{"field": "to", "message": f"must be before {timestamp(_dt(LAST_END))}"}],
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


def counts_view(buckets: list[tuple[int, int]]) -> dict[str, Any]:
    """The GET /v1/analytics/counts body for bucket_counts' answer."""
    return {"buckets": [{"ts": timestamp(_dt(b)), "count": c} for b, c in buckets]}

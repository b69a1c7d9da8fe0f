"""Events, their one-minute rollups and day partitions: sql/events.sql, plus the COPY path."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID

from asyncpg import Connection, Record

from db import queries
from db.pool import Executor

_Q = queries.load("events.sql")

# The COPY column order, that of CopyRecord.
COLUMNS = ("tenant_id", "ts", "name", "user_id", "props")
PARTITIONED = ("events", "event_counts")

# (tenant_id, ts as pg_micros, name, user_id, props as binary jsonb): a row for copy_events.
CopyRecord = tuple[str, int, str, str | None, bytes]

# (tenant_id, name, minute) -> count
MinuteCounts = dict[tuple[str, str, datetime], int]

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def pg_micros(ts: datetime) -> int:
    """A timestamptz as PostgreSQL stores it: microseconds since 2000-01-01 UTC."""
    return (ts - PG_EPOCH) // _MICROSECOND


def _count_arrays(
    counts: MinuteCounts, as_micros: bool
) -> tuple[list[str], list[str], list[Any], list[int]]:
    keys = sorted(counts)  # the lock order add_counts relies on
    return (
        [k[0] for k in keys],
        [k[1] for k in keys],
        [pg_micros(k[2]) if as_micros else k[2] for k in keys],
        [counts[k] for k in keys],
    )


async def copy_events(
    con: Connection,
    records: Sequence[CopyRecord],
    counts: MinuteCounts,
    shard: int,
) -> None:
    """One group commit's events and their rollups, in the caller's transaction.

    COPY is binary, and encoding a datetime costs asyncpg more than the rest of a row. So the
    connection must carry binary codecs that take timestamptz as int microseconds since
    2000-01-01 UTC (pg_micros) and jsonb as its binary form (b"\x01" + the JSON text), and
    records come in that form: db.pool.open_copy_pool's connections have them.
    """
    await con.copy_records_to_table("events", records=records, columns=COLUMNS)
    await con.execute(_Q["add_counts"], *_count_arrays(counts, True), shard)


async def insert_events(
    pg: Executor,
    rows: Sequence[tuple[UUID, datetime, str, UUID | None, str]],
    counts: MinuteCounts,
    shard: int,
) -> None:
    """A few events and their rollups through one INSERT (props as JSON text), for callers on
    the shared pool; inside the caller's transaction."""
    await pg.execute(
        _Q["insert_events"],
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        [r[4] for r in rows],
    )
    await pg.execute(_Q["add_counts"], *_count_arrays(counts, False), shard)


async def count_buckets(
    pg: Executor,
    tenant_id: UUID,
    name: str,
    start: datetime,
    bucket: timedelta,
    end: datetime,
    skip_start: datetime,
    skip_end: datetime,
) -> list[Record]:
    return await pg.fetch(
        _Q["count_buckets"], tenant_id, name, start, bucket, end, skip_start, skip_end
    )


async def create_partitions(pg: Executor, table: str, first_day: date, last_day: date) -> list[str]:
    assert table in PARTITIONED
    rows = await pg.fetch(_Q["create_partitions"], table, first_day, last_day)
    return [r["name"] for r in rows]


async def drop_partitions(pg: Executor, table: str, before_day: date) -> list[str]:
    assert table in PARTITIONED
    rows = await pg.fetch(_Q["drop_partitions"], table, before_day)
    return [r["name"] for r in rows]


async def list_partitions(pg: Executor, table: str) -> list[str]:
    assert table in PARTITIONED
    rows = await pg.fetch(_Q["list_partitions"], table)
    return [r["name"] for r in rows]


async def stray_partitions(pg: Executor, table: str) -> list[str]:
    """Tables named like a day partition of `table` that are not attached to it."""
    assert table in PARTITIONED
    rows = await pg.fetch(_Q["stray_partitions"], table)
    return [r["name"] for r in rows]

"""The outbox relay's position and horizon, pruning and replay, and stream consumers' applied
ids: sql/outbox.sql."""

from __future__ import annotations

from datetime import datetime, timedelta
from uuid import UUID

from asyncpg import Record

from db import queries
from db.pool import Executor

_Q = queries.load("outbox.sql")


async def ensure_position(pg: Executor, stream: str) -> None:
    await pg.execute(_Q["ensure_position"], stream)


async def lock_position(pg: Executor, stream: str) -> int | None:
    """The relayed position, row-locked until the transaction ends; None when another relay
    holds it (or the stream has no position row)."""
    row = await pg.fetchrow(_Q["lock_position"], stream)
    return None if row is None else int(row["last_id"])


async def advance_position(pg: Executor, stream: str, last_id: int) -> None:
    await pg.execute(_Q["advance_position"], stream, last_id)


async def last_outbox_id(pg: Executor) -> int:
    value: int = await pg.fetchval(_Q["last_outbox_id"])
    return value


async def outbox_writers(pg: Executor) -> list[str]:
    value: list[str] = await pg.fetchval(_Q["outbox_writers"])
    return value


async def count_writers_running(pg: Executor, writers: list[str]) -> int:
    value: int = await pg.fetchval(_Q["count_writers_running"], writers)
    return value


async def fetch_outbox(pg: Executor, after_id: int, upto_id: int, limit: int) -> list[Record]:
    return await pg.fetch(_Q["fetch_outbox"], after_id, upto_id, limit)


async def outbox_lag(pg: Executor, stream: str) -> tuple[int, float]:
    row = await pg.fetchrow(_Q["outbox_lag"], stream)
    assert row is not None
    return int(row["ids"]), float(row["seconds"])


async def prune_outbox(pg: Executor, retention: timedelta, limit: int) -> int:
    """Deletes up to `limit` relayed rows older than `retention`; how many it deleted."""
    value: int = await pg.fetchval(_Q["prune_outbox"], retention, limit)
    return value


async def oldest_outbox_age(pg: Executor) -> float:
    value: float = await pg.fetchval(_Q["oldest_outbox_age"])
    return value


async def oldest_outbox_time(pg: Executor) -> datetime | None:
    value: datetime | None = await pg.fetchval(_Q["oldest_outbox_time"])
    return value


async def wait_position(pg: Executor, stream: str) -> int | None:
    """The relayed position, row-locked until the transaction ends (waiting for a relay round
    to finish); None when the stream has no position row."""
    row = await pg.fetchrow(_Q["wait_position"], stream)
    return None if row is None else int(row["last_id"])


async def replay_span(
    pg: Executor, since: datetime, until: datetime, upto_id: int
) -> tuple[int, int] | None:
    """The lowest and highest ids of rows created in [since, until), at or below `upto_id`;
    None when there is none."""
    first: int | None = await pg.fetchval(_Q["replay_first_id"], since, upto_id)
    last: int | None = await pg.fetchval(_Q["replay_last_id"], until, upto_id)
    if first is None or last is None or first > last:
        return None
    return first, last


async def fetch_replay(
    pg: Executor, after_id: int, upto_id: int, since: datetime, until: datetime, limit: int
) -> list[Record]:
    return await pg.fetch(_Q["fetch_replay"], after_id, upto_id, since, until, limit)


async def claim_consumed(pg: Executor, consumer: str, event_ids: list[UUID]) -> set[UUID]:
    rows = await pg.fetch(_Q["claim_consumed"], consumer, event_ids)
    return {r["event_id"] for r in rows}


async def prune_consumed(pg: Executor, older_than: datetime) -> None:
    await pg.execute(_Q["prune_consumed"], older_than)

"""The outbox stream: its name, the message an outbox row becomes, and the replay of a range of
relayed rows (`surge outbox replay`, docs/EVENTS.md).

The relay (handlers/events/relay.py) and the replay publish through `publish`, so a replayed
message is field for field the one the relay wrote, with the same `id` and `event_id`: a
consumer that records the event ids it applied (the analytics consumer's stream_consumed)
applies each event once however often it arrives.

This lives in server/, not beside the relay, because the CLI (server/__main__.py) runs it and
server/ must not import handlers/.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from asyncpg import Record
from redis.asyncio import Redis

from db import outbox
from db.pool import Database, open_database
from server.config import Config
from server.http import timestamp

REPLAY_BATCH = 1000
# `--until` left out: every relayed row from `--since` on.
END_OF_TIME = datetime(9999, 12, 31, tzinfo=UTC)


def stream_key(prefix: str) -> str:
    return f"{prefix}outbox"


def message(row: Record) -> dict[str, str]:
    return {
        "id": str(row["id"]),
        "event_id": str(row["event_id"]),
        "tenant_id": str(row["tenant_id"]),
        "topic": row["topic"],
        "aggregate_id": "" if row["aggregate_id"] is None else str(row["aggregate_id"]),
        "payload": row["payload"],
        "created_at": timestamp(row["created_at"]),
    }


async def publish(redis: Redis, stream: str, rows: Sequence[Record], maxlen: int) -> None:
    """XADD the rows in their order, in one pipeline."""
    async with redis.pipeline(transaction=False) as pipe:
        for row in rows:
            pipe.xadd(stream, message(row), maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
        await pipe.execute()


@dataclass(frozen=True, slots=True)
class Replayed:
    count: int
    first_id: int | None
    last_id: int | None
    position: int | None  # the relayed position the replay stopped at (None: no relay yet)
    oldest: datetime | None  # when the oldest row kept was written


async def replay(
    pg: Database,
    redis: Redis,
    stream: str,
    since: datetime,
    until: datetime | None = None,
    *,
    maxlen: int,
    batch: int = REPLAY_BATCH,
) -> Replayed:
    """Publish again, in id order, the relayed outbox rows created in [since, until).

    Rows the relay has not published yet are left to it. The replay holds the relay's position
    row the whole time (the relays skip their rounds meanwhile), so the replayed messages reach
    the stream together and in order, with nothing relayed in between."""
    end = until or END_OF_TIME
    async with pg.transaction() as con:
        position = await outbox.wait_position(con, stream)
        oldest = await outbox.oldest_outbox_time(con)
        span = None if position is None else await outbox.replay_span(con, since, end, position)
        if span is None:
            return Replayed(0, None, None, position, oldest)
        first, last = span
        count, after = 0, first - 1
        while rows := await outbox.fetch_replay(con, after, last, since, end, batch):
            await publish(redis, stream, rows, maxlen)
            count += len(rows)
            after = rows[-1]["id"]
    return Replayed(count, first, after, position, oldest)


def parse_time(raw: str) -> datetime:
    """An RFC 3339 time with its offset (2026-12-07T10:00:00Z); ValueError otherwise."""
    try:
        value = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise ValueError(f"{raw!r} is not an RFC 3339 time") from None
    if value.tzinfo is None:
        raise ValueError(f"{raw!r} has no UTC offset (add Z or +hh:mm)")
    return value


class _Services(Protocol):
    def stop(self) -> None: ...


def replay_command(
    config: Config,
    since_raw: str,
    until_raw: str | None,
    *,
    resolve: Callable[[Config], tuple[Config, _Services]],
) -> int:
    """`surge outbox replay`: the exit status; one line on stdout, problems on stderr.
    `resolve` completes the config as `surge migrate` does (runner.resolve_services: the
    embedded PostgreSQL and Redis of a development checkout when the URLs are unset)."""
    try:
        since = parse_time(since_raw)
        until = None if until_raw is None else parse_time(until_raw)
    except ValueError as exc:
        print(f"surge: {exc}", file=sys.stderr)
        return 2
    if until is not None and until <= since:
        print("surge: --until must be later than --since", file=sys.stderr)
        return 2
    config, services = resolve(config)
    stream = stream_key(config.redis_key_prefix)
    try:
        done = asyncio.run(_replay(config, stream, since, until))
    finally:
        services.stop()
    if done.position is None:
        print(f"nothing was ever relayed to {stream}: nothing to replay")
        return 0
    ids = "" if done.first_id is None else f" (ids {done.first_id}..{done.last_id})"
    # What is older than the oldest row kept was pruned (OUTBOX_RETENTION_H), or never was.
    oldest = "" if done.oldest is None else f"; oldest row kept {timestamp(done.oldest)}"
    print(
        f"replayed {done.count} outbox event(s){ids} to {stream};"
        f" relayed up to id {done.position}{oldest}"
    )
    return 0


async def _replay(config: Config, stream: str, since: datetime, until: datetime | None) -> Replayed:
    assert config.database_url is not None and config.redis_url is not None
    pg = await open_database(
        config.database_url,
        min_size=1,
        max_size=1,
        acquire_timeout=config.pg_acquire_timeout_ms / 1000,
        command_timeout=config.pg_command_timeout_s,
        statement_cache_size=config.pg_statement_cache_size,
        name="replay",
    )
    redis = Redis.from_url(config.redis_url, socket_timeout=10, socket_connect_timeout=5)
    try:
        return await replay(pg, redis, stream, since, until, maxlen=config.outbox_stream_maxlen)
    finally:
        await redis.aclose()
        await pg.close()

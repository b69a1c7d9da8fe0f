"""`surge outbox replay`: after Redis lost the outbox stream, the relayed rows of a time range
are published again, in id order, with their original ids, so a consumer that deduplicates by
event id (the analytics consumer) takes each event once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from redis.asyncio import Redis

from db import outbox
from db.pool import Database
from handlers.events.relay import OutboxRelay, UserEventsConsumer, stream_key
from server import metrics
from server.config import Config
from server.http import timestamp
from server.outbox_stream import parse_time, replay

from .conftest import ROOT

TOPICS = ("user.created", "user.updated", "order.created")
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


async def add_outbox(
    pg: Database | asyncpg.Connection, n: int, start: int = 0, hours_old: float = 0.0
) -> list[int]:
    """n outbox rows (topics cycle through TOPICS: two in three are user.*); their ids."""
    rows = await pg.fetch(
        """
        INSERT INTO outbox (tenant_id, topic, aggregate_id, payload, created_at)
        SELECT $1, ($2::text[])[1 + (i % 3)], surge_uuid_v7(), jsonb_build_object('n', i),
               now() - make_interval(secs => $5::float8 * 3600)
        FROM generate_series($3::int, $3::int + $4::int - 1) AS i
        RETURNING id
        """,
        uuid.UUID(int=1),
        list(TOPICS),
        start,
        n,
        hours_old,
    )
    return [r["id"] for r in rows]


async def relay_all(relay: OutboxRelay) -> int:
    total = 0
    while n := await relay.relay_once():
        total += n
    return total


async def messages(redis: Redis, stream: str) -> list[dict[bytes, bytes]]:
    return [fields for _mid, fields in await redis.xrange(stream)]


async def drain(consumer: UserEventsConsumer) -> int:
    """Consume until a round finds nothing twice in a row (the first round after the stream
    was deleted only makes the group again)."""
    handled, idle = 0, 0
    while idle < 2:
        n = await consumer.consume_once()
        handled += n
        idle = 0 if n else idle + 1
    return handled


def consumed(result: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "surge_stream_consumed_total", {"consumer": "analytics", "result": result}
    )
    return value or 0.0


async def test_replay_after_del_restores_the_events_in_order_with_their_ids(
    config: Config, pg: Database, redis: Redis
) -> None:
    stream = stream_key(config.redis_key_prefix)
    await outbox.ensure_position(pg, stream)
    await add_outbox(pg, 250)
    relay = OutboxRelay(pg, redis, stream, batch=100)
    assert await relay_all(relay) == 250
    before = await messages(redis, stream)
    assert [int(m[b"id"]) for m in before] == list(range(1, 251))

    await redis.delete(stream)  # Redis lost the stream
    done = await replay(pg, redis, stream, LONG_AGO, maxlen=config.outbox_stream_maxlen, batch=64)

    assert (done.count, done.first_id, done.last_id, done.position) == (250, 1, 250, 250)
    assert await messages(redis, stream) == before  # every field: same ids, same event ids


async def test_a_consumer_deduplicating_by_event_id_takes_each_event_once(
    config: Config, pg: Database, redis: Redis
) -> None:
    stream = stream_key(config.redis_key_prefix)
    await outbox.ensure_position(pg, stream)
    relay = OutboxRelay(pg, redis, stream)
    consumer = UserEventsConsumer(pg, redis, stream, None, batch=64)
    await consumer.ensure_group()
    await add_outbox(pg, 30)  # 20 user.* events
    await relay_all(relay)
    assert await drain(consumer) == 30
    await add_outbox(pg, 15, start=30)  # 10 more, relayed but lost before the consumer read them
    await relay_all(relay)
    await redis.delete(stream)
    applied, duplicates = consumed("applied"), consumed("duplicate")

    consumer._claimed_at = 0.0  # its periodic XAUTOCLAIM is due: it must survive the lost group
    assert await consumer.consume_once() == 0  # the stream and its group are gone
    done = await replay(pg, redis, stream, LONG_AGO, maxlen=config.outbox_stream_maxlen)
    assert done.count == 45
    assert await drain(consumer) == 45

    assert consumed("applied") - applied == 10
    assert consumed("duplicate") - duplicates == 20
    assert await pg.fetchval("SELECT count(*) FROM events") == 30
    sql = "SELECT count(DISTINCT props->>'event_id') FROM events"
    assert await pg.fetchval(sql) == 30
    # A second replay (an operator running it twice) changes nothing either.
    await replay(pg, redis, stream, LONG_AGO, maxlen=config.outbox_stream_maxlen)
    await drain(consumer)
    assert await pg.fetchval("SELECT count(*) FROM events") == 30


async def test_replay_takes_the_time_range_and_only_relayed_rows(
    config: Config, pg: Database, redis: Redis
) -> None:
    stream = stream_key(config.redis_key_prefix)
    await outbox.ensure_position(pg, stream)
    three_h = await add_outbox(pg, 3, hours_old=3)
    two_h = await add_outbox(pg, 3, hours_old=2)
    late_old = await add_outbox(pg, 1, hours_old=4)  # written by a transaction begun long ago
    one_h = await add_outbox(pg, 3, hours_old=1)
    relay = OutboxRelay(pg, redis, stream)
    await relay_all(relay)
    unrelayed = await add_outbox(pg, 3, hours_old=2.5)  # in the range, not relayed yet
    await redis.delete(stream)
    now = await pg.fetchval("SELECT now()")

    done = await replay(
        pg,
        redis,
        stream,
        now - timedelta(hours=3.5),
        now - timedelta(hours=1.5),
        maxlen=config.outbox_stream_maxlen,
    )

    replayed = [int(m[b"id"]) for m in await messages(redis, stream)]
    assert replayed == three_h + two_h
    assert done.position == one_h[-1]
    assert late_old[0] not in replayed and unrelayed[0] not in replayed
    done = await replay(pg, redis, stream, now - timedelta(hours=5), maxlen=1000)
    assert done.count == len(three_h + two_h + late_old + one_h)
    assert [int(m[b"id"]) for m in await messages(redis, stream)][len(replayed) :] == (
        three_h + two_h + late_old + one_h
    )


async def test_replay_waits_for_a_relay_round_in_progress(
    config: Config, pg: Database, redis: Redis
) -> None:
    """The replay takes the relay's position row: a round holding it finishes first, and the
    rows that round relays are replayed too."""
    stream = stream_key(config.redis_key_prefix)
    await outbox.ensure_position(pg, stream)
    await add_outbox(pg, 5)
    async with pg.transaction() as con:  # a relay round in progress
        assert await outbox.lock_position(con, stream) == 0
        task = asyncio.create_task(
            replay(pg, redis, stream, LONG_AGO, maxlen=config.outbox_stream_maxlen)
        )
        while not await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND query LIKE '%FROM outbox_relay%FOR UPDATE%'"
        ):
            assert not task.done()
            await asyncio.sleep(0.01)
        await outbox.advance_position(con, stream, 5)
    done = await task
    assert done.count == 5
    assert [int(m[b"id"]) for m in await messages(redis, stream)] == [1, 2, 3, 4, 5]


def test_parse_time_wants_rfc_3339_with_an_offset() -> None:
    assert parse_time("2026-12-07T10:00:00Z") == datetime(2026, 12, 7, 10, tzinfo=UTC)
    assert parse_time("2026-12-07T11:00:00.5+01:00") == datetime(
        2026, 12, 7, 10, 0, 0, 500_000, tzinfo=UTC
    )
    for bad in ("2026-12-07T10:00:00", "yesterday", ""):
        with pytest.raises(ValueError):
            parse_time(bad)


def _surge(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    assert config.database_url is not None and config.redis_url is not None
    env = {
        **os.environ,
        "DATABASE_URL": config.database_url,
        "REDIS_URL": config.redis_url,
        "REDIS_KEY_PREFIX": config.redis_key_prefix,
    }
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_the_command_replays_and_says_what_it_did(
    config: Config, pg: Database, redis: Redis
) -> None:
    stream = stream_key(config.redis_key_prefix)
    await outbox.ensure_position(pg, stream)
    await add_outbox(pg, 12)
    await relay_all(OutboxRelay(pg, redis, stream))
    await redis.delete(stream)

    proc = await asyncio.to_thread(
        _surge, config, "outbox", "replay", "--since", "2000-01-01T00:00:00Z"
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    oldest = timestamp(await pg.fetchval("SELECT created_at FROM outbox WHERE id = 1"))
    assert proc.stdout == (
        f"replayed 12 outbox event(s) (ids 1..12) to {stream}; relayed up to id 12;"
        f" oldest row kept {oldest}\n"
    )
    assert [int(m[b"id"]) for m in await messages(redis, stream)] == list(range(1, 13))

    for args, problem in (
        (("--since", "2026-12-07 10:00"), "has no UTC offset"),
        (("--since", "2026-12-07T10:00:00Z", "--until", "2026-12-07T09:00:00Z"), "later than"),
    ):
        proc = await asyncio.to_thread(_surge, config, "outbox", "replay", *args)
        assert proc.returncode == 2
        assert problem in proc.stderr and proc.stderr.count("\n") == 1
    assert len(await messages(redis, stream)) == 12  # a refused command published nothing

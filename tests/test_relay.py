"""The outbox relay (id order, at least once, one publisher among replicas, resumable, never
past an unfinished transaction) and the analytics consumer group (each event applied once)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from db import outbox
from db.pool import Database, open_database
from handlers.events.relay import (
    IDLE_MAX_S,
    OutboxRelay,
    UserEventsConsumer,
    next_pause,
    stream_key,
)
from server import metrics
from server.app import create_app
from server.config import Config
from server.runner import free_port

from .conftest import ROOT
from .helpers import add_user, signup

TOPICS = ("user.created", "user.updated", "order.created")


async def add_outbox(pg: Database | asyncpg.Connection, n: int, start: int = 0) -> None:
    """n outbox rows in one statement; topics cycle through TOPICS."""
    await pg.execute(
        """
        INSERT INTO outbox (tenant_id, topic, aggregate_id, payload)
        SELECT $1, ($2::text[])[1 + (i % 3)], surge_uuid_v7(), jsonb_build_object('n', i)
        FROM generate_series($3::int, $3::int + $4::int - 1) AS i
        """,
        uuid.UUID(int=1),
        list(TOPICS),
        start,
        n,
    )


async def stream_ids(redis: Redis, stream: str) -> list[int]:
    return [int(fields[b"id"]) for _mid, fields in await redis.xrange(stream)]


async def relay_all(relay: OutboxRelay) -> int:
    total = 0
    while n := await relay.relay_once():
        total += n
    return total


async def test_rows_go_out_in_id_order_in_batches(
    config: Config, pg: Database, redis: Redis
) -> None:
    stream = stream_key(config.redis_key_prefix)
    await add_outbox(pg, 120)
    relay = OutboxRelay(pg, redis, stream, batch=50)
    await outbox.ensure_position(pg, stream)
    assert [await relay.relay_once() for _ in range(4)] == [50, 50, 20, 0]
    assert await stream_ids(redis, stream) == list(range(1, 121))
    _mid, fields = (await redis.xrange(stream, count=1))[0]
    assert set(fields) == {
        b"id",
        b"event_id",
        b"tenant_id",
        b"topic",
        b"aggregate_id",
        b"payload",
        b"created_at",
    }
    assert fields[b"payload"] == b'{"n": 0}'
    assert await pg.fetchval("SELECT last_id FROM outbox_relay WHERE stream = $1", stream) == 120
    await add_outbox(pg, 5)
    await relay.update_lag()
    assert metrics.REGISTRY.get_sample_value("surge_outbox_lag") == 5
    await relay_all(relay)
    await relay.update_lag()
    assert metrics.REGISTRY.get_sample_value("surge_outbox_lag") == 0
    assert metrics.REGISTRY.get_sample_value("surge_outbox_lag_seconds") == 0


@pytest.mark.parametrize("outcome", ["COMMIT", "ROLLBACK"])
async def test_an_unfinished_transaction_holds_the_relay_back(
    config: Config, pg: Database, redis: Redis, outcome: str
) -> None:
    stream = stream_key(config.redis_key_prefix)
    relay = OutboxRelay(pg, redis, stream)
    await outbox.ensure_position(pg, stream)
    slow = await asyncpg.connect(config.database_url)
    try:
        await slow.execute("BEGIN")
        await add_outbox(slow, 1)  # draws id 1, not committed yet
        await add_outbox(pg, 1, start=1)  # id 2, committed
        assert await relay.relay_once() == 0  # publishing id 2 now would skip id 1 for good
        await slow.execute(outcome)
    finally:
        await slow.close()
    await relay_all(relay)
    assert await stream_ids(redis, stream) == ([1, 2] if outcome == "COMMIT" else [2])


async def test_replicas_publish_every_row_once_in_order_under_concurrent_writers(
    config: Config, pg: Database, redis: Redis
) -> None:
    stream = stream_key(config.redis_key_prefix)
    await outbox.ensure_position(pg, stream)
    relays = [OutboxRelay(pg, redis, stream, batch=7, poll_s=0.005) for _ in range(3)]
    stop = asyncio.Event()
    running = [asyncio.create_task(r.run(stop)) for r in relays]

    async def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(15):
            with contextlib.suppress(_Rollback):
                async with pg.transaction() as con:
                    await add_outbox(con, rng.randint(1, 3))
                    await asyncio.sleep(rng.random() / 50)  # commits land out of id order
                    if rng.random() < 0.2:
                        raise _Rollback  # and some ids never land at all

    await asyncio.gather(*[writer(seed) for seed in range(5)])
    expected = await pg.fetchval("SELECT count(*) FROM outbox")
    deadline = time.monotonic() + 10
    while len(await stream_ids(redis, stream)) < expected:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.gather(*running)
    published = await stream_ids(redis, stream)
    assert published == sorted(published)
    assert published == [r["id"] for r in await pg.fetch("SELECT id FROM outbox ORDER BY id")]


class _Rollback(Exception):
    pass


_KILLED_RELAY = """
import asyncio, sys
from redis.asyncio import Redis
from db.pool import open_database
from handlers.events.relay import OutboxRelay

async def main(dsn, redis_url, stream):
    pg = await open_database(dsn, min_size=1, max_size=2, acquire_timeout=5, command_timeout=60)
    relay = OutboxRelay(pg, Redis.from_url(redis_url), stream, batch=100)
    publish = relay.publish
    async def publish_then_hang(rows):
        await publish(rows)
        print("published", len(rows), flush=True)
        await asyncio.sleep(3600)  # killed here: published, position not yet committed
    relay.publish = publish_then_hang
    await relay.relay_once()

asyncio.run(main(*sys.argv[1:]))
"""


async def _drain(consumer: UserEventsConsumer) -> None:
    while await consumer.consume_once():
        pass


async def test_a_relay_killed_mid_batch_loses_nothing_and_the_consumer_applies_each_once(
    config: Config, pg: Database, redis: Redis
) -> None:
    stream = stream_key(config.redis_key_prefix)
    assert config.database_url is not None and config.redis_url is not None
    await outbox.ensure_position(pg, stream)
    await add_outbox(pg, 300)
    killed = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RELAY, config.database_url, config.redis_url, stream],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert killed.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(killed.stdout.readline), 20)
        assert line == b"published 100\n", killed.stderr.read() if killed.stderr else b""
        survivor = OutboxRelay(pg, redis, stream, batch=100, poll_s=0.01)
        assert await survivor.relay_once() == 0  # the position is the killed relay's
        stop = asyncio.Event()
        running = asyncio.create_task(survivor.run(stop))
        await asyncio.sleep(0.1)
        killed.send_signal(signal.SIGKILL)
        killed.wait(5)
        deadline = time.monotonic() + 10
        while await pg.fetchval("SELECT last_id FROM outbox_relay") < 300:
            assert time.monotonic() < deadline, "the survivor did not take over"
            await asyncio.sleep(0.02)
        stop.set()
        await running
    finally:
        if killed.poll() is None:
            killed.kill()
        killed.wait(5)
        for pipe in (killed.stdout, killed.stderr):
            if pipe is not None:
                pipe.close()
    published = await stream_ids(redis, stream)
    assert len(published) == 400  # the first hundred twice: at least once, not exactly once
    assert set(published) == set(range(1, 301))
    assert published[100:] == list(range(1, 301))

    consumer = UserEventsConsumer(pg, redis, stream, None, batch=64)
    await consumer.ensure_group()
    await _drain(consumer)
    user_events = await pg.fetchval("SELECT count(*) FROM outbox WHERE topic LIKE 'user.%'")
    assert user_events == 200
    assert await pg.fetchval("SELECT count(*) FROM events") == 200
    sql = "SELECT count(DISTINCT props->>'event_id') FROM events"
    assert await pg.fetchval(sql) == 200
    sql = "SELECT count(*) FROM stream_consumed WHERE consumer = 'analytics'"
    assert await pg.fetchval(sql) == 200
    assert await pg.fetchval("SELECT sum(count) FROM event_counts") == 200
    pending = await redis.xpending(stream, consumer.group)
    assert pending["pending"] == 0


async def test_a_message_redelivered_after_a_consumer_died_is_not_applied_twice(
    config: Config, pg: Database, redis: Redis
) -> None:
    stream = stream_key(config.redis_key_prefix)
    await outbox.ensure_position(pg, stream)
    await add_outbox(pg, 30)
    await relay_all(OutboxRelay(pg, redis, stream))
    dying = UserEventsConsumer(pg, redis, stream, None, name="dying")
    await dying.ensure_group()
    read = await dying._read()
    await dying.apply(read)  # applied, then "died" before XACK
    heir = UserEventsConsumer(pg, redis, stream, None, name="heir")
    heir.claim_idle_ms = 0
    assert await heir.consume_once() == 30  # takes over the dead consumer's messages
    assert await pg.fetchval("SELECT count(*) FROM events") == 20
    assert (await redis.xpending(stream, heir.group))["pending"] == 0


async def test_the_relay_resumes_after_a_restart(config: Config, redis: Redis) -> None:
    stream = stream_key(config.redis_key_prefix)
    assert config.database_url is not None
    for start, n in ((0, 40), (40, 25)):
        # A fresh pool and relay each time: only PostgreSQL remembers where it stopped.
        pg = await open_database(
            config.database_url, min_size=1, max_size=2, acquire_timeout=5, command_timeout=10
        )
        try:
            await outbox.ensure_position(pg, stream)
            await add_outbox(pg, n, start)
            assert await relay_all(OutboxRelay(pg, redis, stream, batch=30)) == n
        finally:
            await pg.close()
    assert await stream_ids(redis, stream) == list(range(1, 66))


async def test_user_events_reach_the_analytics_counts(aiohttp_client: Any, config: Config) -> None:
    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    await add_user(client, owner)
    deadline = time.monotonic() + 10
    while True:
        resp = await client.get(
            "/v1/analytics/counts", params={"name": "user.created"}, headers=owner.headers
        )
        assert resp.status == 200
        total = sum(b["count"] for b in (await resp.json())["buckets"])
        if total == 2:  # the owner and the added user; tenant.created is not user.*
            break
        assert total < 2 and time.monotonic() < deadline
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("pause", "poll_s", "found", "expected"),
    [
        (0.1, 0.1, 0, 0.2),  # nothing: wait twice as long
        (0.8, 0.1, 0, 1.0),  # ... up to IDLE_MAX_S
        (1.0, 0.1, 0, 1.0),
        (5.0, 0.1, 0, 1.0),  # after an error's backoff, an idle round is back under the cap
        (1.0, 0.1, 3, 0.1),  # work: poll_s again
        (0.005, 0.005, 0, 0.01),
        (3.0, 3.0, 0, 3.0),  # a poll_s above the cap is kept as it is
    ],
)
def test_the_idle_pause(pause: float, poll_s: float, found: int, expected: float) -> None:
    assert next_pause(pause, poll_s, found) == pytest.approx(expected)
    assert IDLE_MAX_S == 1.0


async def test_an_idle_relay_polls_less_and_still_relays(
    config: Config, pg: Database, redis: Redis
) -> None:
    stream = stream_key(config.redis_key_prefix)
    await outbox.ensure_position(pg, stream)
    relay = OutboxRelay(pg, redis, stream, poll_s=0.01)
    rounds = 0
    relay_once = relay.relay_once

    async def counted() -> int:
        nonlocal rounds
        rounds += 1
        return await relay_once()

    relay.relay_once = counted  # type: ignore[method-assign]
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        await asyncio.sleep(1.5)
        # at a fixed 10 ms this would be ~150 rounds; doubling: 0.02, 0.04, ... 0.64, 1.0
        assert 3 <= rounds <= 12
        await add_outbox(pg, 5)
        deadline = time.monotonic() + IDLE_MAX_S + 2
        while len(await stream_ids(redis, stream)) < 5:
            assert time.monotonic() < deadline, "an idle relay did not pick up new rows"
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await running
    assert await stream_ids(redis, stream) == [1, 2, 3, 4, 5]


async def test_redis_away_is_a_warning_line_not_a_traceback(
    config: Config, pg: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """An outage the relay outlasts by retrying is one warning line per round, not an ERROR
    with a traceback each time (the metrics count the failed rounds)."""
    stream = stream_key(config.redis_key_prefix)
    await outbox.ensure_position(pg, stream)
    await add_outbox(pg, 3)
    away = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    relay = OutboxRelay(pg, away, stream, poll_s=0.01)
    stop = asyncio.Event()
    with caplog.at_level(logging.WARNING, logger="surge.relay"):
        running = asyncio.create_task(relay.run(stop))
        try:
            for _ in range(200):
                if caplog.records:
                    break
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await running
            await away.aclose()
    assert caplog.records, "the relay never tried"
    for record in caplog.records:
        assert record.levelno == logging.WARNING and record.exc_info is None
        assert record.getMessage().startswith("outbox relay round failed; retrying in")
        assert "ConnectionError" in record.getMessage()


async def test_the_lag_rises_while_redis_is_away(
    config: Config, pg: Database, redis: Redis
) -> None:
    """The lag gauge is read from PostgreSQL on its own schedule: with every relay round
    failing (Redis on a closed port), rows added to the outbox still show up in it."""
    stream = stream_key(config.redis_key_prefix)
    await outbox.ensure_position(pg, stream)
    away = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    relay = OutboxRelay(pg, away, stream, poll_s=0.01)
    relay.lag_interval_s = 0.05
    metrics.OUTBOX_LAG.set(0)
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    errors = metrics.REGISTRY.get_sample_value("surge_outbox_relay_errors_total") or 0.0
    try:
        await add_outbox(pg, 3)
        for _ in range(400):  # the relay is in its outage: its rounds fail on Redis
            if (metrics.REGISTRY.get_sample_value("surge_outbox_relay_errors_total") or 0) > errors:
                break
            await asyncio.sleep(0.05)
        await add_outbox(pg, 558, start=3)
        lag = 0.0
        for _ in range(400):  # bounded: 20 s at most, a fraction of a second when it works
            lag = metrics.REGISTRY.get_sample_value("surge_outbox_lag") or 0.0
            if lag >= 561:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await running
        await away.aclose()
    assert lag == 561
    assert await stream_ids(redis, stream) == []  # nothing was relayed: the rounds all failed

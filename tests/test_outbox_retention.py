"""Relayed outbox rows are pruned past OUTBOX_RETENTION_H, in batches, by every relaying
process at once; a row some stream has not been fed yet is never deleted."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

from redis.asyncio import Redis

from db.pool import Database, open_database
from handlers.events.relay import OutboxRelay, stream_key
from server import metrics
from server.app import create_app
from server.config import Config

OLD_H = 200  # hours: past the default retention of 168
YOUNG_H = 1


async def add_rows(pg: Database, n: int, hours_old: float) -> list[int]:
    """n outbox rows written `hours_old` hours ago (by the database's clock); their ids."""
    rows = await pg.fetch(
        """
        INSERT INTO outbox (tenant_id, topic, aggregate_id, payload, created_at)
        SELECT $1, 'user.updated', surge_uuid_v7(), jsonb_build_object('n', i),
               now() - make_interval(secs => $3::float8 * 3600)
        FROM generate_series(1, $2::int) AS i
        RETURNING id
        """,
        uuid.UUID(int=1),
        n,
        hours_old,
    )
    return [r["id"] for r in rows]


async def set_position(pg: Database, stream: str, last_id: int) -> None:
    await pg.execute(
        "INSERT INTO outbox_relay (stream, last_id) VALUES ($1, $2)"
        " ON CONFLICT (stream) DO UPDATE SET last_id = EXCLUDED.last_id",
        stream,
        last_id,
    )


async def kept(pg: Database) -> list[int]:
    return [r["id"] for r in await pg.fetch("SELECT id FROM outbox ORDER BY id")]


def pruned_total() -> float:
    return metrics.REGISTRY.get_sample_value("surge_outbox_pruned_total") or 0.0


async def test_only_relayed_rows_older_than_the_retention_go(
    config: Config, pg: Database, redis: Redis
) -> None:
    stream = stream_key(config.redis_key_prefix)
    old = await add_rows(pg, 5, OLD_H)
    straggler = await add_rows(pg, 1, YOUNG_H)  # young, among old ones (a later transaction)
    old += await add_rows(pg, 4, OLD_H)
    await set_position(pg, stream, old[-1])
    unrelayed_old = await add_rows(pg, 4, OLD_H)  # old, but no stream has them yet
    young = await add_rows(pg, 3, YOUNG_H)
    relay = OutboxRelay(pg, redis, stream, retention_h=168)
    relay.prune_batch = 2  # several batches, one of them short because of the straggler
    before = pruned_total()

    assert await relay.prune_once() == len(old)
    assert await kept(pg) == straggler + unrelayed_old + young
    assert pruned_total() - before == len(old)
    # The oldest row kept is now the straggler, an hour old (measured by the database's clock).
    oldest = metrics.REGISTRY.get_sample_value("surge_outbox_oldest_seconds")
    assert oldest is not None and YOUNG_H * 3600 <= oldest < YOUNG_H * 3600 + 600
    assert await relay.prune_once() == 0  # nothing more is due

    await set_position(pg, stream, young[-1])  # now relayed: the old ones are due too
    assert await relay.prune_once() == len(unrelayed_old)
    assert await kept(pg) == straggler + young


async def test_a_stream_behind_holds_pruning_back(
    config: Config, pg: Database, redis: Redis
) -> None:
    """Two streams fed from the same outbox (another REDIS_KEY_PREFIX): a row goes once both
    have it."""
    stream = stream_key(config.redis_key_prefix)
    ids = await add_rows(pg, 10, OLD_H)
    await set_position(pg, stream, ids[-1])
    await set_position(pg, stream + ":other", ids[3])
    relay = OutboxRelay(pg, redis, stream, retention_h=168)
    assert await relay.prune_once() == 4
    assert await kept(pg) == ids[4:]


async def test_nothing_is_pruned_before_anything_is_relayed_or_with_retention_0(
    config: Config, pg: Database, redis: Redis
) -> None:
    stream = stream_key(config.redis_key_prefix)
    ids = await add_rows(pg, 5, OLD_H)
    assert await OutboxRelay(pg, redis, stream, retention_h=1).prune_once() == 0  # no position
    await set_position(pg, stream, ids[-1])
    assert await OutboxRelay(pg, redis, stream, retention_h=0).prune_once() == 0
    assert await kept(pg) == ids
    # Retention 0 still measures how far back a replay reaches.
    oldest = metrics.REGISTRY.get_sample_value("surge_outbox_oldest_seconds")
    assert oldest is not None and oldest >= OLD_H * 3600


async def test_replicas_pruning_at_once_delete_each_row_once(
    config: Config, pg: Database, redis: Redis
) -> None:
    stream = stream_key(config.redis_key_prefix)
    ids = await add_rows(pg, 3000, OLD_H)
    young = await add_rows(pg, 50, YOUNG_H)
    await set_position(pg, stream, young[-1])
    assert config.database_url is not None
    pools = [
        await open_database(
            config.database_url, min_size=1, max_size=1, acquire_timeout=10, command_timeout=10
        )
        for _ in range(4)
    ]
    try:
        relays = [OutboxRelay(p, redis, stream, retention_h=168) for p in pools]
        for r in relays:
            r.prune_batch = 100
        before = pruned_total()
        counts = await asyncio.gather(*(r.prune_once() for r in relays))
    finally:
        for p in pools:
            await p.close()
    assert sum(counts) == len(ids)
    assert pruned_total() - before == len(ids)
    assert await kept(pg) == young


async def test_the_server_prunes_at_start_and_every_interval(
    aiohttp_client: Any, config: Config, pg: Database
) -> None:
    """OUTBOX_RETENTION_H reaches the relay: a serving process prunes without being asked."""
    stream = stream_key(config.redis_key_prefix)
    ids = await add_rows(pg, 20, 3)
    await set_position(pg, stream, ids[-1])
    await aiohttp_client(create_app(dataclasses.replace(config, outbox_retention_h=2)))
    deadline = time.monotonic() + 10
    while await kept(pg):
        assert time.monotonic() < deadline, "the relayed rows were not pruned"
        await asyncio.sleep(0.05)

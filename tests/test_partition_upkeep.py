"""Partition upkeep is observable: a failed round counts in surge_partition_upkeep_errors_total
and leaves surge_partition_upkeep_last_success_timestamp_seconds alone; a good round stamps it.
SurgePartitionUpkeepFailing (deploy/prometheus/rules/surge.rules.yml) reads both."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from db.pool import Database, open_database
from handlers.events.partitions import start_maintenance
from server import metrics
from server.config import Config
from server.runner import free_port

ERRORS = "surge_partition_upkeep_errors_total"
LAST_SUCCESS = "surge_partition_upkeep_last_success_timestamp_seconds"


def sample(name: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name)
    assert value is not None, f"{name} is not exported"
    return value


async def one_round(pg: Database, retention_days: int) -> None:
    """start_maintenance's first round (the one it runs before returning), then its loop
    stopped before the next."""
    task = await start_maintenance(pg, retention_days)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_failed_round_is_counted_and_a_good_one_stamps_its_time(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    errors, stamped = sample(ERRORS), sample(LAST_SUCCESS)
    # PostgreSQL down: nothing listens on the port
    down = await open_database(
        f"postgresql://postgres@127.0.0.1:{free_port()}/test",
        min_size=0,
        max_size=1,
        acquire_timeout=2,
        command_timeout=2,
    )
    try:
        with caplog.at_level(logging.WARNING, logger="surge.events"):
            await one_round(down, config.events_retention_days)
    finally:
        await down.close()
    assert [r.getMessage() for r in caplog.records] == ["partition maintenance failed"]
    assert sample(ERRORS) == errors + 1
    assert sample(LAST_SUCCESS) == stamped

    assert config.database_url is not None
    up = await open_database(
        config.database_url, min_size=1, max_size=2, acquire_timeout=5, command_timeout=10
    )
    before = time.time()
    try:
        await one_round(up, config.events_retention_days)
    finally:
        await up.close()
    assert before <= sample(LAST_SUCCESS) <= time.time()
    assert sample(ERRORS) == errors + 1

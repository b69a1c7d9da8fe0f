"""Day partitions of events and event_counts: made ahead, dropped past the retention, by every
replica (the statements are safe to run concurrently)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import UTC, date, datetime, timedelta

from db import events, outbox
from db.pool import Database
from server import metrics

log = logging.getLogger("surge.events")

# Partitions exist from yesterday (ts may be 24 h old) to three days ahead, so ingestion keeps
# working through two days of failed maintenance rounds.
PARTITION_DAYS_BEHIND = 1
PARTITION_DAYS_AHEAD = 3
MAINTENANCE_INTERVAL_S = 3600.0
MAINTENANCE_RETRY_S = 30.0
MAINTENANCE_START_S = 5.0
_DAY_NAME = re.compile(r"^(.*_p[0-9]{8})(_[0-9]+)?$")


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
    await _report_strays(pg)
    return created, dropped


async def _report_strays(pg: Database) -> None:
    """Warn, every round, of tables named like a partition that are not attached: the day's
    partition was made under the next name (0007_partition_names.sql), and what to do with the
    stray table's rows is the operator's call."""
    strays = 0
    for table in events.PARTITIONED:
        for name in await events.stray_partitions(pg, table):
            strays += 1
            log.warning(
                "table %s is named like a day partition of %s but is not attached to it"
                " (detached?): no query reads its rows and retention never drops them; that"
                " day's rows go to %s_N. Move its rows back or drop it"
                " (RUNBOOK: a detached event partition)",
                name,
                table,
                _DAY_NAME.sub(r"\1", name),
            )
    metrics.EVENT_PARTITIONS_STRAY.set(strays)


async def start_maintenance(pg: Database, retention_days: int) -> asyncio.Task[None]:
    """One round now (bounded by MAINTENANCE_START_S), then the hourly task, returned for the
    caller to cancel. A database that is down at start-up does not stop the process: the task
    retries sooner, and the writer makes missing partitions itself should events arrive first."""
    try:
        ok = await asyncio.wait_for(_maintain_logged(pg, retention_days), MAINTENANCE_START_S)
    except TimeoutError:
        # cancelled mid-round (a lock held, a slow database): the loop retries sooner
        metrics.PARTITION_UPKEEP_ERRORS.inc()
        log.warning("partition maintenance did not finish within %.1fs", MAINTENANCE_START_S)
        ok = False
    return asyncio.create_task(_maintenance_loop(pg, retention_days, ok))


async def _maintenance_loop(pg: Database, retention_days: int, ok: bool) -> None:
    while True:
        await asyncio.sleep(MAINTENANCE_INTERVAL_S if ok else MAINTENANCE_RETRY_S)
        ok = await _maintain_logged(pg, retention_days)


async def _maintain_logged(pg: Database, retention_days: int) -> bool:
    try:
        await maintain_partitions(pg, retention_days)
    except Exception:  # the database is down, a lock timed out: the next round tries again
        metrics.PARTITION_UPKEEP_ERRORS.inc()
        log.warning("partition maintenance failed", exc_info=True)
        return False
    metrics.PARTITION_UPKEEP_LAST_SUCCESS.set(time.time())
    return True

"""The events domain's workers, started in this order after the pools; closed in reverse, so
the writer commits what is pending before the pools close."""

from __future__ import annotations

from handlers.events import analytics, ingest, relay

contexts = [
    ingest.partitions_ctx,
    ingest.counters_ctx,
    ingest.writer_ctx,
    analytics.live_ctx,
    relay.relay_ctx,
    relay.consumer_ctx,
]

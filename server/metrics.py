"""The Prometheus metrics Surge exports, all in one registry.

With `serve --workers N` (N > 1) the supervisor gives every worker PROMETHEUS_MULTIPROC_DIR, a
directory of its own: prometheus-client then keeps each value in a memory-mapped file per
process, and /metrics on any worker reads them all (MultiProcessCollector), so one scrape
reports the whole instance. Counters and histograms are summed over live and dead workers;
each gauge says how its workers' values combine (`multiprocess_mode`, ignored with one process).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

# Read once, as prometheus-client itself does when it is imported.
MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "surge_http_requests_total",
    "HTTP requests answered, by route template and status",
    ["method", "route", "status"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "surge_http_request_duration_seconds",
    "Time from request start to response, by route template",
    ["method", "route"],
    # Budget is p99 <= 25 ms; the buckets are dense around it.
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "surge_http_requests_in_flight",
    "Requests being handled now",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
SHED = Counter(
    "surge_shed_total", "Requests refused with 503 because the process was full", registry=REGISTRY
)
RATELIMITED = Counter(
    "surge_ratelimit_refused_total",
    "Requests refused with 429, by limit",
    ["limit"],
    registry=REGISTRY,
)
RATELIMIT_FALLBACK = Counter(
    "surge_ratelimit_fallback_total",
    "Rate-limit decisions made locally because Redis did not answer",
    registry=REGISTRY,
)
POOL_TIMEOUTS = Counter(
    "surge_db_pool_timeouts_total",
    "Requests answered 503 because no database connection came free in time",
    registry=REGISTRY,
)


_POOL_GAUGES = {
    "size": ("surge_db_pool_size", "Open connections"),
    "idle": ("surge_db_pool_idle", "Idle connections"),
    "max": ("surge_db_pool_max", "Pool capacity"),
    "in_use": ("surge_db_pool_in_use", "Connections handed out"),
    "waiting": ("surge_db_pool_waiting", "Requests queued for a connection"),
}


class PoolCollector(Collector):
    """Pool gauges read at scrape time, so the request path pays nothing for them.

    A collector only sees its own process; with several workers, publish() copies the stats
    into multiprocess gauges (summed over live workers) instead: the runner calls it every
    second and /metrics right before reading, so the other workers' figures are <= 1 s old."""

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], dict[str, int]]] = {}
        self._shared: dict[str, Gauge] = {}

    def collect(self) -> Iterable[GaugeMetricFamily]:
        families = {
            key: GaugeMetricFamily(name, doc, labels=["pool"])
            for key, (name, doc) in _POOL_GAUGES.items()
        }
        for name, stats in list(self.sources.items()):
            values = stats()
            for key, fam in families.items():
                fam.add_metric([name], values[key])
        return list(families.values())

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []

    def publish(self) -> None:
        if not self._shared:
            self._shared = {
                key: Gauge(name, doc, ["pool"], multiprocess_mode="livesum", registry=None)
                for key, (name, doc) in _POOL_GAUGES.items()
            }
        for name, stats in list(self.sources.items()):
            values = stats()
            for key, gauge in self._shared.items():
                gauge.labels(name).set(values[key])


POOLS = PoolCollector()
REGISTRY.register(POOLS)

CACHE = Counter(
    "surge_user_cache_total",
    "User cache lookups and failures, by result (hit, miss, error)",
    ["result"],
    registry=REGISTRY,
)
AUTH_FAILURES = Counter(
    "surge_auth_failures_total",
    "Refused credentials, by reason",
    ["reason"],
    registry=REGISTRY,
)

EVENTS_INGESTED = Counter(
    "surge_events_ingested_total", "Events committed by POST /v1/events", registry=REGISTRY
)
EVENTS_REFUSED = Counter(
    "surge_events_refused_total",
    "Events answered 503 without being written, by reason (full, error, closing)",
    ["reason"],
    registry=REGISTRY,
)
EVENTS_PENDING = Gauge(
    "surge_events_pending",
    "Events accepted and not yet committed",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
EVENTS_FLUSH = Histogram(
    "surge_events_flush_seconds",
    "Time to commit one group of events (COPY + rollups + COMMIT)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
EVENTS_FLUSH_SIZE = Histogram(
    "surge_events_flush_size",
    "Events per group commit",
    buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10_000, 25_000),
    registry=REGISTRY,
)
EVENT_COUNTER_ERRORS = Counter(
    "surge_event_counter_errors_total",
    "Redis counter updates or reads that failed (PostgreSQL rollups still hold the counts)",
    registry=REGISTRY,
)
EVENT_PARTITIONS = Counter(
    "surge_event_partitions_total",
    "Day partitions created or dropped by this process",
    ["action"],
    registry=REGISTRY,
)
LIVE_CLIENTS = Gauge(
    "surge_analytics_live_clients",
    "Open /v1/analytics/live streams",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
# Every worker measures the same database-wide lag: the largest live reading is the answer.
OUTBOX_LAG = Gauge(
    "surge_outbox_lag",
    "Outbox ids not yet relayed to the Redis stream",
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
OUTBOX_LAG_SECONDS = Gauge(
    "surge_outbox_lag_seconds",
    "Age of the oldest outbox row not yet relayed (0 when caught up)",
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
OUTBOX_RELAYED = Counter(
    "surge_outbox_relayed_total", "Outbox rows published to the Redis stream", registry=REGISTRY
)
OUTBOX_RELAY_ERRORS = Counter(
    "surge_outbox_relay_errors_total",
    "Relay rounds that failed and were retried",
    registry=REGISTRY,
)
STREAM_CONSUMED = Counter(
    "surge_stream_consumed_total",
    "Stream messages a consumer handled, by result (applied, duplicate, skipped)",
    ["consumer", "result"],
    registry=REGISTRY,
)
PAYMENTS_BREAKER_STATE = Gauge(
    "surge_payments_breaker_state",
    "The payment provider's circuit breaker: 0 closed, 1 half-open, 2 open",
    multiprocess_mode="max",  # several workers: the instance shows its most open breaker
    registry=REGISTRY,
)
PAYMENTS_CALLS = Counter(
    "surge_payments_calls_total",
    "Calls to the payment provider, by operation and outcome",
    ["op", "outcome"],
    registry=REGISTRY,
)
PAYMENTS_SAGAS = Counter(
    "surge_payments_sagas_total",
    "Pay sagas that ended, by result (paid, payment_failed, refunded, voided)",
    ["result"],
    registry=REGISTRY,
)
WEBHOOKS = Counter(
    "surge_payments_webhooks_total",
    "Provider webhooks received, by result (applied, duplicate, ignored, bad_signature)",
    ["result"],
    registry=REGISTRY,
)


_INSTANCE: CollectorRegistry | None = None
if MULTIPROC_DIR is not None:
    _INSTANCE = CollectorRegistry()
    MultiProcessCollector(_INSTANCE, MULTIPROC_DIR)  # type: ignore[no-untyped-call]


def exposition() -> bytes:
    """The /metrics body: this process's registry, or with several workers the whole instance."""
    if _INSTANCE is None:
        return generate_latest(REGISTRY)
    POOLS.publish()
    return generate_latest(_INSTANCE)

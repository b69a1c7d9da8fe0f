"""The Prometheus metrics Surge exports, all in one registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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
IN_FLIGHT = Gauge("surge_http_requests_in_flight", "Requests being handled now", registry=REGISTRY)
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


class PoolCollector(Collector):
    """Pool gauges read at scrape time, so the request path pays nothing for them."""

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], dict[str, int]]] = {}

    def collect(self) -> Iterable[GaugeMetricFamily]:
        families = {
            "size": GaugeMetricFamily("surge_db_pool_size", "Open connections", labels=["pool"]),
            "idle": GaugeMetricFamily("surge_db_pool_idle", "Idle connections", labels=["pool"]),
            "max": GaugeMetricFamily("surge_db_pool_max", "Pool capacity", labels=["pool"]),
            "in_use": GaugeMetricFamily(
                "surge_db_pool_in_use", "Connections handed out", labels=["pool"]
            ),
            "waiting": GaugeMetricFamily(
                "surge_db_pool_waiting", "Requests queued for a connection", labels=["pool"]
            ),
        }
        for name, stats in list(self.sources.items()):
            values = stats()
            for key, fam in families.items():
                fam.add_metric([name], values[key])
        return list(families.values())

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


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
    "surge_events_pending", "Events accepted and not yet committed", registry=REGISTRY
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
    "surge_analytics_live_clients", "Open /v1/analytics/live streams", registry=REGISTRY
)
OUTBOX_LAG = Gauge(
    "surge_outbox_lag", "Outbox ids not yet relayed to the Redis stream", registry=REGISTRY
)
OUTBOX_LAG_SECONDS = Gauge(
    "surge_outbox_lag_seconds",
    "Age of the oldest outbox row not yet relayed (0 when caught up)",
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

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

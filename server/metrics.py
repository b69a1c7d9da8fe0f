"""The Prometheus metrics Surge exports, all in one registry.

With `serve --workers N` (N > 1) the supervisor gives every worker PROMETHEUS_MULTIPROC_DIR, a
directory of its own: prometheus-client then keeps each value in a memory-mapped file per
process, and /metrics on any worker reads them all (MultiProcessCollector), so one scrape
reports the whole instance. Counters and histograms are summed over live and dead workers;
each gauge says how its workers' values combine (`multiprocess_mode`, ignored with one process).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Read once, as prometheus-client itself does when it is imported.
MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

REGISTRY = CollectorRegistry(auto_describe=True)


def zeroed(counter: Counter, *label_values: str | tuple[str, ...]) -> Counter:
    """The counter with a child made now for each of its known label values, so every series
    is exported at 0 from the start: dashboards show 0, not "No data", and rate() alerts can
    fire on the first increment. A value not listed here still works; it appears when used."""
    for values in label_values:
        counter.labels(*((values,) if isinstance(values, str) else values))
    return counter


REQUESTS_DOC = "HTTP requests answered, by route template and status"
LATENCY_DOC = "Time from request start to response, by route template"
IN_FLIGHT_DOC = "Requests being handled now"
# Budget is p99 <= 25 ms; the buckets are dense around it.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_LE = [floatToGoString(b) for b in LATENCY_BUCKETS]  # type: ignore[no-untyped-call]
_FIRST_BOUND = LATENCY_BUCKETS[0]
_SUM = len(LATENCY_BUCKETS) + 1  # RouteMeter.latency: the buckets, +Inf, then the sum


class RouteMeter:
    """One route's (method, route template) request figures, kept as plain numbers.

    The chain builds one per route when the route is registered, so a request pays no label
    lookup: one method call on this object when it is answered.
    """

    __slots__ = ("counts", "latency", "method", "route")

    def __init__(self, method: str, route: str) -> None:
        self.method = method
        self.route = route
        self.counts: dict[int, int] = {}  # by status
        # one count per bucket, then +Inf, then the sum of seconds (at _SUM)
        self.latency = [0.0] * (_SUM + 1)

    def finished(self, status: int, seconds: float) -> None:
        latency = self.latency
        # le: the first bound >= seconds. Most answers take less than the first bound, so one
        # comparison spares them the bisect.
        latency[0 if seconds <= _FIRST_BOUND else bisect_left(LATENCY_BUCKETS, seconds)] += 1
        latency[_SUM] += seconds  # a non-negative index: the interpreter's fast path for lists
        counts = self.counts
        counts[status] = counts.get(status, 0) + 1


class HttpMetrics(Collector):
    """surge_http_requests_total, surge_http_request_duration_seconds and
    surge_http_requests_in_flight for one process, kept as plain numbers in a RouteMeter per
    route.

    Every request updates these three, and prometheus-client's objects take a lock per update
    and check themselves on every call. Only the event loop's thread updates and reads these
    numbers (the /metrics handler runs there too), so no lock is needed; they become metric
    families when scraped. With several workers (multiprocess mode) the numbers must live in
    prometheus-client's shared files instead: PromHttpMetrics below.
    """

    def __init__(self) -> None:
        self._meters: dict[tuple[str, str], RouteMeter] = {}
        # Requests started and not yet answered, counted by the chain itself (server/chain.py).
        self.in_flight = 0

    def route(self, method: str, route: str) -> RouteMeter:
        """The meter of (method, route): made on first use, the same object afterwards."""
        meter = self._meters.get((method, route))
        if meter is None:
            meter = self._meters[method, route] = RouteMeter(method, route)
        return meter

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "surge_http_requests_total", REQUESTS_DOC, labels=["method", "route", "status"]
        )
        latency = HistogramMetricFamily(
            "surge_http_request_duration_seconds", LATENCY_DOC, labels=["method", "route"]
        )
        for meter in list(self._meters.values()):
            for status, n in meter.counts.items():
                requests.add_metric([meter.method, meter.route, str(status)], n)
            counts = meter.latency
            if not any(counts):
                continue  # registered, never answered: no series, as prometheus-client
            cumulative: float = 0.0
            buckets: list[tuple[str, float]] = []
            for le, in_bucket in zip(_LE, counts, strict=False):
                cumulative += in_bucket
                buckets.append((le, cumulative))
            buckets.append(("+Inf", cumulative + counts[len(LATENCY_BUCKETS)]))
            latency.add_metric([meter.method, meter.route], buckets, sum_value=counts[_SUM])
        yield requests
        yield latency
        yield GaugeMetricFamily("surge_http_requests_in_flight", IN_FLIGHT_DOC, self.in_flight)

    def describe(self) -> Iterable[Metric]:
        return self.collect()


class PromRouteMeter:
    """A RouteMeter on prometheus-client's children, bound once per route (.labels() takes a
    lock and builds a key per call)."""

    __slots__ = ("_counts", "_latency", "_owner", "method", "route")

    def __init__(self, owner: PromHttpMetrics, method: str, route: str) -> None:
        self.method = method
        self.route = route
        self._owner = owner
        # made at the first answer: a child exists (and is exposed) from .labels() on
        self._latency: Any = None
        self._counts: dict[int, Any] = {}

    def finished(self, status: int, seconds: float) -> None:
        if self._latency is None:
            self._latency = self._owner.latency.labels(self.method, self.route)
        self._latency.observe(seconds)
        counter = self._counts.get(status)
        if counter is None:
            counter = self._counts[status] = self._owner.requests.labels(
                self.method, self.route, str(status)
            )
        counter.inc()


class PromHttpMetrics:
    """The same three metrics on prometheus-client's objects, for multiprocess mode."""

    def __init__(self) -> None:
        self.requests = Counter(
            "surge_http_requests_total", REQUESTS_DOC, ["method", "route", "status"],
            registry=REGISTRY,
        )  # fmt: skip
        self.latency = Histogram(
            "surge_http_request_duration_seconds", LATENCY_DOC, ["method", "route"],
            buckets=LATENCY_BUCKETS, registry=REGISTRY,
        )  # fmt: skip
        self.gauge = Gauge(
            "surge_http_requests_in_flight", IN_FLIGHT_DOC, multiprocess_mode="livesum",
            registry=REGISTRY,
        )  # fmt: skip
        self._meters: dict[tuple[str, str], PromRouteMeter] = {}
        self.in_flight = 0  # counted by the chain, as HttpMetrics.in_flight

    def route(self, method: str, route: str) -> PromRouteMeter:
        meter = self._meters.get((method, route))
        if meter is None:
            meter = self._meters[method, route] = PromRouteMeter(self, method, route)
        return meter

    def publish(self) -> None:
        """The in-flight count into this worker's shared file: every second, with the pool
        gauges (server/runner.py), instead of a gauge update (a lock and a file write) twice per
        request. Not at a scrape: the scrape would count itself and leave that count behind
        until the next tick (a single process's scrape does count itself)."""
        self.gauge.set(self.in_flight)


HTTP: HttpMetrics | PromHttpMetrics
if MULTIPROC_DIR is None:
    HTTP = HttpMetrics()
    REGISTRY.register(HTTP)
else:
    HTTP = PromHttpMetrics()
SHED = zeroed(
    Counter(
        "surge_shed_total",
        "Requests refused with 503 because the process was full, by reason (queue_full: the queue"
        " was at its bound; deadline: waited past the wait allowed; tenant_share: its tenant held"
        " more than its share of the queue)",
        ["reason"],
        registry=REGISTRY,
    ),
    "queue_full",
    "deadline",
    "tenant_share",
)
RATELIMITED = zeroed(
    Counter(
        "surge_ratelimit_refused_total",
        "Requests refused with 429, by limit (general, auth, graphql, webhook)",
        ["limit"],
        registry=REGISTRY,
    ),
    *("general", "auth", "graphql", "webhook"),
)
RATELIMIT_FALLBACK = Counter(
    "surge_ratelimit_fallback_total",
    "Rate-limit decisions made locally because Redis did not answer",
    registry=REGISTRY,
)
READINESS = Gauge(
    "surge_readiness_check",
    "The last /readyz check of each dependency: 1 answered, 0 did not (redis 0: degraded)",
    ["check"],
    multiprocess_mode="livemin",  # several workers: the instance shows a failing check
    registry=REGISTRY,
)
CONNECTIONS_DROPPED = zeroed(
    Counter(
        "surge_connections_dropped_total",
        "Connections closed before a request was served, by reason (header_timeout,"
        " per_address_cap)",
        ["reason"],
        registry=REGISTRY,
    ),
    *("header_timeout", "per_address_cap"),
)
POOL_TIMEOUTS = Counter(
    "surge_db_pool_timeouts_total",
    "Requests answered 503 because no database connection came free in time",
    registry=REGISTRY,
)

DB_UNAVAILABLE = Counter(
    "surge_db_unavailable_total",
    "Requests answered 503 because PostgreSQL could not be reached or the connection was lost",
    registry=REGISTRY,
)
DB_CONNECTIONS_CLOSED = Counter(
    "surge_db_connections_closed_total",
    "Pooled connections closed, by pool and reason: lost (found closed by the server or the"
    " network), interrupted (dropped after a cancelled or failed statement), lifetime, idle",
    ["pool", "reason"],
    registry=REGISTRY,
)
DB_RETRIES = Counter(
    "surge_db_retries_total",
    "Statements (or a transaction's BEGIN) run again on a new connection after the first was"
    " found lost before anything of them was sent, by pool",
    ["pool"],
    registry=REGISTRY,
)


_POOL_CLOSE_REASONS = ("lost", "interrupted", "lifetime", "idle")


def pool_events(pool: str) -> Callable[[str], None]:
    """The pool's on_event: its events (db.pool.Database) counted under the pool's name, each
    series exported at 0 from the pool's opening."""
    DB_RETRIES.labels(pool)
    for reason in _POOL_CLOSE_REASONS:
        DB_CONNECTIONS_CLOSED.labels(pool, reason)

    def note(event: str) -> None:
        if event == "retry":
            DB_RETRIES.labels(pool).inc()
        else:
            DB_CONNECTIONS_CLOSED.labels(pool, event).inc()

    return note


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

_ADMISSION_GAUGES = {
    "limit": (
        "surge_concurrency_limit",
        "Requests this process admits at once now (adaptive, CONCURRENCY_MIN..MAX_IN_FLIGHT)",
    ),
    "in_flight": ("surge_concurrency_in_flight", "Requests holding an admission slot now"),
    "queued": ("surge_queue_length", "Requests waiting for an admission slot now"),
}
QUEUE_WAIT_DOC = "Time from a request's arrival to its admission slot, of admitted requests"
QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_WAIT_LE = [floatToGoString(b) for b in QUEUE_WAIT_BUCKETS]  # type: ignore[no-untyped-call]
_WAIT_FIRST = QUEUE_WAIT_BUCKETS[0]
_WAIT_SUM = len(QUEUE_WAIT_BUCKETS) + 1


class AdmissionCollector(Collector):
    """The admission gauges (read at scrape time from `source`) and the queue-wait histogram
    (plain numbers, as RouteMeter: `observe` runs once per admitted request). With several
    workers the histogram is prometheus-client's, and publish() copies the gauges into
    multiprocess gauges every second."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, int]] | None = None
        self.wait = [0.0] * (_WAIT_SUM + 1)  # one count per bucket, +Inf, then the sum
        self._shared: dict[str, Gauge] = {}
        # one admitted request's wait, in seconds
        self.observe: Callable[[float], None] = self._count
        if MULTIPROC_DIR is not None:
            self.observe = Histogram(
                "surge_queue_wait_seconds", QUEUE_WAIT_DOC, buckets=QUEUE_WAIT_BUCKETS,
                registry=REGISTRY,
            ).observe  # fmt: skip

    def _count(self, seconds: float) -> None:
        wait = self.wait
        wait[0 if seconds <= _WAIT_FIRST else bisect_left(QUEUE_WAIT_BUCKETS, seconds)] += 1
        wait[_WAIT_SUM] += seconds

    def collect(self) -> Iterable[Metric]:
        # Without an adaptive limit (ADAPTIVE_CONCURRENCY=false, or no app yet) the gauges are
        # declared with no sample: they exist, and read "no data" rather than a false 0.
        values = self.source() if self.source is not None else None
        for key, (name, doc) in _ADMISSION_GAUGES.items():
            yield GaugeMetricFamily(name, doc, None if values is None else values[key])
        counts = self.wait
        cumulative = 0.0
        buckets: list[tuple[str, float]] = []
        for le, in_bucket in zip(_WAIT_LE, counts, strict=False):
            cumulative += in_bucket
            buckets.append((le, cumulative))
        buckets.append(("+Inf", cumulative + counts[len(QUEUE_WAIT_BUCKETS)]))
        yield HistogramMetricFamily(
            "surge_queue_wait_seconds", QUEUE_WAIT_DOC, buckets=buckets, sum_value=counts[_WAIT_SUM]
        )

    def describe(self) -> Iterable[Metric]:
        return []

    def publish(self) -> None:
        """Multiprocess mode: the gauges into this worker's shared files (summed over workers)."""
        if self.source is None:
            return
        if not self._shared:
            self._shared = {
                key: Gauge(name, doc, multiprocess_mode="livesum", registry=None)
                for key, (name, doc) in _ADMISSION_GAUGES.items()
            }
        values = self.source()
        for key, gauge in self._shared.items():
            gauge.set(values[key])


ADMISSION = AdmissionCollector()
if MULTIPROC_DIR is None:
    REGISTRY.register(ADMISSION)

CACHE = zeroed(
    Counter(
        "surge_user_cache_total",
        "User cache lookups and failures, by result (hit, miss, error)",
        ["result"],
        registry=REGISTRY,
    ),
    *("hit", "miss", "error"),
)
# Why server/tokens.py refused an access token (TokenError.reason).
TOKEN_FAILURES = ("bad_header", "malformed", "bad_signature", "wrong_audience", "expired")
AUTH_FAILURES = zeroed(
    Counter(
        "surge_auth_failures_total",
        "Refused credentials, by reason: login, refresh, refresh_reuse (a rotated refresh token"
        " replayed), revoked, and the access tokens refused by server/tokens.py (bad_header,"
        " malformed, bad_signature, wrong_audience, expired)",
        ["reason"],
        registry=REGISTRY,
    ),
    *("login", "refresh", "refresh_reuse", "revoked", *TOKEN_FAILURES),
)
REVOCATION_CURRENT = Gauge(
    "surge_revocation_current",
    "1 while the revocation list is current (Redis subscription or a sweep of PostgreSQL in the"
    " last second); 0 while access tokens are checked against PostgreSQL",
    multiprocess_mode="livemin",  # several workers: 0 if any of them is stale
    registry=REGISTRY,
)
REVOCATION_DB_CHECKS = Counter(
    "surge_revocation_db_checks_total",
    "Access tokens checked against PostgreSQL because the revocation list was stale",
    registry=REGISTRY,
)
REVOCATION_ERRORS = zeroed(
    Counter(
        "surge_revocation_errors_total",
        "Revocation list failures, by source (subscription: lost Redis subscriptions; sweep:"
        " failed PostgreSQL sweeps; publish: revocations not published)",
        ["source"],
        registry=REGISTRY,
    ),
    *("subscription", "sweep", "publish"),
)

EVENTS_INGESTED = Counter(
    "surge_events_ingested_total", "Events committed by POST /v1/events", registry=REGISTRY
)
EVENTS_REFUSED = zeroed(
    Counter(
        "surge_events_refused_total",
        "Events answered 503 without being written, by reason (full, error, closing)",
        ["reason"],
        registry=REGISTRY,
    ),
    *("full", "error", "closing"),
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
# Not "..._counter_...": a metric name must not name a metric type (promtool check metrics).
EVENT_COUNTER_ERRORS = Counter(
    "surge_event_redis_count_errors_total",
    "Redis counter updates or reads that failed (PostgreSQL rollups still hold the counts)",
    registry=REGISTRY,
)
EVENT_PARTITIONS = zeroed(
    Counter(
        "surge_event_partitions_total",
        "Day partitions created or dropped by this process, by action (created, dropped)",
        ["action"],
        registry=REGISTRY,
    ),
    *("created", "dropped"),
)
EVENT_PARTITIONS_STRAY = Gauge(
    "surge_event_partitions_stray",
    "Tables named like an events day partition but not attached (detached): rows nobody reads",
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
LIVE_CLIENTS = Gauge(
    "surge_analytics_live_clients",
    "Open /v1/analytics/live streams",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
LIVE_REFUSED = zeroed(
    Counter(
        "surge_analytics_live_refused_total",
        "Live streams refused, by the limit reached (user, tenant: 429; process: 503)",
        ["limit"],
        registry=REGISTRY,
    ),
    "user",
    "tenant",
    "process",
)
LIVE_CLOSED = zeroed(
    Counter(
        "surge_analytics_live_closed_total",
        "Live streams the server ended, by reason (slow: a consumer past its buffer or write "
        "timeout; expired, revoked: its token, after a reauthenticate event)",
        ["reason"],
        registry=REGISTRY,
    ),
    "slow",
    "expired",
    "revoked",
)
EVENT_NAMES_REFUSED = Counter(
    "surge_event_names_refused_total",
    "POST /v1/events answered 422 for a new event name past EVENTS_MAX_NAMES_PER_TENANT",
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
# Read replicas (server/replica.py): series only when DATABASE_READ_URL is set. Every worker
# samples the same replica: the largest live lag, the lowest live `up`, is the instance's.
REPLICA_LAG_SECONDS = Gauge(
    "surge_replica_lag_seconds",
    "How far the read replica's replay is behind the primary, in time (sampled every"
    " REPLICA_POLL_MS)",
    ["pool"],
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
REPLICA_LAG_BYTES = Gauge(
    "surge_replica_lag_bytes",
    "WAL bytes the primary has written that the read replica has not replayed",
    ["pool"],
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
REPLICA_UP = Gauge(
    "surge_replica_up",
    "1 while the read replica answers its position (lagging or not), 0 while it does not",
    ["pool"],
    multiprocess_mode="livemin",
    registry=REGISTRY,
)
# (server, reason) of every read routed while a replica is set: the replica because it had
# replayed the tenant's writes (fresh), else the primary because it had not (behind), lagged
# past REPLICA_MAX_LAG_S (lagging), did not answer (down), or Redis did not (redis).
REPLICA_READ_ROUTES = (
    ("replica", "fresh"),
    ("primary", "behind"),
    ("primary", "lagging"),
    ("primary", "down"),
    ("primary", "redis"),
)
REPLICA_READS = Counter(
    "surge_replica_reads_total",
    "Reads routed while a read replica is set, by the server chosen and why",
    ["server", "reason"],
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
STREAM_CONSUMED = zeroed(
    Counter(
        "surge_stream_consumed_total",
        "Stream messages a consumer handled, by result (applied, duplicate, skipped)",
        ["consumer", "result"],
        registry=REGISTRY,
    ),
    # the consumer groups of handlers/events/relay.py
    *(("analytics", result) for result in ("applied", "duplicate", "skipped")),
)
PAYMENTS_BREAKER_STATE = Gauge(
    "surge_payments_breaker_state",
    "The payment provider's circuit breaker: 0 closed, 1 half-open, 2 open",
    multiprocess_mode="max",  # several workers: the instance shows its most open breaker
    registry=REGISTRY,
)
_PAYMENT_OPS = ("authorize", "capture", "void", "refund")
_PAYMENT_OUTCOMES = (
    "ok",
    "declined",
    "rejected",
    "5xx",
    "retry_later",
    "unreachable",
    "breaker_open",
)
PAYMENTS_CALLS = zeroed(
    Counter(
        "surge_payments_calls_total",
        "Calls to the payment provider, by operation (authorize, capture, void, refund) and"
        " outcome (ok, declined, rejected, 5xx, retry_later, unreachable, breaker_open)",
        ["op", "outcome"],
        registry=REGISTRY,
    ),
    *((op, outcome) for op in _PAYMENT_OPS for outcome in _PAYMENT_OUTCOMES),
)
PAYMENTS_SAGAS = zeroed(
    Counter(
        "surge_payments_sagas_total",
        "Pay sagas that ended, by result (paid, payment_failed, cancelled, refunded, voided)",
        ["result"],
        registry=REGISTRY,
    ),
    *("paid", "payment_failed", "cancelled", "refunded", "voided"),
)
WEBHOOKS = zeroed(
    Counter(
        "surge_payments_webhooks_total",
        "Provider webhooks received, by result (applied, duplicate, ignored, bad_signature)",
        ["result"],
        registry=REGISTRY,
    ),
    *("applied", "duplicate", "ignored", "bad_signature"),
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
    ADMISSION.publish()
    return generate_latest(_INSTANCE)

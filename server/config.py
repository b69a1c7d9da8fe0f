"""Settings: read once from the environment at start-up, cast strictly, frozen."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")


class ConfigError(Exception):
    """A bad environment value; the message names the variable."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def cast(raw: str) -> int:
        try:
            value = int(raw.strip(), 10)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return value

    return cast


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def cast(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return value

    return cast


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {raw!r}")


def _choice(*choices: str) -> Callable[[str], str]:
    def cast(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {raw!r}")
        return value

    return cast


def _url(*schemes: str) -> Callable[[str], str]:
    def cast(raw: str) -> str:
        value = raw.strip()
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018  (raises ValueError on a bad port)
        except ValueError as exc:
            raise ValueError(f"malformed URL ({exc})") from None
        if parts.scheme not in schemes:
            raise ValueError(f"expected a {' or '.join(schemes)} URL")
        if parts.scheme == "unix":  # redis over a Unix socket (the embedded one, a sidecar)
            if not parts.path:
                raise ValueError("the URL names no socket path")
        elif not parts.hostname and "host=" not in parts.query:
            raise ValueError("the URL names no host")
        return value

    return cast


def _origins(raw: str) -> tuple[str, ...]:
    """`*`, or comma-separated origins (scheme://host[:port]), lower-cased as browsers send them."""
    origins = tuple(part.strip() for part in raw.split(",") if part.strip())
    if "*" in origins:
        if len(origins) > 1:
            raise ValueError("`*` stands alone: it allows every origin")
        return origins
    out = []
    for origin in origins:
        try:
            parts = urlsplit(origin)
            parts.port  # noqa: B018  (raises ValueError on a bad port)
        except ValueError as exc:
            raise ValueError(f"malformed origin {origin!r} ({exc})") from None
        bare = origin.rstrip("/")
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or "@" in parts.netloc
            or bare != f"{parts.scheme}://{parts.netloc}"
        ):
            raise ValueError(f"expected origins such as https://app.example.com, got {origin!r}")
        out.append(bare.lower())
    return tuple(out)


def _public_url(raw: str) -> str:
    value = _url("http", "https")(raw)
    parts = urlsplit(value)
    if parts.query or parts.fragment:
        raise ValueError("expected a base URL without query or fragment")
    return value.rstrip("/")


def _str(raw: str) -> str:
    return raw


def _nonempty(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw.strip()


def _identifier(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", value):
        raise ValueError(f"expected a PostgreSQL role name (letters, digits, _), got {raw!r}")
    return value


def _setting(
    env: str, cast: Callable[[str], Any], default: Any, doc: str, secret: bool = False
) -> Any:
    return field(default=default, metadata={"env": env, "cast": cast, "doc": doc, "secret": secret})


_PG = ("postgresql", "postgres")
_REDIS = ("redis", "rediss", "unix")


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting Surge reads. Tests build Config(...) directly; production uses from_env()."""

    host: str = _setting("HOST", _nonempty, "127.0.0.1", "Address to listen on")
    port: int = _setting("PORT", _int(0, 65535), 8080, "TCP port to listen on")
    database_url: str | None = _setting(
        "DATABASE_URL",
        _url(*_PG),
        None,
        "PostgreSQL URL; unset: an embedded PostgreSQL under DATA_DIR",
        secret=True,
    )
    database_read_url: str | None = _setting(
        "DATABASE_READ_URL",
        _url(*_PG),
        None,
        "Optional streaming replica for gets and lists, once it has replayed the reader's"
        " tenant's writes; unset: reads use DATABASE_URL",
        secret=True,
    )
    # A replica further behind than this serves nobody (stale reads of tenants that did not
    # write lately stay within it); reads after a tenant's own write wait for it in any case.
    replica_max_lag_s: float = _setting(
        "REPLICA_MAX_LAG_S",
        _float(0.1, 3600),
        5.0,
        "Reads skip the replica while its replay is further behind the primary than this",
    )
    replica_poll_ms: int = _setting(
        "REPLICA_POLL_MS",
        _int(10, 10_000),
        100,
        "How often each process samples the replica's replay position (and its lag)",
    )
    redis_url: str | None = _setting(
        "REDIS_URL",
        _url(*_REDIS),
        None,
        "Redis URL; unset: an embedded redis-server under DATA_DIR",
        secret=True,
    )
    redis_key_prefix: str = _setting(
        "REDIS_KEY_PREFIX", _nonempty, "surge:", "Prefix of every Redis key Surge writes"
    )
    data_dir: str = _setting(
        "DATA_DIR", _nonempty, ".surge", "Where embedded PostgreSQL and Redis keep their data"
    )
    pg_pool_min: int = _setting("PG_POOL_MIN", _int(0, 1000), 2, "Connections opened at start")
    # 16 per process: PERF-FINDINGS measured the database using <20 % of its capacity at 16;
    # more connections only move the queue from our FIFO gate into PostgreSQL.
    pg_pool_max: int = _setting("PG_POOL_MAX", _int(1, 1000), 16, "Most pooled connections")
    pg_acquire_timeout_ms: int = _setting(
        "PG_ACQUIRE_TIMEOUT_MS",
        _int(1, 600_000),
        2000,
        "Wait for a pooled connection at most this long, then answer 503",
    )
    pg_command_timeout_s: float = _setting(
        "PG_COMMAND_TIMEOUT_S", _float(0.1, 3600), 10.0, "Longest a single SQL statement may run"
    )
    pg_statement_cache_size: int = _setting(
        "PG_STATEMENT_CACHE_SIZE",
        _int(0, 100_000),
        1024,
        "Prepared statements kept per connection; 0 behind PgBouncer in transaction mode",
    )
    pg_max_lifetime_s: float = _setting(
        "PG_MAX_LIFETIME_S",
        _float(0, 86_400),
        1800.0,
        "A pooled connection is replaced after this long (new DNS, failover); 0: never",
    )
    pg_max_idle_s: float = _setting(
        "PG_MAX_IDLE_S",
        _float(0, 86_400),
        300.0,
        "A pooled connection idle this long is closed (down to PG_POOL_MIN); 0: never",
    )
    max_body_bytes: int = _setting(
        "MAX_BODY_BYTES", _int(1024, 1 << 30), 1 << 20, "Largest request body; bigger is 413"
    )
    max_in_flight: int = _setting(
        "MAX_IN_FLIGHT",
        _int(1, 1_000_000),
        512,
        "Most requests handled at once by one process (the adaptive limit's ceiling)",
    )
    adaptive_concurrency: bool = _setting(
        "ADAPTIVE_CONCURRENCY",
        _bool,
        False,  # off until it beats the fixed gate: docs/PERFORMANCE.md, "Overload"
        "Adapt the requests admitted at once to measured latency (CONCURRENCY_*), with a queue"
        " per tenant; false: a fixed MAX_IN_FLIGHT and one FIFO queue",
    )
    concurrency_min: int | None = _setting(
        "CONCURRENCY_MIN",
        _int(1, 1_000_000),
        None,
        "The adaptive limit never goes below this (nor above MAX_IN_FLIGHT); unset: PG_POOL_MAX,"
        " below which a lower limit only leaves pooled connections idle",
    )
    concurrency_initial: int = _setting(
        "CONCURRENCY_INITIAL",
        _int(1, 1_000_000),
        32,
        "The adaptive limit at start (within CONCURRENCY_MIN and MAX_IN_FLIGHT)",
    )
    concurrency_tolerance: float = _setting(
        "CONCURRENCY_TOLERANCE",
        _float(1.0, 100.0),
        2.0,
        "Latency up to this multiple of the no-load latency counts as no queueing: the adaptive"
        " limit grows below it and shrinks above it",
    )
    queue_deadline_ms: int | None = _setting(
        "QUEUE_DEADLINE_MS",
        _int(0, 600_000),
        None,
        "Longest wait for a slot, counted from the request's arrival; past it 503 (under a"
        " standing queue: half of this, or the current latency if longer); unset:"
        " SHED_QUEUE_TIMEOUT_MS",
    )
    shed_queue_timeout_ms: int = _setting(
        "SHED_QUEUE_TIMEOUT_MS",
        _int(0, 600_000),
        50,
        "Former name of QUEUE_DEADLINE_MS, used when that is unset",
    )
    body_read_timeout_s: float = _setting(
        "BODY_READ_TIMEOUT_S",
        _float(0.1, 3600),
        10.0,
        "A request body that has not fully arrived this long after the head is 408",
    )
    header_timeout_s: float = _setting(
        "HEADER_TIMEOUT_S",
        _float(0.1, 3600),
        10.0,
        "A connection that has not sent a whole request head this long after it opened is closed",
    )
    keepalive_timeout_s: float = _setting(
        "KEEPALIVE_TIMEOUT_S",
        _float(0.1, 3600),
        75.0,
        "An idle keep-alive connection is closed after this long",
    )
    max_connections_per_ip: int = _setting(
        "MAX_CONNECTIONS_PER_IP",
        _int(0, 1_000_000),
        256,
        "Open connections one client address may hold per process; 0: no cap"
        " (not applied with TRUST_FORWARDED_FOR: the peer is then the proxy)",
    )
    rate_limit_backend: str = _setting(
        "RATE_LIMIT_BACKEND",
        _choice("local", "redis"),
        "local",
        "local: per process (server/ratelimit.py); redis: one bucket shared by all replicas",
    )
    rate_limit_rate: float = _setting(
        "RATE_LIMIT_RATE", _float(0.001, 1e9), 100.0, "Requests per second per principal"
    )
    rate_limit_burst: int = _setting(
        "RATE_LIMIT_BURST", _int(1, 1_000_000_000), 200, "Bucket size per principal"
    )
    auth_rate_limit_per_minute: int = _setting(
        "AUTH_RATE_LIMIT_PER_MINUTE",
        _int(1, 1_000_000_000),
        30,
        "signup/login/refresh attempts per minute per IP (and per email)",
    )
    webhook_rate_limit_rate: float = _setting(
        "WEBHOOK_RATE_LIMIT_RATE",
        _float(0.001, 1e9),
        1000.0,
        "Signed payment webhooks accepted per second (their own bucket, after the signature check)",
    )
    trust_forwarded_for: bool = _setting(
        "TRUST_FORWARDED_FOR",
        _bool,
        False,
        "Take the client IP from X-Forwarded-For (only behind a trusted proxy)",
    )
    migrate_on_start: bool = _setting(
        "MIGRATE_ON_START",
        _bool,
        True,
        "serve applies pending migrations first; false when a migration job does it (PgBouncer)",
    )
    shutdown_grace_s: float = _setting(
        "SHUTDOWN_GRACE_S", _float(0, 3600), 10.0, "How long in-flight requests may finish on stop"
    )
    # A load balancer learns of a stop only from its checks (HAProxy: inter x fall); closing the
    # listener before it has would send it requests that meet a closed port (bench/cluster.py).
    drain_delay_s: float = _setting(
        "DRAIN_DELAY_S",
        _float(0, 600),
        0.0,
        "On stop, keep serving this long with /readyz 503 before the listener closes, so load"
        " balancers take the process out first (Kubernetes: preStop does it instead)",
    )
    # Production: processes, TLS on the listener, the two database roles.
    workers: int = _setting(
        "WORKERS",
        _int(0, 1024),
        0,
        "Processes serving the port (SO_REUSEPORT) under one supervisor; 0: one per usable core",
    )
    tls_cert_file: str | None = _setting(
        "TLS_CERT_FILE",
        _nonempty,
        None,
        "PEM certificate chain: serve HTTPS (with TLS_KEY_FILE); unset: plain HTTP",
    )
    tls_key_file: str | None = _setting(
        "TLS_KEY_FILE", _nonempty, None, "PEM private key of TLS_CERT_FILE", secret=True
    )
    database_migration_url: str | None = _setting(
        "DATABASE_MIGRATION_URL",
        _url(*_PG),
        None,
        "PostgreSQL URL of the schema owner, for migrations; unset: DATABASE_URL",
        secret=True,
    )
    database_runtime_role: str | None = _setting(
        "DATABASE_RUNTIME_ROLE",
        _identifier,
        None,
        "Role the server connects as: migrations grant it DML rights only; unset: no grants",
    )
    access_log: bool = _setting("ACCESS_LOG", _bool, True, "One JSON line per request on stdout")
    log_level: str = _setting(
        "LOG_LEVEL", _choice("debug", "info", "warning", "error"), "info", "Application log level"
    )
    log_format: str = _setting(
        "LOG_FORMAT",
        _choice("json", "console"),
        "json",
        "json: one JSON object per log line; console: plain text for a terminal",
    )
    jwt_keys: str = _setting(
        "JWT_KEYS",
        _str,
        "",
        "Signing keys 'kid:secret,kid:secret' (first signs, all verify); unset: with no"
        " DATABASE_URL a dev key kept in DATA_DIR/jwt-keys, else a random key per start",
        secret=True,
    )
    jwt_issuer: str = _setting("JWT_ISSUER", _nonempty, "surge", "iss claim of access tokens")
    jwt_audience: str = _setting(
        "JWT_AUDIENCE", _nonempty, "surge-api", "aud claim of access tokens"
    )
    access_token_ttl_s: int = _setting(
        "ACCESS_TOKEN_TTL_S", _int(30, 86_400), 900, "Lifetime of an access token"
    )
    refresh_token_ttl_s: int = _setting(
        "REFRESH_TOKEN_TTL_S", _int(60, 365 * 86_400), 30 * 86_400, "Lifetime of a refresh token"
    )
    refresh_reuse_grace_s: float = _setting(
        "REFRESH_REUSE_GRACE_S",
        _float(0, 300),
        10.0,
        "A just-rotated refresh token still works this long (two tabs refreshing at once)",
    )
    hash_concurrency: int = _setting(
        "HASH_CONCURRENCY", _int(1, 256), 2, "Password hashes computed at once (threads)"
    )
    user_cache_ttl_s: int = _setting(
        "USER_CACHE_TTL_S", _int(0, 86_400), 60, "TTL of cached users; 0 turns the cache off"
    )
    user_view_memo: int = _setting(
        "USER_VIEW_MEMO",
        _int(0, 1_000_000),
        10_000,
        "User bodies (~0.6 kB) kept per process for list pages, and pages (0.5 kB a body); 0: off",
    )
    enable_docs: bool = _setting("ENABLE_DOCS", _bool, True, "Serve /openapi.json and /docs")
    public_url: str | None = _setting(
        "PUBLIC_URL",
        _public_url,
        None,
        "Base URL clients reach the API at (the OpenAPI document's servers); unset: the"
        " origin the document was fetched from",
    )
    cors_allow_origins: tuple[str, ...] = _setting(
        "CORS_ALLOW_ORIGINS",
        _origins,
        (),
        "Browser origins allowed to call the API (comma-separated, e.g. https://app.example.com,"
        " or *); unset: none",
    )
    # -- GraphQL (POST /graphql): limits checked before any SQL runs --
    # Depth 8 fits the deepest useful query (orders > edges > node > items > product > field is
    # 6) with room for fragments; the standard introspection query is exempt (its own rule).
    graphql_max_depth: int = _setting(
        "GRAPHQL_MAX_DEPTH", _int(1, 64), 8, "Deepest field nesting a GraphQL query may have"
    )
    graphql_max_cost: int = _setting(
        "GRAPHQL_MAX_COST",
        _int(1, 10_000_000),
        5000,
        "Most nodes a GraphQL query may return (first x nested sizes); also what it is charged",
    )
    graphql_max_bytes: int = _setting(
        "GRAPHQL_MAX_BYTES", _int(256, 1 << 20), 16 * 1024, "Largest GraphQL document (the query)"
    )
    graphql_introspection: bool = _setting(
        "GRAPHQL_INTROSPECTION", _bool, True, "Answer GraphQL introspection (__schema, __type)"
    )
    # Group commit: 10 ms adds at most that much to a 202 and lets one COPY carry every event
    # that arrived meanwhile (hundreds under load) instead of one transaction per request.
    events_flush_ms: int = _setting(
        "EVENTS_FLUSH_MS", _int(1, 10_000), 10, "Pending events are committed at least this often"
    )
    events_batch_size: int = _setting(
        "EVENTS_BATCH_SIZE",
        _int(1, 1_000_000),
        1000,
        "A COPY starts at once when this many events are pending",
    )
    # A pending event is ~300 bytes (a tuple, its props as bytes, name and user id strings):
    # 50,000 keeps the worst case near 15 MB of the 100 MB RSS budget, and holds 64 clients
    # posting 500 events each, or half a second of 100k events/s against a stalled database.
    events_max_pending: int = _setting(
        "EVENTS_MAX_PENDING",
        _int(1000, 10_000_000),
        50_000,
        "Events accepted but not yet committed; past this POST /v1/events answers 503",
    )
    events_writers: int = _setting(
        "EVENTS_WRITERS",
        _int(1, 64),
        2,
        "Connections committing event batches at once (a pool of their own)",
    )
    events_retention_days: int = _setting(
        "EVENTS_RETENTION_DAYS",
        _int(1, 3650),
        30,
        "Days of events and 1-minute counts kept; older day partitions are dropped",
    )
    events_live_max_clients: int = _setting(
        "EVENTS_LIVE_MAX_CLIENTS",
        _int(1, 1_000_000),
        1000,
        "Open /v1/analytics/live streams per process; past this the endpoint answers 503",
    )
    # Shares of that pool: one tenant (or one of its users) cannot take every stream.
    events_live_max_per_tenant: int = _setting(
        "EVENTS_LIVE_MAX_PER_TENANT",
        _int(1, 1_000_000),
        100,
        "Open /v1/analytics/live streams of one tenant per process; past this 429",
    )
    events_live_max_per_user: int = _setting(
        "EVENTS_LIVE_MAX_PER_USER",
        _int(1, 1_000_000),
        10,
        "Open /v1/analytics/live streams of one user per process; past this 429",
    )
    # A message of 100 names of 64 characters is about 7 KB: 32 KB holds a few seconds of
    # them, and 1000 stalled streams hold at most ~100 MB between kernel and process.
    events_live_buffer_bytes: int = _setting(
        "EVENTS_LIVE_BUFFER_BYTES",
        _int(4096, 16 * 1024 * 1024),
        32768,
        "Unsent bytes a live stream may hold (also its socket's send buffer); past it the "
        "stream is closed",
    )
    events_live_top_names: int = _setting(
        "EVENTS_LIVE_TOP_NAMES",
        _int(1, 10_000),
        100,
        "Event names per live message: the most frequent of the second; the rest summed",
    )
    events_max_names_per_tenant: int = _setting(
        "EVENTS_MAX_NAMES_PER_TENANT",
        _int(1, 1_000_000),
        1000,
        "Distinct event names a tenant may use; a new name past it answers 422",
    )
    outbox_relay: bool = _setting(
        "OUTBOX_RELAY", _bool, True, "Relay outbox rows to the Redis stream from this process"
    )
    outbox_relay_batch: int = _setting(
        "OUTBOX_RELAY_BATCH", _int(1, 100_000), 500, "Outbox rows published per relay round"
    )
    outbox_relay_poll_ms: int = _setting(
        "OUTBOX_RELAY_POLL_MS",
        _int(1, 600_000),
        100,
        "Pause between relay rounds when drained; doubles while nothing comes, up to 1 s",
    )
    outbox_stream_maxlen: int = _setting(
        "OUTBOX_STREAM_MAXLEN",
        _int(1000, 1_000_000_000),
        1_000_000,
        "Approximate length the outbox stream is trimmed to",
    )
    # Relayed rows are what `surge outbox replay` can publish again after Redis lost the
    # stream; past this they are deleted (handlers/events/relay.py, docs/EVENTS.md).
    outbox_retention_h: int = _setting(
        "OUTBOX_RETENTION_H",
        _int(0, 87_600),
        168,
        "Hours a relayed outbox row is kept for `surge outbox replay`; 0 keeps every row",
    )
    analytics_consumer: bool = _setting(
        "ANALYTICS_CONSUMER",
        _bool,
        True,
        "Count user.* outbox events into the analytics (consumer group 'analytics')",
    )

    # -- payments (the provider is reached only through these) --
    payments_url: str | None = _setting(
        "PAYMENTS_URL",
        _url("http", "https"),
        None,
        "Payment provider base URL; unset: `make run` starts the fake provider (bench/)",
    )
    payments_api_key: str | None = _setting(
        "PAYMENTS_API_KEY", _nonempty, None, "Bearer key for calls to the provider", secret=True
    )
    payments_webhook_secret: str | None = _setting(
        "PAYMENTS_WEBHOOK_SECRET",
        _nonempty,
        None,
        "Webhook signing secret; during rotation 'new,old' (both verify)",
        secret=True,
    )
    payments_timeout_s: float = _setting(
        "PAYMENTS_TIMEOUT_S", _float(0.05, 120), 5.0, "Longest one provider call may take"
    )
    payments_retries: int = _setting(
        "PAYMENTS_RETRIES",
        _int(0, 10),
        3,
        "Retries of a retryable provider failure (connection, 5xx, 429), with backoff and jitter",
    )
    payments_backoff_ms: int = _setting(
        "PAYMENTS_BACKOFF_MS", _int(1, 60_000), 200, "First retry delay; doubles per retry"
    )
    payments_breaker_failures: int = _setting(
        "PAYMENTS_BREAKER_FAILURES",
        _int(1, 1000),
        5,
        "Consecutive provider failures that open the circuit breaker",
    )
    payments_breaker_reset_s: float = _setting(
        "PAYMENTS_BREAKER_RESET_S",
        _float(0.01, 3600),
        30.0,
        "How long the breaker stays open before one half-open probe",
    )
    payments_saga_lease_s: float = _setting(
        "PAYMENTS_SAGA_LEASE_S",
        _float(0.1, 3600),
        30.0,
        "A saga whose process stopped renewing it this long is resumed by another",
    )
    payments_saga_attempts: int = _setting(
        "PAYMENTS_SAGA_ATTEMPTS",
        _int(1, 1000),
        8,
        "Rounds of retries a saga step gets before it compensates (void, release stock)",
    )
    webhook_tolerance_s: int = _setting(
        "WEBHOOK_TOLERANCE_S",
        _int(1, 86_400),
        300,
        "Webhook signatures older (or newer) than this are refused",
    )
    # Tracing is off unless a collector is named: then every request, SQL statement and Redis
    # call is a span, exported over OTLP/HTTP in batches by a background thread (server/tracing.py).
    otel_exporter_otlp_endpoint: str | None = _setting(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        _url("http", "https"),
        None,
        "OTLP/HTTP collector base URL (spans go to <url>/v1/traces); unset: tracing off",
    )
    otel_service_name: str = _setting(
        "OTEL_SERVICE_NAME", _nonempty, "surge", "service.name of every exported span"
    )
    otel_traces_sampler_arg: float = _setting(
        "OTEL_TRACES_SAMPLER_ARG",
        _float(0.0, 1.0),
        1.0,
        "Share of new traces recorded; an incoming traceparent's sampled flag is always followed",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f.metadata.get("env")
            if name is None or name not in env:
                continue
            raw = env[name]
            if raw == "" and f.default is None:
                continue
            try:
                values[f.name] = f.metadata["cast"](raw)
            except ValueError as exc:
                raise ConfigError(name, str(exc)) from None
        config = cls(**values)
        config.check()
        return config

    @property
    def concurrency_floor(self) -> int:
        """CONCURRENCY_MIN, or its default: PG_POOL_MAX (within MAX_IN_FLIGHT)."""
        floor = self.pg_pool_max if self.concurrency_min is None else self.concurrency_min
        return min(floor, self.max_in_flight)

    @property
    def queue_deadline_s(self) -> float:
        ms = self.queue_deadline_ms
        return (self.shed_queue_timeout_ms if ms is None else ms) / 1000

    def check(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            missing = "TLS_KEY_FILE" if self.tls_key_file is None else "TLS_CERT_FILE"
            raise ConfigError(
                missing, "TLS_CERT_FILE and TLS_KEY_FILE are set together or not at all"
            )
        if self.pg_pool_min > self.pg_pool_max:
            raise ConfigError("PG_POOL_MIN", f"must not exceed PG_POOL_MAX ({self.pg_pool_max})")
        if self.rate_limit_burst < 1:
            raise ConfigError("RATE_LIMIT_BURST", "must be at least 1")
        if self.jwt_keys:
            parse_jwt_keys(self.jwt_keys)
        if self.payments_url and not (self.payments_api_key and self.payments_webhook_secret):
            raise ConfigError(
                "PAYMENTS_API_KEY" if not self.payments_api_key else "PAYMENTS_WEBHOOK_SECRET",
                "must be set when PAYMENTS_URL is",
            )

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "********"
            shown.append(f"{f.name}={value!r}")
        return f"Config({', '.join(shown)})"


def parse_jwt_keys(raw: str) -> list[tuple[str, bytes]]:
    """'kid1:secret1,kid2:secret2' -> [(kid, secret), ...]; each secret at least 32 bytes."""
    keys: list[tuple[str, bytes]] = []
    for part in raw.split(","):
        kid, sep, secret = part.strip().partition(":")
        if not sep or not kid or not secret:
            raise ConfigError("JWT_KEYS", "expected 'kid:secret[,kid:secret...]'")
        if len(secret.encode()) < 32:
            raise ConfigError("JWT_KEYS", f"the secret of key {kid!r} is shorter than 32 bytes")
        keys.append((kid, secret.encode()))
    return keys


def settings_table() -> list[tuple[str, str, str]]:
    """(name, default, meaning) for every variable: the README's table is made from this."""
    rows = []
    for f in dataclasses.fields(Config):
        if "env" not in f.metadata:
            continue
        default = "" if f.default is None or f.default == () else str(f.default)
        if isinstance(f.default, bool):
            default = str(f.default).lower()
        rows.append((f.metadata["env"], default, f.metadata["doc"]))
    return rows

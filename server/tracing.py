"""Distributed tracing (OpenTelemetry), on only when OTEL_EXPORTER_OTLP_ENDPOINT is set.

Off (the default), no OpenTelemetry SDK object exists (the SDK and the exporter are not even
imported; the API module is, for its types): create_app passes no Tracing
to the middleware, which then checks one `None` per request; the pools use asyncpg's own
connection class and the Redis client is untouched. The one thing kept is cheap: an incoming
`traceparent`'s trace id goes into the access log line (`trace_id_of`), so logs still join
the caller's trace. No `traceparent` is answered then: Surge has no span of its own to name.

On, with the SDK's BatchSpanProcessor and OTLP/HTTP (protobuf) exporter:
- a SERVER span per request, `METHOD route`, child of the incoming `traceparent` (W3C, with
  `tracestate`), current for the handler; its own `traceparent` is the response header;
- a CLIENT span per SQL statement named after its `-- name:` (db/traced.py), per Redis command
  and per Redis pipeline, only under a recording span (background loops start no traces);
- `client_span(name, headers)` for outgoing HTTP calls (the payment provider).
The exporter runs in the processor's thread; shutdown flushes it off the event loop.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web
from multidict import istr
from opentelemetry.context import Context, attach, detach
from opentelemetry.trace import (
    Span,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from redis.asyncio import Redis

from server.config import Config

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.sdk.trace import TracerProvider

# The tracer of the running app, for client_span (called from code that has no app at hand).
# One app per process in production; tests run their apps one after another.
_tracer: Tracer | None = None

# The header's name as istr, like aiohttp's hdrs: a lookup or a set skips case-folding it.
TRACEPARENT = istr("traceparent")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32
_PROPAGATOR = TraceContextTextMapPropagator()
_ERROR = Status(StatusCode.ERROR)


def trace_id_of(value: str | None) -> str | None:
    """The trace id of a traceparent header's value, None when absent or invalid."""
    if value is None:
        return None
    m = _TRACEPARENT.match(value.strip())
    if m is None or m[1] == "ff" or m[2] == _ZERO_TRACE:
        return None
    return m[2]


class ServerSpan:
    """A request's span while it runs: what the middleware needs, computed once."""

    __slots__ = ("_token", "span", "trace_id", "traceparent")

    def __init__(self, span: Span, token: Token[Context]) -> None:
        self.span = span
        self._token = token
        ctx = span.get_span_context()
        self.trace_id = f"{ctx.trace_id:032x}"
        self.traceparent = f"00-{self.trace_id}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"

    def error(self, exc: BaseException) -> None:
        # The type only: messages can quote request data (asyncpg's DataError quotes values).
        self.span.set_attribute("error.type", type(exc).__qualname__)

    def end(self, status: int) -> None:
        span = self.span
        if span.is_recording():
            span.set_attribute("http.response.status_code", status)
            if status >= 500:  # a 4xx is the client's error, not the server span's
                span.set_status(_ERROR)
        span.end()
        detach(self._token)


class Tracing:
    """The tracer provider of one app: built by `ctx` at start-up, flushed and closed on exit."""

    def __init__(self, config: Config) -> None:
        assert config.otel_exporter_otlp_endpoint is not None
        self.config = config
        self.endpoint = config.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
        self.tracer: Tracer | None = None
        self.provider: TracerProvider | None = None

    def start(self) -> Tracer:
        global _tracer
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        config = self.config
        resource = Resource.create(
            {
                "service.name": config.otel_service_name,
                # Which process served the span (one per worker): the "server id".
                "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
            }
        )
        # Not the global provider: each app (tests run several per process) owns its own.
        self.provider = TracerProvider(
            resource=resource,
            sampler=ParentBased(TraceIdRatioBased(config.otel_traces_sampler_arg)),
            shutdown_on_exit=False,  # stop() does it, bounded; an atexit hook would not be
        )
        # Queue size, batch size and delay follow OTEL_BSP_*; headers, timeout, compression
        # and certificates follow OTEL_EXPORTER_OTLP_* (read by the SDK itself).
        self.provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=self.endpoint))
        )
        self.tracer = _tracer = self.provider.get_tracer("surge")
        return self.tracer

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Export every ended span now (tests; the processor otherwise sends every 5 s)."""
        assert self.provider is not None
        return bool(await _in_thread(self.provider.force_flush, int(timeout_s * 1000)))

    async def stop(self, grace_s: float = 5.0) -> None:
        global _tracer
        if _tracer is self.tracer:
            _tracer = None
        provider, self.provider, self.tracer = self.provider, None, None
        if provider is None:
            return
        # shutdown() exports what is queued with blocking HTTP (and retries for up to
        # OTEL_EXPORTER_OTLP_TIMEOUT): in a daemon thread, waited for at most grace_s, so a
        # collector that does not answer cannot hold up the process's exit.
        closing = asyncio.ensure_future(_in_thread(provider.shutdown))
        await asyncio.wait({closing}, timeout=grace_s)

    def start_request(self, request: web.Request, route: str, rid: str) -> ServerSpan:
        assert self.tracer is not None
        headers = request.headers
        parent = _PROPAGATOR.extract(headers) if TRACEPARENT in headers else None
        method = request.method
        span = self.tracer.start_span(
            f"{method} {route}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "http.route": route,
                "url.path": request.path,
                "url.scheme": request.scheme,
                "surge.request_id": rid,
            },
        )
        return ServerSpan(span, attach(set_span_in_context(span)))

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        self.start()
        try:
            yield
        finally:
            await self.stop()


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a daemon thread of its own: unlike the loop's default executor, one still
    running at exit does not keep the process alive."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def run() -> None:
        result, error = None, None
        try:
            result = fn(*args)
        except BaseException as exc:
            error = exc
        with suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(_settle, fut, result, error)

    threading.Thread(target=run, name="surge-otel-flush", daemon=True).start()
    return await fut


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class ClientSpan:
    """What `client_span` yields: record the answer's status with `set_status`."""

    __slots__ = ("span",)

    def __init__(self, span: Span | None) -> None:
        self.span = span

    def set_status(self, status: int) -> None:
        span = self.span
        if span is None or not span.is_recording():
            return
        span.set_attribute("http.response.status_code", status)
        if status >= 400:
            span.set_status(_ERROR)
            span.set_attribute("error.type", str(status))


_NO_SPAN = ClientSpan(None)


@contextmanager
def client_span(
    name: str, headers: MutableMapping[str, str], *, method: str = "POST", url: str | None = None
) -> Iterator[ClientSpan]:
    """A CLIENT span around one outgoing HTTP call; adds `traceparent` (and `tracestate`).

        headers = {"Content-Type": "application/json", "Idempotency-Key": key}
        with client_span("payments.create_charge", headers, method="POST", url=url) as span:
            async with session.post(url, data=body, headers=headers) as resp:
                span.set_status(resp.status)

    Tracing off: `headers` is left alone and the span is a shared no-op. Tracing on: a child of
    the current request's span (a root span when called outside a request); an exception
    leaving the block marks it failed and propagates. `url` is recorded as server.address only
    (no path or query: they may carry ids or tokens).
    """
    tracer = _tracer
    if tracer is None:
        yield _NO_SPAN
        return
    attributes: dict[str, str | int] = {"http.request.method": method}
    if url is not None:
        parts = urlsplit(url)
        if parts.hostname:
            attributes["server.address"] = parts.hostname
        if parts.port:
            attributes["server.port"] = parts.port
    span = tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
    _PROPAGATOR.inject(headers, context=set_span_in_context(span))
    try:
        yield ClientSpan(span)
    except BaseException as exc:
        span.set_status(_ERROR)
        span.set_attribute("error.type", type(exc).__qualname__)
        raise
    finally:
        span.end()


def instrument_redis(client: Redis, tracer: Tracer) -> None:
    """A CLIENT span per command (named after it: MGET, EVALSHA) and per pipeline, on this
    client only, under a recording span only. No keys or values are recorded."""
    attributes: dict[str, dict[str, Any]] = {}

    async def traced(name: str, call: Any, *args: Any, **options: Any) -> Any:
        attrs = attributes.get(name)
        if attrs is None:  # bounded: the command names Surge uses
            attrs = attributes[name] = {"db.system.name": "redis", "db.operation.name": name}
        span = tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attrs)
        try:
            return await call(*args, **options)
        except BaseException as exc:
            span.set_status(_ERROR)
            span.set_attribute("error.type", type(exc).__qualname__)
            raise
        finally:
            span.end()

    execute: Any = client.execute_command

    async def execute_command(*args: Any, **options: Any) -> Any:
        if not get_current_span().is_recording():
            return await execute(*args, **options)
        command = args[0]
        name = (command.decode() if isinstance(command, bytes) else str(command)).upper()
        return await traced(name, execute, *args, **options)

    make_pipeline = client.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = make_pipeline(*args, **kwargs)
        run = pipe.execute

        async def execute_pipeline(*args: Any, **kwargs: Any) -> Any:
            if not get_current_span().is_recording():
                return await run(*args, **kwargs)
            return await traced("PIPELINE", run, *args, **kwargs)

        pipe.execute = execute_pipeline  # type: ignore[method-assign]
        return pipe

    client.execute_command = execute_command  # type: ignore[method-assign]
    client.pipeline = pipeline  # type: ignore[method-assign]


__all__ = [
    "ClientSpan",
    "ServerSpan",
    "Tracing",
    "client_span",
    "instrument_redis",
    "trace_id_of",
]

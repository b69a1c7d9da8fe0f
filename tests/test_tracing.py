"""Tracing: spans exported over real OTLP/HTTP to a real sink, against real PostgreSQL and Redis.

The sink is an aiohttp server decoding ExportTraceServiceRequest protobufs (opentelemetry-proto),
the collector's side of the wire; Surge runs in-process with OTEL_EXPORTER_OTLP_ENDPOINT at it.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from server import tracing
from server.access_log import AccessLog
from server.app import create_app, tracer_of
from server.config import Config
from server.keys import PG, REDIS, TRACING

from .conftest import configured
from .helpers import add_user, signup

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
SERVER = Span.SpanKind.SPAN_KIND_SERVER
CLIENT = Span.SpanKind.SPAN_KIND_CLIENT


def _value(kv: KeyValue) -> Any:
    v = kv.value
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


@dataclass
class Exported:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    trace_state: str
    status: int
    attributes: dict[str, Any]
    resource: dict[str, Any]


@dataclass
class Sink:
    """The collector: every span POSTed to /v1/traces, decoded."""

    spans: list[Exported] = field(default_factory=list)
    posts: int = 0

    async def receive(self, request: web.Request) -> web.Response:
        assert request.headers["Content-Type"] == "application/x-protobuf"
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest.FromString(body)
        self.posts += 1
        for rs in message.resource_spans:
            resource = {kv.key: _value(kv) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        Exported(
                            s.name,
                            s.kind,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            s.trace_state,
                            s.status.code,
                            {kv.key: _value(kv) for kv in s.attributes},
                            resource,
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def trace(self, trace_id: str) -> list[Exported]:
        return [s for s in self.spans if s.trace_id == trace_id]


async def start_sink(aiohttp_server: Any) -> tuple[Sink, str]:
    # Tests take aiohttp_server before aiohttp_client: the sink then outlives Surge's shutdown.
    sink = Sink()
    app = web.Application()
    app.router.add_post("/v1/traces", sink.receive)
    server = await aiohttp_server(app)
    return sink, f"http://127.0.0.1:{server.port}/"


def log_lines(stream: io.BytesIO, log: AccessLog) -> list[dict[str, Any]]:
    log.flush()
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def children(spans: list[Exported], parent: Exported) -> list[Exported]:
    return [s for s in spans if s.parent_id == parent.span_id]


async def test_request_sql_and_redis_spans_reach_the_collector(
    aiohttp_server: Any, aiohttp_client: Any, config: Config
) -> None:
    sink, endpoint = await start_sink(aiohttp_server)
    stream = io.BytesIO()
    log = AccessLog(stream)
    config = configured(config, otel_exporter_otlp_endpoint=endpoint, access_log=True)
    client = await aiohttp_client(create_app(config, access_log=log))
    owner = await signup(client)
    member = await add_user(client, owner)
    path = f"/v1/users/{member.id}"
    r = aioredis.Redis.from_url(config.redis_url or "")
    await r.delete(f"{config.redis_key_prefix}user:{owner.tenant_id}:{member.id}")
    await r.aclose()

    # A cache miss: the row comes from PostgreSQL (get_user), then fills Redis.
    incoming = f"00-{TRACE_ID}-{PARENT_ID}-01"
    miss = await client.get(
        path, headers={**owner.headers, "traceparent": incoming, "tracestate": "acme=7"}
    )
    assert miss.status == 200
    # A hit on a second trace: Redis answers alone.
    hit_trace = "0af7651916cd43dd8448eb211c80319c"
    hit = await client.get(
        path, headers={**owner.headers, "traceparent": f"00-{hit_trace}-b7ad6b7169203331-01"}
    )
    assert hit.status == 200
    assert await client.app[TRACING].flush()
    assert sink.posts >= 1

    server = [s for s in sink.trace(TRACE_ID) if s.kind == SERVER]
    assert len(server) == 1
    span = server[0]
    assert span.name == "GET /v1/users/{user_id}"
    assert span.parent_id == PARENT_ID
    assert span.trace_state == "acme=7"
    assert span.attributes["http.request.method"] == "GET"
    assert span.attributes["http.route"] == "/v1/users/{user_id}"
    assert span.attributes["http.response.status_code"] == 200
    assert span.resource["service.name"] == "surge"
    assert str(span.resource["service.instance.id"]).endswith(f":{__import__('os').getpid()}")
    assert miss.headers["traceparent"] == f"00-{TRACE_ID}-{span.span_id}-01"

    below = children(sink.trace(TRACE_ID), span)
    sql = [s for s in below if s.attributes.get("db.system.name") == "postgresql"]
    assert [s.name for s in sql] == ["get_user"]
    assert sql[0].kind == CLIENT
    assert sql[0].attributes["db.query.summary"] == "get_user"
    redis_ops = sorted(s.name for s in below if s.attributes.get("db.system.name") == "redis")
    assert redis_ops == ["EVALSHA", "MGET"]  # the lookup, then the fill

    hit_server = next(s for s in sink.trace(hit_trace) if s.kind == SERVER)
    assert hit.headers["traceparent"] == f"00-{hit_trace}-{hit_server.span_id}-01"
    hit_below = children(sink.trace(hit_trace), hit_server)
    assert [s.name for s in hit_below] == ["MGET"]
    assert hit_below[0].attributes == {"db.system.name": "redis", "db.operation.name": "MGET"}

    # Signup's statements are named spans too; no SQL or Redis span holds a value it was given.
    named = {s.name for s in sink.spans if s.attributes.get("db.system.name") == "postgresql"}
    assert {"insert_tenant", "insert_user", "get_user", "BEGIN", "COMMIT"} <= named
    secrets = (owner.tenant_id, member.id, owner.email, member.email, "correct horse")
    for s in sink.spans:
        if s.kind == CLIENT:
            assert not any(x in str(v) for v in s.attributes.values() for x in secrets), s

    lines = [x for x in log_lines(stream, log) if x["route"] == "/v1/users/{user_id}"]
    assert [x["trace_id"] for x in lines] == [TRACE_ID, hit_trace]
    assert all(len(x["trace_id"]) == 32 for x in log_lines(stream, log))  # traced: every line


async def test_client_span_unsampled_parent_and_errors(
    aiohttp_server: Any, aiohttp_client: Any, config: Config
) -> None:
    sink, endpoint = await start_sink(aiohttp_server)
    client = await aiohttp_client(
        create_app(configured(config, otel_exporter_otlp_endpoint=endpoint))
    )
    # The caller decided not to sample: the trace id is kept, nothing is exported.
    unsampled = "11111111111111111111111111111111"
    resp = await client.get("/healthz", headers={"traceparent": f"00-{unsampled}-{PARENT_ID}-00"})
    assert resp.status == 200
    assert resp.headers["traceparent"].startswith(f"00-{unsampled}-")
    assert resp.headers["traceparent"].endswith("-00")
    # No traceparent: a new trace, sampled (OTEL_TRACES_SAMPLER_ARG defaults to 1).
    fresh = await client.get("/no/such/route", headers={"traceparent": "garbage"})
    assert fresh.status == 404
    _, fresh_trace, fresh_span, flags = fresh.headers["traceparent"].split("-")
    assert int(flags, 16) & 1  # sampled (03: also W3C level 2's "random trace id" flag)

    tracer = tracer_of(client.app)
    assert tracer is not None
    headers: dict[str, str] = {"Content-Type": "application/json"}
    with (
        tracer.start_as_current_span("charge order") as parent,
        tracing.client_span(
            "payments.create_charge", headers, url="https://pay.example:8443/v1/charges?k=s"
        ) as call,
    ):
        call.set_status(502)
    outgoing = headers["traceparent"].split("-")
    assert outgoing[1] == f"{parent.get_span_context().trace_id:032x}"
    assert int(outgoing[3], 16) & 1
    try:
        with tracing.client_span("payments.refund", {}, method="POST"):
            raise ConnectionResetError
    except ConnectionResetError:
        pass
    assert await client.app[TRACING].flush()

    assert sink.trace(unsampled) == []
    (fresh_server,) = sink.trace(fresh_trace)
    assert fresh_server.span_id == fresh_span
    assert fresh_server.name == "GET unmatched"
    assert fresh_server.parent_id == ""
    assert fresh_server.attributes["http.response.status_code"] == 404
    charge = next(s for s in sink.spans if s.name == "payments.create_charge")
    assert charge.kind == CLIENT
    assert charge.span_id == outgoing[2]
    assert charge.parent_id == f"{parent.get_span_context().span_id:016x}"
    assert charge.status == Status.StatusCode.STATUS_CODE_ERROR
    assert charge.attributes == {
        "http.request.method": "POST",
        "server.address": "pay.example",
        "server.port": 8443,
        "http.response.status_code": 502,
        "error.type": "502",
    }
    refund = next(s for s in sink.spans if s.name == "payments.refund")
    assert refund.parent_id == ""  # outside a request: a trace of its own
    assert refund.status == Status.StatusCode.STATUS_CODE_ERROR
    assert refund.attributes["error.type"] == "ConnectionResetError"


async def test_failed_requests_mark_their_span(
    aiohttp_server: Any, aiohttp_client: Any, config: Config
) -> None:
    sink, endpoint = await start_sink(aiohttp_server)
    client = await aiohttp_client(
        create_app(configured(config, otel_exporter_otlp_endpoint=endpoint, user_cache_ttl_s=0))
    )
    owner = await signup(client)
    # A SQL error inside a request: the statement's span and the request's are marked, with
    # the exception's type only (asyncpg's messages can quote values).
    async with client.app[PG].connection() as con:
        await con.execute("ALTER TABLE users RENAME TO users_gone")
    try:
        resp = await client.get(
            f"/v1/users/{owner.id}",
            headers={**owner.headers, "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
        )
    finally:
        async with client.app[PG].connection() as con:
            await con.execute("ALTER TABLE users_gone RENAME TO users")
    assert resp.status == 500
    assert await client.app[TRACING].flush()
    server = next(s for s in sink.trace(TRACE_ID) if s.kind == SERVER)
    assert server.status == Status.StatusCode.STATUS_CODE_ERROR
    assert server.attributes["error.type"] == "UndefinedTableError"
    assert server.attributes["http.response.status_code"] == 500
    (sql,) = [s for s in children(sink.trace(TRACE_ID), server) if s.name == "get_user"]
    assert sql.status == Status.StatusCode.STATUS_CODE_ERROR
    assert sql.attributes["error.type"] == "UndefinedTableError"


async def test_off_builds_nothing_and_logs_the_incoming_trace_id(
    aiohttp_client: Any, config: Config
) -> None:
    assert config.otel_exporter_otlp_endpoint is None
    stream = io.BytesIO()
    log = AccessLog(stream)
    client = await aiohttp_client(create_app(configured(config, access_log=True), access_log=log))
    incoming = f"00-{TRACE_ID}-{PARENT_ID}-01"
    traced = await client.get("/healthz", headers={"traceparent": incoming})
    bad = await client.get("/healthz", headers={"traceparent": f"ff-{TRACE_ID}-{PARENT_ID}-01"})
    plain = await client.get("/healthz")
    assert [traced.status, bad.status, plain.status] == [200, 200, 200]
    # No span of our own, so nothing to answer (echoing the caller's would name its span as ours).
    assert "traceparent" not in traced.headers
    assert TRACING not in client.app
    assert tracer_of(client.app) is None
    assert client.app[PG].connection_class is asyncpg.Connection
    assert "execute_command" not in vars(client.app[REDIS])
    assert not any(t.name.startswith("OtelBatch") for t in threading.enumerate())
    headers = {"Accept": "application/json"}
    with tracing.client_span("payments.create_charge", headers) as call:
        call.set_status(500)
    assert headers == {"Accept": "application/json"}
    lines = log_lines(stream, log)
    assert [x.get("trace_id") for x in lines] == [TRACE_ID, None, None]
    assert "trace_id" not in lines[2]  # an untraced line is byte-for-byte what it was


def test_trace_id_of_a_traceparent() -> None:
    parse = tracing.trace_id_of
    assert parse(f"00-{TRACE_ID}-{PARENT_ID}-01") == TRACE_ID
    assert parse(f" 00-{TRACE_ID}-{PARENT_ID}-00 ") == TRACE_ID
    assert parse(None) is None
    assert parse(f"00-{'0' * 32}-{PARENT_ID}-01") is None
    assert parse(f"00-{TRACE_ID.upper()}-{PARENT_ID}-01") is None
    assert parse(f"00-{TRACE_ID}-{PARENT_ID}") is None


async def test_shutdown_flushes_spans_still_queued(aiohttp_server: Any, config: Config) -> None:
    sink, endpoint = await start_sink(aiohttp_server)
    app = create_app(configured(config, otel_exporter_otlp_endpoint=endpoint))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /healthz HTTP/1.1\r\nHost: x\r\ntraceparent: 00-{TRACE_ID}-{PARENT_ID}-01\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    assert (await reader.read()).startswith(b"HTTP/1.1 200")
    writer.close()
    assert sink.trace(TRACE_ID) == []  # still queued (the processor exports every 5 s)
    await runner.cleanup()
    assert [s.name for s in sink.trace(TRACE_ID)] == ["GET /healthz"]
    assert tracing._tracer is None


async def test_a_collector_that_is_down_neither_fails_requests_nor_holds_up_exit(
    config: Config,
) -> None:
    from server.runner import free_port

    app = create_app(
        configured(config, otel_exporter_otlp_endpoint=f"http://127.0.0.1:{free_port()}")
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 200")
    writer.close()
    started = time.monotonic()
    await runner.cleanup()  # the exporter retries for 10 s; Surge waits for it 5 s at most
    assert time.monotonic() - started < 7

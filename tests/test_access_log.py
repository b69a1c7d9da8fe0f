"""The access log: one JSON line per request, its fields in a fixed order, written in batches."""

from __future__ import annotations

import asyncio
import io
import time
from datetime import datetime
from typing import Any

import orjson
import pytest

from server.access_log import AccessLine, AccessLog, stamp_iso
from server.app import create_app
from server.config import Config

from .conftest import configured
from .helpers import signup

KEYS = [
    "ts",
    "level",
    "logger",
    "msg",
    "method",
    "route",
    "path",
    "status",
    "duration_ms",
    "request_id",
    "tenant",
]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def lines(stream: io.BytesIO, log: AccessLog) -> list[dict[str, Any]]:
    log.flush()
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize(
    ("method", "path", "headers", "expected"),
    [
        ("GET", "/healthz", {}, {"route": "/healthz", "path": "/healthz", "status": 200}),
        ("HEAD", "/healthz", {}, {"route": "/healthz", "path": "/healthz", "status": 200}),
        (
            "GET",
            "/v1/users/not-a-uuid",
            {},
            {"route": "/v1/users/{user_id}", "path": "/v1/users/not-a-uuid", "status": 401},
        ),
        ("GET", "/no/such/route", {}, {"route": "unmatched", "path": "/no/such/route"}),
        ("DELETE", "/healthz", {}, {"route": "unmatched", "path": "/healthz", "status": 405}),
        # the decoded path, as aiohttp's request.path gives it
        ("GET", "/v1/users/a%20b", {}, {"route": "/v1/users/{user_id}", "path": "/v1/users/a b"}),
        ("GET", "/healthz", {"X-Request-ID": "client-1"}, {"request_id": "client-1"}),
        (
            "GET",
            "/healthz",
            {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"},
            {"trace_id": TRACE_ID},
        ),
        ("GET", "/healthz", {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7"}, {}),
    ],
)
async def test_one_line_per_request(
    aiohttp_client: Any,
    config: Config,
    method: str,
    path: str,
    headers: dict[str, str],
    expected: dict[str, Any],
) -> None:
    stream = io.BytesIO()
    log = AccessLog(stream)
    client = await aiohttp_client(create_app(configured(config, access_log=True), access_log=log))
    before = time.time()
    resp = await client.request(method, path, headers=headers)
    after = time.time()
    [line] = lines(stream, log)
    traced = "trace_id" in expected
    assert list(line) == KEYS + (["trace_id"] if traced else [])  # the order is the contract
    assert line["msg"] == "request"
    assert line["level"] == "info"
    assert line["method"] == method
    assert line["status"] == resp.status
    assert line["request_id"] == resp.headers["X-Request-ID"]
    assert line["tenant"] is None
    assert {k: line[k] for k in expected} == expected
    # the end of the request, on the wall clock, from a perf_counter() reading
    # (ISO 8601 UTC to the millisecond, as the application's lines: compared as epoch seconds)
    ts = datetime.strptime(line["ts"], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
    assert before - 0.01 <= ts <= after + 0.01
    assert 0 <= line["duration_ms"] <= (after - before) * 1000 + 1


async def test_the_tenant_of_an_authenticated_request(aiohttp_client: Any, config: Config) -> None:
    stream = io.BytesIO()
    log = AccessLog(stream)
    client = await aiohttp_client(create_app(configured(config, access_log=True), access_log=log))
    owner = await signup(client)
    resp = await client.get(f"/v1/users/{owner.id}", headers=owner.headers)
    assert resp.status == 200
    line = lines(stream, log)[-1]
    assert line["route"] == "/v1/users/{user_id}"
    assert line["path"] == f"/v1/users/{owner.id}"
    assert line["tenant"] == owner.tenant_id


async def test_lines_wait_for_the_flush_and_keep_their_order(
    aiohttp_client: Any, config: Config
) -> None:
    stream = io.BytesIO()
    log = AccessLog(stream, flush_s=3600)  # the timer runs from start-up: keep it out of the way
    client = await aiohttp_client(create_app(configured(config, access_log=True), access_log=log))
    for i in range(5):
        assert (await client.get("/healthz", headers={"X-Request-ID": f"r{i}"})).status == 200
    assert stream.getvalue() == b""  # batched: nothing written per request
    got = lines(stream, log)
    assert [x["request_id"] for x in got] == [f"r{i}" for i in range(5)]
    assert [x["ts"] for x in got] == sorted(x["ts"] for x in got)
    log.flush()  # nothing pending: writes nothing more
    assert len(stream.getvalue().splitlines()) == 5


async def test_a_full_batch_is_written_at_once(aiohttp_client: Any, config: Config) -> None:
    stream = io.BytesIO()
    log = AccessLog(stream, max_pending=3, flush_s=3600)
    client = await aiohttp_client(create_app(configured(config, access_log=True), access_log=log))
    for _ in range(2):
        assert (await client.get("/healthz")).status == 200
    assert stream.getvalue() == b""
    assert (await client.get("/healthz")).status == 200
    assert len(stream.getvalue().splitlines()) == 3  # the third request wrote the batch


async def test_lines_are_written_by_the_timer(aiohttp_client: Any, config: Config) -> None:
    stream = io.BytesIO()
    log = AccessLog(stream)
    client = await aiohttp_client(create_app(configured(config, access_log=True), access_log=log))
    assert (await client.get("/healthz")).status == 200
    deadline = time.monotonic() + log.flush_s + 5
    while not stream.getvalue():
        assert time.monotonic() < deadline, "the pending line was never written"
        await asyncio.sleep(0.05)
    assert orjson.loads(stream.getvalue())["route"] == "/healthz"


async def test_shutdown_writes_what_is_pending(aiohttp_client: Any, config: Config) -> None:
    stream = io.BytesIO()
    log = AccessLog(stream)
    client = await aiohttp_client(create_app(configured(config, access_log=True), access_log=log))
    assert (await client.get("/healthz", headers={"X-Request-ID": "last"})).status == 200
    await client.close()
    assert orjson.loads(stream.getvalue())["request_id"] == "last"


class Broken(io.RawIOBase):
    def write(self, b: Any) -> int:
        raise BrokenPipeError(32, "Broken pipe")


async def test_a_broken_stdout_loses_lines_not_requests(
    aiohttp_client: Any, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    log = AccessLog(Broken(), max_pending=2, flush_s=3600)  # type: ignore[arg-type]
    client = await aiohttp_client(create_app(configured(config, access_log=True), access_log=log))
    statuses = [(await client.get("/healthz")).status for _ in range(5)]
    assert statuses == [200] * 5
    assert "2 access log lines could not be written" in caplog.text
    assert len(log.pending) == 1  # the fifth waits for the next batch


def test_epoch_seconds_become_iso_8601_utc_at_flush() -> None:
    pending = [
        AccessLine(
            t, "info", "surge.access", "request", "GET", "/healthz", "/healthz", 200, 0.1, "r", None
        )
        for t in (0.0, 0.9995, 1796587633.0037, 1796587633.5)
    ]
    stamp_iso(pending)
    assert [line.ts for line in pending] == [
        "1970-01-01T00:00:00.000Z",
        "1970-01-01T00:00:00.999Z",
        "2026-12-06T20:07:13.003Z",
        "2026-12-06T20:07:13.500Z",
    ]
    stamp_iso(pending)  # already stamped: left alone
    assert pending[0].ts == "1970-01-01T00:00:00.000Z"

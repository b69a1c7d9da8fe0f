"""Response hardening (issue 18, defect 8): every answer says nosniff, API answers are never
stored by a cache, and a malformed request head gets a problem+json 400 that repeats nothing of
it, with one warning and no traceback."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server.app import create_app
from server.config import Config
from server.runner import free_port, serve_app

from .helpers import signup

NOSNIFF = "nosniff"


async def test_api_answers_are_no_store_and_nosniff(aiohttp_client: Any, config: Config) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(client)
    answers = [
        await client.get("/v1/me", headers=owner.headers),  # authenticated JSON
        await client.get("/v1/users", headers=owner.headers),
        await client.post(  # a public answer that carries tokens
            "/v1/auth/refresh", json={"refresh_token": owner.refresh_token}
        ),
        await client.get("/v1/me"),  # an API error: 401
        await client.get("/v1/nope", headers=owner.headers),  # an API path with no route: 404
    ]
    assert [r.status for r in answers] == [200, 200, 200, 401, 404]
    for resp in answers:
        assert resp.headers["Cache-Control"] == "no-store", resp.url
        assert resp.headers["X-Content-Type-Options"] == NOSNIFF, resp.url


async def test_every_answer_is_nosniff(aiohttp_client: Any, config: Config) -> None:
    client: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(client)
    answers = {
        "/healthz": await client.get("/healthz"),
        "/readyz": await client.get("/readyz"),
        "/metrics": await client.get("/metrics"),
        "/openapi.json": await client.get("/openapi.json"),
        "/docs": await client.get("/docs"),
        "/graphql explorer": await client.get("/graphql", headers={"Accept": "text/html"}),
        "404": await client.get("/nope"),
        "405": await client.post("/healthz"),
    }
    assert {k: r.status for k, r in answers.items()} == {
        "/healthz": 200,
        "/readyz": 200,
        "/metrics": 200,
        "/openapi.json": 200,
        "/docs": 200,
        "/graphql explorer": 200,
        "404": 404,
        "405": 405,
    }
    for name, resp in answers.items():
        assert resp.headers["X-Content-Type-Options"] == NOSNIFF, name
    # a stream sends its headers itself, before the chain sees its answer
    async with client.get("/v1/analytics/live", headers=owner.headers) as live:
        assert live.status == 200
        assert live.headers["X-Content-Type-Options"] == NOSNIFF


async def raw_exchange(config: Config, caplog: pytest.LogCaptureFixture, data: bytes) -> bytes:
    """`data` sent to a real listener; all it answers until it closes the connection."""
    cfg = dataclasses.replace(config, port=free_port())
    ready, stop = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve_app(cfg, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 10)
    caplog.clear()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", cfg.port)
        writer.write(data)
        answer = await asyncio.wait_for(reader.read(), 5)  # until the server closes
        writer.close()
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)
    return answer


@pytest.mark.parametrize(
    "bad_line",
    [
        b"this line has no colon card=4111111111111111",
        b"X-Card: 4111111111111111\x01",
    ],
    ids=["no-colon", "control-character"],
)
async def test_a_malformed_header_is_a_problem_400_that_echoes_nothing(
    config: Config, caplog: pytest.LogCaptureFixture, bad_line: bytes
) -> None:
    answer = await raw_exchange(
        config, caplog, b"GET /healthz HTTP/1.1\r\nHost: surge\r\n" + bad_line + b"\r\n\r\n"
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].split(" ", 1)[1] == "400 Bad Request"  # HTTP/1.0: the head was never read
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Content-Type"] == "application/problem+json"
    assert headers["Connection"] == "close"
    assert headers["X-Content-Type-Options"] == NOSNIFF
    problem = json.loads(body)
    assert problem == {
        "type": "/problems/bad-request",
        "title": "Bad Request",
        "status": 400,
        "detail": "the request head is malformed",
        "request_id": headers["X-Request-ID"],
    }
    assert b"4111" not in answer
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.levelname, r.name) for r in records] == [("WARNING", "surge")]
    assert records[0].exc_info is None
    assert "4111" not in records[0].getMessage()
    assert "malformed request head" in records[0].getMessage()


async def test_bytes_that_are_not_http_get_a_400_and_no_warning(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    # a TLS ClientHello's first bytes sent to the plain-HTTP port, as scanners do all day
    answer = await raw_exchange(config, caplog, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    assert b"Content-Type: application/problem+json" in answer
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []

"""The conventions every response follows: problem+json, X-Request-ID, shedding, rate limits,
readiness, metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from server import metrics
from server.app import add_routes, create_app
from server.config import Config
from server.errors import NotFound
from server.keys import LIFECYCLE
from server.routes import get, post
from server.runner import free_port, serve_app
from server.validation import read_json

PROBLEM_KEYS = {"type", "title", "status", "detail", "request_id"}


async def echo(request: web.Request) -> web.Response:
    body = await read_json(request, "Health")
    return web.json_response(body)


def make_app(config: Config, gate: asyncio.Event | None = None) -> web.Application:
    app = create_app(config)

    async def slow(request: web.Request) -> web.Response:
        if gate is not None:
            await gate.wait()
        else:
            await asyncio.sleep(0.5)
        return web.json_response({"slow": True})

    add_routes(app, [post("/test/echo", echo, page=True), get("/test/slow", slow, page=True)])
    return app


def assert_problem(status: int, body: dict[str, Any], headers: Any, expected: int) -> None:
    assert status == expected
    assert headers["Content-Type"] == "application/problem+json"
    assert body.keys() >= PROBLEM_KEYS
    assert body["status"] == expected
    assert body["request_id"] == headers["X-Request-ID"]
    assert "Traceback" not in orjson.dumps(body).decode()


@pytest.mark.parametrize(
    ("method", "path", "data", "headers", "status"),
    [
        ("POST", "/test/echo", b"{not json", {"Content-Type": "application/json"}, 400),
        ("POST", "/test/echo", b"x" * 5000, {"Content-Type": "application/json"}, 413),
        ("POST", "/test/echo", b'{"status": "ok"}', {"Content-Type": "text/plain"}, 415),
        ("POST", "/test/echo", b'{"status": "bad"}', {"Content-Type": "application/json"}, 422),
        ("GET", "/no/such/route", None, {}, 404),
        ("DELETE", "/healthz", None, {}, 405),
    ],
)
async def test_errors_are_problem_json(
    aiohttp_client: Any,
    config: Config,
    method: str,
    path: str,
    data: bytes | None,
    headers: dict[str, str],
    status: int,
) -> None:
    client: TestClient = await aiohttp_client(
        make_app(dataclasses.replace(config, max_body_bytes=4096))
    )
    resp = await client.request(method, path, data=data, headers=headers)
    body = await resp.json(content_type=None)
    assert_problem(resp.status, body, resp.headers, status)
    if status == 405:
        assert set(resp.headers["Allow"].split(",")) == {"GET", "HEAD"}
    if status == 413:
        assert body["detail"] == "the request body is larger than 4096 bytes"


@pytest.mark.parametrize(
    ("method", "path", "status", "allow", "limited"),
    [
        ("GET", "/v1/no/such/route", 404, None, True),
        ("POST", "/nowhere", 404, None, False),
        ("PUT", f"/v1/users/{uuid.UUID(int=7)}", 405, {"DELETE", "GET", "HEAD", "PATCH"}, True),
        ("GET", "/v1/auth/login", 405, {"POST"}, True),
        ("OPTIONS", "/healthz", 405, {"GET", "HEAD"}, False),
        ("PUT", "/graphql", 405, {"GET", "HEAD", "POST"}, False),
        ("HEAD", "/healthz", 200, None, False),
    ],
)
async def test_the_catch_all_answers_what_the_router_would(
    aiohttp_client: Any,
    config: Config,
    method: str,
    path: str,
    status: int,
    allow: set[str] | None,
    limited: bool,
) -> None:
    """No route: 404; a route with other methods: 405 + Allow; never 401 for an unknown /v1 path
    (no token sent), which is still rate limited; counted under route="unmatched"."""
    client: TestClient = await aiohttp_client(make_app(config))
    resp = await client.request(method, path)
    assert resp.status == status
    assert re.fullmatch(r"[0-9a-f]{24}", resp.headers["X-Request-ID"])
    if status != 200:
        assert_problem(resp.status, await resp.json(content_type=None), resp.headers, status)
    if allow is not None:
        assert set(resp.headers["Allow"].split(",")) == allow
    assert ("RateLimit-Limit" in resp.headers) is limited
    metrics_text = await (await client.get("/metrics")).text()
    route = "/healthz" if status == 200 else "unmatched"
    assert f'method="{method}",route="{route}",status="{status}"' in metrics_text


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({"status": "bad"}, [{"field": "status", "message": "must be one of ['ok']"}]),
        ({}, [{"field": "status", "message": "is required"}]),
        ([], [{"field": "", "message": "must be object"}]),
    ],
)
async def test_validation_errors_name_the_field(
    aiohttp_client: Any, config: Config, body: Any, errors: list[dict[str, str]]
) -> None:
    client = await aiohttp_client(make_app(config))
    resp = await client.post("/test/echo", json=body)
    assert resp.status == 422
    assert (await resp.json(content_type=None))["errors"] == errors


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [
        ("abc-123_X.y:z", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("has space", False),
        ("", False),
        ("ünïcode", False),
    ],
)
async def test_request_id(aiohttp_client: Any, config: Config, sent: str, echoed: bool) -> None:
    client = await aiohttp_client(make_app(config))
    resp = await client.get("/healthz", headers={"X-Request-ID": sent})
    assert resp.status == 200
    if echoed:
        assert resp.headers["X-Request-ID"] == sent
    else:
        assert re.fullmatch(r"[0-9a-f]{24}", resp.headers["X-Request-ID"])


async def test_generated_request_ids_count_up_behind_the_process_prefix(
    aiohttp_client: Any, config: Config
) -> None:
    client = await aiohttp_client(make_app(config))
    ids = [(await client.get(path)).headers["X-Request-ID"] for path in ("/healthz", "/nope") * 3]
    assert all(re.fullmatch(r"[0-9a-f]{24}", rid) for rid in ids)
    assert len({rid[:12] for rid in ids}) == 1  # one random prefix per process
    counters = [int(rid[12:], 16) for rid in ids]
    assert counters == list(range(counters[0], counters[0] + 6))


async def test_ops_endpoints(aiohttp_client: Any, config: Config) -> None:
    client = await aiohttp_client(make_app(config))
    resp = await client.get("/healthz")
    assert (resp.status, await resp.json()) == (200, {"status": "ok"})
    resp = await client.get("/readyz")
    assert (resp.status, await resp.json()) == (
        200,
        {"status": "ready", "checks": {"postgres": "ok", "redis": "ok"}},
    )
    resp = await client.get("/openapi.json")
    spec = await resp.json()
    assert spec["openapi"] == "3.1.0"
    resp = await client.get("/docs")
    assert resp.status == 200 and "/healthz" in await resp.text()
    resp = await client.get("/metrics")
    text = await resp.text()
    assert 'surge_http_requests_total{method="GET",route="/healthz",status="200"}' in text
    assert 'surge_db_pool_max{pool="primary"} 8.0' in text
    assert "surge_http_request_duration_seconds_bucket" in text


def plain_ok(request: web.Request) -> web.Response:
    return web.json_response({"plain": True})


def plain_missing(request: web.Request) -> web.Response:
    raise NotFound("thing")


def plain_broken(request: web.Request) -> web.Response:
    raise RuntimeError("a bug in a plain handler")


@pytest.mark.parametrize(
    ("handler", "status", "body"),
    [
        (plain_ok, 200, {"plain": True}),
        (plain_missing, 404, {"detail": "thing not found"}),
        (plain_broken, 500, {"detail": "an internal error occurred"}),
    ],
)
async def test_plain_function_handlers_run_in_the_whole_pipeline(
    aiohttp_client: Any, config: Config, handler: Any, status: int, body: dict[str, Any]
) -> None:
    """A handler may be a plain function (no coroutine of its own): the pipeline gives its
    answer, or its exception as problem+json, with the request id and metrics of any other."""
    app = make_app(config)
    add_routes(app, [get("/test/plain", handler, page=True, plain=True)])
    client = await aiohttp_client(app)
    resp = await client.get("/test/plain", headers={"X-Request-ID": "plain-1"})
    got = await resp.json()
    assert resp.status == status
    assert resp.headers["X-Request-ID"] == "plain-1"
    assert got.items() >= body.items()
    if status >= 400:
        assert got["request_id"] == "plain-1"
    text = await (await client.get("/metrics")).text()
    assert re.search(
        rf'surge_http_requests_total{{method="GET",route="/test/plain",status="{status}"}} '
        r"[1-9]",
        text,
    )


def test_a_handler_that_is_neither_async_nor_plain_is_refused(config: Config) -> None:
    """It would be called without an await: refused when the route is added, not at a request."""

    def unmarked(request: web.Request) -> web.Response:
        return web.json_response({})

    with pytest.raises(TypeError, match="plain"):
        add_routes(make_app(config), [get("/test/unmarked", unmarked)])


async def wait_in_flight(expected: int) -> None:
    for _ in range(200):
        if metrics.HTTP.in_flight == expected:
            return
        await asyncio.sleep(0.01)
    assert metrics.HTTP.in_flight == expected


async def test_in_flight_counts_every_way_a_request_ends(
    aiohttp_client: Any, config: Config
) -> None:
    """Answered, refused by a handler, broken, shed, unknown, or abandoned by its client:
    in flight while running, and not afterwards."""
    gate = asyncio.Event()
    app = make_app(dataclasses.replace(config, max_in_flight=1, shed_queue_timeout_ms=50), gate)
    add_routes(app, [get("/test/broken", plain_broken, page=True, plain=True)])
    client = await aiohttp_client(app)
    start = metrics.HTTP.in_flight
    for path, status in [("/healthz", 200), ("/test/broken", 500), ("/no/such", 404)]:
        assert (await client.get(path)).status == status
        assert metrics.HTTP.in_flight == start
    gone_before = await slow_gone(client)
    held = asyncio.create_task(client.get("/test/slow"))
    await wait_in_flight(start + 1)
    assert (await client.get("/test/slow")).status == 503  # shed: the one slot is taken
    assert metrics.HTTP.in_flight == start + 1
    held.cancel()  # the client goes away: the server's handler is cancelled
    await wait_in_flight(start)
    assert await slow_gone(client) == gone_before + 1  # recorded as 499
    gate.set()


async def slow_gone(client: TestClient[web.Request, web.Application]) -> float:
    text = await (await client.get("/metrics")).text()
    m = re.search(r'route="/test/slow",status="499"\} (\S+)$', text, re.M)
    return float(m[1]) if m else 0.0


async def test_metrics_use_route_templates_not_paths(aiohttp_client: Any, config: Config) -> None:
    client = await aiohttp_client(make_app(config))
    for i in range(3):
        await client.get(f"/unknown/{i}")
    text = await (await client.get("/metrics")).text()
    assert "/unknown/1" not in text
    assert re.search(
        r'surge_http_requests_total\{method="GET",route="unmatched",status="404"\} \d', text
    )


async def test_readiness_fails_when_postgres_is_unreachable(
    aiohttp_client: Any, config: Config
) -> None:
    port = free_port()
    broken = dataclasses.replace(
        config, database_url=f"postgresql://postgres@127.0.0.1:{port}/nope", pg_pool_min=0
    )
    client = await aiohttp_client(make_app(broken))
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert await resp.json() == {
        "status": "unavailable",
        "checks": {"postgres": "error", "redis": "ok"},
    }


DEGRADED = {"status": "ready", "checks": {"postgres": "ok", "redis": "degraded"}}


def redis_up_gauge(text: str) -> str:
    return re.findall(r'^surge_readiness_check\{check="redis"\} (\S+)$', text, re.M)[0]


async def test_readiness_stays_200_degraded_when_redis_is_unreachable(
    aiohttp_client: Any, config: Config
) -> None:
    # Redis down: the replica still serves (local limits, no cache), so it stays in the
    # load balancer.
    broken = dataclasses.replace(config, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    client = await aiohttp_client(make_app(broken))
    resp = await client.get("/readyz")
    assert (resp.status, await resp.json()) == (200, DEGRADED)
    assert resp.headers["Content-Type"] == "application/json"
    assert redis_up_gauge(await (await client.get("/metrics")).text()) == "0.0"


async def test_readiness_does_not_hang_on_a_redis_that_never_answers(
    aiohttp_client: Any, config: Config
) -> None:
    # A listener that completes the TCP handshake (the kernel does) and never says a word.
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        hung = dataclasses.replace(config, redis_url=f"redis://127.0.0.1:{port}/0")
        client = await aiohttp_client(make_app(hung))
        resp = await client.get("/readyz")
        assert (resp.status, await resp.json()) == (200, DEGRADED)
        assert accepted  # the probe did reach the silent listener
        await client.close()
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_readiness_reports_redis_ok_again_once_it_answers(
    aiohttp_client: Any, config: Config
) -> None:
    client = await aiohttp_client(make_app(config))
    resp = await client.get("/readyz")
    assert (resp.status, await resp.json()) == (
        200,
        {"status": "ready", "checks": {"postgres": "ok", "redis": "ok"}},
    )
    assert redis_up_gauge(await (await client.get("/metrics")).text()) == "1.0"


async def test_readiness_is_503_while_draining(aiohttp_client: Any, config: Config) -> None:
    app = make_app(config)
    client = await aiohttp_client(app)
    app[LIFECYCLE].draining = True
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["status"] == "draining"


async def test_shedding_refuses_past_max_in_flight(aiohttp_client: Any, config: Config) -> None:
    gate = asyncio.Event()
    app = make_app(dataclasses.replace(config, max_in_flight=3, shed_queue_timeout_ms=50), gate)
    client = await aiohttp_client(app)
    before = metrics.SHED.labels("deadline")._value.get()
    held = [asyncio.create_task(client.get("/test/slow")) for _ in range(3)]
    await asyncio.sleep(0.1)
    resp = await client.get("/test/slow")
    body = await resp.json(content_type=None)
    assert_problem(resp.status, body, resp.headers, 503)
    assert resp.headers["Retry-After"] == "1"
    assert metrics.SHED.labels("deadline")._value.get() == before + 1
    # probes are never shed
    assert (await client.get("/healthz")).status == 200
    gate.set()
    assert [r.status for r in await asyncio.gather(*held)] == [200, 200, 200]


async def test_shedding_queues_fairly_within_the_timeout(
    aiohttp_client: Any, config: Config
) -> None:
    app = make_app(dataclasses.replace(config, max_in_flight=1, shed_queue_timeout_ms=5000))
    client = await aiohttp_client(app)
    # 0.5 s each, one at a time: three finish in order within the 5 s queue timeout
    results = await asyncio.gather(*(client.get("/test/slow") for _ in range(3)))
    assert [r.status for r in results] == [200, 200, 200]


async def test_graceful_shutdown_finishes_in_flight_requests(config: Config) -> None:
    port = free_port()
    cfg = dataclasses.replace(config, port=port, shutdown_grace_s=5)
    ready, stop = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve_app(cfg, app=make_app(cfg), ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 10)
    async with aiohttp.ClientSession() as session:
        in_flight = asyncio.create_task(session.get(f"http://127.0.0.1:{port}/test/slow"))
        await asyncio.sleep(0.1)
        stop.set()
        resp = await in_flight
        assert resp.status == 200
        assert await resp.json() == {"slow": True}
        await asyncio.wait_for(server, 10)
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"http://127.0.0.1:{port}/healthz")

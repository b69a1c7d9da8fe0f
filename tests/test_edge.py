"""Shedding at the edge: deploy/haproxy.cfg, as it ships, in front of a real Surge app.

HAProxy holds at most SURGE_MAXCONN requests in flight per replica and queues the rest for at
most SURGE_QUEUE_TIMEOUT; a caller (the tenant of a bearer token whose signature checks, else
the client address) past SURGE_CALLER_SHARE goes to the back of the queue and, while anyone is
queued, is refused at once. Every refusal is Surge's own 503 problem + Retry-After. The ops
routes go round the queue, and HAProxy's metrics tell its own refusals from Surge's answers
(deploy/prometheus/rules/edge.yml). Here one replica is in service (the other two slots are
disabled on the admin socket), and its GET /test/hold answers only when the test lets one
request through, so what is in flight and queued is set by the test, never by timing.

HAProxy comes from Debian's package (`.ci/run` and `make cluster` install it); without it the
tests fail under CI and skip elsewhere, saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from bench.cluster import accepts, haproxy_admin, haproxy_stats
from server.app import add_routes, create_app
from server.chain import Overloaded
from server.config import Config, parse_jwt_keys
from server.routes import get
from server.runner import free_port
from server.tokens import TokenService

from .conftest import ROOT, debian_program, wait_for

HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
OVERLOADED = {
    "type": "/problems/overloaded",
    "title": "Service Unavailable",
    "status": 503,
    "detail": Overloaded().detail,
}


@dataclass
class Edge:
    url: str
    metrics_url: str  # HAProxy's Prometheus exporter (SURGE_HAPROXY_METRICS)
    socket_path: Path
    arrived: list[str]  # the `who` of each request that reached Surge, in order
    permits: asyncio.Queue[None]  # one put: one held request answers

    def queued(self) -> int:
        return int(haproxy_stats(self.socket_path)[("surge", "BACKEND")]["qcur"])

    def callers(self) -> dict[str, int]:
        """The stick table's callers: key -> requests in flight or queued."""
        out = {}
        for line in haproxy_admin(self.socket_path, "show table callers").splitlines()[1:]:
            fields = dict(f.split("=", 1) for f in line.split()[1:])
            if fields:
                out[fields["key"]] = int(fields["conn_cur"])
        return out


@pytest.fixture
def tokens(config: Config) -> TokenService:
    return TokenService.from_config(config)


def bearer(tokens: TokenService, tenant: uuid.UUID) -> dict[str, str]:
    return {"Authorization": "Bearer " + tokens.issue(uuid.uuid4(), tenant, ["member"])}


def forged(tokens: TokenService, tenant: uuid.UUID) -> dict[str, str]:
    """A token claiming `tenant`, signed with a key HAProxy does not know."""
    other = TokenService([("k1", b"f" * 32)], tokens.issuer, tokens.audience, tokens.ttl_s)
    return {"Authorization": "Bearer " + other.issue(uuid.uuid4(), tenant, ["member"])}


@contextlib.asynccontextmanager
async def start_edge(
    config: Config, aiohttp_server: Any, tmp_path: Path, **settings: str
) -> AsyncIterator[Edge]:
    arrived: list[str] = []
    permits: asyncio.Queue[None] = asyncio.Queue()

    async def hold(request: web.Request) -> web.Response:
        if "status" in request.query:  # an answer of Surge's own, at once
            return web.json_response({}, status=int(request.query["status"]))
        arrived.append(request.query["who"])
        await permits.get()
        return web.json_response({"who": request.query["who"]})

    app = create_app(replace(config, max_in_flight=64, queue_deadline_ms=60_000))
    add_routes(app, [get("/test/hold", hold, page=True)])
    server = await aiohttp_server(app)
    port, metrics_port = free_port(), free_port()
    admin = tmp_path / "haproxy.sock"
    env = {
        **os.environ,
        "SURGE_LISTEN": f"127.0.0.1:{port}",
        "SURGE_HAPROXY_SOCKET": str(admin),
        "SURGE_1": f"127.0.0.1:{server.port}",
        "SURGE_2": f"127.0.0.1:{server.port}",
        "SURGE_3": f"127.0.0.1:{server.port}",
        "SURGE_JWT_SECRET": parse_jwt_keys(config.jwt_keys or "")[0][1].decode(),
        "SURGE_HAPROXY_METRICS": f"127.0.0.1:{metrics_port}",
        **settings,
    }
    log = (tmp_path / "haproxy.log").open("wb")
    proc = subprocess.Popen(
        [debian_program("haproxy"), "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=log, stderr=log
    )
    edge = Edge(
        f"http://127.0.0.1:{port}",
        f"http://127.0.0.1:{metrics_port}/metrics",
        admin,
        arrived,
        permits,
    )
    try:
        await wait_for(lambda: proc.poll() is None and accepts(port) and admin.exists())
        for name in ("surge2", "surge3"):  # one replica in service: its slots are the test's
            assert haproxy_admin(admin, f"disable server surge/{name}").strip() == ""
        yield edge
    finally:
        for _ in range(64):  # let any request still held answer, so the server can stop
            permits.put_nowait(None)
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)
        log.close()


@pytest.fixture
async def edge(config: Config, aiohttp_server: Any, tmp_path: Path) -> AsyncIterator[Edge]:
    """Two slots, a share of two per caller, and a queue wait long enough never to end here."""
    settings = {"SURGE_MAXCONN": "2", "SURGE_CALLER_SHARE": "2", "SURGE_QUEUE_TIMEOUT": "30s"}
    async with start_edge(config, aiohttp_server, tmp_path, **settings) as e:
        yield e


async def assert_refused(resp: aiohttp.ClientResponse) -> None:
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert resp.headers["Content-Type"] == "application/problem+json"
    body = orjson.loads(await resp.read())
    rid = body.pop("request_id")
    assert body == OVERLOADED
    assert resp.headers["X-Request-ID"] == rid
    uuid.UUID(rid)


async def test_a_flooding_tenant_is_refused_while_its_neighbour_goes_first(
    edge: Edge, tokens: TokenService
) -> None:
    flooder, neighbour = uuid.uuid4(), uuid.uuid4()
    async with aiohttp.ClientSession(edge.url) as http:

        def send(who: str, headers: dict[str, str]) -> asyncio.Task[aiohttp.ClientResponse]:
            return asyncio.create_task(http.get("/test/hold", params={"who": who}, headers=headers))

        held = [send(f"a{i}", bearer(tokens, flooder)) for i in (1, 2)]
        await wait_for(lambda: len(edge.arrived) == 2)  # both slots taken
        queued = send("a3", bearer(tokens, flooder))  # past its share, but nobody waits: queued
        await wait_for(lambda: edge.queued() == 1)
        # past its share while a queue stands: refused at once, never reaching Surge
        await assert_refused(await http.get("/test/hold?who=a4", headers=bearer(tokens, flooder)))
        # its neighbour, within its share, queues ahead of the flooder's waiting request
        first = send("b1", bearer(tokens, neighbour))
        await wait_for(lambda: edge.queued() == 2)
        # a token claiming the neighbour's tenant with a signature that does not check counts
        # against its address, not against the tenant it names
        stranger = send("c1", forged(tokens, neighbour))
        await wait_for(lambda: edge.queued() == 3)
        assert edge.callers() == {str(flooder): 3, str(neighbour): 1, "127.0.0.1": 1}

        # the ops routes go round the queue
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            async with http.get(path) as resp:
                assert resp.status == 200, path

        for _ in range(5):
            edge.permits.put_nowait(None)
        answers = [await t for t in (*held, queued, first, stranger)]
        assert [r.status for r in answers] == [200] * 5
        # the class-0 requests (within their callers' shares) went before the flooder's
        assert sorted(edge.arrived[:2]) == ["a1", "a2"]
        assert edge.arrived[2:] == ["b1", "c1", "a3"]


async def test_a_request_that_waits_past_the_queue_timeout_is_refused(
    config: Config, aiohttp_server: Any, tmp_path: Path, tokens: TokenService
) -> None:
    settings = {"SURGE_MAXCONN": "1", "SURGE_QUEUE_TIMEOUT": "50ms"}
    async with (
        start_edge(config, aiohttp_server, tmp_path, **settings) as edge,
        aiohttp.ClientSession(edge.url) as http,
    ):
        held = asyncio.create_task(http.get("/test/hold?who=a1"))
        await wait_for(lambda: edge.arrived == ["a1"])
        await assert_refused(await http.get("/test/hold?who=a2"))
        edge.permits.put_nowait(None)
        assert (await held).status == 200
        assert edge.arrived == ["a1"]  # the refused request never reached Surge


async def test_an_unsigned_caller_is_counted_by_its_address(
    edge: Edge, tokens: TokenService
) -> None:
    async with aiohttp.ClientSession(edge.url) as http:
        held = [
            asyncio.create_task(http.get("/test/hold", params={"who": f"n{i}"})) for i in (1, 2)
        ]
        await wait_for(lambda: len(edge.arrived) == 2)
        queued = asyncio.create_task(http.get("/test/hold?who=n3"))
        await wait_for(lambda: edge.queued() == 1)
        assert edge.callers() == {"127.0.0.1": 3}
        # a token with a bad signature is the same caller: its address
        await assert_refused(
            await http.get("/test/hold?who=n4", headers=forged(tokens, uuid.uuid4()))
        )
        for _ in range(3):
            edge.permits.put_nowait(None)
        assert [(await t).status for t in (*held, queued)] == [200, 200, 200]


def edge_refused(text: str) -> float:
    """rules/edge.yml's numerator, from one scrape: the backend's 5xx less its servers'."""
    found = {"backend": 0.0, "server": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            kind = sample.name.removeprefix("haproxy_").partition("_http_responses_total")[0]
            labels = sample.labels
            if kind in found and labels.get("proxy") == "surge" and labels.get("code") == "5xx":
                found[kind] += sample.value
    return found["backend"] - found["server"]


async def test_the_edge_alert_counts_haproxy_refusals_not_surge_answers(
    config: Config, aiohttp_server: Any, tmp_path: Path
) -> None:
    rules = (ROOT / "deploy" / "prometheus" / "rules" / "edge.yml").read_text()
    used = set(re.findall(r"\b(haproxy_\w+)\{", rules))
    settings = {"SURGE_MAXCONN": "1", "SURGE_QUEUE_TIMEOUT": "50ms"}
    async with (
        start_edge(config, aiohttp_server, tmp_path, **settings) as edge,
        aiohttp.ClientSession(edge.url) as http,
    ):

        async def scrape() -> str:
            async with http.get(edge.metrics_url) as resp:
                assert resp.status == 200
                return await resp.text()

        before = await scrape()
        exported = {s.name for f in text_string_to_metric_families(before) for s in f.samples}
        assert used and used <= exported, used - exported
        held = asyncio.create_task(http.get("/test/hold?who=a1"))
        await wait_for(lambda: edge.arrived == ["a1"])
        for who in ("a2", "a3"):  # no slot within 50 ms: HAProxy's own 503s
            assert (await http.get("/test/hold", params={"who": who})).status == 503
        edge.permits.put_nowait(None)
        assert (await held).status == 200
        # a 5xx that Surge sent through HAProxy is not the edge's
        assert (await http.get("/test/hold?status=503")).status == 503
        assert edge_refused(await scrape()) - edge_refused(before) == 2

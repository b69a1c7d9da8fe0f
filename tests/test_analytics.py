"""GET /v1/analytics/counts (Redis for the last hour, PostgreSQL beyond, and PostgreSQL alone
when Redis fails) and GET /v1/analytics/live (Server-Sent Events fanned out per tenant)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse
from redis.asyncio import Redis

from handlers.events.analytics import BUCKETS, CountsQuery, bucket_counts, parse_counts_query
from handlers.events.keys import EVENT_COUNTERS, LIVE_HUB
from server.app import create_app
from server.config import Config
from server.keys import LIFECYCLE, PG_READ
from server.runner import free_port

from .helpers import signup


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def floor(ts: float, step: int) -> int:
    return int(ts) - int(ts) % step


# (offset from now, events): two hours and more back (PostgreSQL only), inside the last hour
# (Redis), and now.
SPREAD = [
    (timedelta(hours=-20), 2),
    (timedelta(hours=-3), 1),
    (timedelta(minutes=-90), 2),
    (timedelta(minutes=-61), 1),
    (timedelta(minutes=-30), 3),
    (timedelta(minutes=-2), 4),
    (timedelta(0), 5),
]


async def _send_spread(client: Any, headers: dict[str, str], now: datetime) -> list[float]:
    events, stamps = [], []
    for offset, n in SPREAD:
        ts = now + offset
        for _ in range(n):
            events.append({"name": "spread", "ts": iso(ts)})
            stamps.append(ts.timestamp())
    resp = await client.post("/v1/events", json={"events": events}, headers=headers)
    assert resp.status == 202
    return stamps


@pytest.mark.parametrize(
    ("bucket", "step", "span"), [("1m", 60, 1300), ("1h", 3600, 23), ("1d", 86400, 3)]
)
async def test_counts_over_buckets_match_what_was_sent(
    aiohttp_client: Any, config: Config, bucket: str, step: int, span: int
) -> None:
    app = create_app(config)
    client = await aiohttp_client(app)
    owner, other = await signup(client), await signup(client, "Other")
    now = datetime.now(UTC)
    stamps = await _send_spread(client, owner.headers, now)
    await _send_spread(client, other.headers, now)  # another tenant: must not show up
    await app[EVENT_COUNTERS].flushed()
    start = now - timedelta(seconds=step * span)
    # `to` half a second into the bucket holding now, whenever the test runs: the fraction
    # must not drop that bucket (it did when `to` fell in a bucket's first second).
    to = datetime.fromtimestamp(floor(now.timestamp(), step) + 0.5, UTC)
    params = {"name": "spread", "bucket": bucket, "from": iso(start), "to": iso(to)}
    resp = await client.get("/v1/analytics/counts", params=params, headers=owner.headers)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    got = {b["ts"]: b["count"] for b in body["buckets"]}
    first, end = floor(start.timestamp(), step), floor(now.timestamp(), step) + step
    assert len(body["buckets"]) == (end - first) // step  # dense: zeros included
    assert body["buckets"][0]["ts"] == iso(datetime.fromtimestamp(first, UTC))
    expected: dict[str, int] = {}
    for ts in stamps:
        if ts >= first:
            key = iso(datetime.fromtimestamp(floor(ts, step), UTC))
            expected[key] = expected.get(key, 0) + 1
    assert {k: v for k, v in got.items() if v} == expected


# 2024-05-01T00:00:00Z, the start of a minute, an hour and a day
MIDNIGHT = 1714521600


@pytest.mark.parametrize("bucket", ["1m", "1h", "1d"])
@pytest.mark.parametrize(
    ("to", "midnight_included"),
    [
        # a fraction of a second into a bucket: that bucket is the last one
        ("2024-05-01T00:00:00.250Z", True),
        ("2024-05-01T00:00:00.000001Z", True),
        ("2024-05-01T02:00:00.5+02:00", True),
        # exactly on a boundary: `to` is exclusive, the bucket starting there is not asked for
        ("2024-05-01T00:00:00Z", False),
        ("2024-04-30T23:59:59.999Z", False),
    ],
)
def test_to_is_rounded_up_from_its_exact_value(
    bucket: str, to: str, midnight_included: bool
) -> None:
    step = BUCKETS[bucket]
    q = parse_counts_query({"name": "x", "bucket": bucket, "to": to}, now=0.0)
    assert q.end == (MIDNIGHT + step if midnight_included else MIDNIGHT)
    assert q.start == q.end - 60 * step


@pytest.mark.parametrize("into", [0.0, 0.000001, 0.3, 0.999999, 59.999])
def test_the_default_to_includes_the_bucket_holding_now(into: float) -> None:
    """Even at the bucket's first microsecond (issue #23: reads in second :00 read 0)."""
    q = parse_counts_query({"name": "x"}, now=MIDNIGHT + into)
    assert (q.start, q.end) == (MIDNIGHT + 60 - 3600, MIDNIGHT + 60)


async def test_postgres_answers_alone_when_redis_is_down(
    aiohttp_client: Any, config: Config
) -> None:
    app = create_app(config)
    client = await aiohttp_client(app)
    owner = await signup(client)
    now = datetime.now(UTC)
    stamps = await _send_spread(client, owner.headers, now)
    await app[EVENT_COUNTERS].flushed()
    q = CountsQuery(
        "spread", floor(now.timestamp(), 60) - 7200, floor(now.timestamp(), 60) + 60, 60
    )
    tenant = uuid.UUID(owner.tenant_id)
    live = Redis.from_url(config.redis_url or "")
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    try:
        with_redis = await bucket_counts(
            app[PG_READ], live, config.redis_key_prefix, tenant, q, time.time()
        )
        without = await bucket_counts(
            app[PG_READ], dead, config.redis_key_prefix, tenant, q, time.time()
        )
    finally:
        await live.aclose()
        await dead.aclose()
    assert with_redis == without
    assert sum(c for _, c in without) == sum(1 for ts in stamps if ts >= q.start)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "name"),
        ({"name": "bad name"}, "name"),
        ({"name": "a", "bucket": "5m"}, "bucket"),
        ({"name": "a", "from": "yesterday"}, "from"),
        ({"name": "a", "to": "2026-11-21T10:00:00"}, "to"),
        ({"name": "a", "from": "2026-11-21T10:00:00Z", "to": "2026-11-21T09:00:00Z"}, "from"),
        ({"name": "a", "from": "2026-11-01T00:00:00Z", "to": "2026-11-03T00:00:00Z"}, "from"),
    ],
)
async def test_bad_count_queries_are_422(
    aiohttp_client: Any, config: Config, params: dict[str, str], field: str
) -> None:
    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    resp = await client.get("/v1/analytics/counts", params=params, headers=owner.headers)
    assert resp.status == 422
    assert (await resp.json(content_type=None))["errors"][0]["field"] == field


async def test_an_offset_with_an_unescaped_plus_is_understood(
    aiohttp_client: Any, config: Config
) -> None:
    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    url = (
        "/v1/analytics/counts?name=a&bucket=1h"
        "&from=2026-11-21T10:00:00+02:00&to=2026-11-21T12:00:00Z"
    )
    resp = await client.get(url, headers=owner.headers)
    assert resp.status == 200
    assert [b["ts"] for b in (await resp.json())["buckets"]] == [
        "2026-11-21T08:00:00.000Z",
        "2026-11-21T09:00:00.000Z",
        "2026-11-21T10:00:00.000Z",
        "2026-11-21T11:00:00.000Z",
    ]


# --- live ------------------------------------------------------------------------------------


async def _next_message(resp: ClientResponse) -> dict[str, Any]:
    while True:
        chunk = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        lines = chunk.decode().strip().split("\n")
        if lines[0] == "event: counts":
            data: dict[str, Any] = orjson.loads(lines[1].removeprefix("data: "))
            return data


async def _counts_until(resp: ClientResponse, name: str) -> int:
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        message = await _next_message(resp)
        assert set(message) == {"ts", "counts"}
        if name in message["counts"]:
            count: int = message["counts"][name]
            return count
    raise AssertionError(f"no counts for {name}")


async def test_live_counts_reach_two_clients_and_stop_when_they_leave(
    aiohttp_client: Any, config: Config
) -> None:
    app = create_app(config)
    client = await aiohttp_client(app)
    owner, other = await signup(client), await signup(client, "Other")
    hub = app[LIVE_HUB]
    streams = [
        await client.get(
            "/v1/analytics/live", headers={**owner.headers, "X-Request-ID": f"live-{i}"}
        )
        for i in range(2)
    ]
    for i, resp in enumerate(streams):
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["X-Request-ID"] == f"live-{i}"
        assert "RateLimit-Limit" in resp.headers
    assert hub.clients == 2
    assert len(hub.feeds) == 1  # one poller for the tenant, however many streams
    events = {"events": [{"name": "live_click"}] * 3}
    assert (await client.post("/v1/events", json=events, headers=owner.headers)).status == 202
    assert (await client.post("/v1/events", json=events, headers=other.headers)).status == 202
    counts = await asyncio.gather(*[_counts_until(r, "live_click") for r in streams])
    assert counts == [3, 3]  # the other tenant's three are not in this tenant's stream
    for resp in streams:
        resp.close()
    deadline = time.monotonic() + 5
    while hub.clients or hub.feeds:
        assert time.monotonic() < deadline, "the streams did not notice their clients leave"
        await asyncio.sleep(0.05)


async def test_live_streams_end_when_the_server_drains(aiohttp_client: Any, config: Config) -> None:
    app = create_app(dataclasses.replace(config, events_live_max_clients=1))
    client = await aiohttp_client(app)
    owner = await signup(client)
    resp = await client.get("/v1/analytics/live", headers=owner.headers)
    assert resp.status == 200
    full = await client.get("/v1/analytics/live", headers=owner.headers)
    assert full.status == 503
    assert full.headers["Retry-After"] == "5"
    app[LIFECYCLE].draining = True
    body = await asyncio.wait_for(resp.content.read(), 5)  # ends: EOF after the last message
    assert body.startswith(b"retry: 2000\n\n")
    assert app[LIVE_HUB].clients == 0


async def test_counts_read_after_a_202_include_its_events(
    aiohttp_client: Any, config: Config
) -> None:
    """Read-your-writes: each 202 is followed at once by a read of the counts, from this
    process and from another one (sharing PostgreSQL and Redis), while other writers keep the
    writer and the Redis counters busy. Every read holds every event acknowledged before it."""
    cfg = dataclasses.replace(config, events_flush_ms=2)
    one, two = await aiohttp_client(create_app(cfg)), await aiohttp_client(create_app(cfg))
    owner, noisy = await signup(one), await signup(one, "Noisy")
    stop = asyncio.Event()

    async def writer(k: int) -> None:
        body = {"events": [{"name": f"bg{k}x{i % 10}"} for i in range(100)]}
        while not stop.is_set():
            resp = await one.post("/v1/events", json=body, headers=noisy.headers)
            assert resp.status == 202

    background = [asyncio.create_task(writer(k)) for k in range(4)]
    sent, short = 0, []
    try:
        for i in range(60):
            n = 1 + i % 5
            resp = await one.post(
                "/v1/events", json={"events": [{"name": "ryw"}] * n}, headers=owner.headers
            )
            assert resp.status == 202
            sent += n
            reader = (one, two)[i % 2]
            resp = await reader.get("/v1/analytics/counts?name=ryw", headers=owner.headers)
            assert resp.status == 200
            seen = sum(b["count"] for b in (await resp.json())["buckets"])
            if seen != sent:
                short.append((i, sent - seen))
    finally:
        stop.set()
        await asyncio.gather(*background)
    assert short == []

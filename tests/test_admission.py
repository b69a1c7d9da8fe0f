"""Admission (server/admission.py): the adaptive limit, the queue's deadline, round-robin across
tenants, the flooding tenant refused first, and ops endpoints never refused.

The limiter and the queue are driven with an injected clock and latency samples; the
in-process tests hold their requests on an event and poll for the state they wait for, so
nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import statistics
from typing import Any

import pytest
from aiohttp import web

from db.gate import FairGate
from server.admission import (
    DEADLINE,
    MIN_WINDOW_SAMPLES,
    QUEUE_FULL,
    TENANT_SHARE,
    WINDOW_S,
    Admission,
    GradientLimit,
    Refused,
)
from server.app import CHAIN, add_routes, admission_of, create_app
from server.config import Config
from server.routes import get, post

from .conftest import wait_for

WINDOW = WINDOW_S  # each feed below is one window


def feed(limit: GradientLimit, now: float, latency: float, in_flight: int | None = None) -> float:
    """One window's worth of samples of `latency` s, the slots used as `in_flight` says (the
    whole limit by default); returns the clock after the window."""
    for _ in range(MIN_WINDOW_SAMPLES):
        limit.sample(latency, limit.limit if in_flight is None else in_flight, now)
    return now + WINDOW


def test_the_limit_rises_while_latency_stays_near_the_reference() -> None:
    limit = GradientLimit(initial=10, minimum=4, maximum=64, tolerance=2.0, now=0.0)
    now, seen = WINDOW, [limit.limit]
    for _ in range(20):
        now = feed(limit, now, 0.001)
        seen.append(limit.limit)
    assert seen == sorted(seen)
    assert seen[-1] > 20
    for _ in range(500):
        now = feed(limit, now, 0.001)
        assert limit.limit <= 64
    assert limit.limit == 64  # MAX_IN_FLIGHT is the ceiling


def test_the_limit_stays_when_the_load_does_not_use_it() -> None:
    limit = GradientLimit(initial=10, minimum=4, maximum=64, tolerance=2.0, now=0.0)
    now = WINDOW
    for _ in range(20):
        now = feed(limit, now, 0.001, in_flight=2)
    assert limit.limit == 10


def test_the_limit_falls_when_requests_queue_and_never_below_the_minimum() -> None:
    limit = GradientLimit(initial=40, minimum=4, maximum=64, tolerance=2.0, now=0.0)
    now = feed(limit, WINDOW, 0.001)  # the no-load reference: 1 ms
    before = limit.limit
    seen = []
    for _ in range(15):
        now = feed(limit, now, 0.010)  # ten times the reference: a queue inside the process
        seen.append(limit.limit)
    assert seen == sorted(seen, reverse=True)
    assert seen[-1] < before / 2
    for _ in range(200):
        now = feed(limit, now, 0.010)
        assert limit.limit >= 4
    assert limit.limit == 4


# The limit under a loop backlog. A simulation, one step per window: each admitted request is
# served in some time (a share of what the limit lets in at once, when the limit causes a
# queue), and waits for the event loop: after its head is read, before it reaches the shed
# layer (what the limiter is told), anywhere from none to the whole backlog; and after its
# query answers, as long in its socket and as long again for the loop once read (what its
# latency counts; LOOP_WAITS).


def spread(limit: GradientLimit, now: float, served: float, backlog: float) -> float:
    """One window of requests served in `served` s that each also waited for the loop, evenly
    from 0 to `backlog` s before the shed layer, and twice as long after its query."""
    n = MIN_WINDOW_SAMPLES
    for i in range(n):
        wait, after = backlog * i / (n - 1), 2 * backlog * (n - 1 - i) / (n - 1)
        limit.sample(served + after, limit.limit, now, wait)
    return now + WINDOW


def idle_start(limit: GradientLimit) -> float:
    """Ten windows at no load: 1 ms a request, a loop that takes up to half a millisecond."""
    now = WINDOW
    for _ in range(10):
        now = spread(limit, now, 0.001, 0.0005)
    return now


def test_a_loop_backlog_the_limit_cannot_cure_does_not_cut_it() -> None:
    # Requests served in 1 ms as before, but the loop is 30 ms behind (other requests' parsing
    # and refusals, which hold no slot): cutting the limit would not shorten that wait, only
    # serve fewer requests in it. The limit before this cut itself to its minimum (the
    # collapse of docs/PERFORMANCE.md's 2026-12-07 notes).
    limit = GradientLimit(initial=32, minimum=16, maximum=64, tolerance=2.0, now=0.0)
    now = idle_start(limit)
    seen = []
    for _ in range(300):  # 30 s
        now = spread(limit, now, 0.001, 0.030)
        seen.append(limit.limit)
    assert min(seen) >= 32
    assert limit.latency > 0.025  # the samples did count the backlog: it was taken off


def test_queueing_the_limit_causes_still_lowers_it_under_a_loop_backlog() -> None:
    # A database that serves 10,000 requests a second: past 10 at once, requests queue for it,
    # in proportion to the limit. That queue is the limit's to cure: it falls until latency is
    # near the tolerance (twice the no-load 2 ms: ~30 at once, a little over it as the
    # gradient probes upwards), and a 30 ms loop backlog on top changes nothing about where.
    def settled(backlog: float) -> list[int]:
        limit = GradientLimit(initial=64, minimum=8, maximum=64, tolerance=2.0, now=0.0)
        now = idle_start(limit)
        seen = []
        for _ in range(300):
            now = spread(limit, now, max(0.001, limit.limit / 10_000), backlog)
            seen.append(limit.limit)
        assert seen[:20] == sorted(seen[:20], reverse=True) and seen[19] < 40
        return seen[-50:]

    quiet, flooded = settled(0.0005), settled(0.030)  # a quiet loop: 0.5 ms
    assert min(quiet) >= 28 and max(quiet) <= 40
    assert abs(statistics.mean(flooded) - statistics.mean(quiet)) <= 2


def test_the_minimum_defaults_to_the_pool() -> None:
    config = Config()
    assert config.concurrency_floor == config.pg_pool_max == 16
    gate = admission_of(dataclasses.replace(config, adaptive_concurrency=True, pg_pool_max=10))
    assert isinstance(gate, Admission) and gate.limiter is not None
    assert (gate.limiter.minimum, gate.limiter.maximum) == (10, 512)
    assert dataclasses.replace(config, concurrency_min=2).concurrency_floor == 2
    assert dataclasses.replace(config, max_in_flight=8).concurrency_floor == 8


async def test_the_limiter_learns_each_requests_wait_for_the_loop() -> None:
    clock = Clock()
    admission = Admission(
        GradientLimit(initial=4, minimum=1, maximum=4, tolerance=2.0, now=clock.now),
        4,
        60.0,
        clock,
    )
    assert admission.limiter is not None
    for i in range(MIN_WINDOW_SAMPLES):
        admission.in_flight += 1
        clock.now += WINDOW / MIN_WINDOW_SAMPLES
        admission.release(clock.now - 0.002, loop_wait=0.001 * (i + 1))
    assert admission.limiter.loop_lag == 0.01  # the window's 90th percentile of the waits
    assert admission.limiter.latency == pytest.approx(0.002)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def full(maximum: int, clock: Clock, deadline_s: float = 60.0) -> Admission:
    """A fixed limit of `maximum`, every slot taken; deadline_s long enough that the real
    timers never fire while a test runs."""
    admission = Admission(None, maximum, deadline_s, clock)
    admission.in_flight = maximum
    return admission


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_request_that_waited_past_the_deadline_is_refused_not_served() -> None:
    clock = Clock()
    admission = full(1, clock)
    waiter = asyncio.create_task(admission.wait("a", clock.now))
    await settle()
    assert admission.queued == 1
    clock.now += 61  # the slot frees only after the deadline
    admission.release(None)
    await settle()
    assert isinstance(waiter.exception(), Refused)
    assert waiter.exception().reason == DEADLINE  # type: ignore[union-attr]
    assert (admission.in_flight, admission.queued) == (0, 0)  # the slot went back, unused


async def test_a_request_already_late_on_arrival_is_refused_at_once() -> None:
    clock = Clock()
    admission = full(1, clock)
    with pytest.raises(Refused) as info:
        await admission.wait("a", clock.now - 61)
    assert info.value.reason == DEADLINE
    assert admission.queued == 0


async def test_a_standing_queue_allows_half_the_deadline() -> None:
    clock = Clock()
    admission = full(1, clock, deadline_s=0.0625)
    assert admission.allowed_wait(clock.now) == 0.0625  # no queue: the whole deadline
    waiter = asyncio.create_task(admission.wait("a", clock.now))
    await settle()
    clock.now += 0.0625  # the queue has not been empty for a whole deadline
    assert admission.allowed_wait(clock.now) == 0.03125  # half (no latency measured)
    admission.release(None)
    await settle()
    assert waiter.exception().reason == DEADLINE  # type: ignore[union-attr]


async def test_what_is_refused_whoever_sends_it() -> None:
    clock = Clock()
    admission = Admission(None, 2, 60.0, clock)
    assert admission.refuses_anyone(clock.now - 61) is None  # a free slot: served, however late
    admission.in_flight = 2
    assert admission.refuses_anyone(clock.now) is None  # it may still wait
    assert admission.refuses_anyone(clock.now - 61) == DEADLINE  # too late for any wait
    waiters = [asyncio.create_task(admission.wait(tenant, clock.now)) for tenant in "abcd"]
    await settle()
    assert (admission.queued, admission.max_queue) == (4, 4)
    # a full queue of four tenants holding one waiter each: a newcomer displaces nobody
    assert admission.refuses_anyone(None) == QUEUE_FULL
    waiters[3].cancel()
    await settle()
    waiters.append(asyncio.create_task(admission.wait("a", clock.now)))
    await settle()
    # "a" holds two of the four: another tenant's newcomer would take the place of its newest
    assert admission.refuses_anyone(None) is None
    for task in waiters:
        task.cancel()
    await settle()


async def test_slots_alternate_between_two_waiting_tenants() -> None:
    clock = Clock()
    admission = full(3, clock)  # a queue of at most 6
    order: list[str] = []

    async def request(name: str) -> None:
        await admission.wait(name[0], clock.now)
        order.append(name)

    tasks = []
    for name in ["a1", "a2", "a3", "b1", "b2"]:
        tasks.append(asyncio.create_task(request(name)))
        await settle()
    for _ in tasks:
        admission.release(clock.now)
        await settle()
    assert order == ["a1", "b1", "a2", "b2", "a3"]
    assert (admission.in_flight, admission.queued) == (3, 0)


async def test_the_flooding_tenant_is_refused_and_the_other_admitted() -> None:
    clock = Clock()
    admission = full(4, clock)  # a queue of at most 8
    flood = []
    for _ in range(8):
        flood.append(asyncio.create_task(admission.wait("flood", clock.now)))
        await settle()
    assert admission.queued == 8
    # the queue is full and holds only the flooder: its next is refused (before its body)
    with pytest.raises(Refused) as info:
        admission.precheck("flood")
    assert info.value.reason == QUEUE_FULL
    with pytest.raises(Refused) as info:
        await admission.wait("flood", clock.now)
    assert info.value.reason == QUEUE_FULL
    admission.precheck("probe")  # the other tenant is not refused before its body...
    probe = asyncio.create_task(admission.wait("probe", clock.now))
    await settle()
    # ...it takes the place of the flooder's newest waiter
    assert flood[-1].exception().reason == TENANT_SHARE  # type: ignore[union-attr]
    assert admission.queued == 8
    with pytest.raises(Refused) as info:
        admission.precheck("flood")
    assert info.value.reason == TENANT_SHARE  # the flooder holds more than its share now
    admission.release(clock.now)
    admission.release(clock.now)
    await settle()
    assert probe.done() and probe.exception() is None  # the second slot freed is the probe's


async def test_a_cancelled_waiter_leaves_no_ghost_and_a_handed_slot_passes_on() -> None:
    clock = Clock()
    admission = full(1, clock)
    first = asyncio.create_task(admission.wait("a", clock.now))
    second = asyncio.create_task(admission.wait("b", clock.now))
    await settle()
    admission.release(clock.now)  # handed to the first...
    first.cancel()  # ...which gives up before it runs: the slot goes to the second
    await settle()
    assert second.done() and second.exception() is None
    assert (admission.in_flight, admission.queued) == (1, 0)
    late = asyncio.create_task(admission.wait("c", clock.now))
    await settle()
    late.cancel()
    await settle()
    assert admission.queued == 0


# In process: the chain's shed layer, tenants told apart by X-Forwarded-For.


def held_app(config: Config, gate: asyncio.Event, **changes: Any) -> web.Application:
    """An app with `changes` to `config` and GET /test/slow, which answers once `gate` is set."""
    app = create_app(dataclasses.replace(config, **changes))

    async def slow(request: web.Request) -> web.Response:
        await gate.wait()
        return web.json_response({"slow": True})

    add_routes(app, [get("/test/slow", slow, page=True)])
    return app


def overload_app(config: Config, gate: asyncio.Event) -> web.Application:
    app = held_app(
        config,
        gate,
        adaptive_concurrency=True,
        max_in_flight=2,
        concurrency_min=2,
        concurrency_initial=2,
        queue_deadline_ms=30_000,
        trust_forwarded_for=True,
    )

    async def upload(request: web.Request) -> web.Response:
        return web.json_response({"bytes": len(await request.read())})

    add_routes(app, [post("/test/upload", upload, page=True)])
    return app


def shed_count(text: str, reason: str) -> float:
    m = re.search(rf'^surge_shed_total\{{reason="{reason}"\}} (\S+)$', text, re.M)
    return float(m[1]) if m else 0.0


async def test_a_flood_is_refused_while_another_tenant_and_ops_are_served(
    aiohttp_client: Any, config: Config
) -> None:
    gate = asyncio.Event()
    app = overload_app(config, gate)
    client = await aiohttp_client(app)
    admission = app[CHAIN].shed_gate
    assert isinstance(admission, Admission)
    before = await (await client.get("/metrics")).text()

    def send(address: str) -> asyncio.Task[Any]:
        return asyncio.create_task(client.get("/test/slow", headers={"X-Forwarded-For": address}))

    flood = [send("10.0.0.1") for _ in range(6)]  # 2 slots and a queue of 4
    await wait_for(lambda: admission.queued == 4)
    refused = [await client.get("/test/slow", headers={"X-Forwarded-For": "10.0.0.1"})]
    upload = await client.post(
        "/test/upload", data=b"x" * 10_000, headers={"X-Forwarded-For": "10.0.0.1"}
    )
    refused.append(upload)  # refused before its body was read
    for resp in refused:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json(content_type=None))["status"] == 503
    # ops endpoints answer while everything else waits or is refused
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/metrics")).status == 200
    probe = send("10.0.0.2")
    await wait_for(lambda: sum(task.done() for task in flood) == 1)
    gate.set()
    assert (await probe).status == 200
    statuses = sorted([(await task).status for task in flood])
    assert statuses == [200, 200, 200, 200, 200, 503]  # the flooder's newest gave way
    after = await (await client.get("/metrics")).text()
    assert shed_count(after, QUEUE_FULL) - shed_count(before, QUEUE_FULL) == 2
    assert shed_count(after, TENANT_SHARE) - shed_count(before, TENANT_SHARE) == 1
    assert re.search(r"^surge_concurrency_limit 2\.0$", after, re.M)
    assert re.search(r"^surge_queue_length 0\.0$", after, re.M)
    assert re.search(r"^surge_concurrency_in_flight 0\.0$", after, re.M)
    assert re.search(r"^surge_queue_wait_seconds_count \d", after, re.M)


async def test_a_request_that_waits_past_the_deadline_is_answered_503(
    aiohttp_client: Any, config: Config
) -> None:
    gate = asyncio.Event()
    app = held_app(
        config,
        gate,
        adaptive_concurrency=True,
        max_in_flight=1,
        concurrency_min=1,
        concurrency_initial=1,
        queue_deadline_ms=20,
    )
    client = await aiohttp_client(app)
    before = shed_count(await (await client.get("/metrics")).text(), DEADLINE)
    held = asyncio.create_task(client.get("/test/slow"))
    await wait_for(lambda: app[CHAIN].shed_gate.in_flight == 1)  # type: ignore[union-attr]
    resp = await client.get("/test/slow")
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert (await resp.json(content_type=None))["detail"] == (
        "the server is at capacity; retry shortly"
    )
    after = shed_count(await (await client.get("/metrics")).text(), DEADLINE)
    assert after == before + 1
    gate.set()
    assert (await held).status == 200


async def test_adaptive_concurrency_off_is_the_fixed_gate(
    aiohttp_client: Any, config: Config
) -> None:
    gate = asyncio.Event()
    app = held_app(config, gate, adaptive_concurrency=False, max_in_flight=1, queue_deadline_ms=20)
    assert isinstance(app[CHAIN].shed_gate, FairGate)
    client = await aiohttp_client(app)
    held = asyncio.create_task(client.get("/test/slow"))
    await wait_for(lambda: app[CHAIN].shed_gate.in_use == 1)  # type: ignore[union-attr]
    resp = await client.get("/test/slow")
    assert (resp.status, resp.headers["Retry-After"]) == (503, "1")
    text = await (await client.get("/metrics")).text()
    assert re.search(r"^surge_concurrency_limit 1\.0$", text, re.M)
    assert re.search(r"^surge_concurrency_in_flight 1\.0$", text, re.M)
    gate.set()
    assert (await held).status == 200


async def test_a_request_too_late_for_any_wait_is_refused_before_its_token(
    aiohttp_client: Any, config: Config
) -> None:
    # One slot, held; no wait allowed: every request now is refused whoever sends it, so it is
    # refused before its token is verified and its rate-limit bucket charged (the refusal's
    # largest costs): a bad token gets 503, not 401, and no RateLimit-* headers. Ops answer.
    gate = asyncio.Event()
    app = create_app(
        dataclasses.replace(
            config,
            adaptive_concurrency=True,
            max_in_flight=1,
            concurrency_min=1,
            concurrency_initial=1,
            queue_deadline_ms=0,
        )
    )

    async def slow(request: web.Request) -> web.Response:
        await gate.wait()
        return web.json_response({"slow": True})

    async def private(request: web.Request) -> web.Response:
        return web.json_response({"private": True})

    add_routes(app, [get("/v1/test/slow", slow, public=True), get("/v1/test/private", private)])
    client = await aiohttp_client(app)
    before = await (await client.get("/metrics")).text()
    held = asyncio.create_task(client.get("/v1/test/slow"))
    await wait_for(lambda: app[CHAIN].shed_gate.in_flight == 1)  # type: ignore[union-attr]
    for headers in ({"Authorization": "Bearer not-a-token"}, {}):
        resp = await client.get("/v1/test/private", headers=headers)
        assert (resp.status, resp.headers["Retry-After"]) == (503, "1")
        assert resp.headers["Content-Type"] == "application/problem+json"
        assert "RateLimit-Limit" not in resp.headers and "WWW-Authenticate" not in resp.headers
        assert await resp.json(content_type=None) == {
            "type": "/problems/overloaded",
            "title": "Service Unavailable",
            "status": 503,
            "detail": "the server is at capacity; retry shortly",
            "request_id": resp.headers["X-Request-ID"],
        }
    assert (await client.get("/healthz")).status == 200
    after = await (await client.get("/metrics")).text()
    assert shed_count(after, DEADLINE) - shed_count(before, DEADLINE) == 2
    failures = r'^surge_auth_failures_total\{reason="(\w+)"\} (\S+)$'
    assert re.findall(failures, after, re.M) == re.findall(failures, before, re.M)
    gate.set()
    assert (await held).status == 200
    resp = await client.get("/v1/test/private", headers={"Authorization": "Bearer not-a-token"})
    assert resp.status == 401  # a free slot again: the token is checked as ever

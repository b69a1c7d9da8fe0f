"""GET /v1/analytics/live under hostile use (issue 23, items 5-8), against the real process over
real sockets: streams are shared out per tenant and per user; a consumer that does not read is
dropped, not buffered for; a message holds at most EVENTS_LIVE_TOP_NAMES names and a tenant at
most EVENTS_MAX_NAMES_PER_TENANT distinct names; a hangup is a quiet 499; a stream ends with a
`reauthenticate` event when its token expires or its user is suspended.

One server for the module, with small limits so each test takes a few seconds."""

from __future__ import annotations

import asyncio
import re
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from unittest.mock import ANY

import aiohttp
import orjson
import pytest

from server.tokens import header_segment, sign

from .conftest import TEST_JWT_KEYS, Services
from .served import Served, served, wait_until

MAX_PER_USER = 2
MAX_PER_TENANT = 3
BUFFER_BYTES = 4096
TOP_NAMES = 50
MAX_NAMES = 60
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def server(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with served(
        services,
        tmp_path_factory.mktemp("live"),
        EVENTS_LIVE_MAX_CLIENTS="50",
        EVENTS_LIVE_MAX_PER_TENANT=str(MAX_PER_TENANT),
        EVENTS_LIVE_MAX_PER_USER=str(MAX_PER_USER),
        EVENTS_LIVE_BUFFER_BYTES=str(BUFFER_BYTES),
        EVENTS_LIVE_TOP_NAMES=str(TOP_NAMES),
        EVENTS_MAX_NAMES_PER_TENANT=str(MAX_NAMES),
        RATE_LIMIT_RATE="10000",
        RATE_LIMIT_BURST="10000",
        AUTH_RATE_LIMIT_PER_MINUTE="10000",
        HASH_CONCURRENCY="2",
        # user.* outbox events (a sign-up's user.created) would become events of their own,
        # landing in whichever second they are relayed: the counts here are only what is posted
        ANALYTICS_CONSUMER="false",
    ) as inst:
        yield inst
    # nothing any test did may have logged a traceback or an error
    text = inst.stderr.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert '"level":"error"' not in text, text[-3000:]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        yield session


@dataclass
class User:
    id: str
    tenant_id: str
    roles: list[str]
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def signup(http: aiohttp.ClientSession, server: Served) -> User:
    n = time.monotonic_ns()
    body = {
        "tenant_name": "Live",
        "email": f"owner{n}@example.com",
        "username": f"owner{n}",
        "password": PASSWORD,
    }
    async with http.post(f"{server.url}/v1/auth/signup", json=body) as r:
        assert r.status == 201, await r.text()
        data = await r.json()
    user = data["user"]
    return User(user["id"], data["tenant"]["id"], user["roles"], data["access_token"])


async def add_member(http: aiohttp.ClientSession, server: Served, owner: User) -> User:
    n = time.monotonic_ns()
    email = f"member{n}@example.com"
    body = {"email": email, "username": f"member{n}", "password": PASSWORD, "roles": ["member"]}
    async with http.post(f"{server.url}/v1/users", json=body, headers=owner.headers) as r:
        assert r.status == 201, await r.text()
        user_id = (await r.json())["id"]
    login = {"tenant_id": owner.tenant_id, "email": email, "password": PASSWORD}
    async with http.post(f"{server.url}/v1/auth/login", json=login) as r:
        assert r.status == 200, await r.text()
        token = (await r.json())["access_token"]
    return User(user_id, owner.tenant_id, ["member"], token)


async def post_events(
    http: aiohttp.ClientSession, server: Served, user: User, names: list[str]
) -> tuple[int, Any]:
    body = {"events": [{"name": name} for name in names]}
    async with http.post(f"{server.url}/v1/events", json=body, headers=user.headers) as r:
        return r.status, await r.json(content_type=None)


async def open_stream(
    http: aiohttp.ClientSession, server: Served, user: User, token: str | None = None
) -> aiohttp.ClientResponse:
    headers = {"Authorization": f"Bearer {token or user.token}"}
    return await http.get(f"{server.url}/v1/analytics/live", headers=headers)


async def next_event(resp: aiohttp.ClientResponse, timeout: float = 5) -> tuple[str, Any] | None:
    """The next SSE event (name, parsed data) of a stream; None at its end."""
    while True:
        chunk = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout)
        if not chunk:
            return None
        fields = dict(line.split(": ", 1) for line in chunk.decode().strip().split("\n"))
        if "event" in fields:
            return fields["event"], orjson.loads(fields["data"])


def metric(server: Served, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{name}{{{re.escape(labels)}}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# --- item 5: a share of the streams per tenant and per user ---------------------------------


async def test_one_user_and_one_tenant_cannot_take_every_stream(
    http: aiohttp.ClientSession, server: Served
) -> None:
    owner = await signup(http, server)
    member = await add_member(http, server, owner)
    other = await signup(http, server)
    held = [await open_stream(http, server, owner) for _ in range(MAX_PER_USER)]
    try:
        assert [r.status for r in held] == [200] * MAX_PER_USER
        async with await open_stream(http, server, owner) as refused:
            assert refused.status == 429
            assert refused.headers["Retry-After"] == "5"
            problem = await refused.json(content_type="application/problem+json")
            assert problem["detail"] == (
                f"you have {MAX_PER_USER} live streams open, the most allowed; close one or "
                "retry later"
            )
        held.append(await open_stream(http, server, member))  # the tenant's third: its share
        assert held[-1].status == 200
        async with await open_stream(http, server, member) as refused:
            assert refused.status == 429
            assert refused.headers["Retry-After"] == "5"
            problem = await refused.json(content_type="application/problem+json")
            assert problem["detail"] == (
                f"your tenant has {MAX_PER_TENANT} live streams open on this server, the most "
                "allowed; close one or retry later"
            )
        async with await open_stream(http, server, other) as theirs:  # another tenant: served
            assert theirs.status == 200
            assert await next_event(theirs) is not None
    finally:
        for r in held:
            r.close()
    # the share comes back once the streams are closed
    deadline = time.monotonic() + 5
    while True:
        async with await open_stream(http, server, owner) as again:
            if again.status == 200:
                break
        assert time.monotonic() < deadline, "the closed streams were not given back"
        await asyncio.sleep(0.2)


# --- item 6: slow consumers, message size, names per tenant ----------------------------------


def long_names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:03d}".ljust(64, "x") for i in range(n)]


async def test_a_stream_that_never_reads_is_dropped_and_a_reading_one_is_not(
    http: aiohttp.ClientSession, server: Served
) -> None:
    owner = await signup(http, server)
    reader = await open_stream(http, server, owner)
    assert reader.status == 200
    seen: list[float] = []

    async def read() -> None:
        while await next_event(reader, timeout=30) is not None:
            seen.append(time.monotonic())

    reading = asyncio.create_task(read())
    # A client that never reads: a small receive window, and not one byte taken from it.
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    stalled.connect(("127.0.0.1", server.port))
    stalled.sendall(
        f"GET /v1/analytics/live HTTP/1.1\r\nHost: surge\r\nAuthorization: Bearer {owner.token}"
        "\r\nX-Request-ID: live-stalled\r\n\r\n".encode()
    )
    dropped = metric(server, "surge_analytics_live_closed_total", 'reason="slow"')
    names = long_names("slow", TOP_NAMES)  # each message: ~3.5 KB
    try:
        deadline = time.monotonic() + 20
        while metric(server, "surge_analytics_live_closed_total", 'reason="slow"') == dropped:
            assert time.monotonic() < deadline, "the stalled stream was never dropped"
            assert (await post_events(http, server, owner, names))[0] == 202
            await asyncio.sleep(0.3)
        # the server closed it: what the socket holds, then EOF or a reset
        stalled.settimeout(5)
        try:
            while stalled.recv(65536):
                pass
        except ConnectionResetError:
            pass
        # and the stream that reads is still served
        after = len(seen)
        deadline = time.monotonic() + 5
        while len(seen) < after + 2:
            assert time.monotonic() < deadline, "the reading stream stopped"
            assert not reading.done()
            await asyncio.sleep(0.1)
    finally:
        stalled.close()
        reader.close()
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
    warnings = [line for line in server.log_lines() if "live-stalled" in line]
    assert len(warnings) == 1, warnings
    assert orjson.loads(warnings[0])["level"] == "warning"
    assert "not reading" in warnings[0]


async def test_a_message_holds_the_most_frequent_names_only(
    http: aiohttp.ClientSession, server: Served
) -> None:
    owner = await signup(http, server)
    async with await open_stream(http, server, owner) as stream:
        assert stream.status == 200
        rare = long_names("rare", 5)
        frequent = long_names("often", TOP_NAMES)
        # one batch: its events are counted in one second, so they meet in one message
        assert (await post_events(http, server, owner, frequent * 2 + rare))[0] == 202
        deadline = time.monotonic() + 6
        while True:
            event = await next_event(stream)
            assert event is not None and event[0] == "counts"
            if event[1]["counts"]:
                break
            assert time.monotonic() < deadline, "no counts arrived"
        data = event[1]
        assert data["counts"] == dict.fromkeys(frequent, 2)
        assert data["omitted"] == {"names": 5, "count": 5}


async def test_a_tenant_cannot_use_more_than_its_names(
    http: aiohttp.ClientSession, server: Served
) -> None:
    owner = await signup(http, server)
    names = [f"name{i}" for i in range(MAX_NAMES)]
    assert (await post_events(http, server, owner, names[:40]))[0] == 202
    assert (await post_events(http, server, owner, names[30:]))[0] == 202
    status, problem = await post_events(http, server, owner, ["name0", "brand_new", "name1"])
    assert status == 422
    message = f"is a new event name, and this tenant has used the most allowed ({MAX_NAMES} "
    assert problem["errors"] == [
        {"field": "events[1].name", "message": message + "distinct names)"}
    ]
    assert (
        problem["detail"] == "the batch brings more distinct event names than this tenant may use"
    )
    assert (await post_events(http, server, owner, names))[0] == 202  # known names still pass
    other = await signup(http, server)  # the limit is per tenant
    assert (await post_events(http, server, other, ["brand_new"]))[0] == 202


# --- item 7: a hangup is a 499, quietly ------------------------------------------------------


async def test_a_hangup_mid_stream_is_a_quiet_499(
    http: aiohttp.ClientSession, server: Served
) -> None:
    token = (await signup(http, server)).token
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(
        f"GET /v1/analytics/live HTTP/1.1\r\nHost: surge\r\nAuthorization: Bearer {token}\r\n"
        "X-Request-ID: live-hangup\r\n\r\n".encode()
    )
    data = b""
    while b"retry: 2000" not in data:
        chunk = sock.recv(65536)
        assert chunk, "closed before the stream started"
        data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    sock.close()
    wait_until(
        "the stream's access line",
        lambda: any(line["request_id"] == "live-hangup" for line in server.access_lines()),
    )
    [line] = [line for line in server.access_lines() if line["request_id"] == "live-hangup"]
    assert line["status"] == 499
    assert line["route"] == "/v1/analytics/live"
    assert [line for line in server.log_lines() if "live-hangup" in line] == []


# --- item 8: a stream ends with its authority -----------------------------------------------


async def _until_end(stream: aiohttp.ClientResponse, timeout: float) -> list[tuple[str, Any]]:
    events = []
    deadline = time.monotonic() + timeout
    while event := await next_event(stream, timeout=max(0.01, deadline - time.monotonic())):
        events.append(event)
    return events


async def test_a_suspended_users_stream_ends_with_reauthenticate(
    http: aiohttp.ClientSession, server: Served
) -> None:
    owner = await signup(http, server)
    member = await add_member(http, server, owner)
    async with await open_stream(http, server, member) as stream:
        assert stream.status == 200
        assert await next_event(stream) == ("counts", ANY)
        async with http.get(f"{server.url}/v1/users/{member.id}", headers=owner.headers) as r:
            etag = r.headers["ETag"]
        async with http.patch(
            f"{server.url}/v1/users/{member.id}",
            json={"status": "suspended"},
            headers={**owner.headers, "If-Match": etag},
        ) as r:
            assert r.status == 200, await r.text()
        suspended = time.monotonic()
        events = await _until_end(stream, timeout=5)
        assert time.monotonic() - suspended < 2.5
    assert events[-1] == ("reauthenticate", {"reason": "revoked"})
    assert all(name == "counts" for name, _ in events[:-1])


async def test_a_stream_ends_with_reauthenticate_when_its_token_expires(
    http: aiohttp.ClientSession, server: Served
) -> None:
    owner = await signup(http, server)
    kid, secret = TEST_JWT_KEYS.split(",")[0].split(":")
    exp = int(time.time()) + 3
    claims = {
        "iss": "surge", "aud": "surge-api", "sub": owner.id, "tid": owner.tenant_id,
        "roles": owner.roles, "iat": exp - 3, "exp": exp, "jti": "0123456789abcdef", "gen": 0,
    }  # fmt: skip
    short = sign(header_segment(kid), claims, secret.encode())
    async with await open_stream(http, server, owner, token=short) as stream:
        assert stream.status == 200
        events = await _until_end(stream, timeout=8)
        assert time.time() - exp < 2.5
    assert events[-1] == ("reauthenticate", {"reason": "expired"})
    assert all(name == "counts" for name, _ in events[:-1])

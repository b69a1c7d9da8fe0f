"""Slow and idle clients against the real process, over raw sockets (issue 18, defect 2): a body
that trickles in is cut off with 408 and holds no shed slot meanwhile; a connection that never
finishes its request head is closed; one address cannot hold more than its share of
connections; a client that hangs up mid-body is a 499 and one warning, never a 500.

One server for the module, with small limits so each test takes a second or two."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import aiohttp
import pytest

from handlers import SPEC
from server.config import Config
from server.runner import free_port, serve_app

from .conftest import Services
from .served import Served, recv_all, served, wait_until

BODY_READ_TIMEOUT_S = 2
HEADER_TIMEOUT_S = 1
MAX_IN_FLIGHT = 2
MAX_CONNECTIONS_PER_IP = 8
OTHER_ADDRESS = "127.0.0.2"  # loopback too: a second client address on this machine


@pytest.fixture(scope="module")
def server(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with served(
        services,
        tmp_path_factory.mktemp("slow"),
        BODY_READ_TIMEOUT_S=str(BODY_READ_TIMEOUT_S),
        HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        KEEPALIVE_TIMEOUT_S="30",
        MAX_IN_FLIGHT=str(MAX_IN_FLIGHT),
        MAX_CONNECTIONS_PER_IP=str(MAX_CONNECTIONS_PER_IP),
        HASH_CONCURRENCY="2",
    ) as inst:
        yield inst
    # nothing any test did may have logged a traceback or an error
    text = inst.stderr.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert '"level":"error"' not in text, text[-3000:]


def login_head(rid: str, length: int = 10_000) -> bytes:
    return (
        "POST /v1/auth/login HTTP/1.1\r\nHost: surge\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\nX-Request-ID: {rid}\r\n\r\n"
    ).encode()


def in_flight(server: Served) -> float:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r"^surge_http_requests_in_flight (\S+)$", text, re.M)
    assert m is not None
    return float(m.group(1)) - 1  # not counting this scrape


def get(server: Served, path: str, token: str | None = None) -> int:
    req = urllib.request.Request(server.url + path)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def signup(server: Served) -> str:
    n = time.monotonic_ns()
    body = {
        "tenant_name": "Slow",
        "email": f"owner{n}@example.com",
        "username": f"owner{n}",
        "password": "correct horse battery",
    }
    req = urllib.request.Request(
        f"{server.url}/v1/auth/signup",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            token: str = json.loads(r.read())["access_token"]
            return token
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"signup answered {exc.code}: {exc.read()!r}") from None


def exchange(sock: socket.socket, path: str = "/healthz") -> int:
    """One keep-alive GET on `sock`; its status."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: surge\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "closed before an answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1])


def test_a_trickling_body_is_cut_off_with_408_and_the_connection_closed(server: Served) -> None:
    sock = server.connect(timeout=BODY_READ_TIMEOUT_S + 5)
    sock.sendall(login_head("trickle-408"))
    stop = threading.Event()

    def trickle() -> None:  # one byte at a time, as the attack does, until cut off
        try:
            while not stop.wait(0.2):
                sock.sendall(b" ")
        except OSError:
            pass

    trickler = threading.Thread(target=trickle)
    trickler.start()
    try:
        answer = recv_all(sock)  # returns once the server closes the connection
    finally:
        stop.set()
        trickler.join()
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 408 Request Timeout"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Content-Type"] == "application/problem+json"
    assert headers["Connection"] == "close"
    problem = json.loads(body)
    assert problem == {
        "type": "/problems/request-timeout",
        "title": "Request Timeout",
        "status": 408,
        "detail": f"the request body did not arrive within {BODY_READ_TIMEOUT_S:g} s",
        "request_id": "trickle-408",
    }
    wait_until(
        "the 408's access line",
        lambda: any(
            line["request_id"] == "trickle-408" and line["status"] == 408
            for line in server.access_lines()
        ),
    )


def test_trickling_bodies_hold_no_slot(server: Served) -> None:
    token = signup(server)
    tricklers = [server.connect() for _ in range(MAX_IN_FLIGHT + 3)]
    try:
        for i, sock in enumerate(tricklers):
            sock.sendall(login_head(f"pinning-{i}") + b"{")
        # every trickler's head is in: each is a request the server is handling now
        wait_until("the tricklers in flight", lambda: in_flight(server) >= len(tricklers))
        assert get(server, "/v1/me", token) == 200
        for sock in tricklers:  # still waiting for their bodies: none was answered yet
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        for sock in tricklers:
            sock.close()


def test_a_connection_that_never_finishes_its_head_is_closed(server: Served) -> None:
    sock = server.connect(timeout=HEADER_TIMEOUT_S + 5)  # well under KEEPALIVE_TIMEOUT_S
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: surge\r\n")
        assert recv_all(sock) == b""  # closed, no answer
    finally:
        sock.close()


def test_connections_beyond_the_per_address_cap_are_refused(server: Served) -> None:
    held = [server.connect(OTHER_ADDRESS) for _ in range(MAX_CONNECTIONS_PER_IP)]
    try:
        for sock in held:
            assert exchange(sock) == 200  # each is a served keep-alive connection
        # Idle keep-alive connections outlive the header timeout (it bounds the first head only).
        time.sleep(HEADER_TIMEOUT_S + 0.5)
        extra = server.connect(OTHER_ADDRESS)
        try:
            try:
                extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: surge\r\n\r\n")
                answer = recv_all(extra)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # closed at once, nothing answered
        finally:
            extra.close()
        assert get(server, "/healthz") == 200  # another address is served meanwhile
        for sock in held:
            assert exchange(sock) == 200  # and the held ones still work
        held.pop().close()

        def one_more_works() -> bool:
            sock = server.connect(OTHER_ADDRESS)
            try:
                return exchange(sock) == 200
            except (AssertionError, ConnectionResetError):
                return False
            finally:
                sock.close()

        wait_until("a connection once one was closed", one_more_works)
    finally:
        for sock in held:
            sock.close()
    warnings = [line for line in server.log_lines() if "connections from" in line]
    assert len(warnings) >= 1
    assert all(
        json.loads(line)["level"] == "warning" and OTHER_ADDRESS in line for line in warnings
    )


def test_a_hangup_mid_body_is_a_499_and_one_warning(server: Served) -> None:
    sock = server.connect()
    sock.sendall(login_head("hangup-499", length=100) + b'{"tenant_id":')
    wait_until("the request in flight", lambda: in_flight(server) >= 1)
    sock.close()
    wait_until(
        "the 499's access line",
        lambda: any(line["request_id"] == "hangup-499" for line in server.access_lines()),
    )
    [line] = [line for line in server.access_lines() if line["request_id"] == "hangup-499"]
    assert line["status"] == 499
    assert line["route"] == "/v1/auth/login"
    mentions = [line for line in server.log_lines() if "hangup-499" in line]
    assert len(mentions) == 1, mentions
    assert json.loads(mentions[0])["level"] == "warning"
    assert "hung up" in mentions[0]


def test_every_operation_with_a_body_documents_408() -> None:
    with_body = [
        (method, path, operation)
        for path, item in SPEC["paths"].items()
        for method, operation in item.items()
        if "requestBody" in operation
    ]
    assert len(with_body) >= 13
    for method, path, operation in with_body:
        assert "408" in operation["responses"], f"{method.upper()} {path}"


async def test_behind_a_trusted_proxy_connections_are_not_capped_per_address(
    config: Config,
) -> None:
    # every connection then comes from the proxy: capping its address would cap everyone
    cfg = dataclasses.replace(
        config, port=free_port(), trust_forwarded_for=True, max_connections_per_ip=1
    )
    ready, stop = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve_app(cfg, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=False, limit=0)
        ) as session:
            url = f"http://127.0.0.1:{cfg.port}/healthz"
            # 3 held at once from one address (the connector opens one per request in flight)
            statuses = await asyncio.gather(*(session.get(url) for _ in range(3)))
            assert [r.status for r in statuses] == [200, 200, 200]
            for r in statuses:
                r.release()
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)


async def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(
    config: Config,
) -> None:
    cfg = dataclasses.replace(config, port=free_port(), keepalive_timeout_s=0.5)
    ready, stop = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve_app(cfg, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", cfg.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: surge\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        await reader.readexactly(length)
        # kept alive, then idle: the server closes it (EOF) well before the 10 s bound
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)

"""A compression bomb against the real process, over real sockets (issue 23, item 2): a ~1 MB
deflate body that would inflate to 1 GiB. POST /v1/events takes compressed bodies and stops
decoding at MAX_BODY_BYTES (413); every other route refuses an encoded body (415, or 401 first
without a token) and never decodes it; /healthz keeps answering while the bomb is refused."""

from __future__ import annotations

import http.client
import json
import threading
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Services
from .served import Served, served

GIB = 1 << 30
MAX_BODY_BYTES = 1 << 20  # the default
NO_CODING = "this operation takes no Content-Encoding; send the body as it is"


def deflate_bomb(size: int = GIB) -> bytes:
    """A zlib stream of `size` zero bytes, built without holding them: 4 MiB of zeros
    compressed up to a full flush is a segment that decodes alone (no reference reaches back
    across a full flush), so the segment repeated is the stream of all the zeros. The stream's
    end and checksum are left out: nothing is to read that far."""
    chunk = bytes(4 << 20)
    deflater = zlib.compressobj(9)
    first = deflater.compress(chunk) + deflater.flush(zlib.Z_FULL_FLUSH)
    segment = deflater.compress(chunk) + deflater.flush(zlib.Z_FULL_FLUSH)
    bomb = first + segment * (size // len(chunk) - 1)
    start = bomb[: len(first) + 2 * len(segment)]
    assert zlib.decompressobj().decompress(start) == bytes(3 * len(chunk))
    return bomb


@pytest.fixture(scope="module")
def bomb() -> bytes:
    body = deflate_bomb()
    assert len(body) < MAX_BODY_BYTES  # as sent, it fits: only decoding finds it too large
    return body


@pytest.fixture(scope="module")
def server(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with served(services, tmp_path_factory.mktemp("bomb")) as inst:
        yield inst
    text = inst.stderr.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert '"level":"error"' not in text, text[-3000:]


def call(
    server: Served, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, dict(resp.getheaders()), json.loads(data) if data else None
    finally:
        conn.close()


@pytest.fixture(scope="module")
def token(server: Served) -> str:
    n = uuid.uuid4().hex[:8]
    status, _, body = call(
        server, "POST", "/v1/auth/signup",
        json.dumps({
            "tenant_name": "bombs", "email": f"o{n}@example.com", "username": f"o{n}",
            "password": "correct horse battery",
        }).encode(),
        **{"Content-Type": "application/json"},
    )  # fmt: skip
    assert status == 201, body
    return str(body["access_token"])


def test_a_bomb_to_events_is_413_and_healthz_keeps_answering(
    server: Served, bomb: bytes, token: str
) -> None:
    answers: list[tuple[int, dict[str, str], Any]] = []
    health: list[int] = []
    headers = {
        "Content-Type": "application/json",
        "Content-Encoding": "deflate",
        "Authorization": f"Bearer {token}",
    }

    def send() -> None:
        answers.append(call(server, "POST", "/v1/events", bomb, **headers))

    sender = threading.Thread(target=send)
    sender.start()
    while sender.is_alive() or not health:
        health.append(call(server, "GET", "/healthz")[0])  # each bounded by its 30 s timeout
    sender.join()
    assert set(health) == {200}
    [(status, answer_headers, problem)] = answers
    assert status == 413, problem
    assert answer_headers["Content-Type"] == "application/problem+json"
    assert problem["detail"] == f"the request body decodes to more than {MAX_BODY_BYTES} bytes"


@pytest.mark.parametrize(
    ("path", "auth", "status"),
    [
        ("/v1/users", True, 415),
        ("/v1/users", False, 401),
        ("/graphql", True, 415),
        ("/v1/auth/login", False, 415),
    ],
)
def test_a_bomb_elsewhere_is_refused_unread(
    server: Served, bomb: bytes, token: str, path: str, auth: bool, status: int
) -> None:
    headers = {"Content-Type": "application/json", "Content-Encoding": "deflate"}
    if auth:
        headers["Authorization"] = f"Bearer {token}"
    got, answer_headers, problem = call(server, "POST", path, bomb, **headers)
    assert got == status, problem
    assert answer_headers["Content-Type"] == "application/problem+json"
    if status == 415:
        assert (
            problem["detail"] == "this operation takes no Content-Encoding; send the body as it is"
        )
        assert answer_headers["Accept-Encoding"] == "identity"

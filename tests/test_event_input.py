"""Hostile input to the events routes (issue 23, items 1-4 and 12): card numbers in props, bodies
in a Content-Encoding (accepted on POST /v1/events only, decoded within MAX_BODY_BYTES), bodies
that are not in the coding they claim, extreme timestamps, numbers that would change on their
way to storage. Each refusal is a 4xx that names its real reason; nothing refused is stored.
(The bomb itself, over real sockets: tests/test_compression_bomb.py.)"""

from __future__ import annotations

import dataclasses
import gzip
import json
import zlib
from decimal import Decimal
from typing import Any

import asyncpg
import brotli
import orjson
import pytest
from aiohttp.test_utils import TestClient

from server.app import create_app
from server.config import Config
from server.validation import CARD_MESSAGE, MAX_DEPTH

from .helpers import signup

JSON = {"Content-Type": "application/json"}
DEEP = f"is nested more than {MAX_DEPTH} levels deep"
INT_RANGE = "is an integer outside -2^63 .. 2^64-1, which would not be stored exactly"
NEGATIVE_ZERO = "is negative zero, which would be stored as 0; send 0"
PRECISION = "has more digits than a 64-bit float holds, so it would not be stored exactly"
TINY = "is too close to zero for a 64-bit float, so it would be stored as 0"
NO_CODING = "this operation takes no Content-Encoding; send the body as it is"
UNKNOWN_CODING = "the body's Content-Encoding must be one of gzip, deflate, br, or none"


@pytest.fixture
async def client(aiohttp_client: Any, config: Config) -> TestClient:
    c: TestClient = await aiohttp_client(create_app(config))
    return c


async def post(
    client: TestClient, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, str], Any]:
    resp = await client.post(path, data=body, headers={**JSON, **headers})
    return resp.status, dict(resp.headers), await resp.json()


async def events_props(dsn: str | None) -> list[str]:
    con = await asyncpg.connect(dsn)
    try:
        return [r["props"] for r in await con.fetch("SELECT props::text AS props FROM events")]
    finally:
        await con.close()


def refused(status: int, problem: Any, field: str, message: str) -> None:
    assert status == 422, problem
    assert problem["errors"] == [{"field": field, "message": message}]


def one_event(props: bytes) -> bytes:
    return b'{"events": [{"name": "a", "props": %s}]}' % props


# -- item 1: card numbers in events, as a prop value or a prop key --


@pytest.mark.parametrize(
    ("props", "field"),
    [
        ({"pan": "4242 4242 4242 4242"}, "events[0].props.pan"),
        ({"4111-1111-1111-1111": "x"}, "events[0].props"),
    ],
)
async def test_a_card_in_event_props_is_422_and_not_stored(
    client: TestClient, config: Config, props: dict[str, str], field: str
) -> None:
    owner = await signup(client)
    body = orjson.dumps({"events": [{"name": "ok"}, {"name": "a", "props": props}]})
    status, _, problem = await post(client, "/v1/events", body, owner.headers)
    refused(status, problem, field.replace("[0]", "[1]"), CARD_MESSAGE)
    assert await events_props(config.database_url) == []


# -- item 4: extreme timestamps --


@pytest.mark.parametrize("ts", ["0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-00:01"])
async def test_an_event_ts_past_the_calendar_is_422(client: TestClient, ts: str) -> None:
    owner = await signup(client)
    body = orjson.dumps({"events": [{"name": "a", "ts": ts}]})
    status, _, problem = await post(client, "/v1/events", body, owner.headers)
    refused(status, problem, "events[0].ts", "is not a valid timestamp")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"from": "0001-01-01T00:00:00+00:01"}, "from"),
        ({"from": "9999-12-31T23:59:59-00:01"}, "from"),
        ({"to": "9999-12-31T23:59:59-00:01"}, "to"),
        ({"to": "9999-12-31T23:30:00Z", "bucket": "1h"}, "to"),
        ({"to": "9999-12-31T23:30:00Z", "bucket": "1d"}, "to"),
        ({"to": "9999-06-01T00:00:00Z", "from": "9999-05-31T00:00:00Z", "bucket": "1h"}, None),
    ],
)
async def test_analytics_ranges_past_the_calendar_are_422(
    client: TestClient, query: dict[str, str], field: str | None
) -> None:
    owner = await signup(client)
    resp = await client.get(
        "/v1/analytics/counts", params={"name": "a", **query}, headers=owner.headers
    )
    answer = await resp.json()
    if field is None:  # far, but inside the calendar: answered
        assert resp.status == 200, answer
        assert len(answer["buckets"]) == 24
        return
    assert resp.status == 422, answer
    assert [e["field"] for e in answer["errors"]] == [field]


# -- item 12: numbers are stored as sent, or refused saying why --


@pytest.mark.parametrize(
    ("props", "field", "message"),
    [
        (b'{"n": 18446744073709551616}', "events[0].props.n", INT_RANGE),
        (b'{"n": -9223372036854775809}', "events[0].props.n", INT_RANGE),
        (b'{"l": [1, 100000000000000000000000]}', "events[0].props.l[1]", INT_RANGE),
        (b'{"z": -0.0}', "events[0].props.z", NEGATIVE_ZERO),
        (b'{"z": -0e3}', "events[0].props.z", NEGATIVE_ZERO),
        (b'{"pi": 3.14159265358979323846}', "events[0].props.pi", PRECISION),
        (b'{"t": 1e-400}', "events[0].props.t", TINY),
        (b'{"t": 2.5e-0400}', "events[0].props.t", TINY),
    ],
)
async def test_a_number_that_would_change_is_422_saying_why(
    client: TestClient, config: Config, props: bytes, field: str, message: str
) -> None:
    owner = await signup(client)
    status, _, problem = await post(client, "/v1/events", one_event(props), owner.headers)
    refused(status, problem, field, message)
    assert await events_props(config.database_url) == []


async def test_numbers_a_float_keeps_are_stored_as_sent(client: TestClient, config: Config) -> None:
    owner = await signup(client)
    props = (
        b'{"max": 18446744073709551615, "min": -9223372036854775808, "f": 0.30000000000000004,'
        b' "e": 1.5e-300, "sub": 5e-324, "zero": -0, "big": 1.7976931348623157e308}'
    )
    status, _, answer = await post(client, "/v1/events", one_event(props), owner.headers)
    assert status == 202, answer
    [stored] = await events_props(config.database_url)
    # jsonb writes numbers in its own notation: compared as the exact decimals they are
    assert json.loads(stored, parse_float=Decimal) == json.loads(props, parse_float=Decimal)


async def test_props_nested_255_deep_are_refused_as_too_deep(client: TestClient) -> None:
    owner = await signup(client)
    props = b'{"a":' * 255 + b"1" + b"}" * 255
    status, _, problem = await post(client, "/v1/events", one_event(props), owner.headers)
    refused(status, problem, "events[0].props" + ".a" * (MAX_DEPTH - 3), DEEP)


# -- items 2 and 3: Content-Encoding --

BATCH = orjson.dumps({"events": [{"name": "zipped", "props": {"n": i}} for i in range(50)]})


def raw_deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


@pytest.mark.parametrize(
    ("coding", "body"),
    [
        ("gzip", gzip.compress(BATCH)),
        ("x-gzip", gzip.compress(BATCH)),
        ("GZIP", gzip.compress(BATCH)),
        ("deflate", zlib.compress(BATCH)),
        ("deflate", raw_deflate(BATCH)),
        ("br", brotli.compress(BATCH)),
        ("identity", BATCH),
    ],
)
async def test_events_take_a_compressed_body(
    client: TestClient, config: Config, coding: str, body: bytes
) -> None:
    owner = await signup(client)
    status, _, answer = await post(
        client, "/v1/events", body, {**owner.headers, "Content-Encoding": coding}
    )
    assert (status, answer) == (202, {"accepted": 50})
    assert len(await events_props(config.database_url)) == 50


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
async def test_a_body_not_in_its_coding_is_400_on_events(client: TestClient, coding: str) -> None:
    owner = await signup(client)
    for body in (BATCH, gzip.compress(BATCH)[:-9] if coding == "gzip" else BATCH[:5], b""):
        status, headers, problem = await post(
            client, "/v1/events", body, {**owner.headers, "Content-Encoding": coding}
        )
        assert status == 400, problem
        assert headers["Content-Type"] == "application/problem+json"
        assert problem["detail"] == f"the request body is not valid {coding} data"


async def test_trailing_bytes_after_the_stream_are_400(client: TestClient) -> None:
    owner = await signup(client)
    status, _, problem = await post(
        client,
        "/v1/events",
        zlib.compress(BATCH) + b"{}",
        {**owner.headers, "Content-Encoding": "deflate"},
    )
    assert status == 400, problem
    assert problem["detail"] == "the request body is not valid deflate data"


@pytest.mark.parametrize("coding", ["compress", "zstd", "gzip, gzip", "*"])
async def test_an_unknown_coding_on_events_is_415(client: TestClient, coding: str) -> None:
    owner = await signup(client)
    status, headers, problem = await post(
        client, "/v1/events", gzip.compress(BATCH), {**owner.headers, "Content-Encoding": coding}
    )
    assert status == 415, problem
    assert headers["Accept-Encoding"] == "gzip, deflate, br"
    assert (
        problem["detail"] == "the body's Content-Encoding must be one of gzip, deflate, br, or none"
    )


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
@pytest.mark.parametrize("path", ["/v1/users", "/graphql", "/v1/auth/login"])
async def test_other_routes_refuse_any_coding_with_415(
    client: TestClient, coding: str, path: str
) -> None:
    """Plain bytes that claim a coding (a 500 before), and real compressed ones alike."""
    owner = await signup(client)
    for body in (b'{"query": "{ me { id } }"}', gzip.compress(b"{}")):
        status, headers, problem = await post(
            client, path, body, {**owner.headers, "Content-Encoding": coding}
        )
        assert status == 415, problem
        assert headers["Content-Type"] == "application/problem+json"
        assert headers["Accept-Encoding"] == "identity"
        assert problem["detail"] == NO_CODING


async def test_decoded_past_max_body_bytes_is_413(aiohttp_client: Any, config: Config) -> None:
    limit = 4096
    client = await aiohttp_client(create_app(dataclasses.replace(config, max_body_bytes=limit)))
    owner = await signup(client)
    # JSON allows whitespace: a batch padded to exactly `limit` bytes, then one byte more
    at_limit = BATCH + b" " * (limit - len(BATCH))
    compress = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress}
    for coding, squeeze in compress.items():
        headers = {**owner.headers, "Content-Encoding": coding}
        status, _, answer = await post(client, "/v1/events", squeeze(at_limit), headers)
        assert (status, answer) == (202, {"accepted": 50})
        status, _, problem = await post(client, "/v1/events", squeeze(at_limit + b" "), headers)
        assert status == 413, problem
        assert problem["detail"] == f"the request body decodes to more than {limit} bytes"

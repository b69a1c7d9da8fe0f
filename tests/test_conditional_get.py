"""Conditional reads: every GET answered with an ETag honours If-None-Match (RFC 9110 13.1.2):
304 without a body while a tag it names is current (`*`, lists, weak tags), else the 200."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from handlers import SPEC
from server.app import create_app
from server.config import Config

from .helpers import Actor, signup

# Every GET whose 200 carries an ETag, as the caller reads it: the caller, a user (through the
# user cache), a product, an order.
READS = ["/v1/me", "/v1/users/{user_id}", "/v1/products/{product_id}", "/v1/orders/{order_id}"]

# (If-None-Match as sent, given the current ETag, expected status)
CONDITIONS = [
    ("current", lambda tag: tag, 304),
    ("stale", lambda tag: '"999999"', 200),
    ("any", lambda tag: "*", 304),
    ("list holding it", lambda tag: f'"999999", {tag} ,"7"', 304),
    ("list without it", lambda tag: '"999999", "7"', 200),
    ("weak", lambda tag: f"W/{tag}", 304),
    ("weak list", lambda tag: f'W/"999999",W/{tag}', 304),
    ("unquoted", lambda tag: tag.strip('"'), 200),
    ("empty", lambda tag: "", 200),
]


async def _world(client: TestClient) -> tuple[Actor, dict[str, str]]:
    owner = await signup(client)
    resp = await client.post(
        "/v1/products",
        json={"sku": "sku-1", "name": "Widget", "price_cents": 100, "currency": "EUR", "stock": 5},
        headers=owner.headers,
    )
    assert resp.status == 201, await resp.text()
    product_id = (await resp.json())["id"]
    resp = await client.post(
        "/v1/orders",
        json={"items": [{"product_id": product_id, "quantity": 1}]},
        headers=owner.headers,
    )
    assert resp.status == 201, await resp.text()
    ids = {"user_id": owner.id, "product_id": product_id, "order_id": (await resp.json())["id"]}
    return owner, ids


@pytest.fixture
async def world(aiohttp_client: Any, config: Config) -> tuple[TestClient, Actor, dict[str, str]]:
    assert config.user_cache_ttl_s > 0  # the cached user read is among those tested
    client = await aiohttp_client(create_app(config))
    owner, ids = await _world(client)
    return client, owner, ids


def test_the_table_covers_every_get_with_an_etag() -> None:
    with_etag = {
        path
        for path, ops in SPEC["paths"].items()
        if "ETag" in ops.get("get", {}).get("responses", {}).get("200", {}).get("headers", {})
    }
    assert with_etag == set(READS)


@pytest.mark.parametrize("path", READS)
async def test_if_none_match(world: tuple[TestClient, Actor, dict[str, str]], path: str) -> None:
    client, owner, ids = world
    url = path.format(**ids)
    first = await client.get(url, headers=owner.headers)
    assert first.status == 200
    body = await first.read()
    tag = first.headers["ETag"]
    assert tag.startswith('"')
    again = await client.get(url, headers=owner.headers)  # a cached read, where there is a cache
    assert again.headers["ETag"] == tag

    for name, condition, status in CONDITIONS:
        resp = await client.get(url, headers={**owner.headers, "If-None-Match": condition(tag)})
        seen = (name, resp.status, resp.headers.get("ETag"), await resp.read())
        assert seen == (name, status, tag, b"" if status == 304 else body)
        assert resp.headers["Cache-Control"] == "no-store", name
        assert "RateLimit-Remaining" in resp.headers, name
        assert "X-Request-ID" in resp.headers, name
        if status == 304:
            assert "Content-Type" not in resp.headers, name
            assert resp.headers.get("Content-Length", "0") == "0", name
        else:
            assert resp.headers["Content-Type"] == "application/json", name


async def test_a_changed_user_answers_200_to_its_old_tag(
    world: tuple[TestClient, Actor, dict[str, str]],
) -> None:
    client, owner, ids = world
    url = f"/v1/users/{ids['user_id']}"
    old = (await client.get(url, headers=owner.headers)).headers["ETag"]
    resp = await client.patch(
        url, json={"username": "renamed"}, headers={**owner.headers, "If-Match": old}
    )
    assert resp.status == 200, await resp.text()
    new = resp.headers["ETag"]
    assert new != old
    resp = await client.get(url, headers={**owner.headers, "If-None-Match": old})
    assert resp.status == 200
    assert resp.headers["ETag"] == new
    assert (await resp.json())["username"] == "renamed"
    resp = await client.get(url, headers={**owner.headers, "If-None-Match": new})
    assert resp.status == 304


async def test_head_is_conditional_too(world: tuple[TestClient, Actor, dict[str, str]]) -> None:
    client, owner, ids = world
    url = f"/v1/products/{ids['product_id']}"
    tag = (await client.get(url, headers=owner.headers)).headers["ETag"]
    resp = await client.head(url, headers={**owner.headers, "If-None-Match": tag})
    assert resp.status == 304


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/users", 200),  # a list: no ETag, so no condition to meet
        ("GET", "/v1/products", 200),
        ("GET", "/healthz", 200),
        ("GET", "/v1/users/{missing}", 404),  # no representation: never 304
    ],
)
async def test_answers_without_an_etag_ignore_it(
    world: tuple[TestClient, Actor, dict[str, str]], method: str, path: str, status: int
) -> None:
    client, owner, _ids = world
    url = path.format(missing="01a24d85-dcd5-7fe6-9c28-3a962300110b")
    resp = await client.request(method, url, headers={**owner.headers, "If-None-Match": "*"})
    assert resp.status == status
    assert "ETag" not in resp.headers


async def test_graphql_is_unchanged(world: tuple[TestClient, Actor, dict[str, str]]) -> None:
    client, owner, _ids = world
    resp = await client.post(
        "/graphql",
        json={"query": "{ me { id } }"},
        headers={**owner.headers, "If-None-Match": "*"},
    )
    assert resp.status == 200
    assert (await resp.json()) == {"data": {"me": {"id": owner.id}}}

"""POST /graphql against real PostgreSQL and Redis: the same values as REST, tenant isolation,
limits, batching (statements counted on the wire), malformed input, pagination, and generated
queries that never produce a 5xx."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.graphql.routes import sdl
from server.app import create_app
from server.config import Config
from server.keys import PG, PG_READ

from .helpers import Actor, add_user, signup
from .test_payments import product

T = TypeVar("T")

USER_FIELDS = "id tenantId email username status roles profile version createdAt updatedAt"
PRODUCT_FIELDS = "id tenantId sku name priceCents currency stock version createdAt updatedAt"
ORDER_FIELDS = (
    "id tenantId userId status totalCents currency version createdAt updatedAt"
    " payment { status failureCode }"
    f" items {{ productId quantity unitPriceCents product {{ {PRODUCT_FIELDS} }} }}"
    f" user {{ {USER_FIELDS} }}"
)


def snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m[1].lower(), name)


def as_rest(node: Any) -> Any:
    """A GraphQL node with REST's field names (createdAt -> created_at), recursively."""
    if isinstance(node, dict):
        return {snake(k): as_rest(v) for k, v in node.items()}
    if isinstance(node, list):
        return [as_rest(v) for v in node]
    return node


async def gql(
    client: TestClient,
    actor: Actor | None,
    query: str,
    variables: Any = None,
    **extra: Any,
) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"query": query, **extra}
    if variables is not None:
        body["variables"] = variables
    resp = await client.post("/graphql", json=body, headers=actor.headers if actor else {})
    payload: dict[str, Any] = await resp.json(content_type=None)
    return resp.status, payload


async def rest(client: TestClient, actor: Actor, path: str) -> Any:
    resp = await client.get(path, headers=actor.headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


def codes(payload: dict[str, Any]) -> list[str]:
    return [e["extensions"]["code"] for e in payload.get("errors", [])]


async def app_client(aiohttp_client: Any, config: Config, **changes: Any) -> TestClient:
    client: TestClient = await aiohttp_client(create_app(dataclasses.replace(config, **changes)))
    return client


async def shop(client: TestClient, owner: Actor, orders: int) -> tuple[Actor, list[str]]:
    """Three products (one priced past 32 bits), a member, `orders` orders by both users."""
    member = await add_user(client, owner)
    products = [
        await product(client, owner, stock=10_000),
        await product(client, owner, stock=10_000, price=100_000_000_000),
        await product(client, owner, stock=10_000, price=7),
    ]
    ids = []
    for n in range(orders):
        buyer = owner if n % 2 else member
        resp = await client.post(
            "/v1/orders",
            json={
                "items": [
                    {"product_id": pid, "quantity": 1 + (n + k) % 3}
                    for k, pid in enumerate(products[: 1 + n % 3])
                ]
            },
            headers=buyer.headers,
        )
        assert resp.status == 201, await resp.text()
        ids.append((await resp.json())["id"])
    return member, ids


# -- the same values as REST -------------------------------------------------------------------


async def test_every_query_returns_the_rest_values(aiohttp_client: Any, config: Config) -> None:
    client = await app_client(aiohttp_client, config)
    owner = await signup(client)
    member, order_ids = await shop(client, owner, 5)
    cancel = await client.post(f"/v1/orders/{order_ids[0]}/cancel", headers=owner.headers)
    assert cancel.status == 200
    query = f"""query($uid: ID!, $oid: ID!) {{
      me {{ {USER_FIELDS} }}
      user(id: $uid) {{ {USER_FIELDS} }}
      users(first: 20) {{ edges {{ node {{ {USER_FIELDS} }} }} }}
      orders(first: 20) {{ edges {{ node {{ {ORDER_FIELDS} }} }} }}
      order(id: $oid) {{ {ORDER_FIELDS} }}
    }}"""
    status, payload = await gql(client, member, query, {"uid": owner.id, "oid": order_ids[3]})
    assert status == 200, payload
    assert "errors" not in payload
    data = as_rest(payload["data"])

    assert data["me"] == await rest(client, member, "/v1/me")
    assert data["user"] == await rest(client, member, f"/v1/users/{owner.id}")
    assert [e["node"] for e in data["users"]["edges"]] == (
        await rest(client, member, "/v1/users?limit=200")
    )["items"]

    rest_orders = (await rest(client, member, "/v1/orders?limit=200"))["items"]
    gql_orders = [e["node"] for e in data["orders"]["edges"]]
    assert [o["id"] for o in gql_orders] == order_ids
    assert gql_orders[0]["status"] == "cancelled"
    for got, want in zip(gql_orders, rest_orders, strict=True):
        user = got.pop("user")
        products = [item.pop("product") for item in got["items"]]
        assert got == want
        assert user == await rest(client, member, f"/v1/users/{want['user_id']}")
        for item, prod in zip(want["items"], products, strict=True):
            assert prod == await rest(client, member, f"/v1/products/{item['product_id']}")
    one = data["order"]
    one.pop("user")
    for item in one["items"]:
        item.pop("product")
    assert one == await rest(client, member, f"/v1/orders/{order_ids[3]}")
    assert 100_000_000_000 in {i["unit_price_cents"] for o in gql_orders for i in o["items"]}


@pytest.mark.parametrize("what", ["user", "order"])
async def test_another_tenants_ids_are_not_found(
    aiohttp_client: Any, config: Config, what: str
) -> None:
    client = await app_client(aiohttp_client, config)
    owner_a = await signup(client, "A")
    _, order_ids = await shop(client, owner_a, 2)
    owner_b = await signup(client, "B")
    target = {"user": owner_a.id, "order": order_ids[0]}[what]
    for ident in (target, str(uuid.uuid4()), "not-an-id"):
        status, payload = await gql(
            client, owner_b, f"query($id: ID!) {{ {what}(id: $id) {{ id }} }}", {"id": ident}
        )
        assert status == 200
        assert payload["data"] == {what: None}
        assert payload["errors"] == [
            {
                "message": f"no such {what} in your tenant",
                "locations": [{"line": 1, "column": 19}],
                "path": [what],
                "extensions": {"code": "NOT_FOUND"},
            }
        ]
    status, payload = await gql(
        client, owner_b, "{ orders { edges { node { id } } } users { edges { node { id } } } }"
    )
    assert status == 200
    assert payload["data"]["orders"]["edges"] == []
    assert [e["node"]["id"] for e in payload["data"]["users"]["edges"]] == [owner_b.id]


# -- limits ------------------------------------------------------------------------------------

DEEP = "{ orders(first: 2) { edges { node { items { product { id } } } } } }"  # depth 6
BIG_LIST = "{ orders(first: 200) { edges { node { items { product { id } } } } } }"  # 40,200


@pytest.mark.parametrize(
    ("changes", "query", "status", "code"),
    [
        ({"graphql_max_depth": 5}, DEEP, 400, "QUERY_TOO_DEEP"),
        ({"graphql_max_depth": 6}, DEEP, 200, None),
        ({}, BIG_LIST, 400, "QUERY_TOO_COSTLY"),
        ({"graphql_max_cost": 50_000}, BIG_LIST, 200, None),
        ({"graphql_max_cost": 10}, "{ users(first: 11) { edges { node { id } } } }", 400,
         "QUERY_TOO_COSTLY"),
        ({"graphql_max_cost": 10}, "{ users(first: 10) { edges { node { id } } } }", 200, None),
        ({}, "{ me { id } }" + " " * (16 * 1024), 413, "QUERY_TOO_LARGE"),
        ({"graphql_max_bytes": 1024}, "{ me { id } }" + "#" * 1011, 200, None),
        ({"graphql_max_bytes": 1024}, "{ me { id } }" + "#" * 1012, 413, "QUERY_TOO_LARGE"),
        ({"graphql_introspection": False}, "{ __schema { types { name } } }", 400,
         "INTROSPECTION_DISABLED"),
        ({"graphql_introspection": False}, '{ __type(name: "User") { name } }', 400,
         "INTROSPECTION_DISABLED"),
        ({}, "{ __schema { types { name } } }", 200, None),
        ({"graphql_introspection": False}, "{ me { __typename id } }", 200, None),
    ],
)  # fmt: skip
async def test_limits(
    aiohttp_client: Any,
    config: Config,
    changes: dict[str, Any],
    query: str,
    status: int,
    code: str | None,
) -> None:
    client = await app_client(aiohttp_client, config, **changes)
    owner = await signup(client)
    got, payload = await gql(client, owner, query)
    assert got == status, payload
    if code is None:
        assert "errors" not in payload and payload["data"]
    else:
        assert "data" not in payload
        assert codes(payload) == [code]
        assert payload["errors"][0]["message"]


async def test_the_standard_introspection_query_passes_the_depth_limit(
    aiohttp_client: Any, config: Config
) -> None:
    from graphql import get_introspection_query

    client = await app_client(aiohttp_client, config)
    owner = await signup(client)
    status, payload = await gql(client, owner, get_introspection_query())
    assert status == 200, payload
    names = {t["name"] for t in payload["data"]["__schema"]["types"]}
    assert {"Query", "User", "Order", "OrderItem", "Product", "Cents"} <= names


@pytest.mark.parametrize("introspection", [True, False])
async def test_sdl_and_explorer(aiohttp_client: Any, config: Config, introspection: bool) -> None:
    client = await app_client(aiohttp_client, config, graphql_introspection=introspection)
    resp = await client.get("/graphql/schema.graphql")
    if introspection:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
        text = await resp.text()
        assert text == sdl()
        assert (
            "orders(first: Int = 50, after: String, status: OrderStatus): OrderConnection!" in text
        )
    else:
        assert resp.status == 404
        assert resp.headers["Content-Type"] == "application/problem+json"
    page = await client.get("/graphql")
    assert page.status == 200
    html = await page.text()
    assert 'fetch("/graphql"' in html and "/graphql/schema.graphql" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing from elsewhere
    assert "RateLimit-Limit" not in page.headers


# -- batching: statements on the wire ----------------------------------------------------------


READS = re.compile(r"\bFROM (orders|order_items|users|products)\b")


class StatementCounter:
    """Counts the statements PostgreSQL receives on the app's pooled connections (asyncpg's
    query logger sees every round trip a fetch/execute makes)."""

    def __init__(self) -> None:
        self.queries: list[str] = []
        self._logged: set[int] = set()

    def _log(self, logged: Any) -> None:
        # Background tasks (outbox relay, saga sweeper, revocation sweep) share the pool: count
        # only statements that read the tables a page of orders is made of.
        if READS.search(logged.query) and "tokens_revoked_at" not in logged.query:
            self.queries.append(logged.query)

    def attach(self, app: Any) -> None:
        for db in {id(app[PG]): app[PG], id(app[PG_READ]): app[PG_READ]}.values():
            acquire = db.acquire

            async def counted(_acquire: Any = acquire) -> Any:
                con = await _acquire()  # every statement takes its connection here
                if id(con) not in self._logged:
                    self._logged.add(id(con))
                    con.add_query_logger(self._log)
                return con

            db.acquire = counted


PAGE_QUERY = f"""query($first: Int) {{
  orders(first: $first) {{
    edges {{ cursor node {{ {ORDER_FIELDS} }} }}
    pageInfo {{ hasNextPage endCursor }}
  }}
}}""".replace("items {", "items(first: 10) {")


async def test_a_page_of_orders_costs_a_fixed_number_of_statements(
    aiohttp_client: Any, config: Config
) -> None:
    client = await app_client(aiohttp_client, config)
    owner = await signup(client)
    await shop(client, owner, 60)
    counter = StatementCounter()
    counter.attach(client.app)
    seen = []
    for first in (1, 5, 50):
        counter.queries.clear()
        status, payload = await gql(client, owner, PAGE_QUERY, {"first": first})
        assert status == 200 and "errors" not in payload, payload
        edges = payload["data"]["orders"]["edges"]
        assert len(edges) == first
        assert {e["node"]["user"]["id"] for e in edges} <= {
            owner.id,
            *{e["node"]["userId"] for e in edges},
        }
        seen.append(list(counter.queries))
    # orders, their items, their users, their products: four statements, however many rows
    for queries in seen:
        assert len(queries) == 4, queries
        assert sum("FROM orders" in q for q in queries) == 1
        assert sum("FROM order_items" in q for q in queries) == 1
        assert sum("FROM users" in q for q in queries) == 1
        assert sum("FROM products" in q for q in queries) == 1
    # The same page over REST is 2 statements plus one per distinct user and product read.
    counter.queries.clear()
    await rest(client, owner, "/v1/orders?limit=50")
    assert len(counter.queries) == 2


# -- malformed requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, "BAD_REQUEST"),
        (b"[]", "application/json", 422, "BAD_REQUEST"),
        (b'{"query": 1}', "application/json", 422, "BAD_REQUEST"),
        (b'{"query": ""}', "application/json", 422, "BAD_REQUEST"),
        (b'{"query": "{ me { id } }", "variables": [1]}', "application/json", 422, "BAD_REQUEST"),
        (b'{"query": "{ me { id } }", "operationName": 3}', "application/json", 422,
         "BAD_REQUEST"),
        (b'{"query": "{ me { id } }", "extra": 1}', "application/json", 422, "BAD_REQUEST"),
        (b'{"query": "{ me { id } }"}', "text/plain", 415, "BAD_REQUEST"),
        (b'{"query": "{"}', "application/json", 400, "GRAPHQL_PARSE_FAILED"),
        (b'{"query": "{ me { id } "}', "application/json", 400, "GRAPHQL_PARSE_FAILED"),
        (b'{"query": "{ nope }"}', "application/json", 400, "GRAPHQL_VALIDATION_FAILED"),
        (b'{"query": "{ me { password_hash } }"}', "application/json", 400,
         "GRAPHQL_VALIDATION_FAILED"),
        (b'{"query": "{ me }"}', "application/json", 400, "GRAPHQL_VALIDATION_FAILED"),
        (b'{"query": "{ user { id } }"}', "application/json", 400, "GRAPHQL_VALIDATION_FAILED"),
        (b'{"query": "{ orders(first: \\"x\\") { pageInfo { hasNextPage } } }"}',
         "application/json", 400, "GRAPHQL_VALIDATION_FAILED"),
        (b'{"query": "mutation { me { id } }"}', "application/json", 400,
         "GRAPHQL_VALIDATION_FAILED"),
        (b'{"query": "subscription { me { id } }"}', "application/json", 400,
         "GRAPHQL_VALIDATION_FAILED"),
        (b'{"query": "query A { me { id } } query B { me { id } }"}', "application/json", 422,
         "BAD_REQUEST"),
        (b'{"query": "query A { me { id } }", "operationName": "B"}', "application/json", 422,
         "BAD_REQUEST"),
        (b'{"query": "fragment F on User { ...F } { me { ...F } }"}', "application/json", 400,
         "GRAPHQL_VALIDATION_FAILED"),
        (b'{"query": "' + b"{ me " * 3000 + b'"}', "application/json", 400,
         "GRAPHQL_PARSE_FAILED"),
    ],
)  # fmt: skip
async def test_malformed_requests(
    aiohttp_client: Any,
    config: Config,
    body: bytes,
    content_type: str,
    status: int,
    code: str,
) -> None:
    client = await app_client(aiohttp_client, config)
    owner = await signup(client)
    resp = await client.post(
        "/graphql", data=body, headers={**owner.headers, "Content-Type": content_type}
    )
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Type"] == "application/json"
    payload = await resp.json()
    assert set(payload) == {"errors"}
    assert code in codes(payload)
    assert all(e["message"] and "Traceback" not in e["message"] for e in payload["errors"])


async def test_no_token_is_401_like_rest(aiohttp_client: Any, config: Config) -> None:
    client = await app_client(aiohttp_client, config)
    resp = await client.post("/graphql", json={"query": "{ me { id } }"})
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert resp.headers["Content-Type"] == "application/problem+json"
    bad = await client.post(
        "/graphql", json={"query": "{ me { id } }"}, headers={"Authorization": "Bearer x.y.z"}
    )
    assert bad.status == 401


@pytest.mark.parametrize(
    ("query", "variables"),
    [
        ("query($n: Int) { orders(first: $n) { pageInfo { hasNextPage } } }", {"n": "ten"}),
        ("query($n: Int) { orders(first: $n) { pageInfo { hasNextPage } } }", {"n": 1.5}),
        ("query($n: Int) { orders(first: $n) { pageInfo { hasNextPage } } }", {"n": 2**40}),
        ("query($n: Int) { orders(first: $n) { pageInfo { hasNextPage } } }", {"n": True}),
        ("query($n: Int) { orders(first: $n) { pageInfo { hasNextPage } } }", {"n": 0}),
        ("query($n: Int) { orders(first: $n) { pageInfo { hasNextPage } } }", {"n": 201}),
        ("query($n: Int) { users(first: $n) { pageInfo { hasNextPage } } }", {"n": -1}),
        ("{ orders(first: 0) { pageInfo { hasNextPage } } }", {}),
        ("query($s: OrderStatus) { orders(status: $s) { pageInfo { hasNextPage } } }",
         {"s": "shipped"}),
        ("query($a: String) { orders(after: $a) { pageInfo { hasNextPage } } }", {"a": "bogus"}),
        ('{ users(after: "AAAA") { pageInfo { hasNextPage } } }', {}),
        ("query($q: String) { users(q: $q) { pageInfo { hasNextPage } } }", {"q": ""}),
        ("query($q: String) { users(q: $q) { pageInfo { hasNextPage } } }", {"q": "a\u0000"}),
        ("query($q: String) { users(q: $q) { pageInfo { hasNextPage } } }", {"q": ["a"]}),
        ("query($id: ID!) { user(id: $id) { id } }", {}),
        ("query($id: ID!) { user(id: $id) { id } }", {"id": None}),
        ("query($id: ID!) { user(id: $id) { id } }", {"id": {"a": 1}}),
        ("query($n: Int) { orders { edges { node { items(first: $n) { quantity } } } } }",
         {"n": 101}),
    ],
)  # fmt: skip
async def test_wrong_variables_are_422(
    aiohttp_client: Any, config: Config, query: str, variables: dict[str, Any]
) -> None:
    client = await app_client(aiohttp_client, config)
    owner = await signup(client)
    status, payload = await gql(client, owner, query, variables)
    assert status == 422, payload
    assert set(payload) == {"errors"}
    assert codes(payload) and set(codes(payload)) == {"BAD_USER_INPUT"}


# -- pagination --------------------------------------------------------------------------------


async def test_pages_have_no_duplicates_or_gaps_and_share_rest_cursors(
    aiohttp_client: Any, config: Config
) -> None:
    client = await app_client(aiohttp_client, config)
    owner = await signup(client)
    _, order_ids = await shop(client, owner, 23)
    query = """query($after: String) {
      orders(first: 5, after: $after) {
        edges { cursor node { id } } pageInfo { hasNextPage endCursor } } }"""
    seen: list[str] = []
    after = None
    rest_cursor = ""
    pages = 0
    while True:
        status, payload = await gql(client, owner, query, {"after": after})
        assert status == 200, payload
        conn = payload["data"]["orders"]
        seen += [e["node"]["id"] for e in conn["edges"]]
        assert [e["cursor"] for e in conn["edges"]][-1] == conn["pageInfo"]["endCursor"]
        rest_page = await rest(client, owner, f"/v1/orders?limit=5&cursor={rest_cursor}")
        assert [o["id"] for o in rest_page["items"]] == [e["node"]["id"] for e in conn["edges"]]
        pages += 1
        if not conn["pageInfo"]["hasNextPage"]:
            assert rest_page["next_cursor"] is None
            break
        assert rest_page["next_cursor"] == conn["pageInfo"]["endCursor"]
        after = rest_cursor = conn["pageInfo"]["endCursor"]
    assert pages == 5
    assert seen == order_ids  # every order once, in order

    # a filter pages the same way
    status, payload = await gql(
        client, owner, "{ orders(first: 50, status: cancelled) { edges { node { id } } } }"
    )
    assert payload["data"]["orders"]["edges"] == []
    status, payload = await gql(
        client, owner, "{ orders(first: 50, status: pending) { edges { node { id } } } }"
    )
    assert len(payload["data"]["orders"]["edges"]) == 23


async def test_users_pages_and_prefix_search(aiohttp_client: Any, config: Config) -> None:
    client = await app_client(aiohttp_client, config)
    owner = await signup(client)
    for _ in range(4):
        await add_user(client, owner)
    everyone = [u["id"] for u in (await rest(client, owner, "/v1/users?limit=200"))["items"]]
    query = """query($after: String, $q: String) {
      users(first: 2, after: $after, q: $q) {
        edges { node { id username } } pageInfo { hasNextPage endCursor } } }"""
    seen: list[str] = []
    after = None
    while True:
        status, payload = await gql(client, owner, query, {"after": after})
        conn = payload["data"]["users"]
        seen += [e["node"]["id"] for e in conn["edges"]]
        if not conn["pageInfo"]["hasNextPage"]:
            break
        after = conn["pageInfo"]["endCursor"]
    assert seen == everyone and len(seen) == 5
    status, payload = await gql(client, owner, query, {"q": "OWNER"})
    assert status == 200
    assert [e["node"]["id"] for e in payload["data"]["users"]["edges"]] == [owner.id]
    status, payload = await gql(client, owner, query, {"q": "%"})
    assert status == 200
    assert payload["data"]["users"]["edges"] == []  # a literal prefix, as in REST


# -- the cost is charged to the caller's bucket ------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "redis"])
async def test_the_cost_is_taken_from_the_rate_limit_bucket(
    aiohttp_client: Any, config: Config, backend: str
) -> None:
    client = await app_client(
        aiohttp_client, config, rate_limit_backend=backend, rate_limit_rate=0.01,
        rate_limit_burst=100,
    )  # fmt: skip
    owner = await signup(client)
    me = await client.get("/v1/me", headers=owner.headers)
    assert me.headers["RateLimit-Remaining"] == "99"
    # 30 users at most: 30 nodes, one token of which the middleware took as for any call
    resp = await client.post(
        "/graphql",
        json={"query": "{ users(first: 30) { edges { node { id } } } }"},
        headers=owner.headers,
    )
    assert resp.status == 200
    assert resp.headers["RateLimit-Remaining"] == "69"
    # 80 more than the 69 left: refused, GraphQL-shaped, with Retry-After
    refused = await client.post(
        "/graphql",
        json={"query": "{ users(first: 80) { edges { node { id } } } }"},
        headers=owner.headers,
    )
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    payload = await refused.json()
    assert codes(payload) == ["RATE_LIMITED"] and "data" not in payload
    # a small query still fits, and REST sees the same bucket
    ok = await client.post("/graphql", json={"query": "{ me { id } }"}, headers=owner.headers)
    assert ok.status == 200
    assert 66 <= int(ok.headers["RateLimit-Remaining"]) <= 68
    rest_resp = await client.get("/v1/me", headers=owner.headers)
    assert (
        int(rest_resp.headers["RateLimit-Remaining"]) == int(ok.headers["RateLimit-Remaining"]) - 1
    )


@pytest.mark.parametrize("backend", ["local", "redis"])
async def test_a_query_costing_more_than_the_burst_runs_from_a_full_bucket_and_leaves_debt(
    aiohttp_client: Any, config: Config, backend: str
) -> None:
    client = await app_client(
        aiohttp_client, config, rate_limit_backend=backend, rate_limit_rate=0.01,
        rate_limit_burst=50,
    )  # fmt: skip
    owner = await signup(client)
    big = "{ users(first: 120) { edges { node { id } } } }"
    resp = await client.post("/graphql", json={"query": big}, headers=owner.headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["RateLimit-Remaining"] == "0"
    assert int(resp.headers["RateLimit-Reset"]) >= 100 * 70  # 70 tokens of debt at 0.01/s
    after = await client.get("/v1/me", headers=owner.headers)
    assert after.status == 429  # nothing passes until the debt is paid


# -- generated queries never produce a 5xx -----------------------------------------------------


def in_thread(loop: asyncio.AbstractEventLoop) -> Callable[[Coroutine[Any, Any, T]], T]:
    def run(coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=30)

    return run


def _type_fields() -> dict[str, dict[str, str]]:
    """Object type -> field -> named type, from the served schema."""
    from graphql import GraphQLObjectType, get_named_type

    from handlers.graphql.schema import SCHEMA

    out: dict[str, dict[str, str]] = {}
    for name, t in SCHEMA.type_map.items():
        if isinstance(t, GraphQLObjectType) and not name.startswith("__"):
            out[name] = {f: get_named_type(d.type).name for f, d in t.fields.items()}
    return out


FIELDS = _type_fields()
ARG_VALUES = st.one_of(
    st.integers(-(2**33), 2**33).map(str),
    st.sampled_from(['"x"', '"AaIBXxzZcDuZsy6j1P7mMg"', "null", "true", "1.5", "paid", "[1]",
                     '"' + str(uuid.UUID(int=0)) + '"', "$v", '""', '"\\u0000"']),
)  # fmt: skip
ARG_NAMES = st.sampled_from(["first", "after", "q", "status", "id", "nope"])


@st.composite
def selection(draw: st.DrawFn, type_name: str, depth: int) -> str:
    fields = FIELDS[type_name]
    names = draw(
        st.lists(st.sampled_from([*fields, "__typename", "bogus"]), min_size=1, max_size=4)
    )
    parts = []
    for name in names:
        text = name
        if draw(st.booleans()) and draw(st.booleans()):
            args = draw(st.lists(st.tuples(ARG_NAMES, ARG_VALUES), max_size=2))
            if args:
                text += "(" + ", ".join(f"{k}: {v}" for k, v in args) + ")"
        sub = fields.get(name)
        if sub in FIELDS and depth < 7:
            text += " { " + draw(selection(sub, depth + 1)) + " }"
        elif sub in FIELDS and draw(st.booleans()):
            text += " { id }"
        parts.append(text)
    return " ".join(parts)


QUERIES = st.one_of(
    selection("Query", 0).map(lambda s: "query($v: Int) { " + s + " }"),
    selection("Query", 0).map(lambda s: "{ " + s + " }"),
    st.text(max_size=40),
)


async def test_generated_queries_never_produce_a_5xx(aiohttp_client: Any, config: Config) -> None:
    client = await app_client(aiohttp_client, config)
    owner = await signup(client)
    await shop(client, owner, 3)
    run = in_thread(asyncio.get_running_loop())
    statuses: list[int] = []

    @settings(max_examples=120, deadline=None)
    @given(query=QUERIES, v=st.one_of(st.none(), st.integers(-5, 300), st.text(max_size=3)))
    def never_5xx(query: str, v: Any) -> None:
        status, payload = run(gql(client, owner, query, {"v": v}))
        statuses.append(status)
        assert status < 500, (query, payload)
        assert set(payload) <= {"data", "errors"} and payload
        assert "INTERNAL_SERVER_ERROR" not in codes(payload), (query, payload)

    await asyncio.to_thread(never_5xx)
    assert 200 in statuses and {400, 422} & set(statuses)  # both kinds were really sent


def test_the_readme_examples_are_valid_queries() -> None:
    from graphql import parse, validate

    from handlers.graphql.schema import SCHEMA

    from .conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## GraphQL") : readme.index("## Performance")]
    queries = re.findall(r'"query": "([^"]+)"', section)
    assert len(queries) == 2
    for query in queries:
        assert validate(SCHEMA, parse(query)) == []

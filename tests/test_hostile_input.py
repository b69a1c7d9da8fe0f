"""Hostile input (issue 18): deep JSON, numbers out of range in headers and query strings, card
numbers wherever they hide, look-alike identities. Each answer is a 4xx naming what it refuses,
never a 500, and a refused card number is never echoed, stored or logged."""

from __future__ import annotations

import dataclasses
import io
import re
import unicodedata
import uuid
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient

from handlers.orders.provider import MAX_RETRY_AFTER_S, _retry_after
from server.access_log import AccessLog
from server.app import create_app
from server.config import Config
from server.openapi import INVISIBLE as INVISIBLE_CLASS
from server.validation import MAX_DEPTH, looks_like_card

from .conftest import configured
from .helpers import PASSWORD, Actor, signup

CARD = "4111111111111111"
CARD_MESSAGE = "looks like a card number; send the payment provider's token instead"


def nest(levels: int) -> Any:
    """An object `levels` deep: {"a": {"a": ... 1}}."""
    return orjson.loads(nested(levels))


def nested(levels: int) -> bytes:
    """nest(levels) as JSON text: orjson.dumps stops at 254 levels, orjson.loads at 1024."""
    return b'{"a":' * levels + b"1" + b"}" * levels


def body_with(fields: dict[str, Any], **deep: int) -> bytes:
    """`fields` as JSON with each `deep` key holding nested(levels)."""
    text = orjson.dumps(fields)[:-1]
    for key, levels in deep.items():
        text += b"," if len(text) > 1 else b""
        text += orjson.dumps(key) + b":" + nested(levels)
    return text + b"}"


def deep_field(base: str, levels_below: int) -> str:
    """The path `levels_below` objects under `base`."""
    return base + ".a" * levels_below


@pytest.fixture
async def client(aiohttp_client: Any, config: Config) -> TestClient:
    c: TestClient = await aiohttp_client(create_app(config))
    return c


async def send(
    client: TestClient,
    method: str,
    path: str,
    body: Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    resp = await client.request(
        method,
        path,
        data=body if isinstance(body, bytes) else orjson.dumps(body),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    text = await resp.text()
    assert resp.status != 500, text
    return resp.status, orjson.loads(text) if text else {}


def refused(status: int, problem: dict[str, Any], field: str, message: str) -> None:
    assert status == 422, problem
    assert problem["errors"] == [{"field": field, "message": message}]


DEEP = f"is nested more than {MAX_DEPTH} levels deep"


async def _product(client: TestClient, owner: Actor) -> str:
    status, body = await send(
        client,
        "POST",
        "/v1/products",
        {"sku": "s-1", "name": "Widget", "price_cents": 100, "currency": "EUR", "stock": 5},
        owner.headers,
    )
    assert status == 201, body
    product_id: str = body["id"]
    return product_id


# -- 3. deep JSON --


async def test_a_deep_order_with_an_idempotency_key_is_422(client: TestClient) -> None:
    owner = await signup(client)
    pid = await _product(client, owner)
    body = body_with({"items": [{"product_id": pid, "quantity": 1}]}, deep=300)
    status, problem = await send(
        client, "POST", "/v1/orders", body, {**owner.headers, "Idempotency-Key": "k-deep"}
    )
    refused(status, problem, deep_field("deep", MAX_DEPTH - 1), DEEP)


async def test_a_deep_profile_is_422_on_create_and_patch(client: TestClient) -> None:
    owner = await signup(client)
    user = {"email": "deep@example.com", "username": "deep", "password": PASSWORD}
    status, problem = await send(
        client, "POST", "/v1/users", body_with(user, profile=300), owner.headers
    )
    refused(status, problem, deep_field("profile", MAX_DEPTH - 1), DEEP)
    status, problem = await send(
        client,
        "PATCH",
        f"/v1/users/{owner.id}",
        body_with({}, profile=300),
        {**owner.headers, "If-Match": "*"},
    )
    refused(status, problem, deep_field("profile", MAX_DEPTH - 1), DEEP)
    # As deep as allowed: the profile's innermost object is at level MAX_DEPTH.
    status, created = await send(
        client, "POST", "/v1/users", {**user, "profile": nest(MAX_DEPTH - 1)}, owner.headers
    )
    assert status == 201, created
    assert created["profile"] == nest(MAX_DEPTH - 1)


async def test_arrays_count_as_levels_and_orjsons_own_limit_is_no_recursion_error(
    client: TestClient,
) -> None:
    owner = await signup(client)
    # deeper than Python's recursion limit, within orjson's
    body = b'{"profile": {"l": ' + b"[" * 1000 + b"]" * 1000 + b"}}"
    status, problem = await send(
        client, "PATCH", f"/v1/users/{owner.id}", body, {**owner.headers, "If-Match": "*"}
    )
    refused(status, problem, "profile.l" + "[0]" * (MAX_DEPTH - 2), DEEP)


async def test_deep_event_props_are_422(client: TestClient) -> None:
    owner = await signup(client)
    body = {"events": [{"name": "ok"}, {"name": "deep", "props": nest(40)}]}
    status, problem = await send(client, "POST", "/v1/events", body, owner.headers)
    refused(status, problem, deep_field("events[1].props", MAX_DEPTH - 3), DEEP)
    # Outside the props, deeper than orjson writes, with an escape: named all the same.
    body = b'{"events": [{"name": "a\\u0062"}], "x": ' + nested(300) + b"}"
    status, problem = await send(client, "POST", "/v1/events", body, owner.headers)
    refused(status, problem, deep_field("x", MAX_DEPTH - 1), DEEP)


async def test_deep_graphql_variables_are_422(client: TestClient) -> None:
    owner = await signup(client)
    body = b'{"query": "query { me { id } }", "variables": {"v": %s}}' % nested(300)
    resp = await client.post(
        "/graphql", data=body, headers={**owner.headers, "Content-Type": "application/json"}
    )
    assert resp.status == 422
    answer = await resp.json()
    assert answer["errors"] == [
        {
            "message": f"variables.v{'.a' * (MAX_DEPTH - 2)}: {DEEP}",
            "extensions": {"code": "BAD_USER_INPUT"},
        }
    ]


# -- 4. numbers out of range in headers and query strings --


async def test_a_huge_webhook_timestamp_is_400(aiohttp_client: Any, config: Config) -> None:
    app = create_app(dataclasses.replace(config, payments_webhook_secret="whsec_test"))
    client = await aiohttp_client(app)
    resp = await client.post(
        "/v1/webhooks/payments",
        data=b"{}",
        headers={"Surge-Signature": f"t={'9' * 400},v1=00", "Content-Type": "application/json"},
    )
    assert resp.status == 400, await resp.text()
    problem = await resp.json()
    assert problem["detail"] == "the signature's timestamp is outside the tolerance"


@pytest.mark.parametrize(
    "ts",
    [
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "9999-12-31T23:59:59-01:00",  # after year 9999 in UTC
    ],
)
async def test_an_event_timestamp_out_of_range_is_422(client: TestClient, ts: str) -> None:
    owner = await signup(client)
    status, problem = await send(
        client, "POST", "/v1/events", {"events": [{"name": "a", "ts": ts}]}, owner.headers
    )
    refused(status, problem, "events[0].ts", "is not a valid timestamp")


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ({"from": "0001-01-01T00:00:00+01:00"}, "from", "must be an RFC 3339 timestamp"),
        ({"to": "9999-12-31T23:59:59-01:00"}, "to", "must be an RFC 3339 timestamp"),
        (
            {"to": "9999-12-31T23:59:59Z", "bucket": "1d"},
            "to",
            "must be before 9999-12-31T00:00:00.000Z",
        ),
        ({"limit": "9" * 400}, "limit", None),
    ],
)
async def test_analytics_and_list_numbers_out_of_range_are_422(
    client: TestClient, query: dict[str, str], field: str, message: str | None
) -> None:
    owner = await signup(client)
    path = "/v1/users" if field == "limit" else "/v1/analytics/counts"
    resp = await client.get(path, params={"name": "a", **query}, headers=owner.headers)
    problem = await resp.json()
    assert resp.status == 422, problem
    assert [e["field"] for e in problem["errors"]] == [field]
    if message is not None:
        assert problem["errors"][0]["message"] == message


@pytest.mark.parametrize("value", ['"' + "9" * 400 + '"', "9" * 400, 'W/"-1"', '"1e999"'])
async def test_a_huge_if_match_is_412(client: TestClient, value: str) -> None:
    owner = await signup(client)
    status, problem = await send(
        client, "PATCH", f"/v1/users/{owner.id}", {"profile": {}},
        {**owner.headers, "If-Match": value},
    )  # fmt: skip
    assert status == 412, problem


@pytest.mark.parametrize("cursor", ["9" * 400, "A" * 400, "%%%", "AAAAAAAAAAAAAAAAAAAAAA=="])
async def test_a_foreign_cursor_is_422(client: TestClient, cursor: str) -> None:
    owner = await signup(client)
    resp = await client.get("/v1/users", params={"cursor": cursor}, headers=owner.headers)
    if cursor == "AAAAAAAAAAAAAAAAAAAAAA==":  # a well-formed cursor of no row: an empty page
        assert resp.status == 200
        return
    assert resp.status == 422
    assert [e["field"] for e in (await resp.json())["errors"]] == ["cursor"]


async def test_graphql_first_out_of_range_is_refused(client: TestClient) -> None:
    owner = await signup(client)
    for first in ("9" * 400, "1e999", "-1"):
        resp = await client.post(
            "/graphql",
            json={"query": f"query {{ users(first: {first}) {{ edges {{ cursor }} }} }}"},
            headers=owner.headers,
        )
        assert 400 <= resp.status < 500, await resp.text()


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("nan", 1.0), ("inf", MAX_RETRY_AFTER_S), ("-inf", 0.0), ("9" * 400, MAX_RETRY_AFTER_S),
     ("2.5", 2.5), (None, 0.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0)],
)  # fmt: skip
def test_the_providers_retry_after_is_always_a_finite_delay(
    raw: str | None, seconds: float
) -> None:
    assert _retry_after(raw) == seconds


# -- 6. card numbers wherever they hide --


async def _dump(dsn: str | None, tables: tuple[str, ...]) -> str:
    con = await asyncpg.connect(dsn)
    try:
        out = []
        for table in tables:
            out.append(
                await con.fetchval(
                    f"SELECT coalesce(string_agg(t::text, ''), '') FROM {table} t"  # noqa: S608
                )
            )
        return "".join(out)
    finally:
        await con.close()


def digits_of(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


async def test_a_card_as_an_object_key_is_422_and_not_echoed(
    client: TestClient, config: Config
) -> None:
    owner = await signup(client)
    status, problem = await send(
        client, "PATCH", f"/v1/users/{owner.id}", {"profile": {CARD: 1}},
        {**owner.headers, "If-Match": "*"},
    )  # fmt: skip
    refused(status, problem, "profile", CARD_MESSAGE)
    assert CARD not in orjson.dumps(problem).decode()
    # An unknown top-level key would be named by the schema's "unknown field": not a card.
    status, problem = await send(
        client, "PATCH", f"/v1/users/{owner.id}", {CARD: 1}, {**owner.headers, "If-Match": "*"}
    )
    refused(status, problem, "", CARD_MESSAGE)
    assert CARD not in orjson.dumps(problem).decode()
    assert CARD not in await _dump(config.database_url, ("users", "audit_log", "outbox"))


SEPARATED = [
    "4111.1111.1111.1111",
    "4111 1111 1111 1111",
    "4111-1111-1111-1111",
    "4111/1111/1111/1111",
    "4111_1111_1111_1111",
    "4111\u00a01111\u00a01111\u00a01111",
    "4111\u20131111\u20131111\u20131111",
    "4111  1111  1111  1111",
    "4111\t1111\t1111\t1111",
    "3782.822463.10005",
    "card:4111.1111.1111.1111, exp 12/30",
]


@pytest.mark.parametrize("card", SEPARATED)
def test_separators_do_not_hide_a_card(card: str) -> None:
    assert looks_like_card(card)


NOT_CARDS = [
    "1234.5678",
    "1234567890.123456",
    "3.14159265358979323",
    "2026-12-06T22:08:33.123456789Z",
    "2026.12.06 22.08.33",
    "+1 555 123 4567",
    "+44 20 7946 0958",
    "0044 20 7946 0958 12",
    "DE89 3704 0044 0532 0130 00",
    "192.168.100.200",
    "v1.2.3.4",
    "00000000-0000-0000-0000-000000000007",
    "4242424242424241",
    "1 2 3 4 5 6 7 8 9 1 2 3 4 5 6",
    # hex ids and keys (uuid4().hex, hashes) whose digits happen to pass Luhn: part of a word
    "ab4111111111111111cd",
    "9f4111111111111111",
    "4111111111111111e0",
    "sku_4111111111111111x",
]


@pytest.mark.parametrize("text", NOT_CARDS)
def test_numbers_that_are_not_cards_stay_allowed(text: str) -> None:
    assert not looks_like_card(text)


async def test_things_that_are_not_cards_pass_through_the_api(client: TestClient) -> None:
    owner = await signup(client)
    profile = {f"k{i}": v for i, v in enumerate(NOT_CARDS)}
    profile["id"] = str(uuid.uuid4())
    profile["price"] = 1234.5678
    profile["1234.5678"] = "decimal key"
    status, body = await send(
        client, "PATCH", f"/v1/users/{owner.id}", {"profile": profile},
        {**owner.headers, "If-Match": "*"},
    )  # fmt: skip
    assert status == 200, body
    assert body["profile"] == profile


@pytest.mark.parametrize(
    "method",
    ["4111.1111.1111.1111", "4111/1111/1111/1111", "4111 1111 1111 1111"],
)
async def test_a_separated_card_as_payment_method_is_422(
    client: TestClient, config: Config, method: str
) -> None:
    owner = await signup(client)
    pid = await _product(client, owner)
    status, order = await send(
        client, "POST", "/v1/orders", {"items": [{"product_id": pid, "quantity": 1}]}, owner.headers
    )
    assert status == 201, order
    status, problem = await send(
        client, "POST", f"/v1/orders/{order['id']}/pay", {"payment_method": method}, owner.headers
    )
    refused(status, problem, "payment_method", CARD_MESSAGE)
    assert digits_of(CARD) not in digits_of(await _dump(config.database_url, ("payments",)))


@pytest.mark.parametrize(
    "body",
    [
        b'{"items": [], "note": "\\u0034111111111111111"}',  # a digit written as an escape
        b'{"items": [], "n": 4111111111111111}',
    ],
)
async def test_escaped_and_numeric_cards_are_422(client: TestClient, body: bytes) -> None:
    owner = await signup(client)
    status, problem = await send(client, "POST", "/v1/orders", body, owner.headers)
    field = "note" if b"note" in body else "n"
    refused(status, problem, field, CARD_MESSAGE)


async def test_a_card_in_the_idempotency_key_is_422_and_not_stored(
    client: TestClient, config: Config
) -> None:
    owner = await signup(client)
    pid = await _product(client, owner)
    body = {"items": [{"product_id": pid, "quantity": 1}]}
    for key in (CARD, "4111-1111-1111-1111", "order-4111.1111.1111.1111"):
        status, problem = await send(
            client, "POST", "/v1/orders", body, {**owner.headers, "Idempotency-Key": key}
        )
        refused(status, problem, "Idempotency-Key", CARD_MESSAGE)
        assert digits_of(CARD) not in digits_of(orjson.dumps(problem).decode())
    dump = await _dump(config.database_url, ("idempotency_keys", "orders"))
    assert digits_of(CARD) not in digits_of(dump)
    # A key that is no card still works.
    status, _ = await send(
        client, "POST", "/v1/orders", body, {**owner.headers, "Idempotency-Key": str(uuid.uuid4())}
    )
    assert status == 201


@pytest.mark.parametrize("rid", [CARD, "4111-1111-1111-1111", "req.4111.1111.1111.1111"])
async def test_a_card_in_x_request_id_is_422_and_never_logged(
    aiohttp_client: Any, config: Config, rid: str
) -> None:
    stream = io.BytesIO()
    log = AccessLog(stream)
    client = await aiohttp_client(create_app(configured(config, access_log=True), access_log=log))
    for path in ("/healthz", "/v1/me"):
        resp = await client.get(path, headers={"X-Request-ID": rid})
        problem = await resp.json()
        assert resp.status == 422, problem
        assert problem["errors"] == [{"field": "X-Request-ID", "message": CARD_MESSAGE}]
        echoed = resp.headers["X-Request-ID"]
        assert problem["request_id"] == echoed
        assert digits_of(CARD) not in digits_of(echoed)
    log.flush()
    written = stream.getvalue().decode()
    assert written.count('"status":422') == 2
    assert digits_of(CARD) not in digits_of(written)
    # A request id that is no card is kept as it was sent.
    resp = await client.get("/healthz", headers={"X-Request-ID": "req-2026-12-06.1"})
    assert resp.status == 200
    assert resp.headers["X-Request-ID"] == "req-2026-12-06.1"


async def test_a_card_in_a_query_string_is_422(client: TestClient) -> None:
    owner = await signup(client)
    for path, params, field in [
        ("/v1/users", {"q": CARD}, "q"),
        ("/v1/users", {"q": "4111.1111.1111.1111"}, "q"),
        ("/v1/analytics/counts", {"name": "a4111.1111.1111.1111"}, "name"),
    ]:
        resp = await client.get(path, params=params, headers=owner.headers)
        problem = await resp.json()
        assert resp.status == 422, problem
        assert problem["errors"] == [{"field": field, "message": CARD_MESSAGE}]


async def test_a_card_in_an_event_is_422_and_not_stored(client: TestClient, config: Config) -> None:
    owner = await signup(client)
    for props, field in [
        ({"pan": "4111 1111 1111 1111"}, "events[0].props.pan"),
        ({CARD: True}, "events[0].props"),
    ]:
        status, problem = await send(
            client, "POST", "/v1/events", {"events": [{"name": "a", "props": props}]},
            owner.headers,
        )  # fmt: skip
        refused(status, problem, field, CARD_MESSAGE)
    assert digits_of(CARD) not in digits_of(await _dump(config.database_url, ("events",)))


async def test_a_card_in_a_graphql_request_is_422(client: TestClient) -> None:
    owner = await signup(client)
    query = 'query { users(first: 1, q: "4111.1111.1111.1111") { edges { cursor } } }'
    resp = await client.post("/graphql", json={"query": query}, headers=owner.headers)
    answer = await resp.json()
    assert resp.status == 422, answer
    assert answer["errors"] == [
        {"message": f"query: {CARD_MESSAGE}", "extensions": {"code": "BAD_USER_INPUT"}}
    ]


# -- 7. look-alike identities --

NFC = "jos\u00e9@example.com"
NFD = "jose\u0301@example.com"
FULLWIDTH = "\uff4a\uff4f\uff53\uff45@example.com"  # jose in fullwidth letters


async def _create(client: TestClient, owner: Actor, email: str, username: str) -> tuple[int, Any]:
    return await send(
        client,
        "POST",
        "/v1/users",
        {"email": email, "username": username, "password": PASSWORD},
        owner.headers,
    )


async def test_nfc_and_nfd_emails_are_one_account(client: TestClient) -> None:
    owner = await signup(client)
    status, user = await _create(client, owner, NFD, "jose1")
    assert status == 201, user
    assert user["email"] == NFC  # stored composed
    status, problem = await _create(client, owner, NFC, "jose2")
    assert status == 409, problem
    for email in (NFC, NFD):
        resp = await client.post(
            "/v1/auth/login",
            json={"tenant_id": owner.tenant_id, "email": email, "password": PASSWORD},
        )
        assert resp.status == 200, await resp.text()


async def test_fullwidth_letters_fold_into_the_same_account(client: TestClient) -> None:
    owner = await signup(client)
    status, user = await _create(client, owner, "jose@example.com", "jose1")
    assert status == 201, user
    status, problem = await _create(client, owner, FULLWIDTH, "jose2")
    assert status == 409, problem
    resp = await client.post(
        "/v1/auth/login",
        json={"tenant_id": owner.tenant_id, "email": FULLWIDTH, "password": PASSWORD},
    )
    assert resp.status == 200, await resp.text()
    status, user = await _create(client, owner, "\uff41@\uff42.\uff43\uff4f", "abc")
    assert status == 201, user
    assert user["email"] == "a@b.co"


INVISIBLE = "must not contain invisible or bidirectional control characters"


def test_the_invisible_class_is_unicodes() -> None:
    """server.openapi.INVISIBLE (in the email pattern, and what the server refuses) is every
    Cc, Cf, Zl and Zp character of the Unicode it was written from; a newer Unicode may add some."""
    pattern = re.compile(f"[{INVISIBLE_CLASS}]")
    unicode = {
        cp for cp in range(0x110000) if unicodedata.category(chr(cp)) in {"Cc", "Cf", "Zl", "Zp"}
    }
    listed = {cp for cp in range(0x110000) if pattern.match(chr(cp))}
    assert listed <= unicode
    if unicodedata.unidata_version == "14.0.0":
        assert listed == unicode


def refused_email(status: int, problem: dict[str, Any]) -> None:
    """422 on `email`: by the schema's pattern, which leaves out every invisible character, or
    (where an operation's schema is looser, as login's) by the server's own check."""
    assert status == 422, problem
    [error] = problem["errors"]
    assert error["field"] == "email"
    assert error["message"] == INVISIBLE or error["message"].startswith("must match pattern ^")


@pytest.mark.parametrize(
    "email",
    [
        "jo\u200dse@example.com",  # zero-width joiner
        "jo\u200bse@example.com",  # zero-width space
        "\u202ejose@example.com",  # right-to-left override
        "jose\u2066@example.com",  # left-to-right isolate
        "jo\u00adse@example.com",  # soft hyphen
        "jose\x07@example.com",  # a control character
        "jo\ufeffse@example.com",  # byte order mark
    ],
)
async def test_invisible_characters_in_an_email_are_422(client: TestClient, email: str) -> None:
    owner = await signup(client)
    status, problem = await _create(client, owner, email, "u1")
    refused_email(status, problem)
    status, problem = await send(
        client,
        "POST",
        "/v1/auth/signup",
        {"tenant_name": "T", "email": email, "username": "u", "password": PASSWORD},
    )
    refused_email(status, problem)
    status, problem = await send(
        client,
        "POST",
        "/v1/auth/login",
        {"tenant_id": owner.tenant_id, "email": email, "password": PASSWORD},
    )
    refused_email(status, problem)


async def test_an_email_that_folds_into_a_bad_shape_is_422(client: TestClient) -> None:
    owner = await signup(client)
    status, problem = await _create(client, owner, "a@b\uff20c.com", "u1")  # a fullwidth @
    assert status == 422, problem
    assert [e["field"] for e in problem["errors"]] == ["email"]


@pytest.mark.parametrize("name", ["jo\u200dse", "\u202ejose", "jos\u00e9", "\uff4aose"])
async def test_usernames_are_plain_ascii(client: TestClient, name: str) -> None:
    owner = await signup(client)
    status, problem = await _create(client, owner, "u@example.com", name)
    assert status == 422, problem
    assert [e["field"] for e in problem["errors"]] == ["username"]


async def test_invisible_characters_in_a_tenant_name_are_422(client: TestClient) -> None:
    status, problem = await send(
        client,
        "POST",
        "/v1/auth/signup",
        {
            "tenant_name": "Acme\u202e",
            "email": "a@example.com",
            "username": "a",
            "password": PASSWORD,
        },
    )
    refused(status, problem, "tenant_name", INVISIBLE)
    status, body = await send(
        client,
        "POST",
        "/v1/auth/signup",
        {
            "tenant_name": "Cafe\u0301",
            "email": "a@example.com",
            "username": "a",
            "password": PASSWORD,
        },
    )
    assert status == 201, body
    assert body["tenant"]["name"] == "Caf\u00e9"

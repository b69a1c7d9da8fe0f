"""/openapi.json describes exactly the routes the server has, with schemas and error answers."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from typing import Any

import jsonschema
import jsonschema_rs
import pytest

from handlers import SPEC, routes, validators
from server.app import create_app
from server.config import Config
from server.errors import ValidationFailed
from server.openapi import CARD_MESSAGE_EXAMPLE, resolved_schema
from server.validation import CARD_MESSAGE, Validators

from .conftest import ROOT, configured
from .helpers import PASSWORD, login, signup


def served() -> set[tuple[str, str]]:
    out = set()
    for r in routes:
        path = re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", r.path)
        out.add((r.method.lower(), path))
    return out


def documented() -> set[tuple[str, str]]:
    return {(m, p) for p, ops in SPEC["paths"].items() for m in ops}


def test_every_route_is_documented_and_nothing_else() -> None:
    assert served() == documented()


@pytest.mark.parametrize(("method", "path"), sorted(documented()))
def test_operations_document_answers(method: str, path: str) -> None:
    op = SPEC["paths"][path][method]
    assert op["summary"]
    codes = set(op["responses"])
    assert any(c.startswith("2") for c in codes)
    if path.startswith("/v1/"):
        assert {"429", "503"} <= codes
        if op["security"]:
            assert "401" in codes
    if any(
        p["in"] == "query" or (p["in"] == "header" and p["name"] != "If-None-Match")
        for p in op.get("parameters", [])
    ):
        assert "422" in codes  # a query parameter or header the server refuses
    if "requestBody" in op:
        # malformed, too slow, too large, not JSON, invalid
        assert {"400", "408", "413", "415", "422"} <= codes
        name = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        schema = resolved_schema(SPEC["components"]["schemas"], name)
        # Bodies we validate refuse unknown fields; a provider's events may grow new ones.
        assert schema.get("additionalProperties") is (path == "/v1/webhooks/payments" or False)


def test_every_schema_compiles() -> None:
    Validators(SPEC["components"]["schemas"])


async def test_served_document(aiohttp_client: Any, config: Config) -> None:
    client = await aiohttp_client(create_app(config))
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"] == "3.1.0"
    assert "/v1/users/{user_id}" in doc["paths"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    html = await (await client.get("/docs")).text()
    for path in doc["paths"]:
        assert path in html


def _patterns(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["pattern"]} if isinstance(node.get("pattern"), str) else set()
        return found.union(*(_patterns(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_patterns(v) for v in node))
    return set()


# Characters where Python's `re` and ECMA 262 regexes disagree: Python's \s holds \x1c-\x1f and
# \x85 but not \ufeff, its \d and \w hold every script's digits and letters, its $ also matches
# before a final newline.
_TRICKY = [chr(c) for c in range(0x21)] + list("\x7f\x85\xa0\u1680\u2000\u2028\u202f\u3000\ufeff")
_TRICKY += ["\u0663", "\u00e9", "\u00df", "_", "-", "@", ".", "\n"]
_SAMPLES = ["a", "abc", "a@b.co", "SKU-1", "01a24d85-dcd5-7fe6-9c28-3a962300110b"]
_SAMPLES += ["2026-11-21T10:00:00Z", "2026-11-21T10:00:00.123+01:00", "USD", "tok_1"]


@pytest.mark.parametrize("pattern", sorted(_patterns(SPEC)))
def test_patterns_mean_the_same_in_python_and_ecma(pattern: str) -> None:
    """Schemathesis and browsers read a pattern as ECMA 262 (jsonschema_rs does too); the server's
    validators (fastjsonschema) as Python's `re`: on every probe both must agree."""
    ecma = jsonschema_rs.validator_for({"type": "string", "pattern": pattern})
    python = Validators({"S": {"type": "string", "pattern": pattern}})
    probes = [*_SAMPLES, *_TRICKY]
    probes += [f"{c}{s}" for c in _TRICKY for s in _SAMPLES]
    probes += [f"{s}{c}" for c in _TRICKY for s in _SAMPLES]
    probes += [f"{s[:1]}{c}{s[1:]}" for c in _TRICKY for s in _SAMPLES]
    # each ASCII digit in turn as the ARABIC-INDIC DIGIT of the same value
    probes += [
        f"{s[:i]}{chr(0x660 + int(ch))}{s[i + 1 :]}"
        for s in _SAMPLES
        for i, ch in enumerate(s)
        if "0" <= ch <= "9"
    ]
    disagree = []
    for probe in probes:
        try:
            python.validate("S", probe)
            python_ok = True
        except ValidationFailed:
            python_ok = False
        if python_ok != ecma.is_valid(probe):
            disagree.append(probe)
    assert disagree == []


@pytest.mark.parametrize("status", ["429", "503"])
def test_graphql_refusals_document_both_shapes(status: str) -> None:
    """The chain refuses before the query is read (problem+json, as on every route); GraphQL
    refuses inside the request (a GraphQL response): both are documented."""
    content = SPEC["paths"]["/graphql"]["post"]["responses"][status]["content"]
    assert set(content) == {"application/json", "application/problem+json"}


def _operations() -> Iterator[tuple[str, str, Any]]:
    for path, ops in SPEC["paths"].items():
        for method, operation in ops.items():
            yield method, path, operation


def test_every_operation_has_a_unique_camel_case_operation_id() -> None:
    ids = [operation.get("operationId") for _m, _p, operation in _operations()]
    assert all(isinstance(i, str) and re.fullmatch(r"[a-z][a-zA-Z0-9]*", i) for i in ids), ids
    assert len(set(ids)) == len(ids)
    named = {(m, p): operation["operationId"] for m, p, operation in _operations()}
    # a few, as generated clients name their functions after them
    assert named[("get", "/v1/users/{user_id}")] == "getUser"
    assert named[("get", "/v1/users")] == "listUsers"
    assert named[("post", "/v1/orders")] == "createOrder"
    assert named[("post", "/v1/orders/{order_id}/pay")] == "payOrder"
    assert named[("get", "/v1/analytics/counts")] == "getAnalyticsCounts"
    assert named[("post", "/graphql")] == "graphql"
    assert named[("get", "/healthz")] == "getHealthz"


def _arrays(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        kind = node.get("type")
        if kind == "array" or (isinstance(kind, list) and "array" in kind):
            yield where, node
        for key, value in node.items():
            yield from _arrays(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _arrays(value, f"{where}/{i}")


def test_every_array_has_items() -> None:
    assert [where for where, node in _arrays(SPEC) if "items" not in node] == []
    errors = SPEC["components"]["schemas"]["GraphQLResponse"]["properties"]["errors"]["items"]
    assert errors["properties"]["path"]["items"] == {"type": ["string", "integer"]}
    assert errors["properties"]["locations"]["items"]["required"] == ["line", "column"]


def test_info_names_the_package_version_and_license() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert SPEC["info"]["version"] == pyproject["version"]
    assert SPEC["info"]["license"] == {"name": "MIT", "identifier": "MIT"}
    assert pyproject["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


# The ids Surge issues (a provider's authorization_id is the provider's string)
OUR_IDS = {"tenant_id", "user_id", "product_id", "order_id"}


def _request_ids(node: Any, name: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        if name in OUR_IDS and "type" in node:
            yield name, node
        for key, value in node.items():
            yield from _request_ids(value, key)
    elif isinstance(node, list):
        for value in node:
            yield from _request_ids(value, name)


def test_ids_in_requests_are_uuids_as_in_answers() -> None:
    """A client passes an id from one answer into the next request: both must be `uuid`."""
    schemas = SPEC["components"]["schemas"]
    requests = [
        resolved_schema(schemas, body["content"]["application/json"]["schema"]["$ref"][21:])
        for _m, _p, operation in _operations()
        if (body := operation.get("requestBody"))
    ]
    params = [p for _m, _p, operation in _operations() for p in operation.get("parameters", [])]
    found = list(_request_ids(requests))
    found += [(p["name"], p["schema"]) for p in params if p["name"] in OUR_IDS]
    assert {name for name, _ in found} == OUR_IDS
    assert [name for name, schema in found if schema.get("format") != "uuid"] == []


@pytest.mark.parametrize(("method", "path"), sorted(documented()))
def test_gets_with_an_etag_document_304(method: str, path: str) -> None:
    op = SPEC["paths"][path][method]
    etag = "ETag" in op["responses"][next(c for c in op["responses"] if c.startswith("2"))].get(
        "headers", {}
    )
    conditional = method == "get" and etag
    names = [p["name"] for p in op.get("parameters", [])]
    assert ("If-None-Match" in names) == conditional
    assert ("304" in op["responses"]) == conditional
    if conditional:
        not_modified = op["responses"]["304"]
        assert "content" not in not_modified
        assert set(not_modified["headers"]) == {
            "ETag",
            "RateLimit-Limit",
            "RateLimit-Remaining",
            "RateLimit-Reset",
        }


@pytest.mark.parametrize(
    ("public_url", "servers"),
    [
        (None, [{"url": "/", "description": "The origin serving this document"}]),
        ("https://api.example.com", [{"url": "https://api.example.com"}]),
    ],
)
async def test_servers(
    aiohttp_client: Any, config: Config, public_url: str | None, servers: list[Any]
) -> None:
    client = await aiohttp_client(create_app(configured(config, public_url=public_url)))
    doc = await (await client.get("/openapi.json")).json()
    assert doc["servers"] == servers
    assert doc["paths"] == SPEC["paths"]


def test_public_url_setting() -> None:
    assert Config.from_env({"PUBLIC_URL": "https://api.example.com/"}).public_url == (
        "https://api.example.com"
    )


# -- examples, components, tags -----------------------------------------------------------------


def _resolve_ref(node: Any) -> Any:
    """`node`, or what its $ref (#/components/...) names."""
    while isinstance(node, dict) and "$ref" in node:
        _, _, kind, name = node["$ref"].split("/")
        node = SPEC["components"][kind][name]
    return node


def _media_types() -> Iterator[tuple[str, Any]]:
    """(where, media type object) of every request body and answer."""
    for method, path, operation in _operations():
        where = f"{method.upper()} {path}"
        for media, content in operation.get("requestBody", {}).get("content", {}).items():
            yield f"{where} request {media}", content
        for code, response in operation["responses"].items():
            for media, content in _resolve_ref(response).get("content", {}).items():
                yield f"{where} {code} {media}", content


def _examples() -> Iterator[tuple[str, Any, Any]]:
    """(where, schema, example value) of every example of a request body or an answer."""
    for where, content in _media_types():
        if "example" in content:
            yield where, content["schema"], content["example"]
        for name, example in content.get("examples", {}).items():
            yield f"{where} example {name}", content["schema"], _resolve_ref(example)["value"]


def test_every_request_body_and_answer_has_an_example() -> None:
    media_types = list(_media_types())
    assert len(media_types) > 150
    assert [w for w, c in media_types if "example" not in c and not c.get("examples")] == []


def test_every_example_holds_against_its_schema() -> None:
    """Each example validates against its schema, formats included, both as ECMA 262 reads
    patterns (jsonschema_rs: clients, schemathesis) and as Python does (jsonschema)."""
    examples = list(_examples())
    assert len(examples) > 150
    wrong = []
    for where, schema, value in examples:
        # the document's components beside the schema: its "#/components/..." refs resolve
        rooted = {**schema, "components": SPEC["components"]}
        ecma = jsonschema_rs.validator_for(rooted, validate_formats=True)
        python = jsonschema.Draft202012Validator(
            rooted, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        )
        found = [e.message for e in ecma.iter_errors(value)]
        found += [e.message for e in python.iter_errors(value)]
        if found:
            wrong.append((where, found))
    assert wrong == []


def test_a_broken_example_is_caught() -> None:
    schema = {**ref_of("User"), "components": SPEC["components"]}
    user = SPEC["components"]["examples"]["Admin"]["value"]
    validator = jsonschema_rs.validator_for(schema, validate_formats=True)
    assert validator.is_valid(user)
    assert not validator.is_valid(user | {"id": "not-a-uuid"})
    assert not validator.is_valid(user | {"created_at": "yesterday"})


def ref_of(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def test_request_examples_are_the_bodies_the_server_validates() -> None:
    """Each request body's example passes the server's own validator (fastjsonschema)."""
    for _m, _p, operation in _operations():
        if body := operation.get("requestBody"):
            media = body["content"]["application/json"]
            name = media["schema"]["$ref"].rsplit("/", 1)[1]
            for example in media["examples"].values():
                validators.validate(name, _resolve_ref(example)["value"])


def test_every_tag_is_declared_with_a_description() -> None:
    declared = {t["name"]: t.get("description", "") for t in SPEC["tags"]}
    used = {tag for _m, _p, operation in _operations() for tag in operation["tags"]}
    assert set(declared) == used
    assert all(declared.values()), declared


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_every_ref_resolves_and_every_component_is_used() -> None:
    refs = set(_refs(SPEC))
    for target in refs:
        assert _resolve_ref({"$ref": target}) is not None, target
    components = {
        f"#/components/{kind}/{name}"
        for kind, entries in SPEC["components"].items()
        if kind != "securitySchemes"
        for name in entries
    }
    assert components - refs == set()


def _answers(operation: Any) -> Iterator[tuple[str, Any]]:
    for code, response in operation["responses"].items():
        yield code, _resolve_ref(response)


def _headers(response: Any) -> dict[str, Any]:
    return {name: _resolve_ref(h) for name, h in response.get("headers", {}).items()}


@pytest.mark.parametrize(("method", "path"), sorted(documented()))
def test_answers_document_their_headers(method: str, path: str) -> None:
    op = SPEC["paths"][path][method]
    # what server/routes.py rate limits: /v1 (the webhook has its own bucket) and POST /graphql
    limited = (path.startswith("/v1/") and path != "/v1/webhooks/payments") or (
        (method, path) == ("post", "/graphql")
    )
    for code, response in _answers(op):
        headers = _headers(response)
        rate_limit = {"RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"}
        if limited:
            assert rate_limit <= set(headers), code
        elif code != "429":  # the webhook's own bucket answers its 429 with them
            assert not rate_limit & set(headers), code
        if code in ("429", "503") and path != "/readyz":
            assert headers["Retry-After"]["required"] is True, code
        if code == "401":
            assert headers["WWW-Authenticate"]["required"] is True
        # a signup answers a tenant, its owner and tokens: no one resource for Location
        if code == "201" and path != "/v1/auth/signup":
            assert {"ETag", "Location"} <= set(headers)
            assert headers["Location"]["required"] and headers["ETag"]["required"]
    codes = set(op["responses"])
    assert any(c.startswith("4") for c in codes)  # at least the X-Request-ID refusal
    assert "422" in codes


def test_idempotent_operations_document_replays() -> None:
    for path in ("/v1/orders", "/v1/orders/{order_id}/pay"):
        op = SPEC["paths"][path]["post"]
        assert "Idempotency-Key" in [p["name"] for p in op["parameters"]]
        for code, response in _answers(op):
            if code.startswith("2"):
                assert "Idempotent-Replayed" in _headers(response), (path, code)


async def test_graphql_429s_have_the_documented_content_types(
    aiohttp_client: Any, config: Config
) -> None:
    """Both 429s of POST /graphql, as the server gives them: a query costing more than the
    bucket holds (GraphQL-shaped, application/json), then an empty bucket (the chain's
    problem+json). Each comes with a documented content type and a body its schema holds."""
    client = await aiohttp_client(
        create_app(configured(config, rate_limit_rate=0.01, rate_limit_burst=100))
    )
    owner = await signup(client)
    documented_429 = SPEC["paths"]["/graphql"]["post"]["responses"]["429"]
    seen = {}
    # 80 nodes twice: the second finds about 19 tokens left; then 1 token each, until none is
    for query in ("{ users(first: 80) { edges { node { id } } } }", "{ me { id } }"):
        for _ in range(30):
            resp = await client.post("/graphql", json={"query": query}, headers=owner.headers)
            if resp.status == 429:
                break
        assert resp.status == 429
        assert "Retry-After" in resp.headers
        media = resp.content_type
        assert media in documented_429["content"]
        schema = {**documented_429["content"][media]["schema"], "components": SPEC["components"]}
        jsonschema_rs.validate(schema, await resp.json())
        seen[query] = media
    assert list(seen.values()) == ["application/json", "application/problem+json"]


# (who asks, method, url, the documented answer it gets): the examples are what the server says
OTHER = "01a24e1a-0000-7000-8000-000000000000"  # no such user or order
SERVER_ANSWERS = [
    ("card", "get", "/healthz", ("/healthz", "get", "422")),
    ("stranger", "get", "/v1/me", ("/v1/me", "get", "401")),
    ("owner", "get", f"/v1/users/{OTHER}", ("/v1/users/{user_id}", "get", "404")),
    ("owner", "get", "/v1/users?limit=500", ("/v1/users", "get", "422")),
    ("member", "post", "/v1/users", ("/v1/users", "post", "403")),
    ("owner", "get", f"/v1/orders/{OTHER}", ("/v1/orders/{order_id}", "get", "404")),
]
CALLERS = {
    "card": {"X-Request-ID": "4111111111111111"},  # a request id that looks like a card number
    "stranger": {"Authorization": "Bearer not-a-token"},
}


@pytest.mark.parametrize(("who", "method", "url", "answer"), SERVER_ANSWERS)
async def test_problem_examples_are_what_the_server_answers(
    aiohttp_client: Any, config: Config, who: str, method: str, url: str, answer: tuple[str, ...]
) -> None:
    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    headers = {**CALLERS, "owner": owner.headers}.get(who)
    if headers is None:  # a member: the owner creates one, who logs in
        made = await client.post(
            "/v1/users",
            json={"email": "mia@example.com", "username": "mia", "password": PASSWORD},
            headers=owner.headers,
        )
        assert made.status == 201
        tokens = await login(client, owner.tenant_id, "mia@example.com")
        headers = {"Authorization": f"Bearer {tokens['access_token']}"}
    body = {"email": "bob@example.com", "username": "bob", "password": "hunter2hunter2"}
    resp = await client.request(
        method, url, headers=headers, json=body if method == "post" else None
    )
    path, op_method, code = answer
    assert str(resp.status) == code
    documented = _resolve_ref(SPEC["paths"][path][op_method]["responses"][code])
    example = documented["content"]["application/problem+json"]["example"]
    assert await resp.json() == example | {"request_id": resp.headers["X-Request-ID"]}
    for name, header in _headers(documented).items():
        if header.get("required"):
            assert name in resp.headers, name


def test_the_card_message_is_the_servers() -> None:
    assert CARD_MESSAGE_EXAMPLE == CARD_MESSAGE

"""/openapi.json describes exactly the routes the server has, with schemas and error answers."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import pytest

from handlers import SPEC, routes
from server.app import create_app
from server.config import Config
from server.errors import ValidationFailed
from server.openapi import resolved_schema
from server.validation import Validators

from .conftest import ROOT, configured


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

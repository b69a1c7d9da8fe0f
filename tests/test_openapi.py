"""/openapi.json describes exactly the routes the server has, with schemas and error answers."""

from __future__ import annotations

import re
from typing import Any

import jsonschema_rs
import pytest

from handlers import SPEC, routes
from server.app import create_app
from server.config import Config
from server.errors import ValidationFailed
from server.openapi import resolved_schema
from server.validation import Validators


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
    if any(p["in"] in ("query", "header") for p in op.get("parameters", [])):
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

"""/openapi.json describes exactly the routes the server has, with schemas and error answers."""

from __future__ import annotations

import re
from typing import Any

import pytest

from handlers import SPEC, routes
from server.app import create_app
from server.config import Config
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
    if "requestBody" in op:
        assert {"400", "413", "422"} <= codes
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

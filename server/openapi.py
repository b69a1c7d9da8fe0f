"""The OpenAPI 3.1 document: the single source of truth for request bodies.

Request schemas live in components.schemas and are compiled into validators (validation.py);
keep them within the JSON Schema subset fastjsonschema understands (draft-07 keywords).
"""

from __future__ import annotations

import copy
from typing import Any

Json = dict[str, Any]


def ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def problem(desc: str) -> Json:
    return {
        "description": desc,
        "content": {"application/problem+json": {"schema": ref("Problem")}},
    }


def json_content(desc: str, schema: Json, **headers: str) -> Json:
    out: Json = {"description": desc, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = {
            k: {"schema": {"type": "string"}, "description": v} for k, v in headers.items()
        }
    return out


def query_param(name: str, schema: Json, description: str, *, required: bool | None = None) -> Json:
    out: Json = {"name": name, "in": "query"}
    if required is not None:  # None leaves the key out (OpenAPI's default: false)
        out["required"] = required
    return out | {"schema": schema, "description": description}


_RL_HEADERS = {
    "RateLimit-Limit": {"schema": {"type": "integer"}, "description": "Bucket size"},
    "RateLimit-Remaining": {"schema": {"type": "integer"}, "description": "Requests left now"},
    "RateLimit-Reset": {"schema": {"type": "integer"}, "description": "Seconds to a full bucket"},
}

STANDARD_ERRORS = {
    "400": problem("Malformed JSON"),
    "413": problem("Body larger than MAX_BODY_BYTES"),
    "422": problem("Validation failed; `errors` names each offending field"),
    "429": problem("Rate limited; see Retry-After"),
    "503": problem("Overloaded or a dependency is down; see Retry-After"),
}


def op(
    summary: str,
    tag: str,
    responses: dict[str, Json],
    *,
    body: str | None = None,
    auth: bool = True,
    params: list[Json] | None = None,
    operation_id: str | None = None,
    ratelimited: bool = True,
) -> Json:
    out: Json = {"summary": summary, "tags": [tag]}
    if operation_id:
        out["operationId"] = operation_id
    if params:
        out["parameters"] = params
    if body:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref(body)}},
        }
    all_responses = dict(responses)
    if ratelimited:
        for r in all_responses.values():
            r.setdefault("headers", {}).update(_RL_HEADERS)
        for code, r in STANDARD_ERRORS.items():
            if code in ("400", "413", "422") and not body:
                continue
            all_responses.setdefault(code, copy.deepcopy(r))
    if auth:
        out["security"] = [{"bearer": []}]
        all_responses.setdefault("401", problem("Missing, invalid or expired access token"))
    else:
        out["security"] = []
    out["responses"] = all_responses
    return out


SCHEMAS: Json = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "required": ["type", "title", "status", "detail", "request_id"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "request_id": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok"]}},
    },
    "Readiness": {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "unavailable", "draining"]},
            "checks": {
                "type": "object",
                "properties": {
                    "postgres": {"type": "string", "enum": ["ok", "error"]},
                    "redis": {"type": "string", "enum": ["ok", "error"]},
                },
            },
        },
    },
}

PATHS: Json = {
    "/healthz": {
        "get": op(
            "Liveness: 200 while the process runs",
            "ops",
            {"200": json_content("Alive", ref("Health"))},
            auth=False,
            ratelimited=False,
        )
    },
    "/readyz": {
        "get": op(
            "Readiness: PostgreSQL and Redis answer and the process is not draining",
            "ops",
            {
                "200": json_content("Ready", ref("Readiness")),
                "503": json_content(
                    "Not ready; `checks` says which dependency failed", ref("Readiness")
                ),
            },
            auth=False,
            ratelimited=False,
        )
    },
    "/metrics": {
        "get": op(
            "Prometheus text exposition",
            "ops",
            {
                "200": {
                    "description": "Metrics",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
            auth=False,
            ratelimited=False,
        )
    },
    "/openapi.json": {
        "get": op(
            "This document",
            "ops",
            {"200": json_content("OpenAPI 3.1", {"type": "object"})},
            auth=False,
            ratelimited=False,
        )
    },
    "/docs": {
        "get": op(
            "A browsable API reference rendered from this document",
            "ops",
            {
                "200": {
                    "description": "HTML",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                }
            },
            auth=False,
            ratelimited=False,
        )
    },
}

SPEC: Json = {
    "openapi": "3.1.0",
    "info": {
        "title": "Surge API",
        "version": "1.0.0",
        "description": (
            "Multi-tenant JSON API. Errors are application/problem+json (RFC 9457); lists use "
            "keyset pagination (`limit`, `cursor` -> `next_cursor`); every /v1 response carries "
            "RateLimit-* headers."
        ),
    },
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
    },
}


def register(paths: Json, schemas: Json) -> None:
    """Domain modules add their paths and schemas at import time."""
    for name in schemas:
        if name in SCHEMAS:
            raise ValueError(f"schema {name} defined twice")
    SCHEMAS.update(schemas)
    for path, ops in paths.items():
        PATHS.setdefault(path, {}).update(ops)


def _resolve(node: Any, seen: tuple[str, ...]) -> Any:
    if isinstance(node, dict):
        target = node.get("$ref")
        if isinstance(target, str):
            name = target.rsplit("/", 1)[-1]
            if name in seen:
                raise ValueError(f"recursive schema {name}")
            return _resolve(SCHEMAS[name], (*seen, name))
        return {k: _resolve(v, seen) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, seen) for v in node]
    return node


def resolved_schema(name: str) -> Json:
    """components.schemas[name] with every $ref inlined (fastjsonschema wants one document)."""
    out: Json = _resolve(SCHEMAS[name], (name,))
    return out

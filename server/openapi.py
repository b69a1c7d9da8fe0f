"""The OpenAPI 3.1 document: the single source of truth for request bodies.

Request schemas live in components.schemas and are compiled into validators (validation.py);
keep them within the JSON Schema subset fastjsonschema understands (draft-07 keywords).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from db.ids import UUID_RE

Json = dict[str, Any]

UUID_PATTERN = f"^{UUID_RE}$"


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
        all_responses.setdefault(
            "401", problem("Missing, invalid, expired or revoked access token")
        )
    else:
        out["security"] = []
    out["responses"] = all_responses
    return out


# The schema every error answer shares; the document always has it.
PROBLEM_SCHEMAS: Json = {
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
}


def document(sections: Iterable[tuple[Json, Json]]) -> Json:
    """The OpenAPI document from each part's (paths, schemas), in order; a schema defined
    twice is a mistake and refused."""
    paths: Json = {}
    schemas: Json = dict(PROBLEM_SCHEMAS)
    for section_paths, section_schemas in sections:
        for name in section_schemas:
            if name in schemas:
                raise ValueError(f"schema {name} defined twice")
        schemas.update(section_schemas)
        for path, ops in section_paths.items():
            paths.setdefault(path, {}).update(ops)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Surge API",
            "version": "1.0.0",
            "description": (
                "Multi-tenant JSON API. Errors are application/problem+json (RFC 9457); lists "
                "use keyset pagination (`limit`, `cursor` -> `next_cursor`); every /v1 response "
                "carries RateLimit-* headers."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }


def _resolve(schemas: Json, node: Any, seen: tuple[str, ...]) -> Any:
    if isinstance(node, dict):
        target = node.get("$ref")
        if isinstance(target, str):
            name = target.rsplit("/", 1)[-1]
            if name in seen:
                raise ValueError(f"recursive schema {name}")
            return _resolve(schemas, schemas[name], (*seen, name))
        return {k: _resolve(schemas, v, seen) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(schemas, v, seen) for v in node]
    return node


def resolved_schema(schemas: Json, name: str) -> Json:
    """schemas[name] with every $ref inlined (fastjsonschema wants one document)."""
    out: Json = _resolve(schemas, schemas[name], (name,))
    return out

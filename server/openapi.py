"""The OpenAPI 3.1 document: the single source of truth for request bodies.

Request schemas live in components.schemas and are compiled into validators (validation.py);
keep them within the JSON Schema subset fastjsonschema understands (draft-07 keywords).
An object open to any keys says `additionalProperties: true`: JSON Schema's default, but
openapi-typescript types an object with neither properties nor that as one with no keys at all.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from db.ids import UUID_RE
from server.version import version

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


# Whitespace and control characters, spelled out for patterns: `\s` (like `\d`, `\w`, `\b`)
# means one set in Python's `re`, which the server's validators use, and another in ECMA 262,
# which schemathesis, browsers and generated clients use; an explicit class means the same in both.
SPACE_OR_CONTROL = r"\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
# Invisible characters: Unicode's Cc (controls), Cf (format: zero-width space and joiners, the
# soft hyphen, the byte order mark, every bidi override and isolate) and Zl/Zp (separators), as of
# Unicode 14 (tests/test_hostile_input.py checks it against unicodedata). Characters past U+FFFF
# are written as themselves: ECMA 262 has no `\U` escape.
INVISIBLE = (
    r"\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e"
    r"\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0001\U000e0020-\U000e007f"
)

_RL_HEADERS = {
    "RateLimit-Limit": {"schema": {"type": "integer"}, "description": "Bucket size"},
    "RateLimit-Remaining": {"schema": {"type": "integer"}, "description": "Requests left now"},
    "RateLimit-Reset": {"schema": {"type": "integer"}, "description": "Seconds to a full bucket"},
}


def retry_problem(desc: str, *, required: bool) -> Json:
    """A problem+json answer with a Retry-After header (`required`: always sent)."""
    out = problem(desc)
    header: Json = {"schema": {"type": "integer"}, "description": "Seconds to wait before retrying"}
    if required:
        header["required"] = True
    out["headers"] = {"Retry-After": header}
    return out


# The error answers op() adds to an operation, by what the operation has; an operation's own
# entry for a status wins. Add a status here once rather than to each operation.
BODY_ERRORS = {  # an operation that reads a JSON body
    "400": problem("Malformed JSON"),
    "408": problem("The body did not arrive within BODY_READ_TIMEOUT_S; the connection is closed"),
    "413": problem("Body larger than MAX_BODY_BYTES"),
    "415": problem(
        "The body is not application/json, or has a Content-Encoding (only POST"
        " /v1/events takes one)"
    ),
    "422": problem("Validation failed; `errors` names each offending field"),
}
PARAM_ERRORS = {  # an operation with query or header parameters
    "422": problem("A parameter is refused; `errors` names it"),
}
LIMITED_ERRORS = {  # every rate-limited operation (each /v1 one and POST /graphql)
    "429": retry_problem("Rate limited; see Retry-After", required=True),
    "503": retry_problem("Overloaded or a dependency is down; see Retry-After", required=False),
}
AUTH_ERRORS = {  # every operation that needs an access token
    "401": problem("Missing, invalid, expired or revoked access token"),
}


def op(
    summary: str,
    tag: str,
    responses: dict[str, Json],
    *,
    body: str | None = None,
    auth: bool = True,
    params: list[Json] | None = None,
    ratelimited: bool = True,
) -> Json:
    out: Json = {"summary": summary, "tags": [tag]}
    if params:
        out["parameters"] = params
    if body:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref(body)}},
        }
    # copies: sections share response objects (FORBIDDEN, NOT_FOUND) between operations
    all_responses = {code: copy.deepcopy(r) for code, r in responses.items()}
    common: list[dict[str, Json]] = []
    if body:
        common.append(BODY_ERRORS)
    if any(p["in"] in ("query", "header") for p in params or []):
        common.append(PARAM_ERRORS)
    if ratelimited:
        common.append(LIMITED_ERRORS)
    if auth:
        common.append(AUTH_ERRORS)
    for errors in common:
        for code, r in errors.items():
            all_responses.setdefault(code, copy.deepcopy(r))
    if ratelimited:  # every answer, errors included
        for r in all_responses.values():
            r.setdefault("headers", {}).update(_RL_HEADERS)
    out["security"] = [{"bearer": []}] if auth else []
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


IF_NONE_MATCH: Json = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": (
        'The ETag you hold (e.g. "3"), a comma-separated list of them, or `*`: 304 without a '
        "body while it is current"
    ),
}


def _conditional(method: str, operation: Json) -> None:
    """A GET whose 200 carries an ETag answers 304 to an If-None-Match naming it (the chain
    does it for every such answer: server/chain.py), so its operation says so."""
    ok = operation["responses"].get("200", {})
    if method != "get" or "ETag" not in ok.get("headers", {}):
        return
    operation.setdefault("parameters", []).append(IF_NONE_MATCH)
    operation["responses"]["304"] = {
        "description": "Not Modified: the ETag in If-None-Match is current; no body",
        "headers": copy.deepcopy(ok["headers"]),
    }


def _name(paths: Json, operation_ids: Mapping[tuple[str, str], str]) -> None:
    """Each operation's operationId from `operation_ids` ((method, path) -> id): every
    operation has one, each is used once, and none names an operation that does not exist."""
    named = {(method, path) for path, ops in paths.items() for method in ops}
    if missing := named - set(operation_ids):
        raise ValueError(f"operations without an operationId: {sorted(missing)}")
    if extra := set(operation_ids) - named:
        raise ValueError(f"operationIds of no operation: {sorted(extra)}")
    if len(set(operation_ids.values())) != len(operation_ids):
        raise ValueError("an operationId is used twice")
    for (method, path), operation_id in operation_ids.items():
        paths[path][method]["operationId"] = operation_id


def document(
    sections: Iterable[tuple[Json, Json]], operation_ids: Mapping[tuple[str, str], str]
) -> Json:
    """The OpenAPI document from each part's (paths, schemas), in order, each operation named
    by `operation_ids`; a schema defined twice is a mistake and refused."""
    paths: Json = {}
    schemas: Json = dict(PROBLEM_SCHEMAS)
    for section_paths, section_schemas in sections:
        for name in section_schemas:
            if name in schemas:
                raise ValueError(f"schema {name} defined twice")
        schemas.update(section_schemas)
        for path, ops in section_paths.items():
            paths.setdefault(path, {}).update(ops)
    _name(paths, operation_ids)
    for ops in paths.values():
        for method, operation in ops.items():
            _conditional(method, operation)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Surge API",
            "version": version(),
            "license": {"name": "MIT", "identifier": "MIT"},
            "description": (
                "Multi-tenant JSON API. Errors are application/problem+json (RFC 9457); lists "
                "use keyset pagination (`limit`, `cursor` -> `next_cursor`); every /v1 response "
                "carries RateLimit-* headers. No string may hold U+0000 (NUL): 422."
            ),
        },
        # Relative: the origin the document was fetched from (OpenAPI's own default, said
        # explicitly); PUBLIC_URL replaces it when the server is served (handlers/ops.py).
        "servers": [{"url": "/", "description": "The origin serving this document"}],
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

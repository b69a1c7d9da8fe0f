"""The OpenAPI 3.1 document: the single source of truth for request bodies.

Request schemas live in components.schemas and are compiled into validators (validation.py);
keep them within the JSON Schema subset fastjsonschema understands (draft-07 keywords).
An object open to any keys says `additionalProperties: true`: JSON Schema's default, but
openapi-typescript types an object with neither properties nor that as one with no keys at all.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import orjson

from db.ids import UUID_RE
from server.errors import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    PreconditionRequired,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    UnsupportedMediaType,
    ValidationFailed,
    problem_body,
)
from server.version import version

Json = dict[str, Any]

UUID_PATTERN = f"^{UUID_RE}$"


def ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def example_ref(name: str) -> Json:
    return {"$ref": f"#/components/examples/{name}"}


def example(summary: str, value: Json) -> Json:
    """A components.examples entry."""
    return {"summary": summary, "value": value}


def response_ref(name: str) -> Json:
    return {"$ref": f"#/components/responses/{name}"}


def header_ref(name: str) -> Json:
    return {"$ref": f"#/components/headers/{name}"}


# The ids the examples share, so that every section's examples tell one story: Acme's owner
# (ann) creates an admin (bob), a product, and an order.
EXAMPLE_TENANT_ID = "01a24e1a-5cff-7929-a333-e7bf0acebc6d"
EXAMPLE_OWNER_ID = "01a24e1a-5cff-7f07-9e61-aadc30a481c7"
EXAMPLE_USER_ID = "01a24e1a-5d82-785e-8e44-37d4692d9184"

# Every problem example names this request id: what X-Request-ID carried (a generated one is a
# process prefix and a counter, 24 hex digits).
EXAMPLE_REQUEST_ID = "80c5fadd0fd4000000000042"

# The problem types (`/problems/<slug>`) and titles an answer of each status has, as the server
# renders them (server/errors.py); a 503 says `overloaded` when the server sheds load.
_PROBLEMS: dict[int, type[ApiError]] = {
    e.status: e
    for e in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PayloadTooLarge,
        PreconditionFailed,
        UnsupportedMediaType,
        ValidationFailed,
        PreconditionRequired,
        TooManyRequests,
        ServiceUnavailable,
    )
}


def problem_example(
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    errors: list[dict[str, str]] | None = None,
) -> Json:
    """A problem+json body exactly as the server renders it (server/errors.py)."""
    kind = _PROBLEMS.get(status)
    body: Json = orjson.loads(
        problem_body(
            status,
            detail,
            EXAMPLE_REQUEST_ID,
            slug=slug or (kind.slug if kind else None),
            title=title or (kind.title if kind else None),
            errors=errors,
        )
    )
    return body


def problem(
    status: int,
    desc: str,
    detail: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    errors: list[dict[str, str]] | None = None,
) -> Json:
    """A problem+json answer, its example one of the details the server gives for it."""
    example = problem_example(status, detail, slug=slug, title=title, errors=errors)
    return {
        "description": desc,
        "content": {"application/problem+json": {"schema": ref("Problem"), "example": example}},
    }


def json_content(
    desc: str, schema: Json, example: str | Json, *, headers: tuple[str, ...] = ()
) -> Json:
    """An application/json answer; `example` names a components.examples entry, or is the
    example value itself; `headers` names components.headers entries it carries."""
    media: Json = {"schema": schema}
    if isinstance(example, str):
        media["examples"] = {example: example_ref(example)}
    else:
        media["example"] = example
    out: Json = {"description": desc, "content": {"application/json": media}}
    if headers:
        out["headers"] = {name: header_ref(name) for name in headers}
    return out


def text_content(desc: str, media_type: str, example: str) -> Json:
    return {
        "description": desc,
        "content": {media_type: {"schema": {"type": "string"}, "example": example}},
    }


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

# components.headers: every header an answer documents, described once.
HEADERS: Json = {
    "RateLimit-Limit": {
        "description": "The size of the caller's token bucket",
        "schema": {"type": "integer"},
    },
    "RateLimit-Remaining": {
        "description": "Requests left in the bucket now",
        "schema": {"type": "integer"},
    },
    "RateLimit-Reset": {
        "description": "Seconds until the bucket is full again",
        "schema": {"type": "integer"},
    },
    "Retry-After": {
        "required": True,
        "description": "Seconds to wait before retrying",
        "schema": {"type": "integer"},
    },
    "ETag": {
        "required": True,
        "description": (
            'The resource\'s version, quoted (e.g. "3"): If-Match for a write, If-None-Match for'
            " a read"
        ),
        "schema": {"type": "string", "pattern": '^"[0-9]+"$'},
    },
    "Location": {
        "required": True,
        "description": "The path of the resource created",
        "schema": {"type": "string", "format": "uri-reference"},
    },
    "Idempotent-Replayed": {
        "description": "`true`: the answer stored for an earlier request with this Idempotency-Key",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "WWW-Authenticate": {
        "required": True,
        "description": (
            'The Bearer challenge: `Bearer realm="surge", error="invalid_token"` for a token that'
            ' is invalid, expired or revoked, `Bearer realm="surge"` when none was sent or the'
            " credentials are wrong"
        ),
        "schema": {"type": "string"},
    },
    "Accept-Encoding": {
        "description": "With a Content-Encoding refused: the codings the operation takes",
        "schema": {"type": "string"},
    },
}
RATELIMIT_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")


def with_headers(response: Json, *names: str) -> Json:
    """`response` carrying the components.headers `names` (a copy)."""
    out = copy.deepcopy(response)
    out.setdefault("headers", {}).update({name: header_ref(name) for name in names})
    return out


def retry_problem(status: int, desc: str, detail: str, *, slug: str | None = None) -> Json:
    """A problem+json answer that always carries Retry-After."""
    return with_headers(problem(status, desc, detail, slug=slug), "Retry-After")


# server/validation.py's CARD_MESSAGE (that module imports this one); tests/test_openapi.py
# checks the answers below against the server's own.
CARD_MESSAGE_EXAMPLE = "looks like a card number; send the payment provider's token instead"

# The answers the chain gives any operation of a kind (server/chain.py), by name. A rate-limited
# operation refers to them in components.responses (where each carries the RateLimit-*
# headers); another gets a copy without those headers. An operation's own entry for a status
# wins. Add a status here once rather than to each operation.
COMMON: dict[str, Json] = {
    "MalformedJson": problem(
        400, "Malformed JSON", "malformed JSON: unexpected end of data: line 1 column 11 (char 10)"
    ),
    "BodyTimeout": problem(
        408,
        "The body did not arrive within BODY_READ_TIMEOUT_S; the connection is closed",
        "the request body did not arrive within 10 s",
        slug="request-timeout",
        title="Request Timeout",
    ),
    "BodyTooLarge": problem(
        413,
        "Body larger than MAX_BODY_BYTES",
        "the request body is larger than 1048576 bytes",
        # aiohttp's own refusal: titled by Python's name for the status
        title=HTTPStatus(413).phrase,
    ),
    "NotJson": with_headers(
        problem(
            415,
            "The body is not application/json, or has a Content-Encoding (only POST /v1/events"
            " takes one: Accept-Encoding then says which)",
            "the request body must be application/json",
        ),
        "Accept-Encoding",
    ),
    "InvalidBody": problem(
        422,
        "Validation failed; `errors` names each offending field",
        "the request body is not valid",
        errors=[{"field": "email", "message": "must match pattern"}],
    ),
    "InvalidParameter": problem(
        422,
        "A parameter is refused; `errors` names it",
        "invalid query parameter",
        errors=[{"field": "limit", "message": "must be an integer from 1 to 200"}],
    ),
    "RequestIdRefused": problem(
        422,
        "X-Request-ID looks like a card number: refused, and neither echoed nor logged",
        "invalid X-Request-ID header",
        errors=[{"field": "X-Request-ID", "message": CARD_MESSAGE_EXAMPLE}],
    ),
    "Unauthorized": with_headers(
        problem(
            401,
            "Missing, invalid, expired or revoked access token",
            "the access token is invalid or expired",
        ),
        "WWW-Authenticate",
    ),
    "RateLimited": retry_problem(
        429,
        "Rate limited; see Retry-After",
        "rate limit exceeded; retry after the Retry-After delay",
    ),
    "Unavailable": retry_problem(
        503,
        "Overloaded, or a dependency (PostgreSQL, the payment provider) is down; see Retry-After",
        "the server is at capacity; retry shortly",
        slug="overloaded",
    ),
    "Forbidden": problem(
        403, "Your role does not allow this", "this needs the admin or owner role"
    ),
    "Overloaded": retry_problem(
        503,
        "The server is at capacity; see Retry-After",
        "the server is at capacity; retry shortly",
        slug="overloaded",
    ),
}
BODY_ERRORS = {  # an operation that reads a JSON body
    "400": "MalformedJson",
    "408": "BodyTimeout",
    "413": "BodyTooLarge",
    "415": "NotJson",
    "422": "InvalidBody",
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
    shed: bool = True,
) -> Json:
    """An operation. `body` names its request schema, and the components.examples entry (of the
    same name) that is its example; `ratelimited`: its answers carry the RateLimit-* headers,
    and it can answer 429; `shed`: it can answer 503 when the server is at capacity."""
    out: Json = {"summary": summary, "tags": [tag]}
    if params:
        out["parameters"] = params
    if body:
        out["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": ref(body), "examples": {body: example_ref(body)}}
            },
        }
    # copies: sections share response objects between operations
    all_responses = {code: copy.deepcopy(r) for code, r in responses.items()}
    common: dict[str, str] = dict(BODY_ERRORS) if body else {}
    if any(p["in"] in ("query", "header") for p in params or []):
        common.setdefault("422", "InvalidParameter")
    if ratelimited:
        common |= {"429": "RateLimited", "503": "Unavailable"}
    elif shed:
        common["503"] = "Overloaded"
    if auth:
        common["401"] = "Unauthorized"
    common.setdefault("422", "RequestIdRefused")  # any operation (server/chain.py)
    for code, name in common.items():
        if code not in all_responses:
            all_responses[code] = response_ref(name) if ratelimited else copy.deepcopy(COMMON[name])
    if ratelimited:  # every answer, errors included (components.responses carry them already)
        for r in all_responses.values():
            if "$ref" not in r:
                r.setdefault("headers", {}).update({h: header_ref(h) for h in RATELIMIT_HEADERS})
    out["security"] = [{"bearer": []}] if auth else []
    out["responses"] = dict(sorted(all_responses.items()))
    return out


# The schema every error answer shares; the document always has it.
PROBLEM_SCHEMAS: Json = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "required": ["type", "title", "status", "detail", "request_id"],
        "properties": {
            "type": {
                "type": "string",
                "description": "`/problems/<kind>`, e.g. /problems/validation",
            },
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "request_id": {"type": "string", "description": "The answer's X-Request-ID"},
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
    operation["responses"] = dict(sorted(operation["responses"].items()))


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


@dataclass(frozen=True)
class Section:
    """A domain's part of the document: its paths, and the components they refer to
    (`responses` are answers of rate-limited operations: document() adds the RateLimit-*
    headers to each)."""

    paths: Json
    schemas: Json
    examples: Json = field(default_factory=dict)
    responses: Json = field(default_factory=dict)


def _refs(node: Any, kind: str) -> set[str]:
    """The names of the components of `kind` ("responses", ...) that `node` refers to."""
    if isinstance(node, dict):
        target = node.get("$ref")
        prefix = f"#/components/{kind}/"
        found = (
            {target[len(prefix) :]}
            if isinstance(target, str) and target.startswith(prefix)
            else set()
        )
        return found.union(*(_refs(v, kind) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(v, kind) for v in node))
    return set()


def _merge(into: Json, part: Json, kind: str) -> None:
    for name in part:
        if name in into:
            raise ValueError(f"{kind} {name} defined twice")
    into.update(part)


def document(
    sections: Iterable[Section],
    operation_ids: Mapping[tuple[str, str], str],
    tags: Mapping[str, str],
) -> Json:
    """The OpenAPI document from each part, in order, each operation named by
    `operation_ids`, each tag described by `tags`; a component defined twice is a mistake and
    refused."""
    paths: Json = {}
    schemas: Json = dict(PROBLEM_SCHEMAS)
    examples: Json = {}
    responses: Json = {}
    for section in sections:
        _merge(schemas, section.schemas, "schema")
        _merge(examples, section.examples, "example")
        _merge(responses, section.responses, "response")
        for path, ops in section.paths.items():
            paths.setdefault(path, {}).update(ops)
    _name(paths, operation_ids)
    for ops in paths.values():
        for method, operation in ops.items():
            _conditional(method, operation)
    used = {
        tag for ops in paths.values() for operation in ops.values() for tag in operation["tags"]
    }
    if used != set(tags):
        raise ValueError(f"tags used {sorted(used)}, described {sorted(tags)}")
    _merge(
        responses,
        {name: COMMON[name] for name in _refs(paths, "responses") & set(COMMON)},
        "response",
    )
    limited = {name: with_headers(r, *RATELIMIT_HEADERS) for name, r in sorted(responses.items())}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Surge API",
            "version": version(),
            "license": {"name": "MIT", "identifier": "MIT"},
            "description": (
                "Multi-tenant JSON API. Errors are application/problem+json (RFC 9457); lists "
                "use keyset pagination (`limit`, `cursor` -> `next_cursor`); every /v1 response "
                "carries RateLimit-* headers. No string may hold U+0000 (NUL): 422. Any "
                "request whose X-Request-ID looks like a card number is refused: 422."
            ),
        },
        # Relative: the origin the document was fetched from (OpenAPI's own default, said
        # explicitly); PUBLIC_URL replaces it when the server is served (handlers/ops.py).
        "servers": [{"url": "/", "description": "The origin serving this document"}],
        "tags": [{"name": name, "description": text} for name, text in tags.items()],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": limited,
            "headers": {name: HEADERS[name] for name in sorted(_refs([paths, limited], "headers"))},
            "examples": dict(sorted(examples.items())),
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

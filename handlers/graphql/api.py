"""OpenAPI paths and schemas of the GraphQL section (the request schema documents the body;
routes.py checks it itself, to answer in the GraphQL error shape)."""

from __future__ import annotations

from server.openapi import (
    COMMON,
    EXAMPLE_OWNER_ID,
    EXAMPLE_USER_ID,
    Json,
    json_content,
    op,
    problem,
    ref,
    text_content,
    with_headers,
)

EXPLORER_EXAMPLE = '<!doctype html>\n<html lang="en">\n<title>Surge GraphQL explorer</title>\n...'
SDL_EXAMPLE = 'type Query {\n  """The caller"""\n  me: User!\n  ...\n}\n'


def _errors(message: str, code: str) -> Json:
    return {"errors": [{"message": message, "extensions": {"code": code}}]}


def _graphql(desc: str, example: Json) -> Json:
    return json_content(desc, ref("GraphQLResponse"), example)


def _refused(
    desc: str, graphql: Json, refused: Json, *, headers: tuple[str, ...] = ("Retry-After",)
) -> Json:
    """A refusal either shape can carry: the chain refuses before the query is read, as on
    every route (problem+json, its answer `refused`); GraphQL refuses inside the request, in the
    GraphQL shape (`graphql`, its example). Clients branch on the status first, then read
    whichever body came."""
    out = {
        "description": desc,
        "content": {
            "application/json": {"schema": ref("GraphQLResponse"), "example": graphql},
            "application/problem+json": refused["content"]["application/problem+json"],
        },
    }
    return with_headers(out, *headers) if headers else out


SCHEMAS: Json = {
    "GraphQLRequest": {
        "type": "object",
        "required": ["query"],
        "properties": {
            "query": {"type": "string", "minLength": 1, "description": "At most GRAPHQL_MAX_BYTES"},
            "variables": {"type": ["object", "null"], "additionalProperties": True},
            "operationName": {"type": ["string", "null"]},
            "extensions": {
                "type": ["object", "null"],
                "additionalProperties": True,
                "description": "Accepted and ignored",
            },
        },
        "additionalProperties": False,
    },
    "GraphQLResponse": {
        "type": "object",
        "description": "`data` when the query ran; `errors` for what failed or was refused",
        "properties": {
            "data": {"type": ["object", "null"], "additionalProperties": True},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["message", "extensions"],
                    "properties": {
                        "message": {"type": "string"},
                        "path": {
                            "type": "array",
                            "description": "The failing field: names, and list indices",
                            "items": {"type": ["string", "integer"]},
                        },
                        "locations": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["line", "column"],
                                "properties": {
                                    "line": {"type": "integer", "minimum": 1},
                                    "column": {"type": "integer", "minimum": 1},
                                },
                            },
                        },
                        "extensions": {
                            "type": "object",
                            "required": ["code"],
                            "properties": {
                                "code": {
                                    "type": "string",
                                    "enum": [
                                        "BAD_REQUEST",
                                        "GRAPHQL_PARSE_FAILED",
                                        "GRAPHQL_VALIDATION_FAILED",
                                        "BAD_USER_INPUT",
                                        "INTROSPECTION_DISABLED",
                                        "QUERY_TOO_LARGE",
                                        "QUERY_TOO_DEEP",
                                        "QUERY_TOO_COSTLY",
                                        "RATE_LIMITED",
                                        "NOT_FOUND",
                                        "SERVICE_UNAVAILABLE",
                                        "INTERNAL_SERVER_ERROR",
                                    ],
                                }
                            },
                        },
                    },
                },
            },
        },
    },
}

EXAMPLES: Json = {
    "GraphQLRequest": {
        "summary": "The caller and the tenant's first two users",
        "value": {
            "query": "query Team($first: Int) { me { id email } users(first: $first) "
            "{ edges { node { id username roles } } } }",
            "variables": {"first": 2},
            "operationName": "Team",
        },
    },
}

PATHS: Json = {
    "/graphql": {
        "post": op(
            "Run a read-only GraphQL query (me, user, users, orders, order); schema at "
            "/graphql/schema.graphql",
            "graphql",
            {
                "200": _graphql(
                    "Ran: `data`, plus `errors` for fields that failed (NOT_FOUND)",
                    {
                        "data": {
                            "me": {"id": EXAMPLE_OWNER_ID, "email": "ann@example.com"},
                            "users": {
                                "edges": [
                                    {
                                        "node": {
                                            "id": EXAMPLE_OWNER_ID,
                                            "username": "ann",
                                            "roles": ["owner", "member"],
                                        }
                                    },
                                    {
                                        "node": {
                                            "id": EXAMPLE_USER_ID,
                                            "username": "bob",
                                            "roles": ["admin", "member"],
                                        }
                                    },
                                ]
                            },
                        }
                    },
                ),
                "400": _graphql(
                    "Not JSON, a parse or validation error, or over GRAPHQL_MAX_DEPTH or "
                    "GRAPHQL_MAX_COST",
                    {
                        "errors": [
                            {
                                "message": "Cannot query field 'nope' on type 'Query'.",
                                "locations": [{"line": 1, "column": 3}],
                                "extensions": {"code": "GRAPHQL_VALIDATION_FAILED"},
                            }
                        ]
                    },
                ),
                "413": _refused(
                    "The query is larger than GRAPHQL_MAX_BYTES (a GraphQL response), or the body"
                    " larger than MAX_BODY_BYTES (problem+json)",
                    _errors("the query is larger than 16384 bytes", "QUERY_TOO_LARGE"),
                    COMMON["BodyTooLarge"],
                    headers=(),
                ),
                "415": _refused(
                    "The body is not application/json (a GraphQL response), or has a "
                    "Content-Encoding (problem+json)",
                    _errors("send the query as application/json", "BAD_REQUEST"),
                    problem(
                        415,
                        "A Content-Encoding",
                        "this operation takes no Content-Encoding; send the body as it is",
                    ),
                    headers=("Accept-Encoding",),
                ),
                "422": _refused(
                    "The body is not {query, variables?, operationName?}, or a variable or"
                    " argument value is refused (BAD_USER_INPUT): a GraphQL response; an"
                    " X-Request-ID that looks like a card number, as on any operation:"
                    " problem+json",
                    _errors("`query` must be a non-empty string", "BAD_REQUEST"),
                    COMMON["RequestIdRefused"],
                    headers=(),
                ),
                "429": _refused(
                    "Rate limited; see Retry-After. problem+json when the caller's bucket is "
                    "empty; a GraphQL response (RATE_LIMITED) when the query's cost is more than "
                    "the bucket holds now",
                    _errors(
                        "this query costs 52 of your rate limit; retry after Retry-After",
                        "RATE_LIMITED",
                    ),
                    COMMON["RateLimited"],
                ),
                "503": _refused(
                    "Overloaded (problem+json) or the database is busy (a GraphQL response, "
                    "SERVICE_UNAVAILABLE); see Retry-After",
                    {
                        "data": None,
                        "errors": [
                            {
                                "message": "the database is busy; retry shortly",
                                "path": ["users"],
                                "extensions": {"code": "SERVICE_UNAVAILABLE"},
                            }
                        ],
                    },
                    COMMON["Unavailable"],
                ),
            },
            body="GraphQLRequest",
        ),
        "get": op(
            "The GraphQL explorer: a self-contained page to run queries with a token",
            "graphql",
            {"200": text_content("HTML", "text/html", EXPLORER_EXAMPLE)},
            auth=False,
            ratelimited=False,
        ),
    },
    "/graphql/schema.graphql": {
        "get": op(
            "The GraphQL schema (SDL)",
            "graphql",
            {
                "200": text_content("SDL", "text/plain", SDL_EXAMPLE),
                "404": problem(
                    404,
                    "Introspection is disabled (GRAPHQL_INTROSPECTION=false)",
                    "schema (introspection is disabled on this server) not found",
                ),
            },
            auth=False,
            ratelimited=False,
        )
    },
}

"""OpenAPI paths and schemas of the GraphQL section (the request schema documents the body;
routes.py checks it itself, to answer in the GraphQL error shape)."""

from __future__ import annotations

from server.openapi import Json, json_content, op, problem, ref


def _graphql(desc: str) -> Json:
    return json_content(desc, ref("GraphQLResponse"))


def _refused(desc: str, *, retry_after: bool = True) -> Json:
    """A refusal either shape can carry: the chain refuses before the query is read, as on
    every route (problem+json); GraphQL refuses inside the request, in the GraphQL shape.
    Clients branch on the status first, then read whichever body came."""
    headers = {"Retry-After": {"schema": {"type": "integer"}, "required": True}}
    return {
        "description": desc,
        **({"headers": headers} if retry_after else {}),
        "content": {
            "application/json": {"schema": ref("GraphQLResponse")},
            "application/problem+json": {"schema": ref("Problem")},
        },
    }


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

PATHS: Json = {
    "/graphql": {
        "post": op(
            "Run a read-only GraphQL query (me, user, users, orders, order); schema at "
            "/graphql/schema.graphql",
            "graphql",
            {
                "200": _graphql("Ran: `data`, plus `errors` for fields that failed (NOT_FOUND)"),
                "400": _graphql(
                    "Not JSON, a parse or validation error, or over GRAPHQL_MAX_DEPTH or "
                    "GRAPHQL_MAX_COST"
                ),
                "413": _graphql("The query is larger than GRAPHQL_MAX_BYTES"),
                "415": _refused(
                    "The body is not application/json (a GraphQL response), or has a "
                    "Content-Encoding (problem+json)",
                    retry_after=False,
                ),
                "422": _graphql(
                    "The body is not {query, variables?, operationName?}, or a "
                    "variable or argument value is refused (BAD_USER_INPUT)"
                ),
                "429": _refused(
                    "Rate limited; see Retry-After. problem+json when the caller's bucket is "
                    "empty; a GraphQL response (RATE_LIMITED) when the query's cost is more than "
                    "the bucket holds now"
                ),
                "503": _refused(
                    "Overloaded (problem+json) or the database is busy (a GraphQL response, "
                    "SERVICE_UNAVAILABLE); see Retry-After"
                ),
            },
            body="GraphQLRequest",
        ),
        "get": op(
            "The GraphQL explorer: a self-contained page to run queries with a token",
            "graphql",
            {
                "200": {
                    "description": "HTML",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                }
            },
            auth=False,
            ratelimited=False,
        ),
    },
    "/graphql/schema.graphql": {
        "get": op(
            "The GraphQL schema (SDL)",
            "graphql",
            {
                "200": {
                    "description": "SDL",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "404": problem("Introspection is disabled (GRAPHQL_INTROSPECTION=false)"),
            },
            auth=False,
            ratelimited=False,
        )
    },
}

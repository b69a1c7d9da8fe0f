"""POST /graphql (read-only queries), GET /graphql (the explorer page), GET
/graphql/schema.graphql (the SDL). The checks, the rate-limit charge and the execution are in
service.py; a refusal is GraphQL-shaped (`errors[].message`, `extensions.code`), not
problem+json, so that GraphQL clients read it."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from graphql import print_schema

from handlers.graphql import service
from handlers.graphql.schema import SCHEMA
from handlers.graphql.service import GraphQLRequest, Refused, refusal
from server import rbac
from server.errors import NotFound, ValidationFailed
from server.http import JSON, json_response
from server.keys import CONFIG, LIMITER, RATELIMIT_HEADERS, REQUEST_ID
from server.replica import read_pool
from server.validation import screen

# A small explorer, hand-written and self-contained (no CDN, no other asset): paste an access
# token, write a query, run it, read the schema beside it.
PAGE = (Path(__file__).parent / "explorer.html").read_text(encoding="utf-8")

_BODY_KEYS = frozenset({"query", "variables", "operationName", "extensions"})


async def graphql_post(request: web.Request) -> web.Response:
    caller = rbac.caller(request)
    try:
        query = await _graphql_request(request)
        answer = await service.run_query(
            query,
            caller,
            pg=await read_pool(request, caller.tenant_id),
            limiter=request.app[LIMITER],
            config=request.app[CONFIG],
            limits=request.get(RATELIMIT_HEADERS),
            request_id=request.get(REQUEST_ID, ""),
        )
    except Refused as exc:
        answer = exc.answer
    return json_response(answer.body, answer.status, answer.headers)


async def _graphql_request(request: web.Request) -> GraphQLRequest:
    """The body as {query, variables?, operationName?, extensions?}, or Refused."""
    if request.content_type != JSON:
        raise refusal(415, "send the query as application/json", "BAD_REQUEST")
    raw = await request.read()
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise refusal(400, "the body is not valid JSON", "BAD_REQUEST") from None
    try:  # too deep, card data, NUL: as every body, told the GraphQL way
        screen(body, raw)
    except ValidationFailed as exc:
        [error] = exc.errors or [{"field": "", "message": exc.detail}]
        message = f"{error['field']}: {error['message']}" if error["field"] else error["message"]
        raise refusal(422, message, "BAD_USER_INPUT") from None
    if not isinstance(body, dict):
        raise refusal(422, "the body must be a JSON object with a `query`", "BAD_REQUEST")
    unknown = sorted(set(body) - _BODY_KEYS)
    if unknown:
        raise refusal(
            422,
            f"unknown field {unknown[0]!r}: the body has query, variables, operationName",
            "BAD_REQUEST",
        )
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise refusal(422, "`query` must be a non-empty string", "BAD_REQUEST")
    variables = body.get("variables")
    if variables is None:
        variables = {}
    elif not isinstance(variables, dict):
        raise refusal(422, "`variables` must be a JSON object", "BAD_REQUEST")
    name = body.get("operationName")
    if name is not None and not isinstance(name, str):
        raise refusal(422, "`operationName` must be a string", "BAD_REQUEST")
    return GraphQLRequest(query, variables, name or None)


@cache
def sdl() -> str:
    return print_schema(SCHEMA) + "\n"


async def graphql_schema(request: web.Request) -> web.Response:
    if not request.app[CONFIG].graphql_introspection:
        raise NotFound("schema (introspection is disabled on this server)")
    return web.Response(text=sdl(), content_type="text/plain", charset="utf-8")


async def graphql_explorer(request: web.Request) -> web.Response:
    return web.Response(
        text=PAGE,
        content_type="text/html",
        charset="utf-8",
        headers={
            # Everything the page needs is in it: no CDN, no other origin.
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
        },
    )

"""POST /graphql (read-only queries), GET /graphql (the explorer page), GET
/graphql/schema.graphql (the SDL).

A request goes: JSON body -> document size -> parse + validate (cached per document text) ->
variables -> depth, cost and argument ranges (graphql_schema.measure) -> the rest of the cost
taken from the caller's rate-limit bucket (the middleware took 1, as for any /v1 call) ->
execution with per-request loaders. Everything refused on the way is a GraphQL-shaped error
(`errors[].message`, `extensions.code`) with a 4xx status; an executed query answers 200, with
`errors` beside `data` for fields that failed (NOT_FOUND for another tenant's id).
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from functools import cache
from typing import Any

import orjson
from aiohttp import web
from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    GraphQLError,
    OperationDefinitionNode,
    OperationType,
    ValidationRule,
    execute,
    parse,
    print_schema,
    specified_rules,
    validate,
)
from graphql.execution.values import get_variable_values

from db.pool import PoolTimeout
from handlers.graphql.explorer import PAGE
from handlers.graphql.loaders import Loaders
from handlers.graphql.schema import SCHEMA, Context, QueryRefused, measure
from server import metrics, rbac
from server.errors import NotFound
from server.keys import CONFIG, LIMITER, PG_READ, RATELIMIT_HEADERS

log = logging.getLogger("surge.graphql")

JSON = "application/json"


class _NoIntrospection(ValidationRule):
    def enter_field(self, node: FieldNode, *_args: Any) -> None:
        if node.name.value in ("__schema", "__type"):
            self.report_error(
                GraphQLError(
                    "introspection is disabled on this server",
                    node,
                    extensions={"code": "INTROSPECTION_DISABLED"},
                )
            )


class _Documents:
    """Parsed and validated documents by their text: a client sends the same few queries again
    and again, and parse + validate cost more than executing a small one."""

    SIZE = 256  # documents of at most GRAPHQL_MAX_BYTES each: a few MB of AST at worst

    def __init__(self) -> None:
        self._cache: OrderedDict[tuple[str, bool], DocumentNode | list[dict[str, Any]]] = (
            OrderedDict()
        )

    def get(self, query: str, introspection: bool) -> DocumentNode | list[dict[str, Any]]:
        key = (query, introspection)
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        found = self._compile(query, introspection)
        self._cache[key] = found
        if len(self._cache) > self.SIZE:
            self._cache.popitem(last=False)
        return found

    @staticmethod
    def _compile(query: str, introspection: bool) -> DocumentNode | list[dict[str, Any]]:
        try:
            document = parse(query)
        except GraphQLError as exc:
            return [_formatted(exc, "GRAPHQL_PARSE_FAILED")]
        rules = list(specified_rules) if introspection else [*specified_rules, _NoIntrospection]
        errors = validate(SCHEMA, document, rules, hide_suggestions=not introspection)
        if errors:
            return [_formatted(e, "GRAPHQL_VALIDATION_FAILED") for e in errors]
        return document


DOCUMENTS = _Documents()


def _formatted(error: GraphQLError, code: str) -> dict[str, Any]:
    out: dict[str, Any] = dict(error.formatted)
    ext = dict(out.get("extensions") or {})
    ext.setdefault("code", code)
    out["extensions"] = ext
    return out


def _refusal(
    status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> web.Response:
    return _errors(status, [{"message": message, "extensions": {"code": code}}], headers)


def _errors(
    status: int, errors: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> web.Response:
    body = orjson.dumps({"errors": errors})
    return web.Response(body=body, status=status, content_type=JSON, headers=headers)


def _operation(document: DocumentNode, name: str | None) -> OperationDefinitionNode | str:
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if name is None:
        if len(operations) != 1:
            return "the document has several operations: name one in operationName"
        return operations[0]
    for op in operations:
        if op.name is not None and op.name.value == name:
            return op
    return f"the document has no operation named {name!r}"


_BODY_KEYS = frozenset({"query", "variables", "operationName", "extensions"})


def _request_fields(body: Any) -> tuple[str, dict[str, Any], str | None] | str:
    if not isinstance(body, dict):
        return "the body must be a JSON object with a `query`"
    unknown = sorted(set(body) - _BODY_KEYS)
    if unknown:
        return f"unknown field {unknown[0]!r}: the body has query, variables, operationName"
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        return "`query` must be a non-empty string"
    variables = body.get("variables")
    if variables is None:
        variables = {}
    elif not isinstance(variables, dict):
        return "`variables` must be a JSON object"
    name = body.get("operationName")
    if name is not None and not isinstance(name, str):
        return "`operationName` must be a string"
    return query, variables, name or None


async def graphql_post(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    config = request.app[CONFIG]
    if request.content_type != JSON:
        return _refusal(415, "send the query as application/json", "BAD_REQUEST")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _refusal(400, "the body is not valid JSON", "BAD_REQUEST")
    fields = _request_fields(body)
    if isinstance(fields, str):
        return _refusal(422, fields, "BAD_REQUEST")
    query, raw_variables, operation_name = fields
    if len(query) > config.graphql_max_bytes or len(query.encode()) > config.graphql_max_bytes:
        return _refusal(
            413,
            f"the query is larger than {config.graphql_max_bytes} bytes",
            "QUERY_TOO_LARGE",
        )
    introspection = config.graphql_introspection
    try:
        compiled = DOCUMENTS.get(query, introspection)
    except RecursionError:  # a pathologically nested document
        return _refusal(400, "the query is nested too deeply to parse", "QUERY_TOO_DEEP")
    if isinstance(compiled, list):
        return _errors(400, compiled)
    operation = _operation(compiled, operation_name)
    if isinstance(operation, str):
        return _refusal(422, operation, "BAD_REQUEST")
    if operation.operation is not OperationType.QUERY:  # validation already refuses these
        return _refusal(400, "only queries are served here", "BAD_REQUEST")
    coerced = get_variable_values(
        SCHEMA,
        operation.variable_definitions or (),
        raw_variables,
        max_errors=20,
        hide_suggestions=not introspection,
    )
    if isinstance(coerced, list):
        return _errors(422, [_formatted(e, "BAD_USER_INPUT") for e in coerced])
    fragments = {
        d.name.value: d for d in compiled.definitions if isinstance(d, FragmentDefinitionNode)
    }
    try:
        size = measure(SCHEMA, operation, fragments, coerced, config.graphql_max_depth)
    except QueryRefused as exc:
        return _refusal(422 if exc.code == "BAD_USER_INPUT" else 400, exc.message, exc.code)
    except GraphQLError as exc:  # an argument that does not coerce
        return _errors(422, [_formatted(exc, "BAD_USER_INPUT")])
    if size.cost > config.graphql_max_cost:
        return _refusal(
            400,
            f"the query may return {size.cost} nodes, more than {config.graphql_max_cost}: "
            "ask for fewer (lower `first`)",
            "QUERY_TOO_COSTLY",
        )
    if size.cost > 1:
        # The middleware took 1 token, as for any call; take the rest now. A cost above the
        # burst runs from a full bucket and leaves it in debt (server/ratelimit.py).
        burst = config.rate_limit_burst
        decision = await request.app[LIMITER].take(
            f"u:{p.user_id}",  # the middleware's key for an authenticated caller
            config.rate_limit_rate,
            burst,
            cost=size.cost - 1,
            need=min(size.cost, burst) - 1,
        )
        limits = request.get(RATELIMIT_HEADERS)
        if limits is not None:  # the middleware adds these to the response: keep them current
            limits.update(decision.headers())
        if not decision.allowed:
            metrics.RATELIMITED.labels("graphql").inc()
            return _refusal(
                429,
                f"this query costs {size.cost} of your rate limit; retry after Retry-After",
                "RATE_LIMITED",
                {"Retry-After": str(decision.retry_after_s)},
            )
    context = Context(
        request.app[PG_READ], p.tenant_id, p.user_id, Loaders(request.app[PG_READ], p.tenant_id)
    )
    result = execute(
        SCHEMA,
        compiled,
        context_value=context,
        variable_values=raw_variables,
        operation_name=operation_name,
        hide_suggestions=not introspection,
    )
    if inspect.isawaitable(result):
        result = await result
    out: dict[str, Any] = {"data": result.data}
    status = 200
    headers: dict[str, str] = {}
    if result.errors:
        errors = []
        for error in result.errors:
            original = error.original_error
            if original is None or isinstance(original, GraphQLError):
                errors.append(_formatted(error, "INTERNAL_SERVER_ERROR"))
                continue
            entry: dict[str, Any] = {"message": "an internal error occurred", "path": error.path}
            if isinstance(original, PoolTimeout):
                metrics.POOL_TIMEOUTS.inc()
                entry["message"] = "the database is busy; retry shortly"
                entry["extensions"] = {"code": "SERVICE_UNAVAILABLE"}
                status, headers = 503, {"Retry-After": "1"}
            else:
                log.error("graphql resolver failed", exc_info=original)
                entry["extensions"] = {"code": "INTERNAL_SERVER_ERROR"}
            errors.append(entry)
        out["errors"] = errors
    return web.Response(body=orjson.dumps(out), status=status, content_type=JSON, headers=headers)


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

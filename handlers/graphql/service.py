"""Running one GraphQL request: document size -> parse + validate (cached per document text) ->
the operation -> variables -> depth, cost and argument ranges (schema.measure) -> the rest of the
cost taken from the caller's rate-limit bucket (the chain took 1, as for any /v1 call) ->
execution with per-request loaders.

Everything refused on the way raises `Refused`: GraphQL-shaped errors (`errors[].message`,
`extensions.code`) with a 4xx status. An executed query answers 200, with `errors` beside `data`
for fields that failed (NOT_FOUND for another tenant's id); a resolver's own exception is told
through the project's one problem table (server/problems.py): 503 SERVICE_UNAVAILABLE with its
Retry-After, anything else INTERNAL_SERVER_ERROR.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from graphql import (
    DocumentNode,
    ExecutionResult,
    FieldNode,
    FragmentDefinitionNode,
    GraphQLError,
    OperationDefinitionNode,
    OperationType,
    ValidationRule,
    execute,
    parse,
    specified_rules,
    validate,
)
from graphql.execution.values import get_variable_values

from db.pool import Database
from handlers.graphql.loaders import Loaders
from handlers.graphql.schema import SCHEMA, Context, QueryRefused, measure
from server import metrics
from server.config import Config
from server.principal import Principal
from server.problems import Problem, problem_of
from server.ratelimit import Limiter


@dataclass(frozen=True, slots=True)
class GraphQLRequest:
    query: str
    variables: dict[str, Any]
    operation_name: str | None


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict[str, Any]
    headers: Mapping[str, str] | None = field(default=None)


class Refused(Exception):
    """A request refused before it ran."""

    def __init__(
        self, status: int, errors: list[dict[str, Any]], headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(status)
        self.answer = Answer(status, {"errors": errors}, headers)


def refusal(
    status: int, message: str, code: str, headers: Mapping[str, str] | None = None
) -> Refused:
    return Refused(status, [{"message": message, "extensions": {"code": code}}], headers)


def formatted(error: GraphQLError, code: str) -> dict[str, Any]:
    """graphql-core's rendering of `error`, with `code` unless it carries its own."""
    out: dict[str, Any] = dict(error.formatted)
    ext = dict(out.get("extensions") or {})
    ext.setdefault("code", code)
    out["extensions"] = ext
    return out


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
        """The document, or the errors that refuse it."""
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
            return [formatted(exc, "GRAPHQL_PARSE_FAILED")]
        rules = list(specified_rules) if introspection else [*specified_rules, _NoIntrospection]
        errors = validate(SCHEMA, document, rules, hide_suggestions=not introspection)
        if errors:
            return [formatted(e, "GRAPHQL_VALIDATION_FAILED") for e in errors]
        return document


DOCUMENTS = _Documents()


async def run_query(
    request: GraphQLRequest,
    caller: Principal,
    *,
    pg: Database,
    limiter: Limiter,
    config: Config,
    limits: dict[str, str] | None,
    request_id: str,
) -> Answer:
    """Check, charge and execute one query for `caller`. `limits` are the RateLimit-* headers
    the chain adds to the response: the extra charge keeps them current."""
    document = _document(request.query, config)
    operation = _operation(document, request.operation_name)
    cost = _cost(document, operation, request.variables, config)
    await _charge(limiter, caller.rate_key, cost, config, limits)
    context = Context(pg, caller.tenant_id, caller.user_id, Loaders(pg, caller.tenant_id))
    result = execute(
        SCHEMA,
        document,
        context_value=context,
        variable_values=request.variables,
        operation_name=request.operation_name,
        hide_suggestions=not config.graphql_introspection,
    )
    if inspect.isawaitable(result):
        result = await result
    return _executed(result, config.max_body_bytes, request_id)


def _document(query: str, config: Config) -> DocumentNode:
    limit = config.graphql_max_bytes
    if len(query) > limit or len(query.encode()) > limit:
        raise refusal(413, f"the query is larger than {limit} bytes", "QUERY_TOO_LARGE")
    try:
        compiled = DOCUMENTS.get(query, config.graphql_introspection)
    except RecursionError:  # a pathologically nested document
        raise refusal(400, "the query is nested too deeply to parse", "QUERY_TOO_DEEP") from None
    if isinstance(compiled, list):
        raise Refused(400, compiled)
    return compiled


def _operation(document: DocumentNode, name: str | None) -> OperationDefinitionNode:
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if name is None:
        if len(operations) != 1:
            raise refusal(
                422, "the document has several operations: name one in operationName", "BAD_REQUEST"
            )
        found = operations[0]
    else:
        named = [op for op in operations if op.name is not None and op.name.value == name]
        if not named:
            raise refusal(422, f"the document has no operation named {name!r}", "BAD_REQUEST")
        found = named[0]
    if found.operation is not OperationType.QUERY:  # validation already refuses these
        raise refusal(400, "only queries are served here", "BAD_REQUEST")
    return found


def _cost(
    document: DocumentNode,
    operation: OperationDefinitionNode,
    variables: dict[str, Any],
    config: Config,
) -> int:
    """The most nodes the operation can return, refusing it over GRAPHQL_MAX_DEPTH or
    GRAPHQL_MAX_COST or with a variable or argument out of range."""
    coerced = get_variable_values(
        SCHEMA,
        operation.variable_definitions or (),
        variables,
        max_errors=20,
        hide_suggestions=not config.graphql_introspection,
    )
    if isinstance(coerced, list):
        raise Refused(422, [formatted(e, "BAD_USER_INPUT") for e in coerced])
    fragments = {
        d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
    }
    try:
        size = measure(SCHEMA, operation, fragments, coerced, config.graphql_max_depth)
    except QueryRefused as exc:
        raise refusal(422 if exc.code == "BAD_USER_INPUT" else 400, exc.message, exc.code) from None
    except GraphQLError as exc:  # an argument that does not coerce
        raise Refused(422, [formatted(exc, "BAD_USER_INPUT")]) from None
    if size.cost > config.graphql_max_cost:
        raise refusal(
            400,
            f"the query may return {size.cost} nodes, more than {config.graphql_max_cost}: "
            "ask for fewer (lower `first`)",
            "QUERY_TOO_COSTLY",
        )
    return size.cost


async def _charge(
    limiter: Limiter, key: str, cost: int, config: Config, limits: dict[str, str] | None
) -> None:
    """Take the rest of the cost from the bucket the chain took 1 token from. A cost above the
    burst runs from a full bucket and leaves it in debt (server/ratelimit.py)."""
    if cost <= 1:
        return
    burst = config.rate_limit_burst
    decision = await limiter.take(
        key, config.rate_limit_rate, burst, cost=cost - 1, need=min(cost, burst) - 1
    )
    if limits is not None:
        limits.update(decision.headers())
    if not decision.allowed:
        metrics.RATELIMITED.labels("graphql").inc()
        raise refusal(
            429,
            f"this query costs {cost} of your rate limit; retry after Retry-After",
            "RATE_LIMITED",
            {"Retry-After": str(decision.retry_after_s)},
        )


def _executed(result: ExecutionResult, max_body_bytes: int, request_id: str) -> Answer:
    body: dict[str, Any] = {"data": result.data}
    if not result.errors:
        return Answer(200, body)
    status, headers, errors = 200, None, []
    for error in result.errors:
        entry, unavailable = _field_error(error, max_body_bytes, request_id)
        if unavailable is not None:
            status, headers = unavailable.status, unavailable.headers
        errors.append(entry)
    body["errors"] = errors
    return Answer(status, body, headers)


def _field_error(
    error: GraphQLError, max_body_bytes: int, request_id: str
) -> tuple[dict[str, Any], Problem | None]:
    """What the client reads of a field's error, and the problem when it is a 503 (the whole
    answer then is a 503 with its Retry-After)."""
    original = error.original_error
    if original is None or isinstance(original, GraphQLError):
        return formatted(error, "INTERNAL_SERVER_ERROR"), None
    problem = problem_of(original, max_body_bytes=max_body_bytes, request_id=request_id)
    if problem.status == 503:
        code, message = "SERVICE_UNAVAILABLE", problem.detail
    else:
        code, message = "INTERNAL_SERVER_ERROR", "an internal error occurred"
    entry = {"message": message, "path": error.path, "extensions": {"code": code}}
    return entry, problem if problem.status == 503 else None

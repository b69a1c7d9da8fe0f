"""The one table from an exception to its problem+json answer (RFC 9457).

The chain renders every exception a handler raises through `problem_for`; the GraphQL layer
reads the same table through `problem_of` for the errors of its resolvers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg
from aiohttp import web

from db.pool import PoolTimeout, unavailable
from server import metrics
from server.errors import ApiError, problem_response
from server.keys import CONFIG, RATELIMIT_HEADERS

log = logging.getLogger("surge")

# Unique constraints whose violation is a client's 409, with what to tell the client.
CONSTRAINT_DETAILS = {
    "users_tenant_email_key": "a user with this email already exists in this tenant",
    "products_tenant_sku_key": "a product with this sku already exists in this tenant",
}

_HTTP_DETAILS = {
    404: "no such route",
    405: "method not allowed on this route",
}


@dataclass(frozen=True, slots=True)
class Problem:
    status: int
    detail: str
    slug: str | None = None
    title: str | None = None
    headers: Mapping[str, str] | None = None
    errors: list[dict[str, str]] | None = None


def problem_of(exc: Exception, *, max_body_bytes: int, request_id: str = "") -> Problem:
    """What a client is told about `exc`. An unexpected exception is logged here, once, and
    told as a 500 with no detail of its own."""
    if isinstance(exc, ApiError):
        return Problem(exc.status, exc.detail, exc.slug, exc.title, exc.headers, exc.errors)
    if isinstance(exc, web.HTTPException):
        detail = _HTTP_DETAILS.get(exc.status) or exc.reason
        if exc.status == 413:
            detail = f"the request body is larger than {max_body_bytes} bytes"
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        return Problem(exc.status, detail, headers=headers)
    if isinstance(exc, asyncpg.UniqueViolationError):
        detail = CONSTRAINT_DETAILS.get(exc.constraint_name or "", "the resource already exists")
        return Problem(409, detail, "conflict")
    if isinstance(
        exc, asyncpg.ForeignKeyViolationError | asyncpg.CheckViolationError | asyncpg.DataError
    ):
        log.warning("constraint refused a write", exc_info=exc)
        return Problem(
            422,
            "the request conflicts with the data's constraints",
            "validation",
            "Unprocessable Content",
            errors=[{"field": "", "message": "a value was refused by the database"}],
        )
    if isinstance(exc, PoolTimeout):
        metrics.POOL_TIMEOUTS.inc()
        return Problem(
            503, "the database is busy; retry shortly", "overloaded", headers={"Retry-After": "1"}
        )
    if unavailable(exc):
        # PostgreSQL unreachable or the connection lost mid-request: one line, no traceback;
        # the pool has replaced the connection by the time the client retries.
        metrics.DB_UNAVAILABLE.inc()
        log.warning(
            "database unavailable: %s: %s",
            type(exc).__name__,
            exc,
            extra={"request_id": request_id},
        )
        return Problem(
            503,
            "the database could not be reached; retry shortly",
            "unavailable",
            headers={"Retry-After": "1"},
        )
    log.error("unhandled error", exc_info=exc, extra={"request_id": request_id})
    return Problem(500, "an internal error occurred")


def problem_for(request: web.Request, exc: Exception, rid: str) -> web.Response:
    """`exc` as the problem+json answer to `request`, with its RateLimit-* headers if any."""
    if isinstance(exc, web.HTTPException) and exc.status < 400:
        raise exc  # a redirect is an answer, not a problem
    p = problem_of(exc, max_body_bytes=request.app[CONFIG].max_body_bytes, request_id=rid)
    resp = problem_response(
        p.status, p.detail, rid, headers=p.headers, slug=p.slug, title=p.title, errors=p.errors
    )
    limits = request.get(RATELIMIT_HEADERS)
    if limits:
        resp.headers.update(limits)
    return resp

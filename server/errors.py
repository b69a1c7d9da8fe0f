"""The domain errors handlers raise, and the one function that renders problem+json (RFC 9457)."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

PROBLEM_JSON = "application/problem+json"


class ApiError(Exception):
    """An error with an HTTP status; the errors middleware renders it as problem+json."""

    status = 500
    slug = "internal"
    title = "Internal Server Error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        errors: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers: dict[str, str] = dict(headers or {})
        self.errors = errors


class BadRequest(ApiError):
    status, slug, title = 400, "bad-request", "Bad Request"


class PayloadTooLarge(ApiError):
    status, slug, title = 413, "payload-too-large", "Content Too Large"


class UnsupportedMediaType(ApiError):
    status, slug, title = 415, "unsupported-media-type", "Unsupported Media Type"


class Unauthorized(ApiError):
    status, slug, title = 401, "unauthorized", "Unauthorized"

    def __init__(self, detail: str | None = None, error: str = "invalid_token") -> None:
        challenge = f'Bearer realm="surge", error="{error}"' if error else 'Bearer realm="surge"'
        super().__init__(detail, headers={"WWW-Authenticate": challenge})


class Forbidden(ApiError):
    status, slug, title = 403, "forbidden", "Forbidden"


class NotFound(ApiError):
    status, slug, title = 404, "not-found", "Not Found"

    def __init__(self, what: str = "resource") -> None:
        super().__init__(f"{what} not found")


class Conflict(ApiError):
    status, slug, title = 409, "conflict", "Conflict"


class PreconditionFailed(ApiError):
    status, slug, title = 412, "precondition-failed", "Precondition Failed"


class PreconditionRequired(ApiError):
    status, slug, title = 428, "precondition-required", "Precondition Required"


class ValidationFailed(ApiError):
    status, slug, title = 422, "validation", "Unprocessable Content"

    def __init__(self, errors: list[dict[str, str]], detail: str | None = None) -> None:
        super().__init__(detail or "the request body is not valid", errors=errors)


class TooManyRequests(ApiError):
    status, slug, title = 429, "rate-limited", "Too Many Requests"


class ServiceUnavailable(ApiError):
    status, slug, title = 503, "unavailable", "Service Unavailable"

    def __init__(self, detail: str | None = None, retry_after: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


# aiohttp's own HTTPExceptions (404 from the router, 405, 413 from the body reader) keep their
# status; these slugs name them.
_SLUGS = {
    400: "bad-request",
    404: "not-found",
    405: "method-not-allowed",
    413: "payload-too-large",
    415: "unsupported-media-type",
    429: "rate-limited",
    503: "unavailable",
}


def problem_body(
    status: int,
    detail: str,
    request_id: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    errors: list[dict[str, str]] | None = None,
) -> bytes:
    body: dict[str, Any] = {
        "type": f"/problems/{slug or _SLUGS.get(status, 'error')}",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "request_id": request_id,
    }
    if errors is not None:
        body["errors"] = errors
    return orjson.dumps(body)


def problem_response(
    status: int,
    detail: str,
    request_id: str,
    *,
    headers: Mapping[str, str] | None = None,
    slug: str | None = None,
    title: str | None = None,
    errors: list[dict[str, str]] | None = None,
) -> web.Response:
    resp = web.Response(
        body=problem_body(status, detail, request_id, slug=slug, title=title, errors=errors),
        status=status,
        content_type=PROBLEM_JSON,
    )
    if headers:
        resp.headers.update(headers)
    return resp

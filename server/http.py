"""The HTTP edge every handler shares: JSON responses, ETags, pagination cursors, query params."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import hdrs, web

from db.ids import parse_uuid
from server.errors import NotFound, PreconditionFailed, PreconditionRequired, ValidationFailed

JSON = "application/json"
ETAG = hdrs.ETAG


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON, headers=headers)


def raw_json_response(
    body: bytes, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(body=body, status=status, content_type=JSON, headers=headers)


def timestamp(dt: datetime) -> str:
    """RFC 3339 UTC with milliseconds: 2026-11-21T10:00:00.123Z."""
    # orjson formats the instant in C, as "2026-11-21T10:00:00.123456Z" (or without the
    # fraction when it is zero); isoformat() asks the tzinfo for its offset in Python.
    # asyncpg hands timestamptz over in UTC already: converting again would only copy it.
    if dt.tzinfo is not UTC:
        dt = dt.astimezone(UTC)
    text = orjson.dumps(dt, option=orjson.OPT_UTC_Z)
    if len(text) == 22:  # '"YYYY-MM-DDTHH:MM:SSZ"'
        return text[1:20].decode() + ".000Z"
    return text[1:24].decode() + "Z"


def etag(version: int) -> str:
    return f'"{version}"'


def none_match(condition: str, current: str) -> bool:
    """Whether an If-None-Match value names `current` (an ETag): `*`, or a comma-separated
    list of entity tags compared weakly (RFC 9110 13.1.2: W/"1" matches "1")."""
    condition = condition.strip(" \t")
    if condition == "*":
        return True
    opaque = current[2:] if current.startswith("W/") else current
    for tag in condition.split(","):  # our tags are digits: a comma inside one never matches
        tag = tag.strip(" \t")
        if (tag[2:] if tag.startswith("W/") else tag) == opaque:
            return True
    return False


def not_modified(resp: web.StreamResponse, condition: str) -> web.StreamResponse:
    """`resp` itself, or 304 without a body when it is a 200 whose ETag `condition` (the
    request's If-None-Match) names. The 304 repeats the ETag; the chain's outer layers add
    what every answer carries (RateLimit-*, X-Request-ID, Cache-Control)."""
    if resp.status != 200 or resp.prepared:
        return resp
    current = resp.headers.get(ETAG)
    if current is None or not none_match(condition, current):
        return resp
    return web.Response(status=304, headers={ETAG: current})


def if_match(request: web.Request) -> int | None:
    """The version a PATCH may change: 428 without If-Match (or with an empty one, which names
    no ETag), 412 when it names none we could hold, None for `*` (any version)."""
    # Only HTTP's own whitespace (OWS: space, tab) is trimmed; str.strip() would also eat
    # characters such as \x1f that the document's pattern counts as a value.
    raw = request.headers.get("If-Match", "").strip(" \t")
    if not raw:
        raise PreconditionRequired("this request needs an If-Match header with the ETag you read")
    if raw == "*":
        return None
    if raw.startswith("W/"):
        raw = raw[2:]
    value = raw.strip('"')
    if not (value.isascii() and value.isdigit()) or len(value) > 9:
        raise PreconditionFailed("If-Match does not match the current ETag")
    return int(value)


def path_uuid(request: web.Request, name: str, what: str) -> uuid.UUID:
    """A UUID from the path; anything else cannot name a resource, so it is a 404."""
    value = parse_uuid(request.match_info[name])
    if value is None:
        raise NotFound(what)
    return value


# Lists: ?limit= from 1 to MAX_PAGE_SIZE, DEFAULT_PAGE_SIZE when absent (GraphQL's `first` too).
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


def query_limit(
    request: web.Request, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE
) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 4 or not 1 <= int(raw) <= maximum:
        raise ValidationFailed(
            [{"field": "limit", "message": f"must be an integer from 1 to {maximum}"}],
            "invalid query parameter",
        )
    return int(raw)


def encode_cursor(last_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(last_id.bytes).rstrip(b"=").decode()


def parse_cursor(raw: str) -> uuid.UUID | None:
    """The id inside a cursor encode_cursor made (REST and GraphQL share them); None if not one."""
    try:
        data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except (ValueError, binascii.Error):
        return None
    return uuid.UUID(bytes=data) if len(data) == 16 else None


def decode_cursor(request: web.Request) -> uuid.UUID | None:
    raw = request.query.get("cursor")
    if raw is None or raw == "":
        return None
    after = parse_cursor(raw)
    if after is None:
        raise ValidationFailed(
            [{"field": "cursor", "message": "not a cursor this API returned"}],
            "invalid query parameter",
        )
    return after


def page(items: list[Any], limit: int, last_id: uuid.UUID | None) -> dict[str, Any]:
    """{"items", "next_cursor"}: callers fetch limit + 1 rows to know whether more follow."""
    has_more = len(items) > limit
    return {
        "items": items[:limit],
        "next_cursor": encode_cursor(last_id) if has_more and last_id is not None else None,
    }


def client_ip(request: web.Request, trust_forwarded_for: bool) -> str:
    if trust_forwarded_for:
        fwd = request.headers.get("X-Forwarded-For")
        if fwd:
            return fwd.split(",", 1)[0].strip()
    return request.remote or "unknown"

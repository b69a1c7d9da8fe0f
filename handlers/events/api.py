"""OpenAPI paths and schemas of the Events and analytics section. EventBatch is also the
validator that names the offending field when POST /v1/events refuses a body."""

from __future__ import annotations

from db.ids import UUID_RE
from server.encoding import CODINGS
from server.openapi import Json, json_content, op, problem, query_param, ref, retry_problem

MAX_EVENTS = 1000
MAX_PROPS_BYTES = 2048
MAX_PROPS_KEYS = 50
# Unanchored, for fullmatch in ingest.py; the schemas below anchor them with ^...$, which
# fastjsonschema applies to the whole string as JSON Schema means (Python's $ alone would also
# accept a trailing newline).
NAME_RE = r"[A-Za-z][A-Za-z0-9_.:-]{0,63}"
# [0-9], never \d: Python's \d holds every script's digits, ECMA's only ASCII ones.
TS_RE = (
    r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
)

EVENT_NAME = {
    "type": "string",
    "minLength": 1,
    "maxLength": 64,
    "pattern": f"^{NAME_RE}$",
    "description": "A letter, then letters, digits, `_ . : -`; e.g. `page_view`, `checkout.paid`",
}

SCHEMAS: Json = {
    "Event": {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": EVENT_NAME,
            "ts": {
                "type": "string",
                "format": "date-time",
                "pattern": f"^{TS_RE}$",
                "description": "RFC 3339 with an offset, within 24 hours of now; default: now",
            },
            "user_id": {"type": ["string", "null"], "format": "uuid", "pattern": f"^{UUID_RE}$"},
            "props": {
                "type": "object",
                "additionalProperties": True,
                "maxProperties": MAX_PROPS_KEYS,
                "description": f"Free-form JSON object, at most {MAX_PROPS_BYTES} bytes serialised",
            },
        },
    },
    "EventBatch": {
        "type": "object",
        "required": ["events"],
        "additionalProperties": False,
        "properties": {
            "events": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_EVENTS,
                "items": ref("Event"),
            }
        },
    },
    "EventsAccepted": {
        "type": "object",
        "required": ["accepted"],
        "properties": {
            "accepted": {"type": "integer", "description": "Events committed (all of the batch)"}
        },
    },
    "LiveCountsEvent": {
        "type": "object",
        "description": "One server-sent event of GET /v1/analytics/live",
        "required": ["event", "data"],
        "properties": {
            "event": {"type": "string", "enum": ["counts", "reauthenticate"]},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "description": (
                    'counts: `{"ts": "<second, RFC 3339>", "counts": {"<name>": n}}`, the '
                    "EVENTS_LIVE_TOP_NAMES most frequent names, plus "
                    '`"omitted": {"names": k, "count": n}` when more names had events that '
                    'second; reauthenticate (the last event): `{"reason": "expired" | '
                    '"revoked"}`, the access token no longer stands: reconnect with a fresh one'
                ),
            },
            "retry": {"type": "integer", "description": "Reconnection delay, milliseconds"},
        },
    },
    "EventCounts": {
        "type": "object",
        "required": ["buckets"],
        "properties": {
            "buckets": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["ts", "count"],
                    "properties": {
                        "ts": {"type": "string", "format": "date-time"},
                        "count": {"type": "integer"},
                    },
                },
            }
        },
    },
}


COUNT_PARAMS = [
    query_param("name", EVENT_NAME, "The event name to count", required=True),
    query_param(
        "from",
        {"type": "string", "format": "date-time"},
        "Start (RFC 3339), rounded down to its bucket; default: 60 buckets before `to`",
        required=False,
    ),
    query_param(
        "to",
        {"type": "string", "format": "date-time"},
        "End (RFC 3339, exclusive), rounded up to its bucket; default: now",
        required=False,
    ),
    query_param(
        "bucket",
        # Generators name enum members after the values; these start with a digit (VALUE_0...).
        {
            "type": "string",
            "enum": ["1m", "1h", "1d"],
            "x-enum-varnames": ["minute", "hour", "day"],
            "default": "1m",
        },
        "Bucket size, aligned to UTC; at most 1440 buckets per request",
        required=False,
    ),
]


def _any_case(word: str) -> str:
    """`word` as a pattern matching it in any case: content codings are case-insensitive (RFC
    9110 8.4.1), and ECMA 262 patterns have no inline flag for it."""
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


# What server/encoding.py takes: one of CODINGS (or x-gzip, or identity), or nothing at all.
_CODINGS_RE = "|".join(_any_case(c) for c in ("identity", "x-gzip", *CODINGS))
CONTENT_ENCODING_PARAM: Json = {
    "name": "Content-Encoding",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": rf"^[ \t]*({_CODINGS_RE})?[ \t]*$"},
    "description": (
        "The body's compression, if any: gzip (x-gzip), deflate or br. Decoded, it may be at"
        " most MAX_BODY_BYTES as any body (413 past it); a body that is not in the coding it"
        " names is a 400, another coding a 415"
    ),
}

PATHS: Json = {
    "/v1/events": {
        "post": op(
            "Ingest 1..1000 analytics events; answered once they are committed",
            "events",
            {
                "202": json_content("Committed", ref("EventsAccepted")),
                "400": problem("Malformed JSON, or a body that is not in its Content-Encoding"),
                "413": problem("Body larger than MAX_BODY_BYTES as sent, or once decoded"),
                "415": problem(
                    "The body is not application/json, or its Content-Encoding is"
                    " not one of gzip, deflate, br"
                ),
                "422": problem(
                    "Validation failed; `errors` names each offending field (`events[i].name` "
                    "for a new event name past the tenant's EVENTS_MAX_NAMES_PER_TENANT)"
                ),
            },
            body="EventBatch",
            params=[CONTENT_ENCODING_PARAM],
        )
    },
    "/v1/analytics/counts": {
        "get": op(
            "Counts of one event name per minute, hour or day (every bucket, zeros included)",
            "events",
            {
                "200": json_content("The buckets, oldest first", ref("EventCounts")),
                "422": problem("A parameter is refused, or the range spans more than 1440 buckets"),
            },
            params=COUNT_PARAMS,
        )
    },
    "/v1/analytics/live": {
        "get": op(
            "Server-Sent Events: each second, the caller's tenant's event counts by name",
            "events",
            {
                "200": {
                    "description": (
                        'A stream of `event: counts` messages, data `{"ts": "<second>", '
                        '"counts": {"<name>": n}}`, one per second until the client leaves '
                        "or the server drains; a `reauthenticate` event, then the end, when "
                        "the access token expires or is revoked. A client that does not read "
                        "(EVENTS_LIVE_BUFFER_BYTES unsent, or a write stalled for 5 s) is "
                        "disconnected"
                    ),
                    # OpenAPI 3.1 without itemSchema: the schema describes each event.
                    "content": {"text/event-stream": {"schema": ref("LiveCountsEvent")}},
                },
                # 429, not 503: these limits are the caller's to free (close a stream), not the
                # server's capacity; 503 is the process's own limit, or a drain.
                "429": retry_problem(
                    "Rate limited, or the caller (EVENTS_LIVE_MAX_PER_USER) or its tenant "
                    "(EVENTS_LIVE_MAX_PER_TENANT) has the most streams open on this server",
                    required=True,
                ),
                "503": retry_problem(
                    "The server holds EVENTS_LIVE_MAX_CLIENTS streams, or is draining; or a "
                    "dependency is down",
                    required=False,
                ),
            },
        )
    },
}

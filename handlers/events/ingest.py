"""POST /v1/events bodies: read, checked and turned into COPY records and per-minute counts.

The accepting path is one loop over the events (parse_batch); a body it balks at goes through
the EventBatch schema, so a refusal names the offending field as every other endpoint does.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import orjson

from db.events import CopyRecord, MinuteCounts, pg_micros
from db.ids import UUID_RE
from handlers.events.api import MAX_EVENTS, MAX_PROPS_BYTES, MAX_PROPS_KEYS, NAME_RE, SCHEMAS, TS_RE
from server.errors import ValidationFailed
from server.validation import DEEP_MESSAGE, MAX_DEPTH, Validators, looks_like_card, screen, too_deep

MAX_SKEW = timedelta(hours=24)
PROPS_DEPTH = MAX_DEPTH - 3  # the body, events and the event hold an event's props

_NAME = re.compile(NAME_RE)
_TS = re.compile(TS_RE)
_UUID = re.compile(UUID_RE)
_SCHEMAS = Validators(SCHEMAS)
_EMPTY_PROPS = b"\x01{}"  # binary jsonb: a version byte, then the JSON text


def is_event_name(value: str) -> bool:
    return _NAME.fullmatch(value) is not None


def parse_ts(raw: str) -> datetime | None:
    """An RFC 3339 timestamp with an offset, as an aware datetime in UTC; else None."""
    if _TS.fullmatch(raw) is None:
        return None
    try:
        return datetime.fromisoformat(raw).astimezone(UTC)
    # ValueError: matches the pattern but is no date (2026-02-30); OverflowError: an offset
    # takes it before year 1 or past 9999 in UTC.
    except (ValueError, OverflowError):
        return None


def parse_batch(data: Any, tenant_id: str, now: datetime) -> tuple[list[CopyRecord], MinuteCounts]:
    """COPY records and per-minute counts for a POST /v1/events body, or ValidationFailed.

    The accepting path is one hand-written loop: the ingestion budget (docs/PERFORMANCE.md)
    leaves no room for the compiled schema on every event. It accepts nothing the
    EventBatch schema refuses: when it balks, the schema validator runs to name the field,
    and what the schema lets through is then refused by the checks it cannot express.
    """
    events_ = data.get("events") if type(data) is dict and len(data) == 1 else None
    if type(events_) is not list or not 1 <= len(events_) <= MAX_EVENTS:
        _refuse(data)
    lo, hi = now - MAX_SKEW, now + MAX_SKEW
    now_us = pg_micros(now)
    names, users = _NAMES_SEEN, _USERS_SEEN
    records: list[CopyRecord] = []
    append = records.append
    counts: MinuteCounts = {}
    untimed: dict[str, int] = {}  # events stamped `now`, by name
    for event in events_:
        if type(event) is not dict:
            _refuse(data)
        name = event.get("name")
        if type(name) is not str or (name not in names and not _learn_name(name)):
            _refuse(data)
        raw_ts = event.get("ts")
        user_id = event.get("user_id")
        props = event.get("props")
        # Every key is a known one exactly when the known ones present add up to them all;
        # a null ts or props is not counted, so it is refused here as the schema does.
        known = 1 + (raw_ts is not None) + (props is not None) + ("user_id" in event)
        if known != len(event):
            _refuse(data)
        if user_id is not None and (
            type(user_id) is not str or (user_id not in users and not _learn(users, _UUID, user_id))
        ):
            _refuse(data)
        if props is None:
            props_json = _EMPTY_PROPS
        else:
            if type(props) is not dict or len(props) > MAX_PROPS_KEYS:
                _refuse(data)
            # The version byte of binary jsonb goes in front here, which also leaves a bytes
            # object of the right size: orjson's own result keeps a 4 KB buffer, far too much
            # to hold for every pending event.
            try:
                props_json = b"\x01" + orjson.dumps(props)
            except orjson.JSONEncodeError:  # nested past the 254 levels orjson writes
                _refuse(data)
            if (
                len(props_json) > MAX_PROPS_BYTES + 1
                or (b"\\u0000" in props_json and _has_nul(props))
                # The depth limit of every body (server/validation.py), checked here per event:
                # too few bytes for so many brackets, else too few brackets, else walked.
                or (
                    len(props_json) > 2 * PROPS_DEPTH
                    and props_json.count(b"{") + props_json.count(b"[") > PROPS_DEPTH
                    and too_deep(props, PROPS_DEPTH)
                )
            ):
                _refuse(data)
        if raw_ts is None:
            append((tenant_id, now_us, name, user_id, props_json))
            untimed[name] = untimed.get(name, 0) + 1
        else:
            ts = parse_ts(raw_ts) if type(raw_ts) is str else None
            if ts is None or not lo <= ts <= hi:
                _refuse(data)
            append((tenant_id, pg_micros(ts), name, user_id, props_json))
            key = (tenant_id, name, ts.replace(second=0, microsecond=0))
            counts[key] = counts.get(key, 0) + 1
    minute = now.replace(second=0, microsecond=0)
    for name, n in untimed.items():
        key = (tenant_id, name, minute)
        counts[key] = counts.get(key, 0) + n
    return records, counts


# Event names come from a small vocabulary and user ids repeat, so each distinct valid string
# is matched against its pattern once per process, not once per event (a regex match costs
# more than the rest of an event's checks). Bounded: cleared when full.
_SEEN_MAX = 4096
_NAMES_SEEN: set[str] = set()
_USERS_SEEN: set[str] = set()


def _learn_name(name: str) -> bool:
    return not looks_like_card(name) and _learn(_NAMES_SEEN, _NAME, name)


def _learn(seen: set[str], pattern: re.Pattern[str], value: str) -> bool:
    if pattern.fullmatch(value) is None:
        return False
    if len(seen) >= _SEEN_MAX:
        seen.clear()
    seen.add(value)
    return True


def _has_nul(value: Any) -> bool:
    """PostgreSQL text (and jsonb) cannot hold U+0000: one would fail a whole group commit."""
    if type(value) is str:
        return "\x00" in value
    if type(value) is dict:
        return any("\x00" in k or _has_nul(v) for k, v in value.items())
    if type(value) is list:
        return any(_has_nul(v) for v in value)
    return False


def _refuse(data: Any) -> NoReturn:
    screen(data)  # too deep, card data, NUL: named first, and never echoed by the schema's errors
    _SCHEMAS.validate("EventBatch", data)  # raises with the schema's own field path when it applies
    now = datetime.now(UTC)
    errors = []
    for i, event in enumerate(data["events"]):
        raw_ts = event.get("ts")
        if raw_ts is not None:
            parsed = parse_ts(raw_ts)
            if parsed is None:
                errors.append({"field": f"events[{i}].ts", "message": "is not a valid timestamp"})
            elif abs(parsed - now) > MAX_SKEW:
                errors.append(
                    {"field": f"events[{i}].ts", "message": "must be within 24 hours of now"}
                )
        props = event.get("props")
        try:
            size = len(orjson.dumps(props))
        except orjson.JSONEncodeError:  # too deep for orjson.dumps; screen() names it first
            errors.append({"field": f"events[{i}].props", "message": DEEP_MESSAGE})
            continue
        if props is not None and size > MAX_PROPS_BYTES:
            errors.append(
                {
                    "field": f"events[{i}].props",
                    "message": f"must be at most {MAX_PROPS_BYTES} bytes of JSON",
                }
            )
        elif props is not None and _has_nul(props):
            errors.append(
                {"field": f"events[{i}].props", "message": "must not contain NUL characters"}
            )
    # Nothing left to blame would mean the fast path refused what the schema accepts.
    raise ValidationFailed(errors or [{"field": "events", "message": "is not valid"}])

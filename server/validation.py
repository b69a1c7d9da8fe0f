"""Request bodies are validated by validators compiled from the OpenAPI document's schemas, so
what /openapi.json documents and what the server accepts cannot drift apart."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import fastjsonschema
import orjson
from aiohttp import web

from server.errors import ApiError, BadRequest, ValidationFailed
from server.openapi import Json, resolved_schema


class UnsupportedMediaType(ApiError):
    status, slug, title = 415, "unsupported-media-type", "Unsupported Media Type"


class Validators:
    """A validator per schema (an OpenAPI document's components.schemas), all compiled up
    front: a broken schema fails the boot, not a request."""

    def __init__(self, schemas: Json) -> None:
        self._compiled: dict[str, Callable[[Any], Any]] = {
            name: fastjsonschema.compile(resolved_schema(schemas, name), detailed_exceptions=True)
            for name in schemas
        }

    def validate(self, schema_name: str, data: Any) -> Any:
        """`data` if it matches components.schemas[schema_name], else ValidationFailed naming
        each offending field."""
        try:
            return self._compiled[schema_name](data)
        except fastjsonschema.JsonSchemaValueException as exc:
            raise ValidationFailed(_errors(exc)) from None


VALIDATORS = web.AppKey("validators", Validators)


def _field(path: list[str]) -> str:
    out = ""
    for part in path[1:]:  # path[0] is fastjsonschema's "data"; our property names never are digits
        if part.isdigit():
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _join(base: str, key: str) -> str:
    return f"{base}.{key}" if base else key


_PREFIX = re.compile(r"^data(\.[A-Za-z0-9_]+|\[\d+\])*\s+")


def _errors(exc: fastjsonschema.JsonSchemaValueException) -> list[dict[str, str]]:
    base = _field([str(p) for p in exc.path or ["data"]])
    value = exc.value
    definition = exc.definition or {}
    if exc.rule == "additionalProperties" and isinstance(value, dict):
        known = set(definition.get("properties", {}))
        return [
            {"field": _join(base, str(k)), "message": "unknown field"}
            for k in value
            if k not in known
        ] or [{"field": base, "message": "unknown field"}]
    if exc.rule == "required" and isinstance(value, dict):
        return [
            {"field": _join(base, k), "message": "is required"}
            for k in definition.get("required", [])
            if k not in value
        ]
    message = _PREFIX.sub("", exc.message)
    return [{"field": base, "message": message}]


async def read_raw_json(request: web.Request) -> tuple[bytes, Any]:
    """The raw body and its parsed JSON, not validated: 415 unless JSON, 400 if malformed."""
    ctype = request.content_type
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType("the request body must be application/json")
    raw = await request.read()  # aiohttp raises 413 past client_max_size
    try:
        return raw, orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc.args[0] if exc.args else 'parse error'}") from None


async def read_json(request: web.Request, schema_name: str) -> dict[str, Any]:
    """The request body, parsed and validated against components.schemas[schema_name]."""
    raw, data = await read_raw_json(request)
    # Validation messages name fields and rules, never values, so a card number in a field of
    # the wrong shape is already refused without being repeated.
    result: dict[str, Any] = request.app[VALIDATORS].validate(schema_name, data)
    # Card data never enters Surge (PCI DSS scope stays with the payment provider).
    if _DIGIT_RUN.search(raw):
        path = _card_path(result, "")
        if path is not None:
            raise ValidationFailed(
                [{"field": path, "message": CARD_MESSAGE}], "the request contains card data"
            )
    # PostgreSQL text and jsonb cannot hold NUL: name the field now instead of failing later.
    if b"\\u0000" in raw:
        path = _nul_path(result, "")
        if path is not None:
            raise ValidationFailed([{"field": path, "message": "must not contain NUL characters"}])
    return result


CARD_MESSAGE = "looks like a card number; send the payment provider's token instead"
# 13 to 19 digits in a row, or grouped the way cards are printed (4-4-4-4[-3], Amex 4-6-5)
# with spaces or dashes. Not any digits with dashes: a UUID like 00000000-0000-0000-... is no card.
_DIGIT_RUN = re.compile(rb"\d{4}[ -]?\d{4}")  # cheap pre-filter over the raw body
_CARD = re.compile(
    r"(?<!\d)(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{4,5})(?!\d)"
)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def looks_like_card(value: str) -> bool:
    if "-" in value:  # ids are not cards, whatever digits they happen to hold
        value = _UUID.sub(" ", value)
    for match in _CARD.finditer(value):
        digits = match.group().replace(" ", "").replace("-", "")
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            return True
    return False


def _first_path(
    value: Any, path: str, bad: Callable[[Any], bool], bad_key: Callable[[str], bool]
) -> str | None:
    """The path of the first leaf `bad` refuses (or of the object holding a key `bad_key`
    refuses), else None."""
    if isinstance(value, dict):
        for k, v in value.items():
            if bad_key(str(k)):
                return path  # a bad key: name the object that holds it
            found = _first_path(v, _join(path, str(k)), bad, bad_key)
            if found is not None:
                return found
        return None
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _first_path(v, f"{path}[{i}]", bad, bad_key)
            if found is not None:
                return found
        return None
    return path if bad(value) else None


def _is_card(value: Any) -> bool:
    if isinstance(value, str):
        return looks_like_card(value)
    return (
        isinstance(value, int) and not isinstance(value, bool) and looks_like_card(str(abs(value)))
    )


def _has_nul(value: Any) -> bool:
    return isinstance(value, str) and "\x00" in value


def _card_path(value: Any, path: str) -> str | None:
    """The path of the first string or integer that passes for a card number, else None."""
    return _first_path(value, path, _is_card, lambda key: False)


def _nul_path(value: Any, path: str) -> str | None:
    return _first_path(value, path, _has_nul, lambda key: "\x00" in key)

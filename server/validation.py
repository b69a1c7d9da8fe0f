"""Request bodies are validated by validators compiled from the OpenAPI document's schemas, so
what /openapi.json documents and what the server accepts cannot drift apart."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import fastjsonschema
import orjson
from aiohttp import web

from server.encoding import content_coding, decode
from server.errors import BadRequest, UnsupportedMediaType, ValidationFailed
from server.keys import CONFIG
from server.openapi import Json, resolved_schema


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


async def read_raw_json(request: web.Request, *, walk_depth: bool = True) -> tuple[bytes, Any]:
    """The raw body (decoded from its Content-Encoding, server/encoding.py) and its parsed JSON,
    screened (`screen`) but not validated: 415 unless JSON, 400 if malformed, 422 if too deep or
    holding a card number, a NUL character or a number that would not be stored exactly."""
    ctype = request.content_type
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType("the request body must be application/json")
    raw = await request.read()  # aiohttp raises 413 past client_max_size
    coding = content_coding(request)
    if coding is not None:  # only on a route that takes one (server/chain.py refuses the rest)
        raw = decode(raw, coding, request.app[CONFIG].max_body_bytes)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc.args[0] if exc.args else 'parse error'}") from None
    screen(data, raw, walk_depth=walk_depth)
    return raw, data


async def read_json(request: web.Request, schema_name: str) -> dict[str, Any]:
    """The request body, parsed, screened and validated against components.schemas[schema_name].
    Screened first: a schema's "unknown field" names a key, and a key may be a card number."""
    data = (await read_raw_json(request))[1]
    # Validation messages name fields and rules, never values.
    result: dict[str, Any] = request.app[VALIDATORS].validate(schema_name, data)
    return result


# Levels of objects and arrays in a request body, the body itself being level 1. Deeper bodies
# are refused before anything walks them recursively (orjson.dumps stops at 254 levels, Python
# at its recursion limit; orjson.loads alone goes to 1024).
MAX_DEPTH = 32
DEEP_MESSAGE = f"is nested more than {MAX_DEPTH} levels deep"
CARD_MESSAGE = "looks like a card number; send the payment provider's token instead"
NUL_MESSAGE = "must not contain NUL characters"
# A number is stored as orjson parsed it (an int of 64 bits, else a 64-bit float) and wrote it
# back, never as sent: one that would not come back equal is refused, each for its reason.
INT_MIN, INT_MAX = -(1 << 63), (1 << 64) - 1
INT_RANGE_MESSAGE = "is an integer outside -2^63 .. 2^64-1, which would not be stored exactly"
NEGATIVE_ZERO_MESSAGE = "is negative zero, which would be stored as 0; send 0"
PRECISION_MESSAGE = "has more digits than a 64-bit float holds, so it would not be stored exactly"
TINY_MESSAGE = "is too close to zero for a 64-bit float, so it would be stored as 0"


def screen(data: Any, raw: bytes | None = None, *, walk_depth: bool = True) -> None:
    """ValidationFailed naming the first value of a parsed body that is nested deeper than
    MAX_DEPTH or is (or holds a key that is) a card number or holds a NUL character; then, given
    the raw body, the first number in it that would not be stored as sent (`_inexact_number`).

    Card data never enters Surge (PCI DSS scope stays with the payment provider); PostgreSQL
    text and jsonb cannot hold NUL; a number is never changed silently. Given the raw body,
    cheap tests over it decide whether the body is walked at all; one walk then finds the field
    for the first three. A caller passing walk_depth=False checks the depth itself (POST
    /v1/events: each event's props, which a batch of a thousand events makes cheaper than
    walking the batch).
    """
    numbers = False  # no raw body, no number as sent to compare with
    if raw is None:
        deep = cards = nul = True
    else:
        # No more brackets than levels: too few to be too deep, whatever the strings hold.
        deep = walk_depth and raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and too_deep(data)
        # orjson writes no escapes but those of control characters, so a card written with
        # \u escapes shows in its output; a body too deep for orjson.dumps is walked anyway.
        escaped = b"\\" in raw
        text: bytes | None = raw
        if escaped and not deep:
            try:
                text = orjson.dumps(data)
            except orjson.JSONEncodeError:  # deeper than orjson writes: walked below
                text = None
        runs = _digit_runs(raw)
        cards = deep or text is None or _card_shaped(text, runs if text is raw else None)
        nul = escaped and b"\\u0000" in raw
        numbers = _inexact_suspect(raw, runs, data)
        if not (deep or cards or nul or numbers):
            return
    found = _first_problem(data, cards, nul) if deep or cards or nul else None
    if found is None and numbers:
        assert raw is not None
        found = _inexact_number(raw)
    if found is None:
        return
    field, message = found
    detail = "the request contains card data" if message is CARD_MESSAGE else None
    raise ValidationFailed([{"field": field, "message": message}], detail)


def too_deep(data: Any, levels: int = MAX_DEPTH) -> bool:
    """Whether objects and arrays nest more than `levels` deep: level by level, no recursion."""
    level = [data] if type(data) is dict or type(data) is list else []
    for _ in range(levels):
        below = []
        for container in level:
            for v in container.values() if type(container) is dict else container:
                if type(v) is dict or type(v) is list:
                    below.append(v)
        if not below:
            return False
        level = below
    return True


# One card-number pattern, 13 to 19 digits in a row or grouped the way cards are printed
# (4-4-4-4[-3], Amex and Diners 4-6-5 and 4-6-4) with one separator used throughout: spaces
# (or a JSON escape of one), dashes, dots, slashes, underscores. Not any digits with
# separators: a decimal like 1234.5678 or 3.14159265358979323, a phone number, a timestamp,
# an address is no card; and a UUID like 00000000-0000-0000-... is no card either. A run of
# digits inside a word is no card: hex ids and keys (uuid4().hex, a hash) hold runs of digits
# that pass Luhn about once in a few hundred.
_SEP = r"(?:\s|\\[tnrf]){1,3}|[.\-/_\u2010-\u2015\u2212]"
_CARD = re.compile(
    (
        r"(?<![0-9])(?<![0-9]\.)"
        r"(?:(?<![A-Za-z])D{13,19}(?!\.D)(?![A-Za-z])"
        r"|D{4}(SEP)D{4}\1D{4}\1D{1,7}|D{4}(SEP)D{6}\2D{4,5})"
        r"(?![0-9])"
    )
    .replace("SEP", _SEP)
    .replace("D", "[0-9]")  # not \d: other scripts' digits are no card digits to Luhn
)
_NOT_DIGIT = re.compile(r"\D")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


# The pre-filter over a whole body, in C: each byte mapped to its kind (a digit to 0, a dash
# kept, a separator to s, including every byte of a multi-byte character and the letters of
# \\t-style escapes; anything else to x), the separators dropped; then 13 digits in a row, or
# 4-4-4 or 4-6-4 digits joined by dashes outside a UUID. Bodies with neither are not walked for
# card numbers. (bytes.translate's own `delete` is slower: it builds its table on every call.)
_SEPARATORS = " \t\n\r\f\v./_\\tnrf"
_KINDS = bytes(
    ord("0") if 48 <= b <= 57
    else b if b == ord("-")
    else ord("s") if b >= 128 or chr(b) in _SEPARATORS
    else ord("x")
    for b in range(256)
)  # fmt: skip
_THIRTEEN = b"0" * 13
_DASHED = (b"0000-0000-0000", b"0000-000000-0000")
# A UUID's groups of digits can take a dashed card's shape: they are no card.
_UUID_BYTES = re.compile(
    rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def _digit_runs(raw: bytes) -> bytes:
    """`raw` with each digit as 0 and the separators dropped (see _KINDS)."""
    return raw.translate(_KINDS).replace(b"s", b"")


def card_shaped(raw: bytes) -> bool:
    """Whether a body may hold a card number (false alarms allowed, no misses)."""
    return _card_shaped(raw, None)


def _card_shaped(raw: bytes, runs: bytes | None) -> bool:
    kinds = _digit_runs(raw) if runs is None else runs
    if _THIRTEEN in kinds:
        return True
    if _DASHED[0] not in kinds and _DASHED[1] not in kinds:
        return False
    kinds = raw.translate(_KINDS)  # nothing dropped: offsets are those of `raw`
    for dashed in _DASHED:
        at = kinds.find(dashed)
        while at >= 0:
            near = _UUID_BYTES.search(raw, max(0, at - 35), at + 50)
            if near is None or not near.start() <= at < at + len(dashed) <= near.end():
                return True
            at = kinds.find(dashed, at + 1)
    return False


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_hint(text: str) -> bool:
    """Whether `text` has a card-shaped number passing Luhn, ids included (may be a UUID)."""
    for match in _CARD.finditer(text):
        digits = _NOT_DIGIT.sub("", match.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            return True
    return False


def looks_like_card(value: str) -> bool:
    """Whether `value` holds a card number (ids are not cards, whatever digits they hold)."""
    if not card_shaped(value.encode()):
        return False
    if "-" in value:
        value = _UUID.sub(" ", value)
    return _card_hint(value)


def _is_card(value: Any) -> bool:
    if type(value) is str:
        return looks_like_card(value)
    return type(value) is int and 10**12 <= abs(value) < 10**19 and luhn_ok(str(abs(value)))


class _Node:
    """A value met by the walk, with how it was reached (its path is built only if named)."""

    __slots__ = ("depth", "key", "parent", "value")

    def __init__(self, value: Any, depth: int, parent: _Node | None, key: str | int) -> None:
        self.value, self.depth, self.parent, self.key = value, depth, parent, key

    def path(self) -> str:
        parts: list[str | int] = []
        node: _Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.key)
            node = node.parent
        out = ""
        for part in reversed(parts):
            out = f"{out}[{part}]" if type(part) is int else _join(out, str(part))
        return out


def has_card(data: Any) -> bool:
    """Whether a parsed value holds a card number, as a value or a key."""
    return _first_problem(data, True, False) is not None


def _first_problem(data: Any, cards: bool, nul: bool) -> tuple[str, str] | None:
    """(path, message) of the first value in document order that is too deep, a card number
    or holds NUL; a key that is one names the object holding it. Iterative: a body as deep as
    orjson parses does not meet Python's recursion limit."""
    stack = [_Node(data, 1, None, "")]
    while stack:
        node = stack.pop()
        value = node.value
        if type(value) is dict or type(value) is list:
            if node.depth > MAX_DEPTH:
                return node.path(), DEEP_MESSAGE
            depth = node.depth + 1
            if type(value) is dict:
                for k in value:
                    if cards and looks_like_card(k):
                        return node.path(), CARD_MESSAGE
                    if nul and "\x00" in k:
                        return node.path(), NUL_MESSAGE
                items: Any = value.items()
            else:
                items = enumerate(value)
            stack.extend(reversed([_Node(v, depth, node, k) for k, v in items]))
        elif cards and _is_card(value):
            return node.path(), CARD_MESSAGE
        elif nul and type(value) is str and "\x00" in value:
            return node.path(), NUL_MESSAGE
    return None


# A number can change on its way through a 64-bit float only when it has 16 significant digits
# or more (15 always come back), is -0.0, or has an exponent of -100 or less (a float's range
# ends near 1e-308; a longer way there spells 16 digits). Bodies with none of these are not
# parsed again; false alarms cost one parse, misses none. UUIDs hold "e-" and "-0e" often, so
# those are found with bytes.find and looked at where they are, not with a pattern run over the
# whole body.
_SIXTEEN = b"0" * 16
_TINY_EXPONENT = re.compile(rb"[eE]-0*[1-9][0-9]{2,}[\s,\]}]")  # matched where [eE]- is
_DIGITS = frozenset(b"0123456789")
_ALNUM = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# orjson writes every negative zero as -0.0 (and -0.05 as itself)
_NEGATIVE_ZERO = re.compile(rb"-0\.0(?![0-9])")


def _inexact_suspect(raw: bytes, runs: bytes, data: Any) -> bool:
    if _SIXTEEN in runs or _found(raw, (b"e-", b"E-"), 0, _DIGITS, _TINY_EXPONENT):
        return True
    if b"-0." in raw or _found(raw, (b"-0e", b"-0E"), -1, _ALNUM, None):
        try:  # a negative number: is it a zero? asked of orjson's output
            return _NEGATIVE_ZERO.search(orjson.dumps(data)) is not None
        except orjson.JSONEncodeError:  # deeper than orjson writes
            return True
    return False


def _found(
    raw: bytes, needles: tuple[bytes, ...], before: int, chars: frozenset[int], then: Any
) -> bool:
    """Whether a needle occurs where the byte before it is in `chars` (before=0) or is not
    (before=-1), and `then` (a pattern) matches from it, when given."""
    for needle in needles:
        at = raw.find(needle, 1)
        while at > 0:
            if (raw[at - 1] in chars) is (before == 0) and (then is None or then.match(raw, at)):
                return True
            at = raw.find(needle, at + 2)
    return False


class _Inexact(Exception):
    pass


def _exact_int(token: str) -> int:
    if len(token) >= 19 and not INT_MIN <= int(token) <= INT_MAX:
        raise _Inexact
    return 0  # the value itself is not kept


def _exact_float(token: str) -> float:
    if _inexact(Decimal(token)) is not None:
        raise _Inexact
    return 0.0


def _inexact_number(raw: bytes) -> tuple[str, str] | None:
    """(path, message) of the first number in `raw` that orjson would not give back equal, with
    why; the body parsed again by the standard library, which hands over each number as sent.
    The first parse only looks at the numbers; a second one, rarely, finds the path."""
    try:
        json.loads(raw, parse_int=_exact_int, parse_float=_exact_float)
        return None
    except _Inexact:
        pass
    except RecursionError:  # deeper than any body may be: that is its problem
        return "", DEEP_MESSAGE
    stack = [_Node(json.loads(raw, parse_float=Decimal), 1, None, "")]
    while stack:
        node = stack.pop()
        value = node.value
        if type(value) is dict:
            stack.extend(reversed([_Node(v, 0, node, k) for k, v in value.items()]))
        elif type(value) is list:
            stack.extend(reversed([_Node(v, 0, node, i) for i, v in enumerate(value)]))
        elif type(value) is int and not INT_MIN <= value <= INT_MAX:
            return node.path(), INT_RANGE_MESSAGE
        elif type(value) is Decimal and (message := _inexact(value)) is not None:
            return node.path(), message
    return None


def _inexact(value: Decimal) -> str | None:
    if value.is_zero():
        return NEGATIVE_ZERO_MESSAGE if value.is_signed() else None
    stored = float(value)  # what orjson parses, written back as repr writes it
    if stored == 0.0:
        return TINY_MESSAGE
    return None if Decimal(repr(stored)) == value else PRECISION_MESSAGE

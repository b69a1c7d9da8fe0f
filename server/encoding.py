"""Content-Encoding on request bodies: which codings a route takes, and a decoder whose output
is bounded while it decodes.

aiohttp's server would inflate a body itself as it reads it (`auto_decompress`), before any
route, token or slot is checked, and compare the result with the size limit only once it was
produced: a 1 MB deflate bomb then costs a second of CPU on any URL. The server runs with
`auto_decompress=False` (server/runner.py), so a body arrives as its client sent it, bounded
by MAX_BODY_BYTES as sent:

- a route that takes no encoded body (all but POST /v1/events) refuses one with 415 before
  reading it (server/chain.py), so it is never decoded;
- a route that takes one (Route.encoded) decodes it in its handler, once shedding admitted the
  request (server/validation.py read_raw_json), with `decode`: never more than MAX_BODY_BYTES
  out (413 past it), whatever the ratio; a body that is not what its Content-Encoding says is a
  400.
"""

from __future__ import annotations

import zlib
from typing import Any

import brotli
from aiohttp import web
from multidict import istr

from server.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

# aiohttp's request handler arguments that keep a body as sent (server/runner.py; the tests'
# servers too).
BODY_AS_SENT: dict[str, Any] = {"auto_decompress": False}
CONTENT_ENCODING = istr("Content-Encoding")
# What a route with Route.encoded takes; no header, or "identity", is no coding at all.
CODINGS = ("gzip", "deflate", "br")
_ALIASES = {"x-gzip": "gzip"}  # RFC 9110 8.4.1.3: a recipient treats x-gzip as gzip


def content_coding(request: web.BaseRequest) -> str | None:
    """The body's content coding, lowercased; None when it has none."""
    raw = request.headers.get(CONTENT_ENCODING)
    if raw is None:
        return None
    coding = raw.strip(" \t").lower()
    if coding in ("", "identity"):
        return None
    return _ALIASES.get(coding, coding)


def check_coding(request: web.BaseRequest, encoded: bool) -> None:
    """415 for a body in a content coding the route does not take (`encoded`: it takes CODINGS),
    with Accept-Encoding naming what it does take (RFC 7694)."""
    coding = content_coding(request)
    if coding is None or (encoded and coding in CODINGS):
        return
    # The header's value is not repeated: it is the client's, and may hold anything.
    if encoded:
        detail = f"the body's Content-Encoding must be one of {', '.join(CODINGS)}, or none"
        accepted = ", ".join(CODINGS)
    else:
        detail = "this operation takes no Content-Encoding; send the body as it is"
        accepted = "identity"
    raise UnsupportedMediaType(detail, headers={"Accept-Encoding": accepted})


def decode(body: bytes, coding: str, limit: int) -> bytes:
    """`body` decoded from `coding`, producing at most about `limit` bytes before stopping:
    PayloadTooLarge past `limit`, BadRequest when it is not valid `coding` data."""
    if coding not in CODINGS:
        raise UnsupportedMediaType(
            f"the body's Content-Encoding must be one of {', '.join(CODINGS)}, or none",
            headers={"Accept-Encoding": ", ".join(CODINGS)},
        )
    try:
        out, complete = _unbrotli(body, limit) if coding == "br" else _inflate(body, coding, limit)
    except (zlib.error, brotli.error):
        complete, out = False, b""
    if len(out) > limit:
        raise PayloadTooLarge(f"the request body decodes to more than {limit} bytes")
    if not complete:
        raise BadRequest(f"the request body is not valid {coding} data")
    return out


def _inflate(body: bytes, coding: str, limit: int) -> tuple[bytes, bool]:
    if coding == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0:
        wbits = zlib.MAX_WBITS  # "deflate" is the zlib format (RFC 9110 8.4.1.2) ...
    else:
        wbits = -zlib.MAX_WBITS  # ... which some clients send without its header, as raw deflate
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(body, limit + 1)  # max_length: a bomb stops here
    return out, inflater.eof and not inflater.unused_data


def _unbrotli(body: bytes, limit: int) -> tuple[bytes, bool]:
    decompressor = brotli.Decompressor()
    # The buffer stops growing once it passes the limit (by at most one of its steps).
    out = decompressor.process(body, output_buffer_limit=limit + 1)
    return out, decompressor.is_finished()


__all__ = [
    "BODY_AS_SENT",
    "CODINGS",
    "CONTENT_ENCODING",
    "check_coding",
    "content_coding",
    "decode",
]

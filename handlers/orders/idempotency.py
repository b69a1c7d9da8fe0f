"""Idempotency-Key for POST /v1/orders and POST /v1/orders/{id}/pay (API.md, Conventions).

The first request with a key claims it (a row in idempotency_keys with the request's
fingerprint) and stores its response in the same transaction as the change it reports, so a
crash can never leave the change without the stored answer, nor the answer without the change.
A replay within 24 h gets the stored status and body back (`Idempotent-Replayed: true`); the
same key with another request is 422; a replay while the first still runs is 409. A request
that fails before changing anything frees its key, so the client's retry runs again. Keys are
per caller (tenant and user), like Stripe's per account.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from uuid import UUID

import orjson
from aiohttp import web
from asyncpg import Connection

from db import idempotency
from db.pool import Database
from server import rbac
from server.errors import Conflict, ValidationFailed
from server.keys import PG
from server.validation import CARD_MESSAGE, looks_like_card, read_raw_json

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HEADER = "Idempotency-Key"
# A first request that has not finished after this long died with its process: its key may
# be taken over (the change it was making rolled back with it).
ABANDONED_S = 60.0
STORED_HEADERS = ("Location", "ETag")


class Answer(NamedTuple):
    """A response as a service decides it: what the route sends and a replay gives back."""

    status: int
    data: dict[str, Any]
    headers: dict[str, str] | None = None


@dataclass
class Scope:
    tenant_id: UUID
    user_id: UUID
    key: str
    completed: bool = field(default=False)

    async def save(
        self, con: Connection, status: int, body: bytes, headers: Mapping[str, str]
    ) -> None:
        """Store the response; call inside the transaction that makes the change."""
        kept = {h: headers[h] for h in STORED_HEADERS if h in headers}
        await idempotency.complete_idempotency_key(
            con, self.tenant_id, self.user_id, self.key, status, body, kept
        )
        self.completed = True

    async def drop(self, pg: Database) -> None:
        """Free the key: the request changed nothing, so its retry runs again."""
        await idempotency.drop_idempotency_key(pg, self.tenant_id, self.user_id, self.key)


SCOPE = web.RequestKey("idempotency_scope", Scope)


def scope_of(request: web.Request) -> Scope | None:
    """The request's claimed key, if it carried one."""
    return request.get(SCOPE)


async def store(con: Connection, scope: Scope | None, answer: Answer) -> None:
    """With a key, store the answer in the caller's transaction (the one making the change)."""
    if scope is not None:
        await scope.save(con, answer.status, orjson.dumps(answer.data), answer.headers or {})


def _fingerprint(request: web.Request, body: Any) -> bytes:
    h = hashlib.sha256()
    h.update(f"{request.method} {request.path}\n".encode())
    # The same JSON with other whitespace or key order is the same request.
    h.update(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    return h.digest()


def _check_key(key: str) -> None:
    if not 1 <= len(key) <= 255 or not key.isascii() or not key.isprintable():
        raise ValidationFailed(
            [{"field": HEADER, "message": "must be 1 to 255 printable ASCII characters"}],
            "invalid Idempotency-Key header",
        )
    if looks_like_card(key):  # the key is stored: card data never is
        raise ValidationFailed(
            [{"field": HEADER, "message": CARD_MESSAGE}], "invalid Idempotency-Key header"
        )


async def _claim(request: web.Request, key: str) -> Scope | web.Response:
    """The key claimed for this request, or the stored answer of the request that has it."""
    _check_key(key)
    p = rbac.caller(request)
    # The body is read and screened (too deep, card data) before it is fingerprinted.
    fingerprint = _fingerprint(request, (await read_raw_json(request))[1])
    row = await idempotency.claim_idempotency_key(
        request.app[PG], p.tenant_id, p.user_id, key, fingerprint, ABANDONED_S
    )
    if row["claimed"]:
        return Scope(p.tenant_id, p.user_id, key)
    if not hmac.compare_digest(row["fingerprint"], fingerprint):
        raise ValidationFailed(
            [{"field": HEADER, "message": "was already used with a different request"}],
            "this Idempotency-Key belongs to another request",
        )
    if row["response_status"] is None:
        raise Conflict("a request with this Idempotency-Key is still being processed")
    return _replay(row["response_status"], row["response_body"], row["response_headers"])


async def _settle(pg: Database, scope: Scope, response: web.StreamResponse) -> None:
    """After a handler that stored nothing: keep a success that changed nothing (an order
    already settled), free the key of anything else."""
    if isinstance(response, web.Response) and 200 <= response.status < 300:
        assert isinstance(response.body, bytes)
        async with pg.transaction() as con:
            await scope.save(con, response.status, response.body, response.headers)
    else:
        await scope.drop(pg)


def idempotent(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        key = request.headers.get(HEADER)
        if key is None:
            return await handler(request)
        claimed = await _claim(request, key)
        if isinstance(claimed, web.Response):
            return claimed
        request[SCOPE] = claimed
        pg = request.app[PG]
        try:
            response = await handler(request)
        except BaseException:
            if not claimed.completed:
                await claimed.drop(pg)
            raise
        if not claimed.completed:
            await _settle(pg, claimed, response)
        return response

    return wrapper


def _replay(status: int, body: bytes, headers: dict[str, Any] | None) -> web.Response:
    out = {str(k): str(v) for k, v in (headers or {}).items()}
    out["Idempotent-Replayed"] = "true"
    return web.Response(body=body, status=status, headers=out, content_type="application/json")

"""POST /v1/webhooks/payments: the provider tells us what happened to an authorization.

`Surge-Signature: t=<unix>,v1=<hex>` where hex = HMAC-SHA256(secret, "<t>." + raw body). The
signature is checked over the raw bytes before anything is parsed, against every configured
secret (PAYMENTS_WEBHOOK_SECRET="new,old" while a rotation is under way), with constant-time
comparisons, and refused when `t` is more than WEBHOOK_TOLERANCE_S away from now (replays of
a captured request stop working after that). A valid event whose id was processed before is
acknowledged and ignored; the state changes are the saga's own conditional transitions, so an
event arriving late or out of order never moves an order backwards.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from typing import Any
from uuid import UUID

import orjson
from asyncpg import Connection

from db import payments
from db.pool import Database
from handlers.orders import saga
from handlers.orders.provider import not_configured
from server import metrics
from server.config import Config
from server.errors import BadRequest, TooManyRequests
from server.ratelimit import Limiter

log = logging.getLogger("surge.payments")

# One bucket for every delivery, whichever address it comes from: the provider sends from many.
WEBHOOK_BUCKET = "webhook:payments"
MAX_FAILURE_CODE = 64  # a decline code from the provider's event (`card_declined`), bounded


def expected_signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return mac.hexdigest()


def verify_signature(
    header: str | None, body: bytes, secrets: list[str], tolerance_s: int, now: float
) -> None:
    """Raises BadRequest unless one v1 signature in the header matches one secret."""
    if not header or len(header) > 1024:
        raise BadRequest("missing Surge-Signature header")
    timestamp = None
    signatures = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            timestamp = value
        elif name == "v1":
            signatures.append(value)
    if timestamp is None or not (timestamp.isascii() and timestamp.isdigit()) or not signatures:
        raise BadRequest("malformed Surge-Signature header")
    # Past 12 digits (the year 33658) no `t` is near now, and a float cannot take every int.
    if len(timestamp) > 12 or abs(now - int(timestamp)) > tolerance_s:
        raise BadRequest("the signature's timestamp is outside the tolerance")
    matched = False
    for secret in secrets:  # no early exit: the time spent does not depend on which one matched
        expected = expected_signature(secret, timestamp, body)
        for sig in signatures:
            matched |= hmac.compare_digest(expected, sig)
    if not matched:
        raise BadRequest("the signature does not match")


def _event(body: bytes) -> tuple[str, str, dict[str, Any]]:
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("malformed JSON") from None
    data = event.get("data") if isinstance(event, dict) else None
    event_id = event.get("id") if isinstance(event, dict) else None
    event_type = event.get("type") if isinstance(event, dict) else None
    if not (
        isinstance(event_id, str)
        and 1 <= len(event_id) <= 255
        and isinstance(event_type, str)
        and len(event_type) <= 100
        and isinstance(data, dict)
        and isinstance(data.get("authorization_id"), str)
    ):
        raise BadRequest("not a payment event")
    return event_id, event_type, data


def webhook_secrets(config: Config) -> list[str]:
    """The secrets a signature may use (503 while none is configured)."""
    if not config.payments_webhook_secret:
        raise not_configured()
    return [s.strip() for s in config.payments_webhook_secret.split(",") if s.strip()]


async def take_delivery(limiter: Limiter, rate: float) -> None:
    """One token of the webhooks' own bucket (WEBHOOK_RATE_LIMIT_RATE a second, a second's
    worth of burst), or TooManyRequests. Taken after the signature check only: an unsigned
    flood is refused 400 and never spends what the provider's deliveries need."""
    decision = await limiter.take(WEBHOOK_BUCKET, rate, max(1, math.ceil(rate)))
    if not decision.allowed:
        metrics.RATELIMITED.labels("webhook").inc()
        raise TooManyRequests(
            "webhook rate limit exceeded; retry after the Retry-After delay",
            headers=decision.headers(),
        )


async def receive(
    pg: Database,
    runner: saga.SagaRunner,
    limiter: Limiter,
    config: Config,
    secrets: list[str],
    signature: str | None,
    body: bytes,
) -> str:
    """Verify, take from the webhooks' bucket, parse and apply one event; the result as
    counted and answered."""
    try:
        verify_signature(signature, body, secrets, config.webhook_tolerance_s, time.time())
    except BadRequest:
        metrics.WEBHOOKS.labels("bad_signature").inc()
        raise
    await take_delivery(limiter, config.webhook_rate_limit_rate)
    event_id, event_type, data = _event(body)
    result = await apply_event(pg, runner, event_id, event_type, data)
    metrics.WEBHOOKS.labels(result).inc()
    return result


def _failure_code(data: dict[str, Any]) -> str | None:
    """The provider's reason for a decline, as its 402 answer to the saga gives it: the same
    order reads the same whichever of the two arrives first."""
    code = data.get("failure_code")
    if isinstance(code, str) and 0 < len(code) <= MAX_FAILURE_CODE:
        return code
    return None


async def apply_event(
    pg: Database, runner: saga.SagaRunner, event_id: str, event_type: str, data: dict[str, Any]
) -> str:
    """'applied', 'duplicate' or 'ignored' (nothing to change: unknown, late or out of order)."""
    auth_id: str = data["authorization_id"]
    found = saga.parse_reference(data.get("reference"))
    payment = None
    if found is not None:
        payment = await payments.get_payment(pg, *found)
    if payment is None:
        payment = await payments.payment_by_authorization(pg, auth_id)
    tenant_id: UUID | None = None if payment is None else payment["tenant_id"]
    order_id: UUID | None = None if payment is None else payment["order_id"]
    kick = False
    async with pg.transaction() as con:
        if not await payments.insert_webhook_event(con, event_id, event_type, tenant_id, order_id):
            return "duplicate"
        if payment is None or tenant_id is None or order_id is None:
            return "ignored"
        known = payment["authorization_id"]
        if known is not None and known != auth_id:
            log.warning("webhook %s names authorization %s, order has %s", event_id, auth_id, known)
            return "ignored"
        source = f"webhook {event_id}"
        moved = False
        if event_type == "authorization.authorized":
            moved = await saga.authorized(con, tenant_id, order_id, auth_id, source)
            if not moved and payment["step"] == "failed" and known is None:
                # The saga gave up on an authorization that happened after all: void it.
                moved = await _late_authorization(con, tenant_id, order_id, auth_id, source)
            kick = moved
        elif event_type == "authorization.captured":
            moved = await saga.paid(con, tenant_id, order_id, auth_id, source)
        elif event_type in ("authorization.declined", "authorization.voided"):
            declined = event_type == "authorization.declined"
            moved = await saga.failed(
                con, tenant_id, order_id,
                ["authorizing"] if declined else ["authorizing", "voiding"],
                "failed" if declined else "voided",
                payment["outcome"]
                or _failure_code(data)
                or event_type.removeprefix("authorization."),
                source, auth_id,
            )  # fmt: skip
        elif event_type == "authorization.refunded":
            moved = await saga.refunded(con, tenant_id, order_id, source)
    if moved:
        await runner.wrote(tenant_id)
    if kick:
        runner.start(tenant_id, order_id)
    return "applied" if moved else "ignored"


async def _late_authorization(
    con: Connection, tenant_id: UUID, order_id: UUID, auth_id: str, source: str
) -> bool:
    moved = await payments.move_payment(
        con, tenant_id, order_id, ["failed"], "voiding", authorization_id=auth_id
    )
    return moved is not None

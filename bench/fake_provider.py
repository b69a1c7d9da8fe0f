"""A fake payment provider: Stripe-like authorizations with manual capture, and fault injection.

Surge's pay saga talks to this over real HTTP, so tests and the bench exercise the same client
code as production: authorize -> capture | void -> refund, Idempotency-Key replays, signed
webhooks delivered asynchronously, and faults injected per operation (errors before execution,
responses lost after it, timeouts, slow answers, forced declines, webhooks duplicated, delayed,
dropped or delivered out of order).

    python -m bench.fake_provider [--host 127.0.0.1] [--port 8100] [--webhook-url URL]
                                  [--journal FILE]

The API key comes from PAYMENTS_API_KEY (default `fake_api_key`) and the webhook signing secret
from PAYMENTS_WEBHOOK_SECRET (default `fake_webhook_secret`). Test fixtures use `FakeProvider`
in their own event loop instead. Everything is in memory and nothing survives a restart, unless
`--journal FILE` is given: then authorizations, the ledger and stored Idempotency-Key answers are
appended to FILE as each request finishes (one write per request, so a SIGKILL loses at most the
request in flight) and read back at start, as a real provider keeps its books across a crash.

`/_admin/*` needs no key: GET /_admin/ledger, GET|POST|DELETE /_admin/faults,
POST /_admin/webhooks/flush.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import random
import re
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

log = logging.getLogger(__name__)

OPS = ("authorize", "capture", "void", "refund")
MODES = ("error", "lost", "timeout", "slow", "decline")
FAULT_STATUSES = (500, 502, 503, 429)
MAX_AMOUNT = 99_999_999  # Stripe's ceiling for USD: $999,999.99 in cents
MAX_STRING = 255
MAX_DELAY_MS = 600_000
MAX_RULES = 100
WEBHOOK_TRIES = 5
WEBHOOK_FIRST_BACKOFF_S = 0.1
WEBHOOK_TIMEOUT_S = 5.0
# Sleeping handlers wake up when the provider closes; this bounds what is left after that.
SHUTDOWN_TIMEOUT_S = 1.0

_JSON = "application/json"
_CURRENCY = re.compile(r"[A-Z]{3}")
_AUTHORIZE_FIELDS = frozenset({"amount", "currency", "payment_method", "reference"})
# op -> (statuses it moves from, the status it moves to); already being there is a no-op 200.
_TRANSITIONS = {
    "capture": (frozenset({"authorized"}), "captured"),
    "void": (frozenset({"authorized"}), "voided"),
    "refund": (frozenset({"captured"}), "refunded"),
}
_DECLINES = {
    "pm_card_declined": ("card_declined", "Your card was declined."),
    "pm_insufficient_funds": ("insufficient_funds", "Your card has insufficient funds."),
}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The `Surge-Signature` header value: `t=<timestamp>,v1=<hex HMAC-SHA256 of "t." + body>`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


class Invalid(ValueError):
    """A request body or fault description that does not fit the contract."""


@dataclass(frozen=True)
class LedgerEntry:
    op: str  # authorize | capture | void | refund | decline
    authorization_id: str
    reference: str
    amount: int
    currency: str
    idempotency_key: str | None
    at: float


@dataclass(frozen=True)
class DeliveryAttempt:
    """One POST of one webhook event: `status` is None when the connection itself failed."""

    event_id: str
    url: str
    attempt: int
    status: int | None
    error: str | None
    at: float


def _int(value: Any, name: str, low: int, high: int, default: int | None = None) -> int | None:
    if value is None:
        return default
    if type(value) is not int or not low <= value <= high:
        raise Invalid(f"{name} must be an integer {low}..{high}")
    return value


@dataclass
class FaultRule:
    """One fault. `count` is what is left: it goes down each time the rule applies."""

    op: str
    mode: str
    status: int | None = None
    retry_after: int | None = None
    delay_ms: int | None = None
    count: int | None = None
    rate: float = 1.0
    seed: int | None = None
    rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.op not in (*OPS, "*"):
            raise Invalid(f"op must be one of {', '.join((*OPS, '*'))}")
        if self.mode not in MODES:
            raise Invalid(f"mode must be one of {', '.join(MODES)}")
        answers = self.mode in ("error", "lost")
        sleeps = self.mode in ("slow", "timeout")
        if self.status is not None and (
            not answers or type(self.status) is not int or self.status not in FAULT_STATUSES
        ):
            raise Invalid("status is one of 500, 502, 503, 429, and only for error and lost")
        if self.retry_after is not None and not answers:
            raise Invalid("retry_after is only for error and lost")
        if self.delay_ms is not None and not sleeps:
            raise Invalid("delay_ms is only for slow and timeout")
        if self.mode == "decline" and self.op not in ("authorize", "*"):
            raise Invalid("decline only applies to authorize")
        if answers and self.status is None:
            self.status = 503
        if sleeps:
            default = 30_000 if self.mode == "timeout" else 1_000
            self.delay_ms = _int(self.delay_ms, "delay_ms", 0, MAX_DELAY_MS, default)
        self.retry_after = _int(self.retry_after, "retry_after", 0, 86_400)
        self.count = _int(self.count, "count", 1, 1_000_000)
        if type(self.rate) not in (int, float) or not 0.0 <= self.rate <= 1.0:
            raise Invalid("rate must be a number 0..1")
        self.rate = float(self.rate)
        if self.seed is not None and type(self.seed) is not int:
            raise Invalid("seed must be an integer")
        self.rng = random.Random(self.seed)

    @classmethod
    def from_dict(cls, raw: Any) -> FaultRule:
        if not isinstance(raw, Mapping):
            raise Invalid("a rule is an object")
        unknown = set(raw) - {"op", "mode", "status", "retry_after", "delay_ms", "count", "rate"}
        unknown -= {"seed"}
        if unknown:
            raise Invalid(f"unknown rule field: {sorted(unknown)[0]}")
        if "op" not in raw or "mode" not in raw:
            raise Invalid("a rule needs op and mode")
        if type(raw["op"]) is not str or type(raw["mode"]) is not str:
            raise Invalid("op and mode are strings")
        return cls(**dict(raw))

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "mode": self.mode,
            "status": self.status,
            "retry_after": self.retry_after,
            "delay_ms": self.delay_ms,
            "count": self.count,
            "rate": self.rate,
            "seed": self.seed,
        }

    def matches(self, op: str) -> bool:
        if self.count == 0 or self.op not in (op, "*"):
            return False
        if self.mode == "decline" and op != "authorize":
            return False
        return self.rate >= 1.0 or self.rng.random() < self.rate


@dataclass(frozen=True)
class WebhookFaults:
    delay_ms: int = 0
    duplicate: bool = False
    reverse: bool = False
    drop: bool = False

    def __post_init__(self) -> None:
        _int(self.delay_ms, "webhooks.delay_ms", 0, MAX_DELAY_MS)
        for name in ("duplicate", "reverse", "drop"):
            if type(getattr(self, name)) is not bool:
                raise Invalid(f"webhooks.{name} must be a boolean")

    @classmethod
    def from_dict(cls, raw: Any) -> WebhookFaults:
        if not isinstance(raw, Mapping):
            raise Invalid("webhooks is an object")
        unknown = set(raw) - {"delay_ms", "duplicate", "reverse", "drop"}
        if unknown:
            raise Invalid(f"unknown webhooks field: {sorted(unknown)[0]}")
        return cls(**dict(raw))


@dataclass
class _Authorization:
    id: str
    status: str
    amount: int
    currency: str
    reference: str
    payment_method: str
    created: int
    failure_code: str | None = None  # a decline's code, also in its webhook's data

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "authorization",
            "status": self.status,
            "amount": self.amount,
            "currency": self.currency,
            "reference": self.reference,
            "created": self.created,
        }


@dataclass
class _Stored:
    """An Idempotency-Key's first request: `status` is None while it still runs."""

    path: str
    fingerprint: bytes
    status: int | None = None
    body: dict[str, Any] | None = None


@dataclass(frozen=True)
class _Delivery:
    event_id: str
    url: str
    body: bytes
    delay_ms: int


@dataclass(frozen=True)
class _Outcome:
    status: int
    body: dict[str, Any]
    store: bool  # False for refusals before anything ran (validation): a retry executes


def _error_body(code: str, message: str, **extra: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def _json(status: int, body: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=_JSON, headers=headers)


def _error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return _json(status, _error_body(code, message), headers)


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if type(value) is not str or not 1 <= len(value) <= MAX_STRING:
        raise Invalid(f"{name} must be a string of 1..{MAX_STRING} characters")
    return value


def _parse_authorize(raw: bytes) -> tuple[int, str, str, str]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Invalid("the body must be a JSON object") from None
    if type(body) is not dict:
        raise Invalid("the body must be a JSON object")
    unknown = set(body) - _AUTHORIZE_FIELDS
    if unknown:
        raise Invalid(f"unknown field: {sorted(unknown)[0]}")
    amount = body.get("amount")
    if type(amount) is not int or not 1 <= amount <= MAX_AMOUNT:
        raise Invalid(f"amount must be an integer 1..{MAX_AMOUNT}")
    currency = body.get("currency")
    if type(currency) is not str or not _CURRENCY.fullmatch(currency):
        raise Invalid("currency must be 3 uppercase letters")
    return amount, currency, _string(body, "payment_method"), _string(body, "reference")


def _parse_empty(raw: bytes) -> None:
    if not raw.strip():
        return
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Invalid("the body must be a JSON object") from None
    if type(body) is not dict:
        raise Invalid("the body must be a JSON object")
    if body:
        raise Invalid(f"unknown field: {sorted(body)[0]}")


def _fingerprint(raw: bytes) -> bytes:
    # The same parameters in another key order or spacing are the same request, as at Stripe;
    # an empty body is `{}`.
    if not raw.strip():
        return b"{}"
    try:
        return orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        return raw


class FakeProvider:
    def __init__(
        self,
        api_key: str = "fake_api_key",
        webhook_secret: str = "fake_webhook_secret",  # noqa: S107 - the fake's documented default
        webhook_url: str | None = None,
        journal: str | None = None,
    ) -> None:
        self.api_key = api_key
        self.journal = journal
        self._unwritten: list[dict[str, Any]] = []
        self.webhook_secret = webhook_secret
        self.webhook_url = webhook_url
        self.ledger: list[LedgerEntry] = []
        self.requests: list[tuple[str, str]] = []
        self.events: list[dict[str, Any]] = []  # every event made, dropped ones included
        self.deliveries: list[DeliveryAttempt] = []
        self.rules: list[FaultRule] = []
        self.webhook_faults = WebhookFaults()
        self._authorizations: dict[str, _Authorization] = {}
        self._idempotency: dict[tuple[str, str], _Stored] = {}
        self._held: list[_Delivery] = []
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._worker: asyncio.Task[None] | None = None

    # -- life cycle -------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        if self.journal is not None:
            self._replay_journal(self.journal)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)
        )
        self._worker = asyncio.create_task(self._deliver_forever())
        self._runner = web.AppRunner(
            make_app(self), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        return f"http://{shown}:{bound_port}"

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- fixtures' view ---------------------------------------------------------------------

    def authorization(self, auth_id: str) -> dict[str, Any] | None:
        auth = self._authorizations.get(auth_id)
        return None if auth is None else auth.view()

    def set_faults(
        self,
        rules: Sequence[Mapping[str, Any] | FaultRule],
        webhooks: Mapping[str, Any] | WebhookFaults | None = None,
    ) -> None:
        """Replace every fault; raises `Invalid` (a ValueError) on nonsense, changing nothing."""
        if len(rules) > MAX_RULES:
            raise Invalid(f"at most {MAX_RULES} rules")
        parsed = [r if isinstance(r, FaultRule) else FaultRule.from_dict(r) for r in rules]
        if webhooks is None:
            hooks = WebhookFaults()
        elif isinstance(webhooks, WebhookFaults):
            hooks = webhooks
        else:
            hooks = WebhookFaults.from_dict(webhooks)
        self.rules = parsed
        self.webhook_faults = hooks
        if not hooks.reverse and self._held:
            self.flush_webhooks()

    def reset_faults(self) -> None:
        self.set_faults([])

    def faults(self) -> dict[str, Any]:
        return {"rules": [r.to_dict() for r in self.rules], "webhooks": asdict(self.webhook_faults)}

    def flush_webhooks(self) -> int:
        """Deliver the events `reverse` held back, newest first; returns how many."""
        held, self._held = self._held, []
        for delivery in reversed(held):
            self._queue.put_nowait(delivery)
        return len(held)

    async def drain(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - the fixtures' API
        """Wait until every queued webhook is delivered or given up (held ones are not queued)."""
        await asyncio.wait_for(self._queue.join(), timeout)

    # -- requests ---------------------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        if header is None or not header.startswith("Bearer "):
            return False
        given = header[len("Bearer ") :].encode("utf-8", "surrogatepass")
        return hmac.compare_digest(given, self.api_key.encode("utf-8", "surrogatepass"))

    def _fault(self, op: str) -> FaultRule | None:
        for rule in self.rules:
            if rule.matches(op):
                if rule.count is not None:
                    rule.count -= 1
                return rule
        return None

    async def _sleep(self, delay_ms: int | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), (delay_ms or 0) / 1000)

    async def handle(self, request: web.Request, op: str, auth_id: str | None) -> web.Response:
        """One POST: faults before execution, Idempotency-Key, execution, faults after it."""
        key = request.headers.get("Idempotency-Key")
        self.requests.append((op, key or ""))
        if key is not None and not 1 <= len(key) <= MAX_STRING:
            return _error(422, "invalid_request", f"Idempotency-Key is 1..{MAX_STRING} characters")
        rule = self._fault(op)
        mode = rule.mode if rule is not None else None
        if rule is not None and mode == "error":
            return self._fault_response(rule)
        if rule is not None and mode == "timeout":
            await self._sleep(rule.delay_ms)
            return _error(504, "provider_error", "The provider did not answer in time.")
        raw = await request.read()
        slot = (self.api_key, key) if key is not None else None
        fingerprint = _fingerprint(raw)
        if slot is not None:
            stored = self._idempotency.get(slot)
            if stored is not None:
                return await self._replay(request, stored, fingerprint, rule)
            self._idempotency[slot] = _Stored(request.path, fingerprint)
        try:
            if rule is not None and mode == "slow":
                await self._sleep(rule.delay_ms)
            outcome = self._execute(op, auth_id, raw, key, decline=mode == "decline")
        except BaseException:
            if slot is not None:
                del self._idempotency[slot]
            raise
        if slot is not None:
            if outcome.store:
                self._idempotency[slot].status = outcome.status
                self._idempotency[slot].body = outcome.body
                self._journal_idempotency(key, self._idempotency[slot])
            else:
                del self._idempotency[slot]
        self._write_journal()
        if rule is not None and mode == "lost":
            return self._fault_response(rule)
        return _json(outcome.status, outcome.body)

    async def _replay(
        self, request: web.Request, stored: _Stored, fingerprint: bytes, rule: FaultRule | None
    ) -> web.Response:
        if stored.path != request.path or stored.fingerprint != fingerprint:
            return _error(
                422,
                "idempotency_mismatch",
                "This Idempotency-Key was used with another path or body.",
            )
        if stored.status is None or stored.body is None:
            return _error(
                409,
                "idempotency_in_progress",
                "A request with this Idempotency-Key is still being processed.",
            )
        if rule is not None and rule.mode == "slow":
            await self._sleep(rule.delay_ms)
        if rule is not None and rule.mode == "lost":
            return self._fault_response(rule)
        return _json(stored.status, stored.body, {"Idempotent-Replayed": "true"})

    @staticmethod
    def _fault_response(rule: FaultRule) -> web.Response:
        status = rule.status or 503
        headers = {"Retry-After": str(rule.retry_after)} if rule.retry_after is not None else None
        return _error(status, "provider_error", f"Injected fault: {rule.mode} {status}.", headers)

    def _execute(
        self, op: str, auth_id: str | None, raw: bytes, key: str | None, *, decline: bool
    ) -> _Outcome:
        try:
            if op == "authorize":
                return self._authorize(*_parse_authorize(raw), key, decline=decline)
            _parse_empty(raw)
        except Invalid as exc:
            return _Outcome(422, _error_body("invalid_request", str(exc)), store=False)
        assert auth_id is not None
        return self._transition(op, auth_id, key)

    def _authorize(
        self,
        amount: int,
        currency: str,
        payment_method: str,
        reference: str,
        key: str | None,
        *,
        decline: bool,
    ) -> _Outcome:
        refusal = _DECLINES["pm_card_declined"] if decline else _DECLINES.get(payment_method)
        auth = _Authorization(
            id="auth_" + secrets.token_hex(12),
            status="authorized" if refusal is None else "declined",
            amount=amount,
            currency=currency,
            reference=reference,
            payment_method=payment_method,
            created=int(time.time()),
            failure_code=None if refusal is None else refusal[0],
        )
        self._authorizations[auth.id] = auth
        self._record("authorize" if refusal is None else "decline", auth, key)
        if refusal is not None:
            code, message = refusal
            return _Outcome(402, _error_body(code, message, authorization_id=auth.id), store=True)
        return _Outcome(201, auth.view(), store=True)

    def _transition(self, op: str, auth_id: str, key: str | None) -> _Outcome:
        auth = self._authorizations.get(auth_id)
        if auth is None:
            return _Outcome(404, _error_body("not_found", f"No authorization {auth_id}."), True)
        sources, target = _TRANSITIONS[op]
        if auth.status == target:
            return _Outcome(200, auth.view(), store=True)
        if auth.status not in sources:
            message = f"Cannot {op} an authorization that is {auth.status}."
            return _Outcome(409, _error_body("invalid_state", message), store=True)
        auth.status = target
        self._record(op, auth, key)
        return _Outcome(200, auth.view(), store=True)

    # -- journal ----------------------------------------------------------------------------

    def _journal_idempotency(self, key: str | None, stored: _Stored) -> None:
        if self.journal is not None:
            self._unwritten.append(
                {
                    "idempotency": {
                        "key": key,
                        "path": stored.path,
                        "fingerprint": stored.fingerprint.hex(),
                        "status": stored.status,
                        "body": stored.body,
                    }
                }
            )

    def _write_journal(self) -> None:
        if self.journal is None or not self._unwritten:
            return
        lines = b"".join(orjson.dumps(r) + b"\n" for r in self._unwritten)
        self._unwritten = []
        # One unbuffered write: what the request did is on disk whole, or not at all.
        fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, lines)
        finally:
            os.close(fd)

    def _replay_journal(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return
        for line in raw.splitlines():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a torn last line: that request never finished
            if "ledger" in record:
                self.ledger.append(LedgerEntry(**record["ledger"]))
                auth = _Authorization(**record["authorization"])
                self._authorizations[auth.id] = auth
            else:
                stored = record["idempotency"]
                self._idempotency[(self.api_key, stored["key"])] = _Stored(
                    stored["path"],
                    bytes.fromhex(stored["fingerprint"]),
                    stored["status"],
                    stored["body"],
                )

    # -- ledger and webhooks ----------------------------------------------------------------

    def _record(self, op: str, auth: _Authorization, key: str | None) -> None:
        now = time.time()
        entry = LedgerEntry(op, auth.id, auth.reference, auth.amount, auth.currency, key, now)
        self.ledger.append(entry)
        if self.journal is not None:
            self._unwritten.append({"ledger": asdict(entry), "authorization": asdict(auth)})
        event_id = "evt_" + secrets.token_hex(12)
        event: dict[str, Any] = {
            "id": event_id,
            "type": "authorization." + auth.status,
            "created": int(now),
            "data": {
                "authorization_id": auth.id,
                "reference": auth.reference,
                "amount": auth.amount,
                "currency": auth.currency,
                "status": auth.status,
            },
        }
        if auth.failure_code is not None:
            event["data"]["failure_code"] = auth.failure_code
        self.events.append(event)
        hooks = self.webhook_faults
        if self.webhook_url is None or hooks.drop:
            return
        delivery = _Delivery(event_id, self.webhook_url, orjson.dumps(event), hooks.delay_ms)
        for _ in range(2 if hooks.duplicate else 1):
            if hooks.reverse:
                self._held.append(delivery)
            else:
                self._queue.put_nowait(delivery)

    async def _deliver_forever(self) -> None:
        while True:
            delivery = await self._queue.get()
            try:
                await self._deliver(delivery)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook %s: delivery failed", delivery.event_id)
            finally:
                self._queue.task_done()

    async def _deliver(self, delivery: _Delivery) -> None:
        assert self._session is not None
        if delivery.delay_ms:
            await asyncio.sleep(delivery.delay_ms / 1000)
        backoff = WEBHOOK_FIRST_BACKOFF_S
        for attempt in range(1, WEBHOOK_TRIES + 1):
            # Signed at each try, as Stripe does, so a late retry is not refused as stale.
            headers = {
                "Content-Type": _JSON,
                "Surge-Signature": sign(self.webhook_secret, delivery.body, int(time.time())),
            }
            status: int | None = None
            error: str | None = None
            try:
                async with self._session.post(
                    delivery.url, data=delivery.body, headers=headers
                ) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            self.deliveries.append(
                DeliveryAttempt(
                    delivery.event_id, delivery.url, attempt, status, error, time.time()
                )
            )
            if status is not None and 200 <= status < 300:
                return
            if attempt < WEBHOOK_TRIES:
                await asyncio.sleep(backoff)
                backoff *= 2
        log.warning("webhook %s: given up after %d tries", delivery.event_id, WEBHOOK_TRIES)


PROVIDER = web.AppKey("provider", FakeProvider)


@web.middleware
async def _edge(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path.startswith("/v1/") and not request.app[PROVIDER].authorized(
        request.headers.get("Authorization")
    ):
        return _error(
            401,
            "unauthorized",
            "Missing or invalid API key: send Authorization: Bearer <api key>.",
            {"WWW-Authenticate": 'Bearer realm="fake-provider"'},
        )
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        code = _HTTP_CODES.get(exc.status, "invalid_request")
        return _error(exc.status, code, exc.reason, headers)


async def authorize(request: web.Request) -> web.Response:
    return await request.app[PROVIDER].handle(request, "authorize", None)


async def capture(request: web.Request) -> web.Response:
    return await request.app[PROVIDER].handle(request, "capture", request.match_info["id"])


async def void(request: web.Request) -> web.Response:
    return await request.app[PROVIDER].handle(request, "void", request.match_info["id"])


async def refund(request: web.Request) -> web.Response:
    return await request.app[PROVIDER].handle(request, "refund", request.match_info["id"])


async def get_authorization(request: web.Request) -> web.Response:
    auth_id = request.match_info["id"]
    view = request.app[PROVIDER].authorization(auth_id)
    if view is None:
        return _error(404, "not_found", f"No authorization {auth_id}.")
    return _json(200, view)


async def admin_ledger(request: web.Request) -> web.Response:
    return _json(200, {"entries": [asdict(e) for e in request.app[PROVIDER].ledger]})


async def admin_get_faults(request: web.Request) -> web.Response:
    return _json(200, request.app[PROVIDER].faults())


async def admin_set_faults(request: web.Request) -> web.Response:
    provider = request.app[PROVIDER]
    try:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise Invalid("the body must be a JSON object") from None
        if type(body) is not dict:
            raise Invalid("the body must be a JSON object")
        unknown = set(body) - {"rules", "webhooks"}
        if unknown:
            raise Invalid(f"unknown field: {sorted(unknown)[0]}")
        rules = body.get("rules", [])
        if type(rules) is not list:
            raise Invalid("rules must be a list")
        provider.set_faults(rules, body.get("webhooks"))
    except Invalid as exc:
        return _error(422, "invalid_request", str(exc))
    return _json(200, provider.faults())


async def admin_reset_faults(request: web.Request) -> web.Response:
    request.app[PROVIDER].reset_faults()
    return _json(200, request.app[PROVIDER].faults())


async def admin_flush_webhooks(request: web.Request) -> web.Response:
    return _json(200, {"flushed": request.app[PROVIDER].flush_webhooks()})


def make_app(provider: FakeProvider) -> web.Application:
    app = web.Application(middlewares=[_edge])
    app[PROVIDER] = provider
    app.router.add_routes(
        [
            web.post("/v1/authorizations", authorize),
            web.get("/v1/authorizations/{id}", get_authorization, allow_head=False),
            web.post("/v1/authorizations/{id}/capture", capture),
            web.post("/v1/authorizations/{id}/void", void),
            web.post("/v1/authorizations/{id}/refund", refund),
            web.get("/_admin/ledger", admin_ledger, allow_head=False),
            web.get("/_admin/faults", admin_get_faults, allow_head=False),
            web.post("/_admin/faults", admin_set_faults),
            web.delete("/_admin/faults", admin_reset_faults),
            web.post("/_admin/webhooks/flush", admin_flush_webhooks),
        ]
    )
    return app


async def serve(host: str, port: int, webhook_url: str | None, journal: str | None) -> None:
    provider = FakeProvider(
        api_key=os.environ.get("PAYMENTS_API_KEY", "fake_api_key"),
        webhook_secret=os.environ.get("PAYMENTS_WEBHOOK_SECRET", "fake_webhook_secret"),
        webhook_url=webhook_url,
        journal=journal,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        url = await provider.start(host, port)
        print(f"fake provider listening on {url}", flush=True)
        await stop.wait()
    finally:
        await provider.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fake_provider", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--webhook-url", default=None, help="where events are POSTed")
    parser.add_argument("--journal", default=None, help="keep the books in this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.host, args.port, args.webhook_url, args.journal))
    return 0


if __name__ == "__main__":
    sys.exit(main())

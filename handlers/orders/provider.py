"""The payment provider's client: one shared session, a timeout per call, retries with backoff
and jitter for retryable failures only, and a circuit breaker in front of it all.

Retryable: connection errors, timeouts, 5xx, 429 (after its Retry-After) and the provider's
409 idempotency_in_progress (our own earlier attempt is still running there). Everything else
is an answer: 402 is a decline, another 4xx a permanent rejection. Every call carries an
Idempotency-Key chosen by the caller, so a retry of a request whose answer was lost is
answered from the provider's record instead of being executed twice.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import aiohttp
import orjson

from server import metrics
from server.errors import ServiceUnavailable
from server.tracing import client_span

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
MAX_RETRY_AFTER_S = 30.0


def not_configured() -> ServiceUnavailable:
    """What a payment request gets from a server started without the provider's settings."""
    return ServiceUnavailable("payments are not configured on this server", retry_after=60)


class ProviderError(Exception):
    """A provider call that did not succeed."""

    def __init__(self, message: str, *, code: str = "provider_error", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class Declined(ProviderError):
    """402: the card or account said no. Final for this payment."""


class Rejected(ProviderError):
    """Another 4xx: the provider will never accept this request (e.g. capture of a voided one)."""


class Unavailable(ProviderError):
    """Retries exhausted on retryable failures: the outcome is unknown, try again later."""


class BreakerOpen(Unavailable):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__("the payment provider is unavailable (circuit open)", code="breaker_open")
        self.retry_after_s = retry_after_s


class CircuitBreaker:
    """closed → open after `failures` consecutive failures → half-open after `reset_s`: one
    probe call goes through; its success closes the circuit, its failure opens it again."""

    def __init__(self, failures: int, reset_s: float) -> None:
        self.threshold = failures
        self.reset_s = reset_s
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._probing = False
        metrics.PAYMENTS_BREAKER_STATE.set(CLOSED)

    def _set(self, state: int) -> None:
        self.state = state
        metrics.PAYMENTS_BREAKER_STATE.set(state)

    def retry_after(self) -> float:
        return max(0.0, self.opened_at + self.reset_s - time.monotonic())

    def allow(self) -> bool:
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if self.retry_after() > 0:
                return False
            self._set(HALF_OPEN)
        if self._probing:  # half-open: only one probe at a time
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self.failures = 0
        self._probing = False
        if self.state != CLOSED:
            self._set(CLOSED)

    def failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self.state == HALF_OPEN or self.failures >= self.threshold:
            self.opened_at = time.monotonic()
            self._set(OPEN)

    def release(self) -> None:
        """A half-open probe ended without telling anything (cancelled)."""
        self._probing = False


class PaymentsClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float,
        retries: int,
        backoff_s: float,
        breaker: CircuitBreaker,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.breaker = breaker
        self.retries = retries
        self.backoff_s = backoff_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # One session for the process: its connection pool keeps provider connections warm.
        self._session = aiohttp.ClientSession(
            json_serialize=lambda v: orjson.dumps(v).decode(),
            connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=60),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def authorize(
        self, amount: int, currency: str, payment_method: str, reference: str, key: str
    ) -> dict[str, Any]:
        body = {
            "amount": amount,
            "currency": currency,
            "payment_method": payment_method,
            "reference": reference,
        }
        return await self.call("authorize", "/v1/authorizations", body, key)

    async def capture(self, authorization_id: str, key: str) -> dict[str, Any]:
        return await self.call("capture", f"/v1/authorizations/{authorization_id}/capture", {}, key)

    async def void(self, authorization_id: str, key: str) -> dict[str, Any]:
        return await self.call("void", f"/v1/authorizations/{authorization_id}/void", {}, key)

    async def refund(self, authorization_id: str, key: str) -> dict[str, Any]:
        return await self.call("refund", f"/v1/authorizations/{authorization_id}/refund", {}, key)

    def _delay(self, attempt: int) -> float:
        # Exponential backoff with full jitter (AWS architecture blog): retries from many
        # sagas spread out instead of arriving at the provider together.
        return random.uniform(0, self.backoff_s * (2**attempt))

    async def call(self, op: str, path: str, body: dict[str, Any], key: str) -> dict[str, Any]:
        assert self._session is not None, "start() first"
        last: ProviderError = Unavailable("no attempt made")
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self._delay(attempt - 1))
            if not self.breaker.allow():
                metrics.PAYMENTS_CALLS.labels(op, "breaker_open").inc()
                raise BreakerOpen(self.breaker.retry_after())
            retry_after = 0.0
            url = self.base_url + path
            headers = {**self._headers, "Idempotency-Key": key}
            try:
                with client_span(f"payments.{op}", headers, url=url) as span:
                    async with self._session.post(
                        url, data=orjson.dumps(body), headers=headers, timeout=self._timeout
                    ) as resp:
                        status = resp.status
                        span.set_status(status)
                        raw = await resp.read()
                        if status == 429:
                            retry_after = _retry_after(resp.headers.get("Retry-After"))
            except asyncio.CancelledError:
                self.breaker.release()
                raise
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.breaker.failure()
                metrics.PAYMENTS_CALLS.labels(op, "unreachable").inc()
                last = Unavailable(f"{op}: {type(exc).__name__}")
                continue
            payload = _json(raw)
            error = payload.get("error") if isinstance(payload.get("error"), dict) else {}
            code = str(error.get("code", "")) if error else ""
            if 200 <= status < 300:
                self.breaker.success()
                metrics.PAYMENTS_CALLS.labels(op, "ok").inc()
                return payload
            if status >= 500:
                self.breaker.failure()
                metrics.PAYMENTS_CALLS.labels(op, "5xx").inc()
                last = Unavailable(f"{op}: provider answered {status}", status=status)
                continue
            # The provider answered: it is healthy, whatever it said.
            self.breaker.success()
            if status == 429 or (status == 409 and code == "idempotency_in_progress"):
                metrics.PAYMENTS_CALLS.labels(op, "retry_later").inc()
                last = Unavailable(f"{op}: provider answered {status}", status=status)
                if retry_after:
                    await asyncio.sleep(retry_after)
                continue
            if status == 402:
                metrics.PAYMENTS_CALLS.labels(op, "declined").inc()
                raise Declined(f"{op}: declined", code=code or "card_declined", status=status)
            metrics.PAYMENTS_CALLS.labels(op, "rejected").inc()
            raise Rejected(
                f"{op}: provider answered {status}", code=code or "rejected", status=status
            )
        raise last


def _retry_after(raw: str | None) -> float:
    try:
        seconds = float(raw or 0)
    except ValueError:
        return 1.0
    if seconds != seconds:  # NaN: max() and min() would pass it through to sleep()
        return 1.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}

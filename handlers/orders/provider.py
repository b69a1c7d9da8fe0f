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
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from server import metrics
from server.errors import ServiceUnavailable
from server.tracing import client_span

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
MAX_RETRY_AFTER_S = 30.0
# The shared breaker: after Redis fails to answer, the process decides alone this long before
# asking it again (each call would otherwise wait out a Redis timeout first). Every process
# reads the shared state this often even when it makes no call (its POST /pay answers).
REDIS_RETRY_S = 5.0
SYNC_INTERVAL_S = 1.0
PROBE_WAIT_S = 0.2

T = TypeVar("T")
log = logging.getLogger("surge.payments")


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
    probe call goes through; its success closes the circuit, its failure opens it again.

    With `redis`, the open state is shared by every process and replica: the process that
    opens the breaker writes a key (`<prefix>payments:breaker`) whose remaining lifetime is
    the state: longer than the half-open window, open; within it, half-open, where one
    process at a time probes, holding `<prefix>payments:breaker:probe` (SET NX, expiring after
    a call's timeout should its process die); gone, closed. So one replica's discovery that
    the provider is down stops every replica calling it, for the same cool-down. Failures are
    counted per process (consecutive failures are a process's own observation). Every
    decision that needs Redis falls back to this process's own breaker when Redis does not
    answer (and for REDIS_RETRY_S after): a payment never fails because Redis is down.
    """

    def __init__(
        self,
        failures: int,
        reset_s: float,
        *,
        redis: Redis | None = None,
        prefix: str = "",
        probe_ttl_s: float = 10.0,
    ) -> None:
        self.threshold = failures
        self.reset_s = reset_s
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._probing = False
        self.redis = redis
        self.key = f"{prefix}payments:breaker"
        self.probe_key = f"{prefix}payments:breaker:probe"
        self.probe_ttl_s = probe_ttl_s
        # How long the shared state stays half-open after the cool-down when no probe settles
        # it (nobody is paying): long enough for a probe whose process died to be taken over.
        self.half_open_s = max(reset_s, 2 * probe_ttl_s)
        self._probe_token: str | None = None  # set while this process holds the shared probe
        self._redis_down_until = 0.0
        self._changes = 0  # local transitions: a Redis read older than one is not applied
        self._sync: asyncio.Task[None] | None = None
        metrics.PAYMENTS_BREAKER_STATE.set(CLOSED)

    def _set(self, state: int) -> None:
        self._changes += 1
        self.state = state
        metrics.PAYMENTS_BREAKER_STATE.set(state)

    def retry_after(self) -> float:
        return max(0.0, self.opened_at + self.reset_s - time.monotonic())

    def _known_open(self) -> bool:
        return self.state == OPEN and self.retry_after() > 0

    # -- the decisions, each shared when Redis answers --

    async def allow(self) -> bool:
        if self._known_open():  # no Redis round trip while this process knows it is open
            return False
        seen = await self._read()
        if seen is None:
            return self._allow_local()
        if seen == CLOSED:
            return True
        if seen == OPEN or self._probing:
            return False
        self._probing = True  # before the await: a second caller of this process waits its turn
        token = secrets.token_hex(8)
        try:
            taken = await self._redis_call(
                lambda r: r.set(self.probe_key, token, nx=True, px=_ms(self.probe_ttl_s))
            )
        except _RedisAway:
            return True  # the local breaker's probe (this process holds _probing)
        if not taken:
            self._probing = False
            return False
        self._probe_token = token
        return True

    async def success(self) -> None:
        probed = self._probe_token is not None
        self._probe_token = None
        self.failures = 0
        self._probing = False
        if self.state != CLOSED:
            self._set(CLOSED)
        if probed:  # this process's probe closes the breaker for everyone
            with contextlib.suppress(_RedisAway):
                await self._redis_call(lambda r: r.delete(self.key, self.probe_key))

    async def failure(self) -> None:
        probed = self._probe_token is not None
        self._probe_token = None
        self.failures += 1
        self._probing = False
        if self.state == HALF_OPEN or self.failures >= self.threshold:
            self.opened_at = time.monotonic()
            self._set(OPEN)
            with contextlib.suppress(_RedisAway):
                await self._redis_call(lambda r: self._open_shared(r, probed))

    def release(self) -> None:
        """A half-open probe ended without telling anything (cancelled). A shared probe is
        left to expire: another process probes after probe_ttl_s."""
        self._probing = False
        self._probe_token = None

    # -- this process's own breaker: Redis away --

    def _allow_local(self) -> bool:
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

    # -- the shared state --

    async def _open_shared(self, r: Redis, probed: bool) -> None:
        async with r.pipeline(transaction=False) as pipe:
            pipe.set(self.key, "open", px=_ms(self.reset_s + self.half_open_s))
            if probed:
                pipe.delete(self.probe_key)
            await pipe.execute()

    async def _read(self) -> int | None:
        """The shared state, adopted by this process; None when Redis did not answer."""
        changes = self._changes
        try:
            ttl_ms = await self._redis_call(lambda r: r.pttl(self.key))
        except _RedisAway:
            return None
        ttl = ttl_ms / 1000
        if ttl_ms < 0:  # no key: closed
            seen, retry_after = CLOSED, 0.0
        elif ttl > self.half_open_s:
            seen, retry_after = OPEN, ttl - self.half_open_s
        else:
            seen, retry_after = HALF_OPEN, 0.0
        if changes == self._changes:  # nothing happened here meanwhile (a failure opening it)
            self._adopt(seen, retry_after)
        return seen

    def _adopt(self, seen: int, retry_after: float) -> None:
        if seen == OPEN:
            self.opened_at = time.monotonic() - self.reset_s + retry_after
        elif seen == HALF_OPEN:
            self.opened_at = time.monotonic() - self.reset_s
        elif self.state != CLOSED:
            self.failures = 0
        if seen != self.state:
            self._set(seen)

    async def _redis_call(self, op: Callable[[Redis], Awaitable[T]]) -> T:
        if self.redis is None or time.monotonic() < self._redis_down_until:
            raise _RedisAway
        try:
            return await op(self.redis)
        except (RedisError, OSError) as exc:
            self._redis_down_until = time.monotonic() + REDIS_RETRY_S
            metrics.PAYMENTS_BREAKER_LOCAL.inc()
            log.warning(
                "payments breaker: Redis did not answer (%s: %s); this process decides alone"
                " for %.0fs",
                type(exc).__name__,
                exc,
                REDIS_RETRY_S,
            )
            raise _RedisAway from exc

    async def refresh(self) -> None:
        """Take the shared state in, so a process that is not calling the provider still
        answers POST /pay with 503 while another process found the provider down, and one
        that knows it open learns that another's probe (or an operator's DEL) closed it."""
        if self.redis is not None:
            await self._read()

    def start(self) -> None:
        if self.redis is not None and self._sync is None:
            self._sync = asyncio.create_task(self._sync_forever())

    async def close(self) -> None:
        if self._sync is not None:
            self._sync.cancel()
            await asyncio.wait({self._sync}, timeout=1.0)
            self._sync = None

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            try:
                await self.refresh()
            except Exception:  # a bug: logged, and the next round tries again
                log.exception("payments breaker: reading the shared state failed")


class _RedisAway(Exception):
    """Redis did not answer (or did not a moment ago): the local breaker decides."""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


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
        self.breaker.start()

    async def close(self) -> None:
        await self.breaker.close()
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
            if not await self.breaker.allow():
                metrics.PAYMENTS_CALLS.labels(op, "breaker_open").inc()
                # Half-open with another process probing: ask again shortly, not at once.
                raise BreakerOpen(self.breaker.retry_after() or PROBE_WAIT_S)
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
                await self.breaker.failure()
                metrics.PAYMENTS_CALLS.labels(op, "unreachable").inc()
                last = Unavailable(f"{op}: {type(exc).__name__}")
                continue
            payload = _json(raw)
            error = payload.get("error") if isinstance(payload.get("error"), dict) else {}
            code = str(error.get("code", "")) if error else ""
            if 200 <= status < 300:
                await self.breaker.success()
                metrics.PAYMENTS_CALLS.labels(op, "ok").inc()
                return payload
            if status >= 500:
                await self.breaker.failure()
                metrics.PAYMENTS_CALLS.labels(op, "5xx").inc()
                last = Unavailable(f"{op}: provider answered {status}", status=status)
                continue
            # The provider answered: it is healthy, whatever it said.
            await self.breaker.success()
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

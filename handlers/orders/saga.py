"""The pay saga: authorize → capture → paid; a decline or a permanent failure compensates
(void the authorization, release the stock) and ends `payment_failed`.

Its state lives in PostgreSQL (`payments.step`), written before and after every provider
call, never only in memory:

    authorizing ─► capturing ─► captured                    order paid
        │              │
        │ declined     └ rejected / gave up ─► voiding ─► voided   order payment_failed
        └ or gave up ─► failed                                      (stock released)
    captured ─► refunding ─► refunded                       order cancelled (stock released)

Every provider call carries an idempotency key derived from (order id, step), so a step run
twice (a retry after a lost answer, a saga resumed after a crash, a second replica) is
answered from the provider's record and never charges twice.

A saga is run by whichever process holds its lease (`payments.lease_until`), renewed at every
step. A process that stops (crash, deploy) stops renewing; the sweeper in every process picks
up sagas whose lease ran out, and at start-up that is every saga its predecessor left.

The same transitions serve the provider's webhooks. They are conditional UPDATEs from the
states that may precede them, so whichever of the saga and a webhook comes first moves the
order, the other finds nothing to move, and an old event can never move an order backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

from asyncpg import Connection, Record

from db import audit, idempotency, orders, payments
from db.pool import Database
from handlers.orders.provider import (
    BreakerOpen,
    CircuitBreaker,
    Declined,
    PaymentsClient,
    ProviderError,
    Rejected,
    Unavailable,
)
from handlers.orders.views import order_view
from server import metrics
from server.config import Config

log = logging.getLogger("surge.payments")

SWEEP_BATCH = 100
# Sagas one sweep resumes start at most this many a second: a restart after a crash finds all
# of its predecessor's sagas stale at once, and starting them together would hammer the
# provider and open the breaker.
RESUME_PER_S = 20.0
CANCELLED = "cancelled"  # the outcome of a payment compensated because its order was cancelled
MAX_STEP_PAUSE_S = 30.0


def reference(tenant_id: UUID, order_id: UUID) -> str:
    return f"{tenant_id}:{order_id}"


def parse_reference(ref: object) -> tuple[UUID, UUID] | None:
    if not isinstance(ref, str):
        return None
    tenant, _, order = ref.partition(":")
    try:
        return UUID(tenant), UUID(order)
    except ValueError:
        return None


# -- transitions: each one transaction, each conditional, shared by the saga and webhooks --


async def _announce(
    con: Connection,
    order: Record,
    action: str,
    payment: Record | None,
    request_id: str | None,
    actor_id: UUID | None = None,
    **details: Any,
) -> None:
    items = await orders.items_of_orders(con, order["tenant_id"], [order["id"]])
    view = order_view(order, items, payment)
    await audit.record_audit(
        con, order["tenant_id"], actor_id, action, "order", order["id"], request_id, details,
        event=view,
    )  # fmt: skip


async def authorized(
    con: Connection, tenant_id: UUID, order_id: UUID, authorization_id: str, source: str
) -> bool:
    moved = await payments.move_payment(
        con, tenant_id, order_id, ["authorizing"], "capturing", authorization_id=authorization_id
    )
    if moved is not None:
        await audit.record_audit(
            con, tenant_id, None, "payment.authorized", "order", order_id, None,
            {"authorization_id": authorization_id, "source": source},
        )  # fmt: skip
    return moved is not None


async def paid(
    con: Connection, tenant_id: UUID, order_id: UUID, authorization_id: str | None, source: str
) -> bool:
    moved = await payments.move_payment(
        con, tenant_id, order_id, ["authorizing", "capturing"], "captured",
        authorization_id=authorization_id,
    )  # fmt: skip
    if moved is None:
        return False
    order = await orders.move_order(con, tenant_id, order_id, ["paying"], "paid")
    if order is not None:
        await _announce(con, order, "order.paid", moved, None, source=source)
        metrics.PAYMENTS_SAGAS.labels("paid").inc()
    return True


async def failed(
    con: Connection,
    tenant_id: UUID,
    order_id: UUID,
    from_steps: list[str],
    to_step: str,
    outcome: str,
    source: str,
    authorization_id: str | None = None,
) -> bool:
    """The payment ended without money moving: the order fails and its stock comes back."""
    moved = await payments.move_payment(
        con, tenant_id, order_id, from_steps, to_step,
        authorization_id=authorization_id, outcome=outcome,
    )  # fmt: skip
    if moved is None:
        return False
    # A payment voided because the customer cancelled ends the order cancelled, not failed.
    to_state = "cancelled" if outcome == CANCELLED else "payment_failed"
    order = await orders.move_order(con, tenant_id, order_id, ["paying"], to_state)
    if order is not None:
        await orders.release_stock(con, tenant_id, order_id)
        await _announce(con, order, f"order.{to_state}", moved, None, reason=outcome, source=source)
        metrics.PAYMENTS_SAGAS.labels(to_state).inc()
    else:
        await audit.record_audit(
            con, tenant_id, None, f"payment.{to_step}", "order", order_id, None,
            {"reason": outcome, "source": source},
        )  # fmt: skip
    return True


async def compensate(
    con: Connection,
    tenant_id: UUID,
    order_id: UUID,
    from_steps: list[str],
    to_step: str,
    outcome: str,
    source: str,
) -> bool:
    """Money may have moved at the provider: void (or refund) it before the order fails."""
    moved = await payments.move_payment(
        con, tenant_id, order_id, from_steps, to_step, outcome=outcome
    )
    if moved is not None:
        await audit.record_audit(
            con, tenant_id, None, f"payment.{to_step}", "order", order_id, None,
            {"reason": outcome, "source": source},
        )  # fmt: skip
    return moved is not None


async def refunded(con: Connection, tenant_id: UUID, order_id: UUID, source: str) -> bool:
    moved = await payments.move_payment(con, tenant_id, order_id, ["refunding"], "refunded")
    if moved is None:
        return False
    order = await orders.move_order(con, tenant_id, order_id, ["paid"], "cancelled")
    if order is not None:
        await orders.release_stock(con, tenant_id, order_id)
        await _announce(con, order, "order.cancelled", moved, None, refunded=True, source=source)
        metrics.PAYMENTS_SAGAS.labels("refunded").inc()
        return True
    # A refund that compensated a capture nobody wanted (the saga had given up): the order
    # failed, and now no money is held either.
    to_state = "cancelled" if moved["outcome"] == CANCELLED else "payment_failed"
    order = await orders.move_order(con, tenant_id, order_id, ["paying"], to_state)
    if order is not None:
        await orders.release_stock(con, tenant_id, order_id)
        await _announce(con, order, f"order.{to_state}", moved, None, source=source)
    return True


def resume_delays(n: int, lease_s: float) -> list[float]:
    """When each of the n sagas one sweep resumes starts, in seconds from now: the i-th at a
    random point of the i-th of n equal slots of a window of n / RESUME_PER_S seconds. The
    window is at most half a lease, so the batch has started before the next sweep looks."""
    if n == 0:
        return []
    slot = min(n / RESUME_PER_S, lease_s / 2) / n
    return [(i + random.random()) * slot for i in range(n)]


async def _nothing(tenant_id: UUID) -> None:
    return None


class SagaRunner:
    """Runs the sagas this process holds the lease of, and sweeps up abandoned ones."""

    def __init__(
        self,
        pg: Database,
        client: PaymentsClient | None,
        config: Config,
        wrote: Callable[[UUID], Awaitable[None]] | None = None,
    ) -> None:
        self.pg = pg
        # After each settled step: the tenant's reads then wait for a replica to replay it
        # (server/replica.py), so a client polling its order never sees it go back.
        self.wrote = wrote or _nothing
        self.client = client
        self.lease_s = config.payments_saga_lease_s
        # How long a cancel waits for its refund before answering 202: about one provider call.
        self.answer_wait_s = config.payments_timeout_s
        self.max_attempts = config.payments_saga_attempts
        self.backoff_s = config.payments_backoff_ms / 1000
        self.tasks: dict[tuple[UUID, UUID], asyncio.Task[None]] = {}
        # Resumed sagas still waiting for their start: their lease is not this process's.
        self._waiting: set[tuple[UUID, UUID]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def breaker(self) -> CircuitBreaker | None:
        return None if self.client is None else self.client.breaker

    def start(
        self, tenant_id: UUID, order_id: UUID, *, owned: bool = False, delay_s: float = 0.0
    ) -> asyncio.Task[None] | None:
        """Run the saga unless this process already does. `owned`: the caller's transaction
        took the lease (a new payment or a refund), so renew it instead of waiting it out.
        `delay_s`: wait this long before taking the lease (a resumed saga's turn)."""
        if self.client is None or self._closing:
            return None
        key = (tenant_id, order_id)
        task = self.tasks.get(key)
        if task is not None and not task.done():
            return task
        task = asyncio.create_task(
            self._run(tenant_id, order_id, owned, delay_s), name=f"saga {order_id}"
        )
        self.tasks[key] = task
        task.add_done_callback(lambda t: self._finished(key, t))
        return task

    def _finished(self, key: tuple[UUID, UUID], task: asyncio.Task[None]) -> None:
        if self.tasks.get(key) is task:
            self.tasks.pop(key, None)
            self._waiting.discard(key)

    async def _run(self, tenant_id: UUID, order_id: UUID, owned: bool, delay_s: float) -> None:
        assert self.client is not None
        client = self.client
        attempts = 0
        renew = owned
        try:
            if delay_s > 0:
                # Not holding the lease meanwhile: another process may take the saga first,
                # and then the claim below finds nothing to take.
                self._waiting.add((tenant_id, order_id))
                await asyncio.sleep(delay_s)
                self._waiting.discard((tenant_id, order_id))
            while True:
                row = await payments.claim_payment(
                    self.pg, tenant_id, order_id, self.lease_s, renew=renew
                )
                if row is None:
                    return  # settled, or another process holds it
                renew = True
                step = row["step"]
                try:
                    await self._step(client, row)
                    await self.wrote(tenant_id)
                    attempts = 0
                except Unavailable as exc:
                    attempts += 1
                    if attempts >= self.max_attempts and step in ("authorizing", "capturing"):
                        await self._give_up(row, exc)
                        await self.wrote(tenant_id)
                        attempts = 0
                        continue
                    pause = self._pause(attempts, exc)
                    log.warning(
                        "saga %s: %s failed (%s); retrying in %.1fs", order_id, step, exc, pause
                    )
                    await asyncio.sleep(pause)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug or a database outage: the lease runs out and the sweeper tries again.
            log.exception("saga %s stopped; it resumes when its lease runs out", order_id)

    def _pause(self, attempts: int, exc: Exception) -> float:
        if isinstance(exc, BreakerOpen):
            pause = exc.retry_after_s + random.uniform(0, 0.1)
        else:
            pause = random.uniform(0, self.backoff_s * 2 ** min(attempts, 10))
        # Renewed before every step, the lease must outlast the pause.
        return min(pause, MAX_STEP_PAUSE_S, self.lease_s / 2)

    async def _step(self, client: PaymentsClient, row: Record) -> None:
        order_id, step, auth_id = row["order_id"], row["step"], row["authorization_id"]
        ids, source = (row["tenant_id"], order_id), "saga"
        if step == "authorizing":
            await self._settle(
                client.authorize(
                    row["amount_cents"],
                    row["currency"],
                    row["payment_method"],
                    reference(*ids),
                    f"{order_id}:authorize",
                ),
                lambda con, answer: authorized(con, *ids, str(answer["id"]), source),
                lambda con, code: failed(con, *ids, ["authorizing"], "failed", code, source),
            )
        elif step == "capturing":
            await self._settle(
                client.capture(auth_id, f"{order_id}:capture"),
                lambda con, _: paid(con, *ids, None, source),
                lambda con, code: compensate(con, *ids, ["capturing"], "voiding", code, source),
            )
        elif step == "voiding":
            await self._settle(
                client.void(auth_id, f"{order_id}:void"),
                lambda con, _: self._voided(con, row),
                # Refused: it was captured after all (a capture whose answer we lost). Refund.
                lambda con, code: compensate(con, *ids, ["voiding"], "refunding", code, source),
            )
        elif step == "refunding":
            await self._settle(
                client.refund(auth_id, f"{order_id}:refund"),
                lambda con, _: refunded(con, *ids, source),
                lambda con, code: self._refund_refused(con, row, code),
            )

    async def _settle(
        self,
        call: Awaitable[dict[str, Any]],
        done: Callable[[Connection, dict[str, Any]], Awaitable[object]],
        refused: Callable[[Connection, str], Awaitable[object]],
    ) -> None:
        """The provider's call, then one transaction: `done` with its answer, or `refused`
        with the code of a decline or rejection."""
        try:
            answer = await call
        except (Declined, Rejected) as exc:
            async with self.pg.transaction() as con:
                await refused(con, exc.code)
            return
        async with self.pg.transaction() as con:
            await done(con, answer)

    async def _voided(self, con: Connection, row: Record) -> None:
        outcome = row["outcome"] or "voided"
        await failed(con, row["tenant_id"], row["order_id"], ["voiding"], "voided", outcome, "saga")
        metrics.PAYMENTS_SAGAS.labels("voided").inc()

    async def _refund_refused(self, con: Connection, row: Record, code: str) -> None:
        tenant_id, order_id = row["tenant_id"], row["order_id"]
        log.error("saga %s: the provider refused the refund (%s); needs a human", order_id, code)
        await payments.move_payment(
            con, tenant_id, order_id, ["refunding"], "failed", outcome=f"refund_{code}"
        )
        await audit.record_audit(
            con, tenant_id, None, "payment.refund_refused", "order", order_id, None,
            {"code": code},
        )  # fmt: skip

    async def _give_up(self, row: Record, exc: ProviderError) -> None:
        tenant_id, order_id = row["tenant_id"], row["order_id"]
        outcome = "provider_unavailable"
        async with self.pg.transaction() as con:
            if row["step"] == "authorizing":
                # Whether the provider authorized is unknown. If it did, its webhook finds the
                # payment failed and the webhook handler voids the authorization.
                await failed(con, tenant_id, order_id, ["authorizing"], "failed", outcome, "saga")
            else:
                await compensate(
                    con, tenant_id, order_id, ["capturing"], "voiding", outcome, "saga"
                )
        log.error(
            "saga %s: gave up on %s after %d rounds (%s)",
            order_id,
            row["step"],
            self.max_attempts,
            exc,
        )

    # -- sweeping and shutdown --

    async def sweep(self) -> dict[tuple[UUID, UUID], float]:
        """Start every saga whose lease ran out (at start-up: all that were left mid-way),
        spread over a window (resume_delays); their delays, by (tenant id, order id)."""
        rows = await payments.stale_payments(self.pg, SWEEP_BATCH)
        keys = [
            (r["tenant_id"], r["order_id"])
            for r in rows
            if (r["tenant_id"], r["order_id"]) not in self.tasks
        ]
        delays = dict(zip(keys, resume_delays(len(keys), self.lease_s), strict=True))
        for (tenant_id, order_id), delay in delays.items():
            self.start(tenant_id, order_id, delay_s=delay)
        if delays:
            log.info(
                "resuming %d sagas whose lease ran out, over %.1f s",
                len(delays),
                max(delays.values()),
            )
        return delays

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
                await idempotency.prune_idempotency_keys(self.pg)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("saga sweep failed; trying again")
            await asyncio.sleep(max(self.lease_s / 2, 0.05))

    def start_sweeper(self) -> None:
        if self.client is not None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="saga sweeper")

    async def close(self, grace_s: float = 5.0) -> None:
        self._closing = True
        # A saga still waiting for its turn never took its lease: nothing of ours to hand over
        # (and releasing it could free another process's live lease).
        interrupted = [key for key in self.tasks if key not in self._waiting]
        running = [t for t in [self._sweeper, *self.tasks.values()] if t is not None]
        for t in running:
            t.cancel()
        if running:
            await asyncio.wait(running, timeout=grace_s)
        # Hand the interrupted sagas over at once instead of after their lease.
        for tenant_id, order_id in interrupted:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(payments.release_payment(self.pg, tenant_id, order_id), 2.0)

"""Access-token revocation, decided in memory on every request.

Each user has a token generation (users.token_generation), and each access token carries the
generation of its user when it was issued (the `gen` claim; a token without one is of
generation 0). Suspending or deleting a user, a password change, a role change and logout-all
bump the generation in the same transaction as the change (db.tokens.revoke_access_tokens): a
token of an older generation is refused. A generation, not a time: a token issued right after a
revocation (the next login) works whatever the clocks say, and a login that read the user just
before a concurrent suspension gets a token that is already refused.

Every process keeps, in memory, the floor generation of each user revoked within the last
access-token lifetime (older tokens have expired anyway). It learns of revocations three ways:

- at start, from PostgreSQL (every revocation of the last token lifetime);
- at once, from the Redis channel `<REDIS_KEY_PREFIX>revocations`, on which the revoking
  process publishes after its commit;
- every SWEEP_S, from PostgreSQL again (the revocations of the last seconds): a publish lost
  to a Redis outage or a partition is still learnt within a second, and while Redis is down a
  process stays current without a query per request.

So the request path is a dict lookup. Only while neither source is current (no subscription and
no successful sweep for STALE_AFTER_S, e.g. PostgreSQL slow as well) is a token checked against
PostgreSQL, per user and at most once per DB_CHECK_TTL_S (surge_revocation_db_checks_total); a
database that does not answer then fails the request rather than the token being trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from uuid import UUID

from redis.asyncio import Redis
from redis.exceptions import RedisError

from db import tokens
from db.pool import Database, Executor
from server import metrics
from server.principal import Principal

log = logging.getLogger("surge.revocation")

SWEEP_S = 0.5
# The revocations a sweep reads go back this far past the previous sweep: a revocation's time
# is taken before its transaction commits, so one that committed late is still read.
SWEEP_OVERLAP_S = 10.0
STALE_AFTER_S = 1.0
# While stale, PostgreSQL's answer for a user is reused this long (well within the 1 s promise).
DB_CHECK_TTL_S = 0.5
# Silence on the subscription for this long (no message, no answer to a PING) is a lost one.
SUBSCRIPTION_SILENCE_S = 3.0
RESUBSCRIBE_S = 1.0


class Revocations:
    """The floor generation of each recently revoked user, kept current in the background."""

    def __init__(self, token_ttl_s: int) -> None:
        self.keep_s = token_ttl_s + SWEEP_OVERLAP_S
        # Keyed by the user id's int: a UUID hashes in Python code, an int in C, and this lookup
        # is on every authenticated request.
        self._floors: dict[int, int] = {}
        self._learnt: dict[int, float] = {}  # monotonic time a floor was last raised
        self._checked: dict[int, tuple[int, float]] = {}  # stale mode: PostgreSQL's answers
        self.subscribed = False
        self._loaded = False  # the first sweep (the last token lifetime) has succeeded
        self._sweep_failing = False
        self._warned_stale = False
        self._last_sweep = -1e9
        # True until the first load, and whenever neither source is current.
        self.stale = True
        self._pg: Database | None = None
        self._redis: Redis | None = None
        self._channel = ""
        self._tasks: list[asyncio.Task[None]] = []

    # The request path

    def allows(self, p: Principal) -> bool:
        """True when the token stands for certain; False when it is revoked, or when the list
        is stale and PostgreSQL must be asked (`confirm`)."""
        floor = self._floors.get(p.user_id.int)
        return not self.stale and (floor is None or p.generation >= floor)

    async def confirm(self, p: Principal) -> bool:
        """Whether a token that `allows` did not pass stands: False if revoked; while the list
        is stale, PostgreSQL's generation of the user decides."""
        stands = self.stale and await self._check_database(p)
        if not stands:
            metrics.AUTH_FAILURES.labels("revoked").inc()
        return stands

    async def _check_database(self, p: Principal) -> bool:
        now = time.monotonic()
        key = p.user_id.int
        checked = self._checked.get(key)
        if checked is None or now - checked[1] > DB_CHECK_TTL_S:
            assert self._pg is not None, "the revocation list is started with the app"
            metrics.REVOCATION_DB_CHECKS.inc()
            generation = await tokens.token_generation(self._pg, p.tenant_id, p.user_id)
            checked = (generation if generation is not None else 0, now)
            self._checked[key] = checked
        return p.generation >= max(checked[0], self._floors.get(key, 0))

    # Writes

    async def revoke(self, con: Executor, tenant_id: UUID, user_id: UUID) -> int:
        """Bumps the user's generation, inside the caller's transaction; `announce` it after
        the commit."""
        return await tokens.revoke_access_tokens(con, tenant_id, user_id)

    async def announce(self, user_id: UUID, generation: int) -> None:
        """After the commit: this process refuses the old tokens at once, the others when the
        message reaches them (or at their next sweep, if it is lost)."""
        self._raise(user_id, generation)
        assert self._redis is not None, "the revocation list is started with the app"
        try:
            await self._redis.publish(self._channel, f"{user_id} {generation}")
        except (RedisError, OSError) as exc:
            metrics.REVOCATION_ERRORS.labels("publish").inc()
            log.warning("revocation of %s not published (%s); the others sweep it up", user_id, exc)

    def _raise(self, user_id: UUID, generation: int) -> None:
        key = user_id.int
        if generation > self._floors.get(key, -1):
            self._floors[key] = generation
        self._learnt[key] = time.monotonic()

    # The background

    async def start(self, pg: Database, redis: Redis, prefix: str) -> None:
        """Loads the revocations of the last token lifetime, then keeps the list current. A
        PostgreSQL that does not answer yet leaves the list stale until a sweep succeeds."""
        self._pg, self._redis, self._channel = pg, redis, f"{prefix}revocations"
        await self._sweep_once()
        self._tasks = [
            asyncio.create_task(self._sweep_forever(), name="revocation-sweep"),
            asyncio.create_task(self._subscribe_forever(redis), name="revocation-sub"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _sweep(self, window_s: float) -> None:
        assert self._pg is not None
        started = time.monotonic()
        async with asyncio.timeout(STALE_AFTER_S):
            rows = await tokens.revoked_since(self._pg, window_s)
        for row in rows:
            self._raise(row["id"], row["token_generation"])
        self._last_sweep = started
        self._loaded = True

    async def _sweep_once(self) -> None:
        window = min(self.keep_s, time.monotonic() - self._last_sweep + SWEEP_OVERLAP_S)
        try:
            await self._sweep(window)
        except Exception as exc:  # whatever failed (timeout, pool, connection): next round
            metrics.REVOCATION_ERRORS.labels("sweep").inc()
            if not self._sweep_failing:  # once per outage
                log.warning("revocation sweep failed: %s", exc or type(exc).__name__)
            self._sweep_failing = True
        else:
            if self._sweep_failing:
                log.info("revocation sweep succeeded again")
            self._sweep_failing = False
        self._update_stale()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            await self._sweep_once()
            self._forget()

    def _forget(self) -> None:
        """Floors older than a token lifetime: every token they refused has expired."""
        cutoff = time.monotonic() - self.keep_s
        for key in [k for k, at in self._learnt.items() if at < cutoff]:
            del self._learnt[key]
            self._floors.pop(key, None)
        if self._checked and not self.stale:
            self._checked.clear()

    def _update_stale(self) -> None:
        stale = not self._loaded or (
            not self.subscribed and time.monotonic() - self._last_sweep > STALE_AFTER_S
        )
        if stale != self.stale:
            self.stale = stale
            metrics.REVOCATION_CURRENT.set(0 if stale else 1)
            if stale and self._loaded:  # not before the first load: that is the start
                log.warning("revocation list stale: checking access tokens against PostgreSQL")
            elif not stale and self._warned_stale:
                log.info("revocation list current again")
            self._warned_stale = stale and self._loaded

    async def _subscribe_forever(self, redis: Redis) -> None:
        first = True
        while True:
            try:
                await self._listen(redis)
            except (RedisError, OSError, TimeoutError) as exc:
                if self.subscribed or first:  # once per outage
                    metrics.REVOCATION_ERRORS.labels("subscription").inc()
                    log.warning(
                        "revocation subscription lost (%s): sweeping PostgreSQL every %.1f s",
                        exc or type(exc).__name__, SWEEP_S,
                    )  # fmt: skip
            first = False
            self.subscribed = False
            self._update_stale()
            await asyncio.sleep(RESUBSCRIBE_S)

    async def _listen(self, redis: Redis) -> None:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(self._channel)
            heard = time.monotonic()
            while True:
                message = await pubsub.get_message(timeout=1.0)
                now = time.monotonic()
                if message is None:
                    if now - heard > SUBSCRIPTION_SILENCE_S:
                        raise TimeoutError("no answer to PING")
                    await pubsub.ping()
                    continue
                heard = now
                if message["type"] == "subscribe" and not self.subscribed:
                    self.subscribed = True
                    self._update_stale()
                    log.info("revocation subscription established")
                elif message["type"] == "message":
                    self._apply(message["data"])
        finally:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _apply(self, data: bytes) -> None:
        try:
            user, generation = data.split()
            self._raise(UUID(user.decode()), int(generation))
        except ValueError:
            log.warning("revocation message ignored: %r", data[:100])

"""Which pool a read goes to: the replica only when it has replayed the tenant's writes.

With DATABASE_READ_URL set, gets and lists may read from a streaming replica, which applies the
primary's WAL some milliseconds (or, under load, seconds) late. Sent there blindly, the GET
after a client's own POST can miss it: `GET /v1/orders/{id}` right after `/pay` would answer the
old status and ETag. So:

- every write a tenant is told about records, after its commit, the primary's WAL insert
  position (`pg_current_wal_insert_lsn()`) as the tenant's last-write LSN in Redis, kept as
  the maximum of all its writes (a Lua compare-and-set), shared by every process and instance.
  Tenant-wide, not per user: a payment settled by the saga or a webhook, then shown to any user
  of the tenant, is covered too, so the tenant's reads never go back in time;
- a task per process samples the replica's `pg_last_wal_replay_lsn()` every REPLICA_POLL_MS
  (and the primary's position, to tell the lag in seconds and bytes);
- a read goes to the replica only when the replica's last sampled replay position is at or past
  the tenant's last-write LSN; else to the primary.

Everything uncertain falls back to the primary, which is always right: Redis not answering, the
replica not answering (`down`), lagging more than REPLICA_MAX_LAG_S (`lagging`), or a write
whose LSN could not be read (the tenant then reads from the primary for its key's lifetime).

Why the LSN is read after the commit, in one more round trip, and not returned by the write's
own statements: inside the transaction the position is before the commit record, and other
transactions' WAL can land between the two, so a replica past that position may still not show
the commit. The insert position (not the flush position) is at or past the commit record even
with synchronous_commit off. It can overshoot by a page header when the commit ends a WAL page;
the tenant then reads from the primary until the next WAL record anywhere: safe.

Without DATABASE_READ_URL nothing here runs: `pool()` answers the primary and `wrote()`
returns at once, with no Redis command and no SQL.

Not covered: the write's LSN is recorded about a millisecond after its commit (one primary
round trip, one Redis round trip), so a read racing the write may see either state; one that
starts after the write's answer sees it. A Redis that fails exactly when a write records its LSN
leaves other processes unaware of that write: they may serve the tenant the replica's view for
up to REPLICA_MAX_LAG_S. DATABASE_READ_URL must name one replica (not several behind one
address): the sampled position is that server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Literal
from uuid import UUID

import asyncpg
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from db.pool import Database
from server import metrics
from server.keys import PRINCIPAL

log = logging.getLogger("surge.replica")

State = Literal["ok", "lagging", "down"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# After commit: at or past the commit record whatever synchronous_commit says (module doc).
_WRITE_LSN = "SELECT (pg_current_wal_insert_lsn() - '0/0')::int8"
_PRIMARY_LSN = "SELECT (pg_current_wal_lsn() - '0/0')::int8"
_REPLICA_POSITION = (
    "SELECT pg_is_in_recovery(), (pg_last_wal_replay_lsn() - '0/0')::int8,"
    " pg_postmaster_start_time()"
)
# The tenant's last-write LSN, raised only (two processes' writes land in any order). Values
# are 16 hex digits, so Lua compares them as strings without losing any of the 64 bits.
_RAISE = """
local cur = redis.call('GET', KEYS[1])
if not cur or cur < ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 1
"""
# The replay position of a read URL that is the primary itself: past any write.
_EVERYTHING = 1 << 64
# A write whose LSN could not be read pins its tenant to the primary until the key expires.
_UNKNOWN_LSN = (1 << 63) - 1
# Each probe query is bounded: a replica that hangs is `down` after this, not a stuck poller.
_PROBE_TIMEOUT_S = 1.0
# After Redis fails, reads go to the primary without asking it for this long (no per-request
# socket timeout while it is down).
_REDIS_RETRY_S = 1.0
# Local copies of this process's own writes (read before Redis: a tenant the replica has not
# caught up with goes to the primary with no Redis round trip); beyond this many, the oldest go.
_LOCAL_MAX = 10_000


class ReadRouting:
    """The read pool for a tenant (`pool`), the record of a tenant's write (`wrote`), and the
    replica's state for /readyz and the metrics (`state`, `lag_s`)."""

    def __init__(
        self,
        primary: Database,
        replica: Database | None,
        redis: Redis,
        prefix: str,
        *,
        primary_dsn: str = "",
        replica_dsn: str = "",
        max_lag_s: float = 5.0,
        poll_s: float = 0.1,
    ) -> None:
        self.primary = primary
        self.replica = replica
        self.redis = redis
        self.prefix = prefix + "wlsn:"
        self.primary_dsn = primary_dsn
        self.replica_dsn = replica_dsn
        self.max_lag_s = max_lag_s
        self.poll_s = poll_s
        # A key outlives the lag at which the replica is still used: by the time it expires, a
        # replica in use has replayed the write it recorded.
        self.key_ttl_s = int(max(60.0, 2 * max_lag_s + 10))
        self._raise = redis.register_script(_RAISE)
        self.state: State = "down"
        self.replay_lsn = -1  # the replica's replay position when last sampled; -1 unknown
        self.lag_s = 0.0
        self.lag_bytes = 0
        self._local: dict[UUID, tuple[int, float]] = {}  # tenant -> (lsn, until)
        self._redis_down_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self._cons: dict[str, asyncpg.Connection] = {}
        self._primary_started: object = None
        self._samples: deque[tuple[float, int]] = deque()  # (when, primary's position)
        self._counted = {
            reason: metrics.REPLICA_READS.labels(server, reason)
            for server, reason in metrics.REPLICA_READ_ROUTES
        }

    # --- the hot paths ----------------------------------------------------------------------
    async def pool(self, tenant_id: UUID) -> Database:
        """Where this tenant's read goes now."""
        if self.replica is None:
            return self.primary
        if self.state != "ok":
            return self._to_primary(self.state)
        now = time.monotonic()
        mine = self._local.get(tenant_id)
        if mine is not None and mine[0] > self.replay_lsn and now < mine[1]:
            return self._to_primary("behind")
        if now < self._redis_down_until:
            return self._to_primary("redis")
        try:
            raw = await self.redis.get(self.prefix + str(tenant_id))
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
            return self._to_primary("redis")
        if raw is not None and int(raw, 16) > self.replay_lsn:
            return self._to_primary("behind")
        self._counted["fresh"].inc()
        return self.replica

    async def wrote(self, tenant_id: UUID) -> None:
        """After a commit that changed what the tenant reads: its reads avoid the replica until
        the replica has replayed this far. Call it before the writer's answer is sent."""
        if self.replica is None:
            return
        try:
            lsn = int(await self.primary.fetchval(_WRITE_LSN))
        except Exception as exc:  # the commit stands; only its position is unknown
            log.warning("replica routing: no WAL position after a write (%r): primary only", exc)
            lsn = _UNKNOWN_LSN
        until = time.monotonic() + self.key_ttl_s
        mine = self._local.get(tenant_id)
        self._local[tenant_id] = (max(lsn, mine[0]) if mine else lsn, until)
        if len(self._local) > _LOCAL_MAX:
            self._prune()
        try:
            await self._raise(
                keys=[self.prefix + str(tenant_id)], args=[f"{lsn:016x}", self.key_ttl_s]
            )
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)

    def _to_primary(self, reason: str) -> Database:
        self._counted[reason].inc()
        return self.primary

    def _redis_failed(self, exc: BaseException) -> None:
        if time.monotonic() >= self._redis_down_until:
            log.warning("replica routing: Redis unavailable (%s); reads go to the primary", exc)
        self._redis_down_until = time.monotonic() + _REDIS_RETRY_S

    def _prune(self) -> None:
        now = time.monotonic()
        self._local = {
            t: (lsn, until)
            for t, (lsn, until) in self._local.items()
            if lsn > self.replay_lsn and now < until
        }
        while len(self._local) > _LOCAL_MAX:  # dicts keep insertion order: the oldest first
            del self._local[next(iter(self._local))]

    # --- the poller -------------------------------------------------------------------------
    async def start(self) -> None:
        if self.replica is not None:
            metrics.REPLICA_UP.labels("replica").set(0)
            await self.poll()  # a first sample before the first request: reads use it at once
            self._task = asyncio.create_task(self._poll_forever(), name="replica-poller")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for con in self._cons.values():
            con.terminate()
        self._cons.clear()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self.poll()

    async def poll(self) -> None:
        """One sample: the primary's position, then the replica's replay position; the state."""
        try:
            primary_lsn: int = (await self._fetchrow("primary", _PRIMARY_LSN))[0]
            now = time.monotonic()
            in_recovery, replay, started = await self._fetchrow("replica", _REPLICA_POSITION)
            itself = not in_recovery
            if itself:  # a writable server: fresh only if it is the primary itself
                if started != await self._primary_start():
                    raise LookupError("DATABASE_READ_URL is not a replica of DATABASE_URL")
                replay = primary_lsn
            elif replay is None:
                raise LookupError("the replica has replayed nothing yet")
        except Exception as exc:
            self._set_state("down", f"{type(exc).__name__}: {exc}")
            return
        self._samples.append((now, primary_lsn))
        # The newest sample the replica has replayed past says how far behind it is in time.
        caught_up_at = None
        for when, lsn in self._samples:
            if lsn <= replay:
                caught_up_at = when
        while self._samples and self._samples[0][0] < now - 2 * self.max_lag_s - 1:
            self._samples.popleft()
        if caught_up_at is None:
            caught_up_at = self._samples[0][0] if self._samples else now
        else:  # older samples can go: lag is measured from the newest one replayed
            while self._samples and self._samples[0][0] < caught_up_at:
                self._samples.popleft()
        # The primary itself (a second pool on it) has every write, even those after the sample.
        self.replay_lsn = _EVERYTHING if itself else replay
        self.lag_s = max(0.0, now - caught_up_at)
        self.lag_bytes = max(0, primary_lsn - replay)
        metrics.REPLICA_LAG_SECONDS.labels("replica").set(self.lag_s)
        metrics.REPLICA_LAG_BYTES.labels("replica").set(self.lag_bytes)
        self._set_state("lagging" if self.lag_s > self.max_lag_s else "ok", f"{self.lag_s:.1f} s")

    async def _fetchrow(self, which: str, sql: str) -> asyncpg.Record:
        """One row from the poller's own connection to WHICH (not a pool's: a busy pool must not
        make the replica look down), opened again after any failure."""
        con = self._cons.get(which)
        if con is None or con.is_closed():
            dsn = self.primary_dsn if which == "primary" else self.replica_dsn
            con = self._cons[which] = await asyncpg.connect(
                dsn,
                timeout=_PROBE_TIMEOUT_S,
                statement_cache_size=0,
                server_settings={"application_name": "surge-replica-probe"},
            )
        try:
            row = await asyncio.wait_for(con.fetchrow(sql), _PROBE_TIMEOUT_S)
        except BaseException:
            self._cons.pop(which, None)
            con.terminate()
            raise
        assert row is not None
        return row

    async def _primary_start(self) -> object:
        if self._primary_started is None:
            row = await self._fetchrow("primary", "SELECT pg_postmaster_start_time()")
            self._primary_started = row[0]
        return self._primary_started

    def _set_state(self, state: State, why: str) -> None:
        metrics.REPLICA_UP.labels("replica").set(0 if state == "down" else 1)
        if state != self.state:
            level = logging.INFO if state == "ok" else logging.WARNING
            log.log(level, "replica: %s (%s)", state, why)
            if state == "down":
                self.replay_lsn = -1
        self.state = state


READS = web.AppKey("reads", ReadRouting)


async def read_pool(request: web.Request, tenant_id: UUID) -> Database:
    """The pool this tenant's read should use (the replica when it is fresh enough)."""
    return await request.app[READS].pool(tenant_id)


async def note_write(request: web.Request, tenant_id: UUID) -> None:
    """Record a committed write of TENANT_ID's, for a handler whose caller has no token yet."""
    await request.app[READS].wrote(tenant_id)


def writes(handler: Handler) -> Handler:
    """A handler that writes what the caller's tenant reads: after it answers, and before the
    answer goes out, the tenant's reads avoid a replica that has not replayed the write."""

    @wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        principal = request.get(PRINCIPAL)
        if principal is not None:
            await request.app[READS].wrote(principal.tenant_id)
        return response

    wrapper.records_writes = True  # type: ignore[attr-defined]  # tests/test_read_replica.py
    return wrapper

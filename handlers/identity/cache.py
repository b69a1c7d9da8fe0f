"""Cache-aside for GET /v1/users/{id}: Redis holds the exact response body, so a hit and a
miss answer byte-identical bodies and the same ETag.

- Entries are `b"<version>:" + body`. A fill only replaces an entry whose version is not newer
  (one Lua script), and every write stores its new row the same way after it commits. A reader
  that fetched an old row before a write committed therefore cannot overwrite the newer entry.
- Concurrent misses for one key in this process share one database query (single flight).
- Redis failing is not an error: reads and writes go to PostgreSQL, and Redis is left alone for
  a second before it is tried again.
- An entry that may be older than PostgreSQL is forgotten (`forget`): a write-through that
  failed (Redis down: its old entry comes back with it), or a write whose outcome is unknown
  (the answer to COMMIT lost: it may have committed). Its key is deleted as soon as Redis
  answers, retried every second; until then this process reads that user from PostgreSQL.
  Another process could serve the old entry only while Redis is back and this one has not yet
  deleted it (under a second), or, if this process dies first, for USER_CACHE_TTL_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from uuid import UUID

from redis.asyncio import Redis
from redis.exceptions import RedisError

from server import metrics

log = logging.getLogger("surge.cache")

_STORE_IF_NOT_OLDER = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local v = tonumber(string.match(cur, '^(%d+):'))
  if v and v > tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""

Entry = tuple[int, bytes]  # (version, body)


class GetBatcher:
    """GETs issued in one event-loop iteration leave as one MGET.

    redis-py spends more CPU per command than asyncpg spends per query (retry wrapper, health
    check, timeout context, connection checkout), so a cache hit cost more than the query it
    saved. Under load many requests reach the cache in the same iteration; one MGET serves them
    all, and the per-request cost is a future. With one request in flight it is a plain GET
    deferred by one loop iteration.
    """

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._keys: list[str] = []
        self._futures: list[asyncio.Future[bytes | None]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, key: str) -> asyncio.Future[bytes | None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes | None] = loop.create_future()
        if not self._keys:
            loop.call_soon(self._flush)
        self._keys.append(key)
        self._futures.append(fut)
        return fut

    def _flush(self) -> None:
        keys, futures = self._keys, self._futures
        self._keys, self._futures = [], []
        task = asyncio.ensure_future(self._mget(keys, futures))
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _mget(self, keys: list[str], futures: list[asyncio.Future[bytes | None]]) -> None:
        try:
            values = await self.redis.mget(keys)
        except BaseException as exc:
            for fut in futures:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for fut, value in zip(futures, values, strict=True):
            if not fut.done():
                fut.set_result(value if isinstance(value, bytes) else None)


Loader = Callable[[], Awaitable[Entry | None]]


class UserCache:
    def __init__(self, redis: Redis, prefix: str, ttl_s: int, retry_after_failure_s: float = 1.0):
        self.redis = redis
        self.prefix = prefix + "user:"
        self.ttl_s = ttl_s
        self.retry_after_failure_s = retry_after_failure_s
        self._store = redis.register_script(_STORE_IF_NOT_OLDER)
        self._gets = GetBatcher(redis)
        self._inflight: dict[tuple[UUID | str, UUID], asyncio.Future[Entry | None]] = {}
        self._down_until = 0.0
        self._stale: set[str] = set()  # keys to delete once Redis answers (see `forget`)
        self._evicting: asyncio.Task[None] | None = None
        # The counter's children, looked up once: .labels() takes a lock and builds a key.
        self._hits, self._misses, self._errors = (
            metrics.CACHE.labels(result) for result in ("hit", "miss", "error")
        )

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    def _key(self, tenant_id: UUID | str, user_id: UUID) -> str:
        # A tenant may come as its text (Principal.tenant_text, formatted once per token), which
        # spares a str(UUID) per request.
        return f"{self.prefix}{tenant_id}:{user_id}"

    def _usable(self) -> bool:
        return self.enabled and time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        self._down_until = time.monotonic() + self.retry_after_failure_s
        self._errors.inc()
        log.warning("user cache: Redis unavailable (%s); serving from PostgreSQL", exc)

    def forget(self, tenant_id: UUID | str, user_id: UUID) -> None:
        """The entry may be older than PostgreSQL: delete it as soon as Redis answers."""
        if not self.enabled:
            return
        self._stale.add(self._key(tenant_id, user_id))
        if self._evicting is None or self._evicting.done():
            self._evicting = asyncio.get_running_loop().create_task(self._evict_stale())

    async def _evict_stale(self) -> None:
        while self._stale:
            keys = list(self._stale)
            try:
                await self.redis.delete(*keys)
            except (RedisError, OSError) as exc:
                self._failed(exc)
                await asyncio.sleep(self.retry_after_failure_s)
                continue
            self._stale.difference_update(keys)

    async def close(self) -> None:
        """At shutdown: one last try to delete what is stale, then stop trying."""
        task = self._evicting
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._stale:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.delete(*self._stale)

    async def get_or_load(self, tenant_id: UUID | str, user_id: UUID, load: Loader) -> Entry | None:
        if self._usable() and not (self._stale and self._key(tenant_id, user_id) in self._stale):
            try:
                raw = await self._gets.get(self._key(tenant_id, user_id))
            except (RedisError, OSError) as exc:
                self._failed(exc)
            else:
                if isinstance(raw, bytes):  # the client is built without decode_responses
                    self._hits.inc()
                    version, _, body = raw.partition(b":")
                    return int(version), body
                self._misses.inc()
        key = (tenant_id, user_id)
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            entry = await load()
            fut.set_result(entry)
            # Still registered while the fill is written: a request arriving now joins the
            # finished flight instead of querying again before the entry lands in Redis.
            if entry is not None:
                await self.store(tenant_id, user_id, *entry)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: waiters (if any) get it; nobody else must
            raise
        finally:
            del self._inflight[key]
        return entry

    async def store(self, tenant_id: UUID | str, user_id: UUID, version: int, body: bytes) -> bool:
        """The fill after a miss (and a new user's first entry). False: not written."""
        key = self._key(tenant_id, user_id)
        if not self._usable() or (self._stale and key in self._stale):
            return False
        try:
            await self._store(keys=[key], args=[version, b"%d:" % version + body, self.ttl_s])
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return False
        return True

    async def write_through(
        self, tenant_id: UUID | str, user_id: UUID, version: int, body: bytes
    ) -> None:
        """After a commit that changed the user: the new entry, or else the old one forgotten."""
        if self.enabled and not await self.store(tenant_id, user_id, version, body):
            self.forget(tenant_id, user_id)

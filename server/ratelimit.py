"""Token buckets per principal: local (TokenBucket) or shared by all replicas (Redis + Lua).

Both answer the same question, `take(key, rate, burst, cost=1, need=None)` -> Decision, so the
middleware does not care which one runs. A cost above 1 takes that many tokens at once (a GraphQL
query pays for the nodes it may return) when the bucket holds `need` (default min(cost, burst)).
So a cost above the burst is admitted only from a full bucket, which it leaves in debt: nothing
else passes until the refill has paid it back. One huge request is never cheaper than the same
work in small ones, and never impossible either.

The Redis limiter falls back to the local one when Redis does not answer (counted in
surge_ratelimit_fallback_total) and retries Redis after a short pause, so a Redis outage costs
one timeout per second, not one per request.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from server import metrics

log = logging.getLogger("surge.ratelimit")


class Decision(NamedTuple):
    # A tuple, not a frozen dataclass: one is made per request, and a frozen dataclass's
    # __init__ sets each field through object.__setattr__.
    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until the bucket is full again
    retry_after_s: int  # seconds until one request would be allowed (0 when allowed)

    def headers(self) -> dict[str, str]:
        h = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
        }
        if not self.allowed:
            h["Retry-After"] = str(self.retry_after_s)
        return h


class Limiter(Protocol):
    async def take(
        self, key: str, rate: float, burst: int, cost: int = 1, need: int | None = None
    ) -> Decision: ...


class TokenBucket:
    """`burst` tokens refilled at `rate` per second, the same arithmetic as the Redis script
    below. A take above what the bucket holds leaves it in debt (tokens < 0)."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, cost: int, need: int, now: float) -> Decision:
        """Take `cost` tokens if `need` are there; the decision and the bucket's state."""
        tokens = min(self.burst, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now
        allowed = tokens >= need
        if allowed:
            tokens -= cost
        self.tokens = tokens
        rate = self.rate
        remaining = max(0, math.floor(tokens))
        reset_s = math.ceil((self.burst - tokens) / rate) if tokens < self.burst else 0
        retry = 0 if allowed else max(1, math.ceil((need - tokens) / rate))
        return Decision(allowed, self.burst, remaining, reset_s, retry)


class LocalLimiter:
    """One TokenBucket per (key, rate, burst), the least recently used evicted past max_keys."""

    def __init__(
        self, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, float, int], TokenBucket] = OrderedDict()

    async def take(
        self, key: str, rate: float, burst: int, cost: int = 1, need: int | None = None
    ) -> Decision:
        now = self._clock()
        bkey = (key, rate, burst)
        bucket = self._buckets.get(bkey)
        if bucket is None:
            bucket = self._buckets[bkey] = TokenBucket(rate, burst, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(bkey)
        return bucket.take(cost, min(cost, burst) if need is None else need, now)


# KEYS[1] bucket key; ARGV rate (tokens/s), burst, cost, need (tokens that must be there to
# admit). Time comes from the Redis server so every replica sees one clock. Returns {allowed,
# remaining, reset_ms, retry_after_ms}. A cost above what the bucket holds leaves it negative:
# a debt the refill pays back.
_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil then
  tokens = burst
  ts = now
end
local elapsed = math.max(0, now - ts)
tokens = math.min(burst, tokens + elapsed * rate / 1000)
local need = tonumber(ARGV[4])
local allowed = 0
local retry_ms = 0
if tokens >= need then
  tokens = tokens - cost
  allowed = 1
else
  retry_ms = math.ceil((need - tokens) * 1000 / rate)
end
local reset_ms = math.ceil((burst - tokens) * 1000 / rate)
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], reset_ms + 1000)
return {allowed, math.max(0, math.floor(tokens)), reset_ms, retry_ms}
"""


class RedisLimiter:
    def __init__(
        self,
        redis: Redis,
        prefix: str,
        fallback: LocalLimiter | None = None,
        retry_after_failure_s: float = 1.0,
    ) -> None:
        self.redis = redis
        self.prefix = prefix + "rl:"
        self.fallback = fallback or LocalLimiter()
        self.retry_after_failure_s = retry_after_failure_s
        self._script = redis.register_script(_LUA)
        self._down_until = 0.0

    async def take(
        self, key: str, rate: float, burst: int, cost: int = 1, need: int | None = None
    ) -> Decision:
        if need is None:
            need = min(cost, burst)
        now = time.monotonic()
        if now >= self._down_until:
            try:
                res = await self._script(keys=[self.prefix + key], args=[rate, burst, cost, need])
            except (RedisError, OSError) as exc:
                self._down_until = now + self.retry_after_failure_s
                log.warning("rate limiter: Redis unavailable (%s); using the local limiter", exc)
            else:
                allowed, remaining, reset_ms, retry_ms = (int(x) for x in res)
                return Decision(
                    bool(allowed),
                    burst,
                    remaining,
                    math.ceil(reset_ms / 1000),
                    0 if allowed else max(1, math.ceil(retry_ms / 1000)),
                )
        metrics.RATELIMIT_FALLBACK.inc()
        return await self.fallback.take(key, rate, burst, cost, need)

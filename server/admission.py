"""Admission: how many requests one process serves at once, who waits, and who is refused.

Three parts, each small enough to read on its own:

- `GradientLimit`, the adaptive concurrency limit. Every admitted request's latency (slot taken
  to slot given back) is a sample. Samples are grouped in windows (WINDOW_S, or WINDOW_SAMPLES
  whichever comes first); a window's 90th percentile is the current latency, and the lowest
  window percentile seen within the last one or two REFERENCE_HORIZON_S is the no-load
  reference. The limit moves by the gradient of the two, as Netflix's concurrency-limits
  Gradient does, on the current latency less the event loop's backlog (below):

      gradient = clamp(tolerance * reference / (current - 2 x loop lag), 0.5, 1)
      new      = limit * gradient + sqrt(limit)      (sqrt: room to probe upwards)
      limit    = limit + SMOOTHING * (new - limit),  within [minimum, maximum]

  While latency stays within `tolerance` times the reference the gradient is 1 and the limit
  grows by a fraction of its square root per window; once requests queue inside the process
  (latency past tolerance x reference) it shrinks, by up to a tenth per window. A window in
  which fewer than half the slots were used says nothing about the limit: it stays.
  Why a gradient and not AIMD: AIMD needs an absolute latency target per deployment (a read is
  1 ms, a payment 50) and saws between it and a cut; the gradient is relative to what this
  process measured with no queue, so one tolerance fits every route mix, and it settles where
  latency stops improving instead of oscillating. The reference is a minimum over a sliding
  horizon (not for ever), so a database that became slower for good becomes the new normal.

  The loop lag. A sample also counts the time the request, once its query has answered, waited
  for the event loop to come back to it: behind other requests' parsing, token checks and
  refusals, none of which holds a slot. Under a flood that wait dominates and does not shrink
  when the limit does: cutting for it only idles the database, the samples stay as long, and
  the cut repeats down to the minimum, goodput (limit / latency) with it (docs/PERFORMANCE.md,
  notes of 2026-12-07). So each request's own wait for the loop is measured before it takes a
  slot, from when its head was read (server/connections.py) to when it reaches the shed layer:
  the path a query's answer takes too, from a socket's bytes to the task awaiting them. A
  window's loop lag is the 90th percentile of those waits, less the lowest such figure of the
  horizon (a quiet loop's), and LOOP_WAITS times it is taken off the window's latency before
  the gradient: the wait is counted from when the loop read the head, and an answer also waits
  in its socket until the loop reads it, so a read of one query meets the backlog about twice.
  What stays is what a lower limit can cure: a wait for a pooled connection, a slower
  PostgreSQL, any queue the admitted requests make downstream. A request that meets the
  backlog more often still counts some of it; the minimum bounds what that costs. Rejected: a
  timer that reports how late it fires (tried first: a timer runs at the start of a loop
  iteration, a woken task an iteration later, so under a flood the samples ran at several
  times its lateness and the limit still sank to the minimum); timing only the pool's acquire
  and the query (the answer waits for the loop all the same, and other queues go unseen); a
  Vegas estimate from throughput and the no-load latency (queued = in flight - throughput x
  no-load latency, Little's law), which reads a loop backlog exactly as a queue of admitted
  requests, both stretching latency at the same throughput.

  The minimum (CONCURRENCY_MIN) defaults to PG_POOL_MAX: below it the pool has idle connections
  while requests wait, so a smaller limit can only lower throughput, never a queue.

- The queue with a deadline (CoDel as Facebook's servers use it, "Fail at Scale"): a request
  may wait for a slot at most `deadline_s` counted from its arrival in the process. When the
  queue has not been empty for a whole `deadline_s` (a standing queue, not a burst), the wait
  allowed drops to half of it, or to the current latency if that is longer (a route mix whose
  requests take long may wait as long as one takes): a waiter past it is refused when its turn
  comes, not served late. The queue holds at most what the limit serves within the deadline at
  the current latency (limit x deadline / latency): a request beyond that could only be
  refused later, so it is refused at once.

- Fairness: waiters queue per tenant and slots go round-robin across the tenants waiting. When
  the queue is full, a newcomer whose tenant holds less than its share takes the place of the
  newest waiter of the tenant holding the most, so the tenant sending more than its share is
  the one refused.

No aiohttp here: the chain (server/chain.py) turns `Refused` into a 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 0.1
WINDOW_SAMPLES = 1000
MIN_WINDOW_SAMPLES = 10
REFERENCE_HORIZON_S = 30.0
SMOOTHING = 0.2
PERCENTILE = 0.9
LOOP_WAITS = 2  # the loop's backlog a read of one query meets, in measured waits (above)


class Refused(Exception):
    """A request turned away; `reason` is surge_shed_total's label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


QUEUE_FULL, DEADLINE, TENANT_SHARE = "queue_full", "deadline", "tenant_share"


class GradientLimit:
    """The adaptive limit (see the module's docstring). Fed by `sample`; reads `limit`."""

    def __init__(
        self, initial: int, minimum: int, maximum: int, tolerance: float, now: float
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.tolerance = tolerance
        self.estimate = float(min(max(initial, minimum), maximum))
        self.limit = int(self.estimate)
        # the current latency (seconds): the last window's percentile; 0 before the first
        self.latency = 0.0
        self._samples: list[float] = []
        self._peak = 0  # most requests in flight seen in this window
        self._window_end = now + WINDOW_S
        # the reference: the lowest window percentile of this horizon and of the one before
        self._ref_now = math.inf
        self._ref_before = math.inf
        self._horizon_end = now + REFERENCE_HORIZON_S
        # the event loop's backlog: this window's waits from arrival to the shed layer, the
        # last window's percentile of them, and its floor over the horizons
        self._waits: list[float] = []
        self.loop_lag = 0.0
        self._lag_floor_now = math.inf
        self._lag_floor_before = math.inf

    @property
    def reference(self) -> float:
        return min(self._ref_now, self._ref_before)

    @property
    def lag_excess(self) -> float:
        """The last window's loop lag above its floor: what the limit does not count."""
        return max(0.0, self.loop_lag - min(self._lag_floor_now, self._lag_floor_before))

    def sample(self, latency: float, in_flight: int, now: float, loop_wait: float = 0.0) -> None:
        """One admitted request finished after `latency` s, with `in_flight` (itself included)
        being served at that moment; it had waited `loop_wait` s for the loop between its
        arrival and the shed layer."""
        samples = self._samples
        samples.append(latency)
        self._waits.append(loop_wait)
        if in_flight > self._peak:
            self._peak = in_flight
        if (now >= self._window_end and len(samples) >= MIN_WINDOW_SAMPLES) or len(
            samples
        ) >= WINDOW_SAMPLES:
            self._close_window(now)

    def _close_window(self, now: float) -> None:
        samples = self._samples
        samples.sort()
        current = samples[int(len(samples) * PERCENTILE)]
        peak = self._peak
        self._samples = []
        self._peak = 0
        self._window_end = now + WINDOW_S
        if now >= self._horizon_end:
            self._ref_before, self._ref_now = self._ref_now, math.inf
            self._lag_floor_before, self._lag_floor_now = self._lag_floor_now, math.inf
            self._horizon_end = now + REFERENCE_HORIZON_S
        if current < self._ref_now:
            self._ref_now = current
        waits = self._waits
        waits.sort()
        self.loop_lag = waits[int(len(waits) * PERCENTILE)]
        self._waits = []
        if self.loop_lag < self._lag_floor_now:
            self._lag_floor_now = self.loop_lag
        self.latency = current
        limit = self.estimate
        if peak < limit / 2:
            return  # the load did not use the limit: its latency says nothing about it
        curable = current - LOOP_WAITS * self.lag_excess
        gradient = (
            1.0 if curable <= 0 else max(0.5, min(1.0, self.tolerance * self.reference / curable))
        )
        target = limit * gradient + math.sqrt(limit)
        limit += SMOOTHING * (target - limit)
        self.estimate = min(max(limit, self.minimum), self.maximum)
        self.limit = int(self.estimate)


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(Refused(DEADLINE))


Waiter = tuple[asyncio.Future[None], float]  # (its future, its arrival)


class Admission:
    """One process's slots, its queue with a deadline, and the round-robin across tenants.

    The chain takes a slot itself when one is free and nobody waits (`in_flight < limit and
    not queued`: the no-load path is two comparisons and an increment), calls `wait` otherwise,
    and gives every slot back with `release`. With `limiter` None the limit is fixed at
    `maximum` (ADAPTIVE_CONCURRENCY=false).
    """

    def __init__(
        self,
        limiter: GradientLimit | None,
        maximum: int,
        deadline_s: float,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.limiter = limiter
        self.limit = maximum if limiter is None else limiter.limit
        self.deadline_s = deadline_s
        self.clock = clock
        self.in_flight = 0
        self.queued = 0
        # tenant -> its waiters, oldest first; the dict's order is the round-robin ring
        self._queues: dict[str, deque[Waiter]] = {}
        self._busy_since = 0.0  # when the queue last went from empty to not empty

    @property
    def max_queue(self) -> int:
        """The most requests waiting: as many as the limit serves within the deadline at the
        current latency (twice the limit before a latency is measured)."""
        latency = 0.0 if self.limiter is None else self.limiter.latency
        if latency <= 0:
            return 2 * self.limit
        return max(self.limit, int(self.limit * self.deadline_s / latency))

    def allowed_wait(self, now: float) -> float:
        """The longest a request may have waited since its arrival, as of `now`."""
        deadline = self.deadline_s
        if self.queued and now - self._busy_since >= deadline:  # a standing queue
            latency = 0.0 if self.limiter is None else self.limiter.latency
            return min(deadline, max(deadline / 2, latency))
        return deadline

    def refuses_anyone(self, arrived: float | None) -> str | None:
        """The reason a request arriving at `arrived` would be refused whatever its tenant, or
        None: no slot is free and it is already past its wait (DEADLINE), or the queue is full
        of tenants holding one waiter each, so none can give way (QUEUE_FULL). Asked before the
        token is verified (server/chain.py). `arrived` None: not yet known (a body still to
        read, after which the request arrives), only the queue is judged."""
        if self.in_flight < self.limit and not self.queued:
            return None
        if arrived is not None:
            now = self.clock()
            if arrived + self.allowed_wait(now) <= now:
                return DEADLINE
        queued = self.queued
        if queued and queued >= self.max_queue and len(self._queues) >= queued:
            return QUEUE_FULL
        return None

    def precheck(self, tenant: str) -> None:
        """Refuse now a request that would be refused once its body is in: the queue is full
        and its tenant already holds its share of it (or is the only one waiting)."""
        if self.queued < self.max_queue:
            return
        queues = self._queues
        mine = queues.get(tenant)
        if mine is not None and len(mine) * len(queues) >= self.max_queue:
            raise Refused(TENANT_SHARE if len(queues) > 1 else QUEUE_FULL)

    async def wait(self, tenant: str, arrived: float) -> None:
        """Wait for a slot (taken when this returns) or raise Refused."""
        now = self.clock()
        left = arrived + self.allowed_wait(now) - now
        if left <= 0:
            raise Refused(DEADLINE)
        queues = self._queues
        mine = queues.get(tenant)
        if self.queued >= self.max_queue:
            self._make_room(0 if mine is None else len(mine))
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if mine is None:
            mine = queues[tenant] = deque()
        mine.append((fut, arrived))
        if not self.queued:
            self._busy_since = now
        self.queued += 1
        # slots free while others wait (the limit just rose): hand them out now, in ring order
        while self.in_flight < self.limit and self.queued:
            self.in_flight += 1
            if not self._hand_over(now):
                self.in_flight -= 1
        timer = loop.call_later(left, _expire, fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(None)  # handed a slot just as we gave up: pass it on
            else:
                self._forget(tenant, (fut, arrived))
            raise
        finally:
            timer.cancel()
        # a slot handed over by release() is already counted in in_flight

    def _make_room(self, mine: int) -> None:
        """The queue is full: refuse the newest waiter of the tenant holding the most, when
        that tenant holds more than the newcomer's would with it; else refuse the newcomer."""
        queues = self._queues
        tenant, largest = max(queues.items(), key=lambda item: len(item[1]))
        if len(largest) <= mine + 1:
            raise Refused(TENANT_SHARE if mine and len(queues) > 1 else QUEUE_FULL)
        fut, _ = largest.pop()
        self.queued -= 1
        if not largest:
            del queues[tenant]
        if not fut.done():
            fut.set_exception(Refused(TENANT_SHARE))

    def _forget(self, tenant: str, waiter: Waiter) -> None:
        """A waiter that gave up (deadline, cancelled) leaves the queue, if still in it."""
        mine = self._queues.get(tenant)
        if mine is None:
            return
        try:
            mine.remove(waiter)
        except ValueError:
            return  # already taken out by release() or _make_room()
        self.queued -= 1
        if not mine:
            del self._queues[tenant]

    def release(self, started: float | None, loop_wait: float = 0.0) -> None:
        """A slot given back by a request admitted at `started` (None: the slot went unused),
        which had waited `loop_wait` s for the loop before it reached the shed layer."""
        limiter = self.limiter
        now = self.clock() if started is not None or self.queued else 0.0
        if limiter is not None and started is not None:
            limiter.sample(now - started, self.in_flight, now, loop_wait)
            self.limit = limiter.limit
        if not (self.queued and self.in_flight <= self.limit and self._hand_over(now)):
            self.in_flight -= 1

    def _hand_over(self, now: float) -> bool:
        """A slot to the next waiter in the ring that is still in time; False: none was."""
        queues = self._queues
        allowed = self.allowed_wait(now)
        while queues:
            # the first tenant in the ring gives its oldest waiter, and goes to the back
            tenant = next(iter(queues))
            mine = queues.pop(tenant)
            fut, arrived = mine.popleft()
            self.queued -= 1
            if mine:
                queues[tenant] = mine
            if fut.done():
                continue  # timed out or cancelled: its own wait() has given up
            if now - arrived > allowed:
                fut.set_exception(Refused(DEADLINE))  # too late to be worth serving
                continue
            fut.set_result(None)  # the slot passes on: in_flight is unchanged
            return True
        return False


__all__ = ["DEADLINE", "QUEUE_FULL", "TENANT_SHARE", "Admission", "GradientLimit", "Refused"]

"""A fair (FIFO), bounded admission gate.

asyncio.Queue-based pools let a newly arriving task take a just-released slot ahead of one
that has been waiting, which stretches the tail of the waits (PERF-FINDINGS.md #1). Here a
released slot is handed directly to the oldest waiter, so waits are first come, first served,
and bounded by a timeout after which the caller is refused instead of queueing forever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class FairGate:
    __slots__ = ("_free", "_waiters", "capacity", "timeout")

    def __init__(self, capacity: int, timeout: float) -> None:
        self.capacity = capacity
        self.timeout = timeout
        self._free = capacity
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def in_use(self) -> int:
        return self.capacity - self._free

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        # A timer that fails the future, not asyncio.wait_for: under load most requests wait
        # here, and a timer costs less per wait than wait_for's wrapping.
        timer = loop.call_later(self.timeout, _expire, fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # The slot was handed to us just as we gave up (cancelled): pass it on.
                self.release()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise
        finally:
            timer.cancel()
        # a slot handed over by release() is already counted as taken

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from db.gate import FairGate


async def test_waiters_are_served_first_come_first_served() -> None:
    gate = FairGate(1, timeout=5)
    order: list[int] = []
    await gate.acquire()

    async def worker(i: int) -> None:
        await gate.acquire()
        order.append(i)
        await asyncio.sleep(0)
        gate.release()

    tasks = [asyncio.create_task(worker(i)) for i in range(5)]
    await asyncio.sleep(0.01)
    gate.release()
    # a newcomer arriving now must queue behind the five, not barge in
    late = asyncio.create_task(worker(99))
    await asyncio.gather(*tasks, late)
    assert order == [0, 1, 2, 3, 4, 99]
    assert gate.in_use == 0 and gate.waiting == 0


async def test_timeout_gives_up_and_leaves_no_ghost() -> None:
    gate = FairGate(1, timeout=0.05)
    await gate.acquire()
    with pytest.raises(TimeoutError):
        await gate.acquire()
    assert gate.waiting == 0
    gate.release()
    await gate.acquire()  # the slot is still usable
    assert gate.in_use == 1


@settings(max_examples=30, deadline=None)
@given(capacity=st.integers(1, 4), workers=st.integers(1, 20))
def test_never_more_than_capacity_at_once(capacity: int, workers: int) -> None:
    async def run() -> int:
        gate = FairGate(capacity, timeout=5)
        active = peak = 0

        async def worker() -> None:
            nonlocal active, peak
            await gate.acquire()
            try:
                active += 1
                peak = max(peak, active)
                await asyncio.sleep(0.001)
                active -= 1
            finally:
                gate.release()

        await asyncio.gather(*(worker() for _ in range(workers)))
        assert gate.in_use == 0
        return peak

    assert asyncio.run(run()) == min(capacity, workers)

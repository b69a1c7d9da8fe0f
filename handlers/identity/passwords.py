"""Password hashing off the event loop.

argon2id at OWASP's minimum (m=19 MiB, t=2, p=1) costs tens of milliseconds of CPU per hash;
on the loop that would stall every other request. Hashes run in a thread pool of
HASH_CONCURRENCY threads (argon2's C code releases the GIL) behind a FIFO gate, so a flood of
logins queues fairly and is refused with 503 when the queue wait passes its bound, instead of
growing without limit.
"""

from __future__ import annotations

import asyncio
import secrets
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from db.gate import FairGate
from server.errors import ServiceUnavailable

# OWASP's argon2id minimum: m=19 MiB, t=2, p=1.
OWASP_TIME_COST, OWASP_MEMORY_KIB, OWASP_PARALLELISM = 2, 19 * 1024, 1


class Hasher:
    def __init__(
        self,
        concurrency: int,
        queue_timeout_s: float = 5.0,
        time_cost: int = OWASP_TIME_COST,
        memory_cost: int = OWASP_MEMORY_KIB,
    ) -> None:
        self._ph = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_cost, parallelism=OWASP_PARALLELISM
        )
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="argon2")
        self._gate = FairGate(concurrency, queue_timeout_s)
        # Verified against when the email is unknown, so a miss costs what a hit costs.
        self._dummy = self._ph.hash(secrets.token_urlsafe(16))

    async def _run(self, fn: object, *args: str) -> object:
        try:
            await self._gate.acquire()
        except TimeoutError:
            raise ServiceUnavailable("too many password operations in progress") from None
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, fn, *args)  # type: ignore[arg-type]
        finally:
            self._gate.release()

    async def hash(self, password: str) -> str:
        result = await self._run(self._ph.hash, password)
        assert isinstance(result, str)
        return result

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return self._ph.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def verify(self, stored: str | None, password: str) -> bool:
        """False for a wrong password, and for no user at all (after the same amount of work)."""
        if stored is None:
            await self._run(self._verify, self._dummy, password)
            return False
        return bool(await self._run(self._verify, stored, password))

    def needs_rehash(self, stored: str) -> bool:
        try:
            return self._ph.check_needs_rehash(stored)
        except InvalidHashError:
            return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

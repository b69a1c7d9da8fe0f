"""The asyncpg pool behind a fair admission gate.

Every statement goes through `Database`: a FIFO gate sized to the pool decides who gets the
next connection (asyncpg's own queue lets newcomers barge ahead of waiters, which is where the
0.5 s p99 in PERF-FINDINGS.md came from), and a wait longer than the acquire timeout raises
PoolTimeout (the errors middleware answers 503) instead of hanging.

Connections are returned with a cheap reset: a ROLLBACK only if a transaction was left open,
instead of asyncpg's four-statement reset (one round trip per query saved, +20-44 % on single
row reads). That is safe because nothing here leaves session state behind: no SET (only SET
LOCAL inside transactions), no LISTEN, no session advisory locks (the migrations runner uses
its own connection). tests/test_sql_hygiene.py enforces it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal, Protocol

import asyncpg
import orjson
from asyncpg import Connection, Record
from asyncpg.pool import Pool

from db.gate import FairGate, GateTimeout

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

Isolation = Literal["read_committed", "repeatable_read", "serializable"]


class PoolTimeout(Exception):
    """No database connection became free within the acquire timeout."""


class Executor(Protocol):
    """What repository functions take: a Database or a Connection inside a transaction."""

    async def fetch(self, query: str, *args: Any) -> list[Record]: ...
    async def fetchrow(self, query: str, *args: Any) -> Record | None: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    async def execute(self, query: str, *args: Any) -> str: ...


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _init_connection(con: Connection) -> None:
    # One introspection round trip per new connection, then jsonb is orjson both ways.
    await con.set_type_codec("jsonb", encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")
    await con.set_type_codec("json", encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")


async def _cheap_reset(con: Connection) -> None:
    # With a custom reset, asyncpg still rolls back a transaction left open (Connection._reset)
    # and forgets listeners; it skips the RESET ALL / CLOSE ALL / UNLISTEN / advisory unlock
    # round trip, which nothing here needs (see the module docstring).
    return None


class Database:
    """A pool plus its gate; the methods acquire per statement and release at once."""

    def __init__(self, pool: Pool, gate: FairGate, name: str = "primary") -> None:
        self.pool = pool
        self.gate = gate
        self.name = name

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:  # a pool proxy, used as one
        try:
            await self.gate.acquire()
        except TimeoutError:
            raise PoolTimeout from None
        try:
            con = await self.pool.acquire()
            try:
                yield con  # type: ignore[misc]
            finally:
                await self.pool.release(con)
        finally:
            self.gate.release()

    @asynccontextmanager
    async def transaction(self, isolation: Isolation | None = None) -> AsyncIterator[Connection]:
        async with self.connection() as con, con.transaction(isolation=isolation):
            yield con

    async def fetch(self, query: str, *args: Any) -> list[Record]:
        async with self.connection() as con:
            result: list[Record] = await con.fetch(query, *args)
            return result

    async def fetchrow(self, query: str, *args: Any) -> Record | None:
        async with self.connection() as con:
            return await con.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.connection() as con:
            return await con.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.connection() as con:
            result: str = await con.execute(query, *args)
            return result

    async def executemany(self, query: str, args: Sequence[Sequence[Any]]) -> None:
        async with self.connection() as con:
            await con.executemany(query, args)

    def stats(self) -> dict[str, int]:
        return {
            "size": self.pool.get_size(),
            "idle": self.pool.get_idle_size(),
            "max": self.pool.get_max_size(),
            "in_use": self.gate.in_use,
            "waiting": self.gate.waiting,
        }

    async def close(self, grace_s: float = 10.0) -> None:
        # asyncio.wait, not wait_for: past the grace wait_for would cancel close() and then
        # wait, unbounded, for that cancellation; terminate() ends it at once instead.
        closing = asyncio.ensure_future(self.pool.close())
        done, _ = await asyncio.wait({closing}, timeout=grace_s)
        if not done:
            self.pool.terminate()
            closing.cancel()
            await asyncio.wait({closing}, timeout=1.0)


async def open_database(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    acquire_timeout: float,
    command_timeout: float,
    statement_cache_size: int = 1024,
    name: str = "primary",
    tracer: Tracer | None = None,
) -> Database:
    # Tracing swaps in a connection class that opens a span per statement (db/traced.py); without
    # it the pool runs asyncpg's own class and tracing costs nothing here.
    extra: dict[str, Any] = {}
    if tracer is not None:
        from db.traced import connection_class

        extra["connection_class"] = connection_class(tracer, name)
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min(min_size, max_size),
        max_size=max_size,
        command_timeout=command_timeout,
        statement_cache_size=statement_cache_size,
        # asyncpg's own reset is four statements; see the module docstring.
        reset=_cheap_reset,
        init=_init_connection,
        # Idle connections are closed after 5 minutes so a quiet replica gives back its slots.
        max_inactive_connection_lifetime=300.0,
        server_settings={"application_name": f"surge-{name}"},
        **extra,
    )
    assert pool is not None
    return Database(pool, FairGate(max_size, acquire_timeout), name)


__all__ = ["Database", "Executor", "GateTimeout", "PoolTimeout", "open_database"]

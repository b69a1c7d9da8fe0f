"""Every connection pool: `Database` (asyncpg connections behind a fair admission gate) for
statements, and `open_copy_pool` for the event writer's COPY connections.

Every statement goes through `Database`: a FIFO gate sized to the pool decides who gets the
next connection (asyncpg's own queue lets newcomers barge ahead of waiters, which is where the
long p99 tail in PERF-FINDINGS.md came from), and a wait longer than the acquire timeout
raises PoolTimeout (the errors middleware answers 503) instead of hanging.

Connections go back without a reset statement (asyncpg's pool sends four: a round trip saved
on every query). That is safe because nothing here leaves session state behind: no SET (only
SET LOCAL inside transactions), no LISTEN, no session advisory locks (the migrations runner
uses its own connection); tests/test_sql_hygiene.py enforces it. A connection that comes back
inside a transaction, or from an interrupted statement, is dropped instead. Connections stay
open until shutdown (no idle reaping): size the pool, and PgBouncer in front of many replicas,
for the peak (docs/DEPLOY.md).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal, Protocol

import asyncpg
import orjson
from asyncpg import Connection, Record
from asyncpg.pool import Pool

from db.gate import FairGate

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


class Database:
    """The pool: a FIFO gate sized to the pool in front of a stack of idle connections.

    Hand-written instead of asyncpg's Pool because that pool's release runs in a task under
    asyncio.shield and goes through a holder queue, CPU every statement pays (figures in
    docs/PERFORMANCE.md). Here acquire is the gate plus a list pop, release a list append
    plus the gate; the gate gives the FIFO order and the acquire timeout. A connection is opened
    when a slot is taken and none is idle, and dropped (and replaced on demand) when a statement
    was interrupted (cancelled, timed out, connection lost) or left a transaction open.
    """

    def __init__(
        self, connect: Callable[[], Awaitable[Connection]], max_size: int, acquire_timeout: float,
        name: str = "primary",
    ) -> None:  # fmt: skip
        self._connect = connect
        self.max_size = max_size
        self.gate = FairGate(max_size, acquire_timeout)
        self.name = name
        self._idle: list[Connection] = []  # a stack: the most recently used is warmest
        self._all: set[Connection] = set()
        self._opening = 0
        self.connection_class: type[Connection] = Connection

    async def open(self, count: int) -> None:
        """Open `count` connections ahead of the first requests."""
        cons = await asyncio.gather(*(self._new() for _ in range(min(count, self.max_size))))
        self._idle.extend(cons)

    async def _new(self) -> Connection:
        self._opening += 1
        try:
            con = await self._connect()
        finally:
            self._opening -= 1
        self._all.add(con)
        return con

    async def acquire(self) -> Connection:
        try:
            await self.gate.acquire()
        except TimeoutError:
            raise PoolTimeout from None
        if self._idle:
            return self._idle.pop()
        try:
            return await self._new()
        except BaseException:
            self.gate.release()
            raise

    def release(self, con: Connection, broken: bool = False) -> None:
        if broken or con.is_closed() or con.is_in_transaction():
            self._all.discard(con)
            if not con.is_closed():
                con.terminate()
        else:
            self._idle.append(con)
        self.gate.release()

    def connection(self) -> _Lease:
        """`async with db.connection() as con:` one connection, returned at the block's end."""
        return _Lease(self)

    @asynccontextmanager
    async def transaction(self, isolation: Isolation | None = None) -> AsyncIterator[Connection]:
        async with self.connection() as con, con.transaction(isolation=isolation):
            yield con

    async def fetch(self, query: str, *args: Any) -> list[Record]:
        # Without the lease object: these two carry the hot reads.
        con = await self.acquire()
        try:
            result: list[Record] = await con.fetch(query, *args)
        except BaseException as exc:
            self.release(con, _interrupted(type(exc)))
            raise
        self.release(con)
        return result

    async def fetchrow(self, query: str, *args: Any) -> Record | None:
        # Without the lease object: these two carry the hot reads.
        con = await self.acquire()
        try:
            row: Record | None = await con.fetchrow(query, *args)
        except BaseException as exc:
            self.release(con, _interrupted(type(exc)))
            raise
        self.release(con)
        return row

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.connection() as con:
            return await con.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.connection() as con:
            result: str = await con.execute(query, *args)
            return result

    def stats(self) -> dict[str, int]:
        return {
            "size": len(self._all) + self._opening,
            "idle": len(self._idle),
            "max": self.max_size,
            "in_use": self.gate.in_use,
            "waiting": self.gate.waiting,
        }

    async def close(self, grace_s: float = 10.0) -> None:
        """Close idle connections at once; in-use ones get `grace_s` to come back, then are
        terminated. Bounded: a stuck close cannot hold up shutdown."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        # Polling: shutdown only, and nothing else needs an event on every release.
        while self.gate.in_use and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        cons, self._idle = list(self._all), []
        self._all.clear()
        closing = [asyncio.ensure_future(c.close(timeout=2.0)) for c in cons if not c.is_closed()]
        if closing:
            _, pending = await asyncio.wait(closing, timeout=3.0)
            for task in pending:
                task.cancel()
        for c in cons:
            if not c.is_closed():
                c.terminate()


# A statement that ended in an error the server reported leaves the session as it was; one
# that was cancelled, timed out or lost its connection may leave a reply half-read on the wire,
# so that connection is dropped, not reused. Other exceptions leaving a `connection()` block
# (a 409 raised by a handler inside a transaction) come after asyncpg finished its statement.
def _interrupted(exc_type: type[BaseException]) -> bool:
    """Whether a statement that raised this may have left its connection mid-reply."""
    return not issubclass(exc_type, Exception) or issubclass(  # CancelledError, ...
        exc_type, TimeoutError | OSError | asyncpg.InterfaceError
    )


class _Lease:
    __slots__ = ("con", "db")

    def __init__(self, db: Database) -> None:
        self.db = db

    async def __aenter__(self) -> Connection:
        self.con = await self.db.acquire()
        return self.con

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        broken = exc_type is not None and _interrupted(exc_type)
        self.db.release(self.con, broken)


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
    connection_class: type[Connection] = Connection
    if tracer is not None:
        from db.traced import connection_class as traced_class

        connection_class = traced_class(tracer, name)

    async def connect() -> Connection:
        con = await asyncpg.connect(
            dsn,
            command_timeout=command_timeout,
            statement_cache_size=statement_cache_size,
            server_settings={"application_name": f"surge-{name}"},
            connection_class=connection_class,
        )
        try:
            await _init_connection(con)
        except BaseException:
            con.terminate()
            raise
        return con

    db = Database(connect, max_size, acquire_timeout, name)
    db.connection_class = connection_class
    await db.open(min_size)
    return db


_INT64 = struct.Struct("!q")


async def _init_copy_connection(con: Connection) -> None:
    # The forms db.events.copy_events needs. Binary jsonb is a version byte and the JSON text:
    # records carry it ready-made (the ingest parser produced it to check the size), so props
    # are serialised once. Binary timestamptz is int64 microseconds since 2000: an int per
    # record (one per request for events stamped now) instead of a datetime asyncpg converts
    # per row.
    await con.set_type_codec(
        "jsonb",
        encoder=bytes,
        decoder=lambda value: orjson.loads(value[1:]),
        schema="pg_catalog",
        format="binary",
    )
    await con.set_type_codec(
        "timestamptz",
        encoder=_INT64.pack,
        decoder=lambda value: _INT64.unpack(value)[0],
        schema="pg_catalog",
        format="binary",
    )


async def open_copy_pool(
    dsn: str, *, max_size: int, command_timeout: float, statement_cache_size: int, name: str
) -> Pool:
    """asyncpg's own pool of connections carrying the binary codecs of db.events.copy_events
    (timestamptz as pg_micros, jsonb as its binary form): the event writer's, apart from the
    request pool so ingestion neither waits behind nor starves it. Connects on first use, so a
    database down at start-up is not fatal."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=0,
        max_size=max_size,
        command_timeout=command_timeout,
        statement_cache_size=statement_cache_size,
        init=_init_copy_connection,
        server_settings={"application_name": f"surge-{name}"},
    )
    assert pool is not None
    return pool


async def close_copy_pool(pool: Pool, grace_s: float) -> None:
    """Close the pool, letting in-use connections come back for `grace_s`; then terminate."""
    closing = asyncio.ensure_future(pool.close())
    done, _ = await asyncio.wait({closing}, timeout=grace_s)
    if not done:
        pool.terminate()
        closing.cancel()


__all__ = [
    "Database",
    "Executor",
    "PoolTimeout",
    "close_copy_pool",
    "open_copy_pool",
    "open_database",
]

"""The connection pool, `Database` (asyncpg connections behind a fair admission gate): the
request pool (`open_database`) and the event writer's COPY connections (`open_copy_pool`).

Every statement goes through `Database`: a FIFO gate sized to the pool decides who gets the
next connection (asyncpg's own queue lets newcomers barge ahead of waiters, which is where the
long p99 tail in PERF-FINDINGS.md came from), and a wait longer than the acquire timeout
raises PoolTimeout (the errors middleware answers 503) instead of hanging.

Connections go back without a reset statement (asyncpg's pool sends four: a round trip saved
on every query). That is safe because nothing here leaves session state behind: no SET (only
SET LOCAL inside transactions), no LISTEN, no session advisory locks (the migrations runner
uses its own connection); tests/test_sql_hygiene.py enforces it. A connection that comes back
inside a transaction, or from an interrupted statement, is dropped instead.

PostgreSQL can end a connection while it sits idle here (a terminated backend, a restart, a
failover). Such a connection is never handed out: asyncpg marks it closed once it has read the
end of the socket, and acquire skips closed ones. A statement asyncpg refused before sending
anything (the connection turned out closed, or the server's goodbye had already arrived) runs
once more on another connection, and so does a transaction's BEGIN; what else fails for a
connection reason is `unavailable()`, which the errors middleware answers with 503 and
Retry-After. Connections are replaced after a maximum lifetime (jittered, so they are not all
replaced at once) and closed when idle too long, down to the minimum size, so that after a
failover every connection is a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal, Protocol

import asyncpg
import orjson
from asyncpg import Connection, Record
from asyncpg.transaction import Transaction

from db.gate import FairGate

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

Isolation = Literal["read_committed", "repeatable_read", "serializable"]
Clock = Callable[[], float]

log = logging.getLogger("surge.db")

# A lifetime is cut short by up to this fraction, at random per connection: connections opened
# together (at start, after a failover) are then not all replaced in the same moment.
LIFETIME_JITTER = 0.1


class PoolTimeout(Exception):
    """No database connection became free (or could be opened) within the acquire timeout."""


# What says that PostgreSQL could not be reached or the connection was lost: the request did
# nothing wrong and may succeed if sent again shortly. TimeoutError (an OSError) is left out:
# a statement that ran past the command timeout is not a lost connection.
_UNAVAILABLE = (
    OSError,
    asyncpg.PostgresConnectionError,  # 08xxx: the connection does not exist, failed, refused
    asyncpg.AdminShutdownError,  # 57P01: terminated by an administrator, or a fast shutdown
    asyncpg.CrashShutdownError,  # 57P02: another backend crashed
    asyncpg.CannotConnectNowError,  # 57P03: starting up, shutting down, in recovery
    asyncpg.IdleSessionTimeoutError,  # 57P05
    asyncpg.TooManyConnectionsError,  # 53300
)


def unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be reached or the connection was lost."""
    if isinstance(exc, _UNAVAILABLE):
        return not isinstance(exc, TimeoutError)
    return _not_sent(exc)


def _not_sent(exc: BaseException) -> bool:
    """Whether asyncpg refused the statement before writing any of it to the server.

    It does when it already knows the connection is gone: closed (it has read the end of the
    socket), or the server's goodbye (FATAL: terminating connection) has arrived while the
    connection was idle, which leaves the protocol consuming an error until the socket closes.
    asyncpg has no exception class for either; tests/test_pg_blips.py pins these messages
    against the asyncpg in use."""
    if type(exc) is asyncpg.InterfaceError:
        return str(exc) == "connection is closed"
    if isinstance(exc, asyncpg.InternalClientError):
        return str(exc).startswith("cannot switch to state")
    return False


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
    docs/PERFORMANCE.md). Here acquire is the gate plus a list pop (skipping connections found
    closed), release a clock read, a list append and the gate; the gate gives the FIFO order
    and the acquire timeout. A connection is opened when a slot is taken and none is idle, and
    dropped (and replaced on demand) when a statement was interrupted (cancelled, timed out,
    connection lost) or left a transaction open, or when it comes back past its lifetime. A
    reaper task closes connections idle longer than `max_idle` (down to `min_size`) and idle
    ones past their lifetime, and opens connections back up to `min_size`.

    `on_event` hears "lost" (a connection found closed), "interrupted" (one dropped after an
    interrupted statement), "lifetime", "idle" (one closed by those limits) and "retry" (a
    statement or BEGIN run again); the server counts them. `clock` is injectable for tests.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[Connection]],
        max_size: int,
        acquire_timeout: float,
        name: str = "primary",
        *,
        min_size: int = 0,
        max_lifetime: float = 0.0,
        max_idle: float = 0.0,
        clock: Clock = time.monotonic,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self._connect = connect
        self.max_size = max_size
        self.min_size = min(min_size, max_size)
        self.max_lifetime = max_lifetime
        self.max_idle = max_idle
        self.gate = FairGate(max_size, acquire_timeout)
        self.name = name
        self._clock = clock
        self._on_event = on_event
        self._idle: list[Connection] = []  # a stack: the most recently used is warmest
        self._idle_since: dict[Connection, float] = {}
        self._retire_at: dict[Connection, float] = {}  # every open connection
        self._opening = 0
        self._reaper: asyncio.Task[None] | None = None
        self.connection_class: type[Connection] = Connection

    async def open(self, count: int) -> None:
        """Open `count` connections ahead of the first requests, and start the reaper."""
        cons = await asyncio.gather(*(self._new() for _ in range(min(count, self.max_size))))
        now = self._clock()
        for con in cons:
            self._idle.append(con)
            self._idle_since[con] = now
        if self._reaper is None and (self.max_lifetime or self.max_idle):
            self._reaper = asyncio.create_task(self._reap_forever())

    async def _new(self) -> Connection:
        self._opening += 1
        try:
            con = await self._connect()
        finally:
            self._opening -= 1
        lifetime = self.max_lifetime * (1 - LIFETIME_JITTER * random.random())
        self._retire_at[con] = self._clock() + lifetime if lifetime else math.inf
        return con

    def _drop(self, con: Connection, reason: str) -> None:
        """Forget `con` and close it (it may be closed already)."""
        self._retire_at.pop(con, None)
        self._idle_since.pop(con, None)
        if not con.is_closed():
            con.terminate()
        if reason == "lost":
            log.warning("database connection lost; it will be replaced (pool %s)", self.name)
        if self._on_event is not None:
            self._on_event(reason)

    def _pop_live(self) -> Connection | None:
        """The warmest idle connection that is still open, or None."""
        idle = self._idle
        while idle:
            con = idle.pop()
            if not con.is_closed():
                return con
            self._drop(con, "lost")
        return None

    async def _open_for_slot(self) -> Connection:
        """A new connection for a slot just taken; the slot is given back if none opens."""
        try:
            return await self._new()
        except TimeoutError:
            self.gate.release()
            raise PoolTimeout("connecting to the database took too long") from None
        except BaseException:
            self.gate.release()
            raise

    async def acquire(self) -> Connection:
        try:
            await self.gate.acquire()
        except TimeoutError:
            raise PoolTimeout from None
        idle = self._idle  # _pop_live inline: this is every statement's path
        while idle:
            con = idle.pop()
            if not con.is_closed():
                return con
            self._drop(con, "lost")
        return await self._open_for_slot()

    async def _swap(self, lost: Connection) -> Connection:
        """Another connection in place of `lost`, which is dropped, keeping the gate slot: a
        statement run again does not queue behind the requests that came after it."""
        self._drop(lost, "lost")
        if self._on_event is not None:
            self._on_event("retry")
        con = self._pop_live()
        if con is not None:
            return con
        return await self._open_for_slot()

    def release(self, con: Connection, broken: bool = False) -> None:
        if broken or con.is_closed() or con.is_in_transaction():
            self._drop(con, "lost" if con.is_closed() else "interrupted")
        else:
            now = self._clock()
            if now < self._retire_at.get(con, -math.inf):  # absent: dropped by close()
                self._idle.append(con)
                self._idle_since[con] = now
            else:
                self._drop(con, "lifetime")
        self.gate.release()

    def connection(self) -> _Lease:
        """`async with db.connection() as con:` one connection, returned at the block's end."""
        return _Lease(self)

    @asynccontextmanager
    async def transaction(self, isolation: Isolation | None = None) -> AsyncIterator[Connection]:
        """One transaction. A statement inside it is never run again: the caller sees its
        error (the statements before it are rolled back)."""
        con, tx = await self._begin(isolation)
        try:
            try:
                yield con
            except BaseException:
                # A failed ROLLBACK leaves the connection in its transaction (or closed), so
                # it is dropped below; the caller hears its own error, not the ROLLBACK's.
                with contextlib.suppress(Exception):
                    await tx.rollback()
                raise
            await tx.commit()
        except BaseException as exc:
            self.release(con, _interrupted(type(exc)))
            raise
        self.release(con)

    async def _begin(self, isolation: Isolation | None) -> tuple[Connection, Transaction]:
        """A connection and its started transaction. BEGIN runs once more on another
        connection if the first turns out lost: BEGIN alone changes nothing, whatever became
        of it."""
        con = await self.acquire()
        tx = con.transaction(isolation=isolation)
        try:
            await tx.start()
        except BaseException as exc:
            if not (isinstance(exc, Exception) and unavailable(exc)):
                self.release(con, _interrupted(type(exc)))
                raise
            con = await self._swap(con)
            tx = con.transaction(isolation=isolation)
            try:
                await tx.start()
            except BaseException as again:
                self.release(con, _interrupted(type(again)))
                raise
        return con, tx

    async def fetch(self, query: str, *args: Any) -> list[Record]:
        # Without the lease object: these carry the hot reads.
        con = await self.acquire()
        try:
            result: list[Record] = await con.fetch(query, *args)
        except BaseException as exc:
            con, result = await self._again(con, exc, "fetch", query, args)
        self.release(con)
        return result

    async def fetchrow(self, query: str, *args: Any) -> Record | None:
        con = await self.acquire()
        try:
            row: Record | None = await con.fetchrow(query, *args)
        except BaseException as exc:
            con, row = await self._again(con, exc, "fetchrow", query, args)
        self.release(con)
        return row

    async def fetchval(self, query: str, *args: Any) -> Any:
        con = await self.acquire()
        try:
            value = await con.fetchval(query, *args)
        except BaseException as exc:
            con, value = await self._again(con, exc, "fetchval", query, args)
        self.release(con)
        return value

    async def execute(self, query: str, *args: Any) -> str:
        con = await self.acquire()
        try:
            status: str = await con.execute(query, *args)
        except BaseException as exc:
            con, status = await self._again(con, exc, "execute", query, args)
        self.release(con)
        return status

    async def _again(
        self, con: Connection, exc: BaseException, method: str, query: str, args: tuple[Any, ...]
    ) -> tuple[Connection, Any]:
        """After `exc` from `con.<method>(query, *args)`: the statement once more on another
        connection if none of it was sent; else `con` is released and `exc` raised."""
        if not _not_sent(exc):
            self.release(con, _interrupted(type(exc)))
            raise exc
        con = await self._swap(con)
        try:
            return con, await getattr(con, method)(query, *args)
        except BaseException as again:
            self.release(con, _interrupted(type(again)))
            raise

    async def reap(self) -> None:
        """Close idle connections that are closed already, past their lifetime or idle longer
        than `max_idle` (keeping `min_size` open); then open connections up to `min_size`."""
        now = self._clock()
        keep: list[Connection] = []
        spare = len(self._retire_at) - self.min_size
        for con in self._idle:  # coldest first
            if con.is_closed():
                self._drop(con, "lost")
            elif now >= self._retire_at[con]:
                self._drop(con, "lifetime")
            elif self.max_idle and spare > 0 and now - self._idle_since[con] >= self.max_idle:
                self._drop(con, "idle")
            else:
                keep.append(con)
                continue
            spare -= 1
        self._idle[:] = keep
        missing = self.min_size - len(self._retire_at) - self._opening
        if missing > 0:
            await self.open(missing)

    async def _reap_forever(self) -> None:
        # Often enough that a lifetime's jitter is not rounded away and an idle connection is
        # closed soon after its limit.
        limits = [t for t in (self.max_idle, self.max_lifetime * LIFETIME_JITTER) if t]
        every = min(10.0, max(0.01, min(limits) / 4))
        while True:
            await asyncio.sleep(every)
            try:
                await self.reap()
            except Exception as exc:  # a connect that failed: tried again next round
                log.warning("database pool %s: reopening connections failed: %r", self.name, exc)

    def stats(self) -> dict[str, int]:
        return {
            "size": len(self._retire_at) + self._opening,
            "idle": len(self._idle),
            "max": self.max_size,
            "in_use": self.gate.in_use,
            "waiting": self.gate.waiting,
        }

    async def close(self, grace_s: float = 10.0) -> None:
        """Close idle connections at once; in-use ones get `grace_s` to come back, then are
        terminated. Bounded: a stuck close cannot hold up shutdown."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        # Polling: shutdown only, and nothing else needs an event on every release.
        while self.gate.in_use and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        cons, self._idle = list(self._retire_at), []
        self._retire_at.clear()
        self._idle_since.clear()
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
        exc_type, TimeoutError | OSError | asyncpg.InterfaceError | asyncpg.InternalClientError
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


def _connector(
    dsn: str,
    *,
    init: Callable[[Connection], Awaitable[None]],
    connect_timeout: float,
    command_timeout: float,
    statement_cache_size: int,
    name: str,
    connection_class: type[Connection] = Connection,
) -> Callable[[], Awaitable[Connection]]:
    async def connect() -> Connection:
        con = await asyncpg.connect(
            dsn,
            timeout=connect_timeout,
            command_timeout=command_timeout,
            statement_cache_size=statement_cache_size,
            server_settings={"application_name": f"surge-{name}"},
            connection_class=connection_class,
        )
        try:
            await init(con)
        except BaseException:
            con.terminate()
            raise
        return con

    return connect


async def open_database(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    acquire_timeout: float,
    command_timeout: float,
    statement_cache_size: int = 1024,
    max_lifetime: float = 0.0,
    max_idle: float = 0.0,
    name: str = "primary",
    tracer: Tracer | None = None,
    on_event: Callable[[str], None] | None = None,
    clock: Clock = time.monotonic,
) -> Database:
    # Tracing swaps in a connection class that opens a span per statement (db/traced.py); without
    # it the pool runs asyncpg's own class and tracing costs nothing here.
    connection_class: type[Connection] = Connection
    if tracer is not None:
        from db.traced import connection_class as traced_class

        connection_class = traced_class(tracer, name)

    # Connecting counts against the acquire timeout: an address that does not answer (a
    # failover in progress) is a 503 in that time, not a request hanging for asyncpg's minute.
    connect = _connector(
        dsn,
        init=_init_connection,
        connect_timeout=acquire_timeout,
        command_timeout=command_timeout,
        statement_cache_size=statement_cache_size,
        name=name,
        connection_class=connection_class,
    )
    db = Database(
        connect,
        max_size,
        acquire_timeout,
        name,
        min_size=min_size,
        max_lifetime=max_lifetime,
        max_idle=max_idle,
        clock=clock,
        on_event=on_event,
    )
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
    dsn: str,
    *,
    max_size: int,
    acquire_timeout: float,
    command_timeout: float,
    statement_cache_size: int,
    name: str,
    max_lifetime: float = 0.0,
    max_idle: float = 0.0,
    on_event: Callable[[str], None] | None = None,
) -> Database:
    """A pool of connections carrying the binary codecs of db.events.copy_events (timestamptz
    as pg_micros, jsonb as its binary form): the event writer's, apart from the request pool
    so ingestion neither waits behind nor starves it. Connects on first use, so a database
    down at start-up is not fatal."""
    connect = _connector(
        dsn,
        init=_init_copy_connection,
        connect_timeout=acquire_timeout,
        command_timeout=command_timeout,
        statement_cache_size=statement_cache_size,
        name=name,
    )
    db = Database(
        connect,
        max_size,
        acquire_timeout,
        name,
        max_lifetime=max_lifetime,
        max_idle=max_idle,
        on_event=on_event,
    )
    await db.open(0)
    return db


__all__ = [
    "Database",
    "Executor",
    "PoolTimeout",
    "open_copy_pool",
    "open_database",
    "unavailable",
]

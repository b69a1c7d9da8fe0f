"""PostgreSQL blips (issue 18, defect 1): backends terminated under the pool, a failover.

A connection that died while idle is never handed to a request; a statement refused before
anything of it was sent is run again on a fresh connection; what still fails for a connection
reason is 503 with Retry-After, never 500; connections are replaced after a maximum lifetime and
closed when idle too long. Real PostgreSQL throughout; the timing windows of a termination (the
server's goodbye not yet read, read but the socket not yet closed, closed) are made
deterministic by a relay between the pool and PostgreSQL that holds back what the server sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import ClientResponse

from db.pool import Database, open_database, unavailable
from handlers.events.keys import EVENT_WRITER
from server.app import create_app
from server.config import Config
from server.keys import PG

from .conftest import configured
from .helpers import signup

KILL_APP_BACKENDS = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1 AND pid <> pg_backend_pid()
"""
APP_BACKENDS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1 AND pid <> pg_backend_pid()
"""


async def kill_backends(dsn: str, application_name: str = "surge-primary") -> int:
    """Terminate the pool's backends and wait until PostgreSQL has let them go."""
    con = await asyncpg.connect(dsn)
    try:
        killed: int = await con.fetchval(KILL_APP_BACKENDS, application_name)
        for _ in range(500):  # each round trip lets the backends exit; bounded, no clock
            if await con.fetchval(APP_BACKENDS, application_name) == 0:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the terminated backends did not go away")
        return killed
    finally:
        await con.close()


async def assert_ok_or_unavailable(resp: ClientResponse, ok: int) -> None:
    """`ok`, or a 503 problem with Retry-After; never a 500."""
    if resp.status == 503:
        assert resp.headers["Retry-After"] == "1"
        assert resp.content_type == "application/problem+json"
        body = await resp.json()
        assert body["status"] == 503 and body["type"] == "/problems/unavailable"
    else:
        assert resp.status == ok, await resp.text()


@pytest.fixture
def app_config(config: Config) -> Config:
    return configured(config, user_cache_ttl_s=0, pg_pool_min=4, pg_pool_max=8)


async def _warm(client: Any, owner: Any, n: int) -> None:
    """Use n connections at once, so the pool holds n idle ones afterwards."""
    await asyncio.gather(
        *(client.get(f"/v1/users/{owner.id}", headers=owner.headers) for _ in range(n))
    )


async def test_after_backends_were_terminated_every_request_succeeds(
    aiohttp_client: Any, app_config: Config
) -> None:
    client = await aiohttp_client(create_app(app_config))
    owner = await signup(client)
    await _warm(client, owner, 8)
    assert app_config.database_url is not None
    assert await kill_backends(app_config.database_url) >= 4
    # Every idle connection is dead and its end already read: none may reach a request.
    for i in range(3):
        resp = await client.get(f"/v1/users/{owner.id}", headers=owner.headers)
        assert resp.status == 200, await resp.text()
        resp = await client.get("/v1/users", headers=owner.headers)
        assert resp.status == 200, await resp.text()
        product = {"sku": f"sku-{i}", "name": "n", "price_cents": 1, "currency": "EUR", "stock": 1}
        resp = await client.post("/v1/products", json=product, headers=owner.headers)
        assert resp.status == 201, await resp.text()


async def test_requests_racing_a_termination_are_answered_or_refused_with_503(
    aiohttp_client: Any, app_config: Config
) -> None:
    client = await aiohttp_client(create_app(app_config))
    owner = await signup(client)
    assert app_config.database_url is not None
    admin = await asyncpg.connect(app_config.database_url)
    try:
        for round_ in range(5):
            await _warm(client, owner, 8)
            await admin.fetchval(KILL_APP_BACKENDS, "surge-primary")
            # at once, while the goodbyes are still on their way
            reads = [client.get(f"/v1/users/{owner.id}", headers=owner.headers) for _ in range(6)]
            lists = [client.get("/v1/users", headers=owner.headers) for _ in range(3)]
            writes = [
                client.post(
                    "/v1/products",
                    json={
                        "sku": f"r{round_}-{i}",
                        "name": "n",
                        "price_cents": 1,
                        "currency": "EUR",
                        "stock": 1,
                    },
                    headers=owner.headers,
                )
                for i in range(3)
            ]
            answers = await asyncio.gather(*reads, *lists, *writes)
            for resp in answers[:9]:
                await assert_ok_or_unavailable(resp, 200)
            for resp in answers[9:]:
                await assert_ok_or_unavailable(resp, 201)
    finally:
        await admin.close()


# --- the timing windows of a termination, made deterministic ---------------------------------


class Relay:
    """A TCP relay between a pool and PostgreSQL that can hold back what the server sends.

    `flow` cleared: the server's bytes (and its closing the socket) wait in the relay, as if
    still on the wire. `eof` cleared: bytes pass, but the client's socket stays open after the
    server closed its side. `server_gone` is set when a server side closed; `client_spoke` when
    a client sent bytes after that (a statement that went out on a dead connection)."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._dsn = dsn
        self.flow = asyncio.Event()
        self.eof = asyncio.Event()
        self.flow.set()
        self.eof.set()
        self.server_gone = asyncio.Event()
        self.client_spoke = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        """Listen; the DSN that goes through the relay."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(self._dsn)
        netloc = parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        sreader, swriter = await asyncio.open_connection(*self._upstream)
        self._writers += [cwriter, swriter]
        gone = False

        async def up() -> None:
            while data := await creader.read(65536):
                if gone:
                    self.client_spoke.set()
                else:
                    swriter.write(data)
            swriter.close()

        async def down() -> None:
            nonlocal gone
            held: list[bytes] = []
            while data := await sreader.read(65536):
                held.append(data)
                if self.flow.is_set():
                    cwriter.write(b"".join(held))
                    held.clear()
            gone = True
            self.server_gone.set()
            await self.flow.wait()
            cwriter.write(b"".join(held))
            await self.eof.wait()
            cwriter.close()

        for coro in (up(), down()):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def reset(self) -> None:
        self.server_gone.clear()
        self.client_spoke.clear()

    async def close(self) -> None:
        self.flow.set()
        self.eof.set()
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def relay(config: Config) -> AsyncIterator[tuple[Relay, str]]:
    assert config.database_url is not None
    r = Relay(config.database_url)
    dsn = await r.start()
    try:
        yield r, dsn
    finally:
        await r.close()


@pytest.fixture
async def blip_pool(relay: tuple[Relay, str]) -> AsyncIterator[tuple[Database, list[str]]]:
    """A pool through the relay, one connection open, its events recorded."""
    events: list[str] = []
    db = await open_database(
        relay[1],
        min_size=1,
        max_size=2,
        acquire_timeout=5,
        command_timeout=5,
        name="blip",
        on_event=events.append,
    )
    try:
        yield db, events
    finally:
        await db.close()


async def _settle() -> None:
    """Let the event loop read what the relay has already written to the client's socket."""
    for _ in range(5):
        await asyncio.sleep(0.01)


async def test_goodbye_read_while_idle_is_not_sent_and_the_statement_runs_again(
    config: Config, relay: tuple[Relay, str], blip_pool: tuple[Database, list[str]]
) -> None:
    r, _ = relay
    db, events = blip_pool
    assert config.database_url is not None
    r.eof.clear()  # the FATAL arrives, the socket stays open: asyncpg cannot tell it is closed
    await kill_backends(config.database_url, "surge-blip")
    await r.server_gone.wait()
    await _settle()
    assert await db.fetchval("SELECT 41 + 1") == 42
    assert events == ["lost", "retry"]
    assert db.stats() == {"size": 1, "idle": 1, "max": 2, "in_use": 0, "waiting": 0}


async def test_a_statement_sent_to_a_dead_backend_is_not_run_again(
    config: Config, relay: tuple[Relay, str], blip_pool: tuple[Database, list[str]]
) -> None:
    r, _ = relay
    db, events = blip_pool
    assert config.database_url is not None
    r.flow.clear()  # the FATAL is still "on the wire" when the statement goes out
    await kill_backends(config.database_url, "surge-blip")
    await r.server_gone.wait()
    statement = asyncio.create_task(db.fetchval("SELECT 1"))
    await r.client_spoke.wait()
    r.flow.set()
    with pytest.raises(asyncpg.ConnectionDoesNotExistError) as caught:
        await statement
    assert isinstance(caught.value.__cause__, asyncpg.AdminShutdownError)
    assert unavailable(caught.value)
    assert events == ["lost"]  # dropped, not run again: it reached the server's socket
    assert await db.fetchval("SELECT 2") == 2
    assert db.stats()["in_use"] == 0


async def test_begin_sent_to_a_dead_backend_is_sent_again(
    config: Config, relay: tuple[Relay, str], blip_pool: tuple[Database, list[str]]
) -> None:
    r, _ = relay
    db, events = blip_pool
    assert config.database_url is not None
    r.flow.clear()
    await kill_backends(config.database_url, "surge-blip")
    await r.server_gone.wait()

    async def write() -> int:
        async with db.transaction() as con:
            value: int = await con.fetchval("SELECT 7")
            return value

    transaction = asyncio.create_task(write())
    await r.client_spoke.wait()
    r.flow.set()
    assert await transaction == 7
    assert events == ["lost", "retry"]


async def test_a_statement_inside_a_transaction_is_not_run_again(
    config: Config, blip_pool: tuple[Database, list[str]]
) -> None:
    db, events = blip_pool
    assert config.database_url is not None
    await db.execute("CREATE TEMP TABLE IF NOT EXISTS t (x int)")  # (never reaches the app)
    with pytest.raises(asyncpg.InterfaceError) as caught:
        async with db.transaction() as con:
            await con.execute("SELECT 1")
            await kill_backends(config.database_url, "surge-blip")
            for _ in range(500):  # bounded, no clock: until asyncpg has read the end
                if con.is_closed():
                    break
                await asyncio.sleep(0.01)
            await con.execute("SELECT 2")
    assert str(caught.value) == "connection is closed"  # the message db.pool relies on
    assert unavailable(caught.value)
    assert "retry" not in events and events.count("lost") == 1
    assert db.stats()["in_use"] == 0
    assert await db.fetchval("SELECT 3") == 3


async def test_a_statement_that_cannot_be_retried_is_a_503_with_retry_after(
    aiohttp_client: Any, app_config: Config, relay: tuple[Relay, str]
) -> None:
    r, dsn = relay
    client = await aiohttp_client(
        create_app(configured(app_config, database_url=dsn, pg_pool_min=1, pg_pool_max=1))
    )
    owner = await signup(client)
    assert app_config.database_url is not None
    r.flow.clear()
    await kill_backends(app_config.database_url)
    await r.server_gone.wait()
    request = asyncio.create_task(client.get(f"/v1/users/{owner.id}", headers=owner.headers))
    await r.client_spoke.wait()
    r.flow.set()
    resp = await request
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body["type"] == "/problems/unavailable"
    assert body["detail"] == "the database could not be reached; retry shortly"
    # the next one is served on a new connection
    resp = await client.get(f"/v1/users/{owner.id}", headers=owner.headers)
    assert resp.status == 200


async def test_the_event_writer_writes_its_batch_after_a_termination(
    aiohttp_client: Any, app_config: Config, relay: tuple[Relay, str]
) -> None:
    r, dsn = relay
    app = create_app(configured(app_config, database_url=dsn, events_writers=1))
    client = await aiohttp_client(app)
    owner = await signup(client)
    batch = {"events": [{"name": "click"}, {"name": "view"}]}
    assert (await client.post("/v1/events", json=batch, headers=owner.headers)).status == 202
    assert app_config.database_url is not None
    r.flow.clear()
    await kill_backends(app_config.database_url, "surge-events")
    await r.server_gone.wait()
    request = asyncio.create_task(client.post("/v1/events", json=batch, headers=owner.headers))
    await r.client_spoke.wait()  # the writer's BEGIN went out on the dead connection
    r.flow.set()
    assert (await request).status == 202
    assert app[EVENT_WRITER].pending == 0
    assert await app[PG].fetchval("SELECT count(*) FROM events") == 4


# --- lifetime and idle reaping -------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _pids(db: Database, n: int) -> set[int]:
    """The backend pids of n connections held at once (so n are open afterwards)."""
    cons = [await db.acquire() for _ in range(n)]
    pids = {con.get_server_pid() for con in cons}
    for con in cons:
        db.release(con)
    return pids


async def test_idle_connections_are_closed_down_to_the_minimum(config: Config) -> None:
    assert config.database_url is not None
    clock, events = FakeClock(), []
    db = await open_database(
        config.database_url,
        min_size=1,
        max_size=3,
        acquire_timeout=5,
        command_timeout=5,
        max_idle=60,
        max_lifetime=3600,
        clock=clock,
        on_event=events.append,
    )
    try:
        await _pids(db, 3)
        clock.now += 59
        await db.reap()
        assert db.stats()["size"] == 3 and events == []
        clock.now += 1
        await db.reap()
        assert db.stats()["size"] == 1 and events == ["idle", "idle"]
        clock.now += 600  # the last one is kept: PG_POOL_MIN
        await db.reap()
        assert db.stats()["size"] == 1 and events == ["idle", "idle"]
    finally:
        await db.close()


async def test_connections_are_replaced_after_their_lifetime(config: Config) -> None:
    assert config.database_url is not None
    clock, events = FakeClock(), []
    db = await open_database(
        config.database_url,
        min_size=2,
        max_size=2,
        acquire_timeout=5,
        command_timeout=5,
        max_lifetime=100,
        clock=clock,
        on_event=events.append,
    )
    try:
        first = await _pids(db, 2)
        clock.now += 89.9  # the jitter shortens a lifetime by at most 10 %
        await db.reap()
        assert await _pids(db, 2) == first and events == []
        clock.now += 10.1
        await db.reap()  # the idle ones are closed, and the minimum opened again
        assert events == ["lifetime", "lifetime"]
        second = await _pids(db, 2)
        assert len(second) == 2 and not second & first
        # one in use when its time comes is closed when it comes back
        con = await db.acquire()
        clock.now += 100
        db.release(con)
        assert events[2:] == ["lifetime"]
        assert con.is_closed()
    finally:
        await db.close()


async def test_the_app_pools_carry_the_lifetime_and_idle_settings(
    aiohttp_client: Any, config: Config
) -> None:
    app = create_app(configured(config, pg_max_lifetime_s=120.0, pg_max_idle_s=30.0))
    await aiohttp_client(app)
    assert (app[PG].max_lifetime, app[PG].max_idle) == (120.0, 30.0)
    writer_pool = app[EVENT_WRITER].pool
    assert (writer_pool.max_lifetime, writer_pool.max_idle) == (120.0, 30.0)

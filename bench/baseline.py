"""The floor of our own stack: aiohttp + uvloop + asyncpg + orjson with no middleware at all.

No auth, no rate limit, no metrics, no access log, no shedding, no fair gate: what Surge's
features cost is measured as the distance from this server. It runs Surge's own SQL (loaded
from sql/users.sql, so the two cannot drift apart) and answers the same JSON shape.

The tenant comes from the `X-Tenant` header (Surge takes it from the access token; the bench
sends both headers to every server, so all of them parse the same request bytes).

The pool is asyncpg's out of the box, reset on release included (one extra round trip per
query): that is the "bare" floor PERF-FINDINGS.md measured. `--no-reset` turns the reset off,
which is what Surge does behind its hygiene test.

    python -m bench.baseline --port 8202 [--no-reset] [--pool 16]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import uvloop
from aiohttp import web
from asyncpg import Connection, Record
from asyncpg.pool import Pool

from bench.common import (
    DATABASE_URL,
    EVENTS_COLUMNS,
    EVENTS_TABLE,
    encode_cursor,
    format_ts,
    parse_limit,
)
from db.queries import load

_Q = load("users.sql")
GET_USER = _Q["get_user"]
LIST_USERS = _Q["list_users"]

PG = web.AppKey("pg", Pool)
_JSON = "application/json"
_HEALTHY = orjson.dumps({"status": "ok"})
_MAX_EVENTS = 1000


def _jsonb_encode(value: Any) -> bytes:
    # jsonb's binary format is a version byte (1) followed by the JSON text; binary (rather
    # than text) is what lets COPY carry jsonb as well.
    return b"\x01" + orjson.dumps(value)


def _jsonb_decode(data: bytes) -> Any:
    return orjson.loads(data[1:])


async def _init_connection(con: Connection) -> None:
    await con.set_type_codec(
        "jsonb",
        encoder=_jsonb_encode,
        decoder=_jsonb_decode,
        schema="pg_catalog",
        format="binary",
    )


async def _no_reset(con: Connection) -> None:
    # asyncpg still rolls back a transaction left open; this only skips RESET ALL and friends.
    return None


def _error(status: int, detail: str) -> web.Response:
    return web.Response(
        body=orjson.dumps({"status": status, "detail": detail}), status=status, content_type=_JSON
    )


def _uuid(raw: str | None) -> uuid.UUID | None:
    if raw is None or len(raw) != 36:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None


def user_view(row: Record) -> dict[str, Any]:
    # asyncpg's UUID type is not one orjson serialises: convert at the edge.
    return {
        "id": str(row["id"]),
        "tenant_id": str(row["tenant_id"]),
        "email": row["email"],
        "username": row["username"],
        "status": row["status"],
        "roles": row["roles"],
        "profile": row["profile"],
        "version": row["version"],
        "created_at": format_ts(row["created_at"]),
        "updated_at": format_ts(row["updated_at"]),
    }


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=_HEALTHY, content_type=_JSON)


async def get_user(request: web.Request) -> web.Response:
    tenant_id = _uuid(request.headers.get("X-Tenant"))
    if tenant_id is None:
        return _error(400, "X-Tenant must be a tenant id")
    user_id = _uuid(request.match_info["user_id"])
    if user_id is None:
        return _error(404, "no such user")
    row = await request.app[PG].fetchrow(GET_USER, tenant_id, user_id)
    if row is None:
        return _error(404, "no such user")
    return web.Response(body=orjson.dumps(user_view(row)), content_type=_JSON)


async def list_users(request: web.Request) -> web.Response:
    tenant_id = _uuid(request.headers.get("X-Tenant"))
    if tenant_id is None:
        return _error(400, "X-Tenant must be a tenant id")
    limit = parse_limit(request.query.get("limit"))
    if limit is None:
        return _error(422, "limit must be 1..200")
    # One row past the page tells whether there is a next page without a count query.
    rows = await request.app[PG].fetch(LIST_USERS, tenant_id, None, None, None, limit + 1)
    next_cursor = encode_cursor(rows[limit - 1]["id"]) if len(rows) > limit else None
    body = {"items": [user_view(r) for r in rows[:limit]], "next_cursor": next_cursor}
    return web.Response(body=orjson.dumps(body), content_type=_JSON)


def _event_record(
    tenant_id: uuid.UUID, event: Any, now: datetime
) -> tuple[uuid.UUID, str, datetime, uuid.UUID | None, Any] | None:
    if type(event) is not dict:
        return None
    name = event.get("name")
    if type(name) is not str or not 1 <= len(name) <= 100:
        return None
    props = event.get("props", {})
    if type(props) is not dict:
        return None
    ts = now
    raw_ts = event.get("ts")
    if raw_ts is not None:
        if type(raw_ts) is not str:
            return None
        try:
            ts = datetime.fromisoformat(raw_ts)
        except ValueError:
            return None
        if ts.tzinfo is None:
            return None
    user_id = None
    raw_user = event.get("user_id")
    if raw_user is not None:
        user_id = _uuid(raw_user) if type(raw_user) is str else None
        if user_id is None:
            return None
    return (tenant_id, name, ts, user_id, props)


async def post_events(request: web.Request) -> web.Response:
    tenant_id = _uuid(request.headers.get("X-Tenant"))
    if tenant_id is None:
        return _error(400, "X-Tenant must be a tenant id")
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "malformed JSON")
    events = payload.get("events") if type(payload) is dict else None
    if type(events) is not list or not 1 <= len(events) <= _MAX_EVENTS:
        return _error(422, f"events must be a list of 1..{_MAX_EVENTS}")
    now = datetime.now(UTC)
    records = []
    for event in events:
        record = _event_record(tenant_id, event, now)
        if record is None:
            return _error(422, "malformed event")
        records.append(record)
    async with request.app[PG].acquire() as con:
        await con.copy_records_to_table(EVENTS_TABLE, records=records, columns=EVENTS_COLUMNS)
    return web.Response(
        body=orjson.dumps({"accepted": len(records)}), status=202, content_type=_JSON
    )


def create_app(dsn: str, pool_size: int, reset: bool) -> web.Application:
    async def postgres(app: web.Application) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(
            dsn,
            # Opened up front so no round is charged for connecting.
            min_size=pool_size,
            max_size=pool_size,
            init=_init_connection,
            reset=None if reset else _no_reset,
        )
        assert pool is not None
        app[PG] = pool
        try:
            yield
        finally:
            await pool.close()

    app = web.Application()
    app.cleanup_ctx.append(postgres)
    app.router.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/v1/users/{user_id}", get_user),
            web.get("/v1/users", list_users),
            web.post("/v1/events", post_events),
        ]
    )
    return app


async def serve(host: str, port: int, app: web.Application) -> None:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port, backlog=2048).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8202)
    parser.add_argument("--dsn", default=DATABASE_URL)
    parser.add_argument("--pool", type=int, default=16, help="pooled connections (default 16)")
    parser.add_argument(
        "--no-reset",
        dest="reset",
        action="store_false",
        help="skip asyncpg's reset statement when a connection is released",
    )
    args = parser.parse_args(argv)
    uvloop.run(serve(args.host, args.port, create_app(args.dsn, args.pool, args.reset)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

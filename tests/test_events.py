"""POST /v1/events: validation bounds, group commit, the bounded buffer, clean shutdown, and the
day partitions behind the events table."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from db import events as events_db
from db.pool import Database
from handlers.events.api import MAX_PROPS_BYTES, SCHEMAS
from handlers.events.ingest import parse_batch
from handlers.events.keys import EVENT_WRITER
from handlers.events.partitions import maintain_partitions
from server import metrics
from server.app import create_app
from server.config import Config
from server.errors import ValidationFailed
from server.runner import free_port, serve_app
from server.validation import Validators

from .helpers import signup

CLICKS = "SELECT count(*) FROM events WHERE name = 'click'"


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def batch(n: int, name: str = "click", **fields: Any) -> dict[str, Any]:
    return {"events": [{"name": name, **fields} for _ in range(n)]}


async def query(dsn: str | None, sql: str, *args: Any) -> Any:
    con = await asyncpg.connect(dsn)
    try:
        return await con.fetchval(sql, *args)
    finally:
        await con.close()


# --- validation ------------------------------------------------------------------------------

_NOW = datetime.now(UTC)
_OK = {"name": "page_view"}


INVALID: list[tuple[Any, str, str | None]] = [
    ({"events": []}, "events", None),
    (batch(1001), "events", None),
    ({"events": [_OK], "extra": 1}, "extra", "unknown field"),
    ({}, "events", "is required"),
    ([_OK], "", None),
    ({"events": [{"name": "a", "colour": "red"}]}, "events[0].colour", "unknown field"),
    ({"events": [{"ts": iso(_NOW)}]}, "events[0].name", "is required"),
    ({"events": [_OK, _OK, _OK, {"name": ""}]}, "events[3].name", None),
    ({"events": [{"name": "x" * 65}]}, "events[0].name", None),
    ({"events": [{"name": "9lives"}]}, "events[0].name", None),
    ({"events": [{"name": "has space"}]}, "events[0].name", None),
    ({"events": [{"name": "trailing\n"}]}, "events[0].name", None),
    ({"events": [{"name": 7}]}, "events[0].name", None),
    ({"events": [{"name": "a", "ts": "2026-11-21"}]}, "events[0].ts", None),
    ({"events": [{"name": "a", "ts": "2026-11-21T10:00:00"}]}, "events[0].ts", None),
    ({"events": [{"name": "a", "ts": None}]}, "events[0].ts", None),
    (
        {"events": [{"name": "a", "ts": "2026-02-30T10:00:00Z"}]},
        "events[0].ts",
        None,
    ),
    (
        {"events": [{"name": "a", "ts": iso(_NOW - timedelta(hours=25))}]},
        "events[0].ts",
        "must be within 24 hours of now",
    ),
    (
        {"events": [{"name": "a", "ts": iso(_NOW + timedelta(hours=25))}]},
        "events[0].ts",
        "must be within 24 hours of now",
    ),
    ({"events": [{"name": "a", "user_id": "nope"}]}, "events[0].user_id", None),
    (
        {"events": [{"name": "a", "user_id": str(uuid.uuid4()) + "\n"}]},
        "events[0].user_id",
        None,
    ),
    ({"events": [{"name": "a", "props": []}]}, "events[0].props", None),
    ({"events": [{"name": "a", "props": None}]}, "events[0].props", None),
    (
        {"events": [{"name": "a", "props": {str(i): i for i in range(51)}}]},
        "events[0].props",
        None,
    ),
    (
        {"events": [{"name": "a", "props": {"deep": [{"x": "nul\u0000"}]}}]},
        "events[0].props.deep[0].x",
        "must not contain NUL characters",
    ),
    (
        {"events": [{"name": "a", "props": {"x": "y" * MAX_PROPS_BYTES}}]},
        "events[0].props",
        f"must be at most {MAX_PROPS_BYTES} bytes of JSON",
    ),
]


@pytest.mark.parametrize(("body", "field", "message"), INVALID)
def test_invalid_batches_name_the_field(body: Any, field: str, message: str | None) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_batch(body, str(uuid.uuid4()), datetime.now(UTC))
    assert info.value.errors is not None
    assert info.value.errors[0]["field"] == field
    if message is not None:
        assert info.value.errors[0]["message"] == message


VALID: list[dict[str, Any]] = [
    {"name": "x" * 64},
    {"name": "checkout.paid:v2-beta_1"},
    {"name": "a", "ts": iso(_NOW - timedelta(hours=23))},
    {"name": "a", "ts": iso(_NOW + timedelta(hours=23))},
    {"name": "a", "ts": (_NOW + timedelta(hours=2)).astimezone().isoformat()},
    {"name": "a", "user_id": None},
    {"name": "a", "user_id": str(uuid.uuid4()).upper()},
    {"name": "a", "props": {str(i): i for i in range(50)}},
    {"name": "a", "props": {"x": "y" * (MAX_PROPS_BYTES - 8)}},
    {"name": "a", "props": {"nested": {"list": [1, 2.5, None, "\u00e9", "\\u0000"]}}},
]


@pytest.mark.parametrize("event", VALID)
def test_valid_edges_are_accepted(event: dict[str, Any]) -> None:
    records, counts = parse_batch({"events": [event]}, str(uuid.uuid4()), datetime.now(UTC))
    assert len(records) == 1
    assert sum(counts.values()) == 1


async def test_the_http_edge(aiohttp_client: Any, config: Config) -> None:
    """Refusals are problem+json 422s that store nothing; every valid edge is stored."""
    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    for body, field, _message in INVALID[:8]:
        resp = await client.post("/v1/events", json=body, headers=owner.headers)
        assert resp.status == 422
        assert resp.headers["Content-Type"] == "application/problem+json"
        problem = await resp.json(content_type=None)
        assert problem["errors"][0]["field"] == field
        assert problem["request_id"] == resp.headers["X-Request-ID"]
        assert "RateLimit-Remaining" in resp.headers
    sql = "SELECT count(*) FROM events WHERE name NOT LIKE 'user.%'"
    assert await query(config.database_url, sql) == 0
    # Each edge in the database, too: PostgreSQL refusing one would fail the whole commit.
    resp = await client.post("/v1/events", json={"events": VALID}, headers=owner.headers)
    assert resp.status == 202
    assert await resp.json() == {"accepted": len(VALID)}
    assert await query(config.database_url, sql) == len(VALID)


@pytest.mark.parametrize(
    ("data", "headers", "status"),
    [
        (b"{not json", {"Content-Type": "application/json"}, 400),
        (b'{"events": [{"name": "a"}]}', {"Content-Type": "text/plain"}, 415),
    ],
)
async def test_malformed_requests(
    aiohttp_client: Any, config: Config, data: bytes, headers: dict[str, str], status: int
) -> None:
    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    resp = await client.post("/v1/events", data=data, headers={**owner.headers, **headers})
    assert resp.status == status


async def test_events_need_a_token(aiohttp_client: Any, config: Config) -> None:
    client = await aiohttp_client(create_app(config))
    resp = await client.post("/v1/events", json=batch(1))
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


_names = st.one_of(
    st.from_regex(r"[A-Za-z][A-Za-z0-9_.:-]{0,70}", fullmatch=True), st.text(max_size=5), st.none()
)
_times = st.one_of(
    st.integers(-50, 50)
    .filter(lambda h: abs(h) != 24)
    .map(lambda h: iso(datetime.now(UTC) + timedelta(hours=h, seconds=7))),
    st.sampled_from(["2026-02-30T00:00:00Z", "2026-11-21T10:00:00", "x", "2026-11-21T24:00:00Z"]),
    st.integers(),
)
_users = st.one_of(st.uuids().map(str), st.text(max_size=40), st.integers())
_props = st.one_of(
    st.dictionaries(
        st.text(max_size=8),
        st.integers() | st.text(max_size=300) | st.lists(st.text(max_size=3), max_size=2),
        max_size=60,
    ),
    st.lists(st.integers(), max_size=2),
)
_event = st.fixed_dictionaries(
    {"name": _names},
    optional={"ts": _times, "user_id": _users | st.none(), "props": _props, "junk": st.none()},
).map(lambda e: {k: v for k, v in e.items() if not (k == "name" and v is None)})


def _nul(v: Any) -> bool:
    if isinstance(v, str):
        return "\0" in v
    if isinstance(v, dict):
        return any(_nul(k) or _nul(x) for k, x in v.items())
    return isinstance(v, list) and any(_nul(x) for x in v)


_EVENT_SCHEMAS = Validators(SCHEMAS)


def _reference_accepts(body: Any) -> bool:
    """The contract, spelled out: the schema, then the checks a schema cannot express."""
    try:
        _EVENT_SCHEMAS.validate("EventBatch", body)
    except ValidationFailed:
        return False
    for event in body["events"]:
        if "ts" in event:
            try:
                ts = datetime.fromisoformat(event["ts"])
            except ValueError:
                return False
            if abs(ts - datetime.now(UTC)) > timedelta(hours=24):
                return False
        if "props" in event:
            props = event["props"]
            try:
                size = len(orjson.dumps(props))
            except TypeError:  # ints past 64 bits: JSON bodies never hold one (orjson.loads)
                return False
            if size > MAX_PROPS_BYTES or _nul(props):
                return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_event, min_size=0, max_size=4))
def test_the_fast_path_accepts_exactly_what_the_contract_accepts(events: list[Any]) -> None:
    body = {"events": events}
    try:
        records, counts = parse_batch(body, "t", datetime.now(UTC))
    except ValidationFailed as exc:
        assert exc.errors, "a refusal names a field"
        assert not _reference_accepts(body)
    else:
        assert _reference_accepts(body)
        assert len(records) == len(events) == sum(counts.values())


# --- group commit ----------------------------------------------------------------------------


def _flushes() -> float:
    value = metrics.REGISTRY.get_sample_value("surge_events_flush_size_count")
    return value or 0.0


async def test_a_batch_of_1000_lands_exactly_once(aiohttp_client: Any, config: Config) -> None:
    client = await aiohttp_client(create_app(config))
    owner, other = await signup(client), await signup(client, "Other")
    body = {
        "events": [
            {"name": f"e{i % 7}", "user_id": owner.id, "props": {"i": i}} for i in range(1000)
        ]
    }
    resp = await client.post("/v1/events", json=body, headers=owner.headers)
    assert resp.status == 202
    assert await resp.json() == {"accepted": 1000}
    assert (await client.post("/v1/events", json=batch(3), headers=other.headers)).status == 202
    dsn = config.database_url
    tenant = uuid.UUID(owner.tenant_id)
    sql = "SELECT count(*) FROM events WHERE tenant_id = $1 AND name LIKE 'e_'"
    assert await query(dsn, sql, tenant) == 1000
    sql = "SELECT count(DISTINCT (props->>'i')::int) FROM events WHERE tenant_id = $1"
    assert await query(dsn, sql, tenant) == 1000
    sql = "SELECT sum(count) FROM event_counts WHERE tenant_id = $1 AND name LIKE 'e_'"
    assert await query(dsn, sql, tenant) == 1000


async def test_concurrent_requests_share_commits(aiohttp_client: Any, config: Config) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(config, events_flush_ms=50)))
    owner = await signup(client)
    before = _flushes()
    results = await asyncio.gather(
        *[client.post("/v1/events", json=batch(10), headers=owner.headers) for _ in range(50)]
    )
    assert [r.status for r in results] == [202] * 50
    assert _flushes() - before < 10  # 50 requests, a handful of COPYs
    assert await query(config.database_url, CLICKS) == 500


async def test_a_full_buffer_is_503_and_every_202_is_stored(
    aiohttp_client: Any, config: Config
) -> None:
    # A flush every second and no size trigger: the buffer holds 3 requests of 300, not 4.
    cfg = dataclasses.replace(
        config, events_flush_ms=1000, events_batch_size=1_000_000, events_max_pending=1000
    )
    client = await aiohttp_client(create_app(cfg))
    owner = await signup(client)
    results = await asyncio.gather(
        *[client.post("/v1/events", json=batch(300), headers=owner.headers) for _ in range(10)]
    )
    statuses = sorted(r.status for r in results)
    assert statuses == [202] * 3 + [503] * 7
    for r in results:
        if r.status == 503:
            assert r.headers["Retry-After"] == "1"
            assert r.headers["Content-Type"] == "application/problem+json"
    assert await query(config.database_url, CLICKS) == 900
    # and the buffer drained: the next request is accepted
    resp = await client.post("/v1/events", json=batch(300), headers=owner.headers)
    assert resp.status == 202


async def test_a_commit_that_fails_is_503_and_stores_nothing(
    aiohttp_client: Any, config: Config
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(config, pg_command_timeout_s=0.5)))
    owner = await signup(client)
    con = await asyncpg.connect(config.database_url)
    try:
        # The COPY queues behind this lock until the command timeout gives up on it.
        await con.execute("BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        resp = await client.post("/v1/events", json=batch(5), headers=owner.headers)
        await con.execute("ROLLBACK")
    finally:
        await con.close()
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert await query(config.database_url, CLICKS) == 0


async def test_clean_shutdown_commits_what_is_pending(config: Config) -> None:
    port = free_port()
    # A long flush interval: the request is still waiting when the stop comes.
    cfg = dataclasses.replace(config, port=port, events_flush_ms=1000, shutdown_grace_s=10)
    app = create_app(cfg)
    ready, stop = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve_app(cfg, app=app, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 10)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        client_like = _Session(session, base)
        owner = await signup(client_like)  # type: ignore[arg-type]
        posting = asyncio.create_task(
            session.post(f"{base}/v1/events", json=batch(7), headers=owner.headers)
        )
        while app[EVENT_WRITER].pending == 0:
            await asyncio.sleep(0.01)
        stop.set()
        resp = await posting
        assert resp.status == 202
        await asyncio.wait_for(server, 15)
    assert await query(config.database_url, CLICKS) == 7


async def test_closing_the_writer_commits_the_open_batch(
    aiohttp_client: Any, config: Config
) -> None:
    app = create_app(dataclasses.replace(config, events_flush_ms=60_000))
    client = await aiohttp_client(app)
    owner = await signup(client)
    posting = asyncio.create_task(client.post("/v1/events", json=batch(4), headers=owner.headers))
    while app[EVENT_WRITER].pending == 0:
        await asyncio.sleep(0.01)
    await app[EVENT_WRITER].close()  # what the cleanup context does before the pools close
    assert (await posting).status == 202
    refused = await client.post("/v1/events", json=batch(1), headers=owner.headers)
    assert refused.status == 503
    assert await query(config.database_url, CLICKS) == 4


class _Session:
    """Enough of TestClient for helpers.signup, over a real socket."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base = session, base

    def post(self, path: str, **kw: Any) -> Any:
        return self.session.post(self.base + path, **kw)


# --- partitions ------------------------------------------------------------------------------


async def test_partitions_exist_around_today(
    aiohttp_client: Any, config: Config, pg: Database
) -> None:
    await aiohttp_client(create_app(config))
    today = datetime.now(UTC).date()
    for table in events_db.PARTITIONED:
        names = set(await events_db.list_partitions(pg, table))
        for offset in range(-1, 4):
            day = today + timedelta(days=offset)
            assert f"{table}_p{day:%Y%m%d}" in names


async def test_replicas_creating_partitions_at_once_do_not_fight(pg: Database) -> None:
    day = date(2031, 3, 10)
    results = await asyncio.gather(*[maintain_partitions(pg, None, today=day) for _ in range(4)])
    created = [name for made, _ in results for name in made]
    assert sorted(created) == sorted(
        f"{t}_p{day + timedelta(days=d):%Y%m%d}"
        for t in events_db.PARTITIONED
        for d in range(-1, 4)
    )


async def test_retention_drops_old_partitions_and_their_rows(config: Config, pg: Database) -> None:
    today = datetime.now(UTC).date()
    old_day = today - timedelta(days=40)
    await maintain_partitions(pg, None, today=old_day)  # partitions from 41 to 37 days ago
    await maintain_partitions(pg, None)
    tenant = uuid.uuid4()
    old_ts = datetime.combine(old_day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=5)
    async with pg.transaction() as con:
        await events_db.insert_events(
            con,
            [(tenant, old_ts, "old", None, "{}"), (tenant, datetime.now(UTC), "new", None, "{}")],
            {(str(tenant), "old", old_ts.replace(minute=0)): 1},
            0,
        )
    created, dropped = await maintain_partitions(pg, 30)
    assert created == []
    expected = {
        f"{t}_p{old_day + timedelta(days=d):%Y%m%d}"
        for t in events_db.PARTITIONED
        for d in range(-1, 4)
    }
    assert expected <= set(dropped)
    cutoff = today - timedelta(days=30)
    for table in events_db.PARTITIONED:
        for name in await events_db.list_partitions(pg, table):
            assert datetime.strptime(name[-8:], "%Y%m%d").date() >= cutoff
    names = await query(config.database_url, "SELECT array_agg(name) FROM events")
    assert names == ["new"]
    assert await query(config.database_url, "SELECT count(*) FROM event_counts") == 0


async def test_events_for_a_missing_partition_make_it(
    aiohttp_client: Any, config: Config, pg: Database
) -> None:
    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    today = datetime.now(UTC).date()
    for table in events_db.PARTITIONED:
        await pg.execute(f"DROP TABLE {table}_p{today:%Y%m%d}")
    resp = await client.post("/v1/events", json=batch(2), headers=owner.headers)
    assert resp.status == 202
    assert await query(config.database_url, CLICKS) == 2


# --- one bad request in a group commit (issue #23 item 11) -----------------------------------


async def test_a_request_that_cannot_be_stored_fails_alone_in_its_group(
    aiohttp_client: Any, config: Config, pg: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Three tenants' requests ride one group commit; one of them breaks a CHECK constraint.
    The group is written again request by request: the other two are 202 and stored."""
    client = await aiohttp_client(create_app(dataclasses.replace(config, events_flush_ms=200)))
    a, b, c = await signup(client, "A"), await signup(client, "B"), await signup(client, "C")
    await pg.execute("ALTER TABLE events ADD CONSTRAINT test_poison CHECK (name <> 'poison')")
    try:
        with caplog.at_level("WARNING", logger="surge.events"):
            results = await asyncio.gather(
                client.post("/v1/events", json=batch(3), headers=a.headers),
                client.post("/v1/events", json=batch(2, "poison"), headers=b.headers),
                client.post("/v1/events", json=batch(4), headers=c.headers),
            )
    finally:
        await pg.execute("ALTER TABLE events DROP CONSTRAINT test_poison")
    assert [r.status for r in results] == [202, 503, 202]
    assert [await r.json() for r in (results[0], results[2])] == [{"accepted": 3}, {"accepted": 4}]
    assert results[1].headers["Content-Type"] == "application/problem+json"
    grouped = [r for r in caplog.records if "writing each on its own" in r.getMessage()]
    assert [r.getMessage().split(" (")[0] for r in grouped] == [
        "a group commit of 3 requests failed"
    ]
    sql = "SELECT count(*) FROM events WHERE tenant_id = $1 AND name = $2"
    stored = [
        await query(config.database_url, sql, uuid.UUID(actor.tenant_id), name)
        for actor, name in ((a, "click"), (b, "poison"), (c, "click"))
    ]
    assert stored == [3, 0, 4]
    sql = "SELECT coalesce(sum(count), 0) FROM event_counts WHERE tenant_id = $1 AND name = $2"
    counted = [
        await query(config.database_url, sql, uuid.UUID(actor.tenant_id), name)
        for actor, name in ((a, "click"), (b, "poison"), (c, "click"))
    ]
    assert counted == [3, 0, 4]


async def test_a_detached_partition_does_not_stop_its_day(
    aiohttp_client: Any, config: Config, pg: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A partition detached by hand leaves a table holding the day's name. Maintenance makes
    the day's partition under the next name, leaves the detached table alone, and says so."""
    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    today = datetime.now(UTC).date()
    name = f"events_p{today:%Y%m%d}"
    await pg.execute(f"ALTER TABLE events DETACH PARTITION {name}")
    try:
        with caplog.at_level("WARNING", logger="surge.events"):
            created, _ = await maintain_partitions(pg, None)
        assert created == [f"{name}_1"]
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warned == [
            f"table {name} is named like a day partition of events but is not attached to it"
            " (detached?): no query reads its rows and retention never drops them; that day's"
            f" rows go to {name}_N. Move its rows back or drop it"
            " (RUNBOOK: a detached event partition)"
        ]
        assert metrics.REGISTRY.get_sample_value("surge_event_partitions_stray") == 1
        resp = await client.post("/v1/events", json=batch(2), headers=owner.headers)
        assert resp.status == 202
        assert await query(config.database_url, CLICKS) == 2
        sql = "SELECT count(*) FROM events WHERE tableoid = $1::regclass AND name = 'click'"
        assert await query(config.database_url, sql, f"{name}_1") == 2
        # The next round finds the day covered: nothing new, the detached table left alone.
        assert (await maintain_partitions(pg, None))[0] == []
        assert name not in await events_db.list_partitions(pg, "events")
        assert await query(config.database_url, "SELECT to_regclass($1)::text", name) == name
        # Retention drops the partition under its second name too.
        _, dropped = await maintain_partitions(pg, 0, today=today + timedelta(days=1))
        assert f"{name}_1" in dropped
    finally:  # the schema outlives the test: later ones need the day's partition
        await pg.execute(f"DROP TABLE IF EXISTS {name}")
        await maintain_partitions(pg, None)
    assert metrics.REGISTRY.get_sample_value("surge_event_partitions_stray") == 0

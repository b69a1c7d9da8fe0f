"""GET /v1/users: keyset pagination (no duplicates or gaps while rows are inserted), the ?q=
literal case-insensitive prefix filter, the ?status= filter, and the bounds of limit and cursor.

Users are written straight to the table (no password hashing): listing is what is tested here.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from db.ids import uuid7
from server.app import create_app
from server.config import Config
from tests.helpers import Actor, add_user, signup

NOW = datetime(2026, 11, 22, 8, 0, 0, 123456, tzinfo=UTC)

T = TypeVar("T")
_seq = itertools.count(1)


@dataclass(frozen=True)
class Row:
    id: str
    username: str
    email: str
    status: str = "active"


async def insert(
    con: asyncpg.Connection, tenant_id: str, specs: list[tuple[str, str, str]]
) -> list[Row]:
    """(username, email, status) rows, in id order."""
    rows = [Row(str(uuid7()), u, e, s) for u, e, s in specs]
    await con.executemany(
        "INSERT INTO users (tenant_id, id, email, username, password_hash, status)"
        " VALUES ($1, $2, $3, $4, 'not-a-hash', $5)",
        [(uuid.UUID(tenant_id), uuid.UUID(r.id), r.email, r.username, r.status) for r in rows],
    )
    return rows


async def insert_named(con: asyncpg.Connection, tenant_id: str, prefix: str, n: int) -> list[Row]:
    specs = []
    for _ in range(n):
        k = next(_seq)
        specs.append((f"{prefix}{k}", f"{prefix}{k}@example.com", "active"))
    return await insert(con, tenant_id, specs)


async def get_page(client: TestClient, owner: Actor, **params: str) -> tuple[int, dict[str, Any]]:
    resp = await client.get("/v1/users", params=params, headers=owner.headers)
    body: dict[str, Any] = await resp.json(content_type=None)
    if resp.status == 200:
        assert resp.headers["Content-Type"] == "application/json"
        assert body.keys() == {"items", "next_cursor"}
    else:
        assert resp.headers["Content-Type"] == "application/problem+json"
        assert body["status"] == resp.status
    return resp.status, body


async def walk(
    client: TestClient,
    owner: Actor,
    between: Callable[[int], Awaitable[None]] | None = None,
    **params: str,
) -> list[list[str]]:
    """Every page's ids, following next_cursor to the end; `between(n)` runs after page n
    whenever another page follows."""
    pages: list[list[str]] = []
    cursor = None
    for _ in range(500):
        query = dict(params, cursor=cursor) if cursor else params
        status, page = await get_page(client, owner, **query)
        assert status == 200, page
        pages.append([u["id"] for u in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
        assert isinstance(cursor, str) and cursor
        if between is not None:
            await between(len(pages))
    raise AssertionError("next_cursor never became null")


def check_walk(pages: list[list[str]], limit: int, existing: set[str]) -> list[str]:
    ids = [i for page in pages for i in page]
    assert len(ids) == len(set(ids)), "a row appeared twice"
    assert existing <= set(ids), f"rows skipped: {existing - set(ids)}"
    assert ids == sorted(ids, key=uuid.UUID), "pages are not in id order"
    assert all(len(p) == limit for p in pages[:-1]), [len(p) for p in pages]
    assert 1 <= len(pages[-1]) <= limit or ids == [], "an empty page after a next_cursor"
    return ids


@pytest.fixture
async def setup(aiohttp_client: Any, config: Config) -> Any:
    client: TestClient = await aiohttp_client(create_app(config))
    owner = await signup(client, "Pages")
    con = await asyncpg.connect(config.database_url)
    try:
        yield client, owner, con
    finally:
        await con.close()


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 200])
async def test_walking_pages_while_rows_are_inserted(setup: Any, limit: int) -> None:
    client, owner, con = setup
    existing = {owner.id} | {r.id for r in await insert_named(con, owner.tenant_id, "old", 7)}
    added: list[Row] = []

    async def between(n: int) -> None:
        if n <= 3:  # new rows arrive while the client pages
            added.extend(await insert_named(con, owner.tenant_id, f"new{n}-", 2))

    pages = await walk(client, owner, between, limit=str(limit))
    ids = check_walk(pages, limit, existing)
    assert set(ids) <= existing | {r.id for r in added}
    if limit >= 8:
        assert pages == [sorted(existing, key=uuid.UUID)]


async def test_a_row_committed_late_behind_the_cursor_breaks_nothing(setup: Any) -> None:
    """A transaction that took its id before the walk and commits during it lands behind the
    cursor: it may be missed, but nothing repeats and no earlier row is lost."""
    client, owner, con = setup
    early_id = str(uuid7())  # taken now, committed only after the second page
    await asyncio.sleep(0.005)  # UUIDv7 orders by the millisecond
    existing = {owner.id} | {r.id for r in await insert_named(con, owner.tenant_id, "old", 5)}

    async def between(n: int) -> None:
        if n == 2:
            await con.execute(
                "INSERT INTO users (tenant_id, id, email, username, password_hash)"
                " VALUES ($1, $2, 'late@example.com', 'late', 'x')",
                uuid.UUID(owner.tenant_id),
                uuid.UUID(early_id),
            )
            await insert_named(con, owner.tenant_id, "new", 1)

    pages = await walk(client, owner, between, limit="2")
    ids = check_walk(pages, 2, existing)
    assert early_id < min(existing - {owner.id}, key=uuid.UUID)
    assert early_id not in ids


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def in_thread(loop: asyncio.AbstractEventLoop) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine on the test's loop from hypothesis' (synchronous) worker thread."""

    def run(coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=30)

    return run


async def test_any_interleaving_of_pages_and_inserts(setup: Any) -> None:
    """Each example pages over its own rows (a private ?q= prefix) of one tenant."""
    client, owner, con = setup
    run = in_thread(asyncio.get_running_loop())
    examples = itertools.count(1)

    @settings(max_examples=30, deadline=None)
    @given(
        limit=st.integers(1, 4),
        initial=st.integers(0, 9),
        inserts=st.lists(st.integers(0, 3), max_size=6),
    )
    def interleaving(limit: int, initial: int, inserts: list[int]) -> None:
        prefix = f"ex{next(examples):03d}-"
        existing = {r.id for r in run(insert_named(con, owner.tenant_id, prefix, initial))}

        async def between(n: int) -> None:
            if n <= len(inserts):
                await insert_named(con, owner.tenant_id, prefix, inserts[n - 1])

        pages = run(walk(client, owner, between, limit=str(limit), q=prefix))
        check_walk(pages, limit, existing)

    await asyncio.to_thread(interleaving)
    assert next(examples) > 20  # hypothesis really ran its examples


# username, email: q matches either, case-insensitively, as a literal prefix
Q_USERS = [
    ("a_b", "first@example.com"),
    ("axb", "second@example.com"),
    ("abc", "third@example.com"),
    ("A_Upper", "fourth@example.com"),
    ("pct", "a%c@example.com"),
    ("lead", "_lead@example.com"),
    ("bs", "a\\b@example.com"),
    ("zed", "AXE@Example.com"),
]
Q_CASES = [
    ("a_", {"a_b", "A_Upper"}),
    ("A_", {"a_b", "A_Upper"}),
    ("a_b", {"a_b"}),
    ("a%", {"pct"}),
    ("a%c", {"pct"}),
    ("%", set()),
    ("_", {"lead"}),
    ("a\\", {"bs"}),
    ("\\", set()),
    ("a", {"a_b", "axb", "abc", "A_Upper", "pct", "bs", "zed"}),
    ("ax", {"axb", "zed"}),
    ("AXE@EXAMPLE.", {"zed"}),
    ("ab", {"abc"}),
    ("first@", {"a_b"}),
    ("FIRST@EXAMPLE.COM", {"a_b"}),
    ("b", {"bs"}),
    ("x", set()),
    ("a_b@", set()),
    ("x" * 254, set()),
]


async def test_q_is_a_literal_case_insensitive_prefix(setup: Any) -> None:
    client, owner, con = setup
    rows = await insert(con, owner.tenant_id, [(u, e, "active") for u, e in Q_USERS])
    name_of = {r.id: r.username for r in rows}
    got, want = {}, {}
    for q, usernames in Q_CASES:
        status, page = await get_page(client, owner, q=q)
        got[q] = (status, {name_of.get(u["id"], "owner") for u in page["items"]})
        want[q] = (200, usernames)
    assert got == want
    # paging through a filtered list gives the same rows
    pages = await walk(client, owner, limit="2", q="A")
    assert {name_of[i] for p in pages for i in p} == dict(Q_CASES)["a"]

    run = in_thread(asyncio.get_running_loop())
    everyone = [*rows, Row(owner.id, owner.email.split("@")[0], owner.email)]

    @settings(max_examples=30, deadline=None)
    @given(st.text(alphabet="aAbBxX_%\\@.eEfF1", min_size=1, max_size=4))
    def prefix(q: str) -> None:
        status, page = run(get_page(client, owner, q=q, limit="200"))
        expected = {
            r.id
            for r in everyone
            if r.username.lower().startswith(q.lower()) or r.email.lower().startswith(q.lower())
        }
        assert (status, {u["id"] for u in page["items"]}) == (200, expected)

    await asyncio.to_thread(prefix)


async def test_status_filter(setup: Any) -> None:
    client, owner, con = setup
    statuses = ("active", "suspended", "deleted")
    specs = [(f"s{i}-{s}", f"s{i}-{s}@example.com", s) for s in statuses for i in range(2)]
    rows = await insert(con, owner.tenant_id, specs)
    by_status = {s: {r.id for r in rows if r.status == s} for s in statuses}
    by_status["active"].add(owner.id)
    cases: list[tuple[dict[str, str], set[str]]] = [
        ({}, by_status["active"] | by_status["suspended"]),  # default: everything but deleted
        ({"status": "active"}, by_status["active"]),
        ({"status": "suspended"}, by_status["suspended"]),
        ({"status": "deleted"}, by_status["deleted"]),
        ({"status": "suspended", "q": "S1-"}, {r.id for r in rows if r.username == "s1-suspended"}),
        ({"status": "deleted", "q": "owner"}, set()),
    ]
    for params, expected in cases:
        pages = await walk(client, owner, limit="2", **params)
        ids = check_walk(pages, 2, expected)
        assert set(ids) == expected, params
        status_of = {r.id: r.status for r in rows} | {owner.id: "active"}
        if "status" in params:
            assert {status_of[i] for i in ids} <= {params["status"]}


BAD_QUERIES: list[tuple[dict[str, str], str]] = [
    ({"limit": "0"}, "limit"),
    ({"limit": "201"}, "limit"),
    ({"limit": "abc"}, "limit"),
    ({"limit": "-1"}, "limit"),
    ({"limit": "1.5"}, "limit"),
    ({"limit": "1e2"}, "limit"),
    ({"limit": ""}, "limit"),
    ({"limit": " 5"}, "limit"),
    ({"cursor": "garbage"}, "cursor"),
    ({"cursor": "!!!!"}, "cursor"),
    ({"cursor": "a"}, "cursor"),
    ({"cursor": "é"}, "cursor"),
    ({"cursor": "AAAAAAAAAAAAAAAAAAAA"}, "cursor"),  # 15 bytes
    ({"cursor": "AAAAAAAAAAAAAAAAAAAAAAAA"}, "cursor"),  # 18 bytes
    ({"status": "bogus"}, "status"),
    ({"status": "DELETED"}, "status"),
    ({"q": "x" * 255}, "q"),
]


async def test_bad_query_parameters_are_422_naming_the_parameter(setup: Any) -> None:
    client, owner, _ = setup
    got, want = {}, {}
    for params, field in BAD_QUERIES:
        status, problem = await get_page(client, owner, **params)
        key = str(params)[:60]
        got[key] = (status, problem.get("type"), [e["field"] for e in problem.get("errors", [])])
        want[key] = (422, "/problems/validation", [field])
        assert all(e["message"] for e in problem.get("errors", []))
    assert got == want


async def test_a_superscript_limit_is_422(setup: Any) -> None:
    client, owner, _ = setup
    status, problem = await get_page(client, owner, limit="\u00b2")
    assert (status, problem["errors"][0]["field"]) == (422, "limit")


async def test_a_nul_in_q_is_422_naming_q(setup: Any) -> None:
    client, owner, _ = setup
    status, problem = await get_page(client, owner, q="a\u0000")
    assert status == 422
    assert problem.get("errors") == [{"field": "q", "message": problem["errors"][0]["message"]}]


async def test_limit_bounds_and_default(setup: Any) -> None:
    client, owner, con = setup
    await insert_named(con, owner.tenant_id, "many", 200)  # 201 users with the owner
    got = {}
    table = [("1", 1, True), ("007", 7, True), ("200", 200, True), (None, 50, True)]
    for limit, size, more in table:
        params = {"limit": limit} if limit else {}
        status, page = await get_page(client, owner, **params)
        got[limit] = (status, len(page["items"]), page["next_cursor"] is not None)
        assert got[limit] == (200, size, more)
    # the 201st row is the last page's only one
    status, page = await get_page(client, owner, limit="200")
    status, last = await get_page(client, owner, limit="200", cursor=page["next_cursor"])
    assert (status, len(last["items"]), last["next_cursor"]) == (200, 1, None)


async def test_any_cursor_is_a_page_or_a_422(setup: Any) -> None:
    client, owner, con = setup
    await insert_named(con, owner.tenant_id, "c", 3)
    run = in_thread(asyncio.get_running_loop())

    @settings(max_examples=30, deadline=None)
    @given(st.text(max_size=30) | st.binary(min_size=16, max_size=16).map(b64))
    def any_cursor(cursor: str) -> None:
        status, body = run(get_page(client, owner, cursor=cursor, limit="2"))
        if status == 422:
            assert [e["field"] for e in body["errors"]] == ["cursor"]
        else:
            assert status == 200, body

    await asyncio.to_thread(any_cursor)


async def test_q_case_folding_matches_the_database_for_dotted_capital_i(setup: Any) -> None:
    client, owner, con = setup
    rows = await insert(con, owner.tenant_id, [("ipek", "İpek@example.com", "active")])
    status, page = await get_page(client, owner, q="İp")
    assert (status, [u["id"] for u in page["items"]]) == (200, [rows[0].id])


@pytest.mark.parametrize("memo", [0, 1, 10_000])
async def test_pages_show_every_write_whatever_the_view_memo(
    aiohttp_client: Any, config: Config, memo: int
) -> None:
    """The memo keeps user bodies by version: a page after a write (PATCH, role grant, delete)
    shows the new state, and its bytes are the by-id body's, joined."""
    client: TestClient = await aiohttp_client(
        create_app(dataclasses.replace(config, user_view_memo=memo))
    )
    owner = await signup(client, "Memo")
    member = await add_user(client, owner)
    path = f"/v1/users/{member.id}"

    async def listed() -> dict[str, Any]:
        status, page = await get_page(client, owner)
        assert status == 200
        return {u["id"]: u for u in page["items"]}

    before = (await listed())[member.id]
    one = await client.get(path, headers=owner.headers)
    assert orjson.loads(await one.read()) == before
    steps: list[tuple[str, str, dict[str, Any] | None]] = [
        ("PATCH", path, {"username": "renamed"}),
        ("PUT", f"{path}/roles/admin", None),
        ("DELETE", path, None),
    ]
    version = before["version"]
    for method, url, body in steps:
        etag = (await client.get(path, headers=owner.headers)).headers.get("ETag", "*")
        resp = await client.request(
            method, url, json=body, headers={**owner.headers, "If-Match": etag}
        )
        assert resp.status in (200, 204), await resp.text()
        if method == "DELETE":
            status, page = await get_page(client, owner, status="deleted")
            assert status == 200
            [gone] = page["items"]
            assert (gone["id"], gone["status"], gone["version"]) == (
                member.id,
                "deleted",
                version + 1,
            )
            assert member.id not in await listed()
        else:
            now = (await listed())[member.id]
            assert now["version"] == version + 1
            assert now == orjson.loads(await (await client.get(path, headers=owner.headers)).read())
        version += 1
    final = await listed()
    assert final[owner.id]["username"] != "renamed"


async def test_a_page_is_byte_for_byte_orjson_of_its_items(setup: Any) -> None:
    client, owner, con = setup
    await insert_named(con, owner.tenant_id, "bytes", 3)
    resp = await client.get("/v1/users", params={"limit": "2"}, headers=owner.headers)
    raw = await resp.read()
    assert raw == orjson.dumps(orjson.loads(raw))
    assert orjson.loads(raw)["next_cursor"] is not None


def test_the_view_memo_drops_its_oldest_past_its_size() -> None:
    from handlers.identity.views import ViewMemo

    memo = ViewMemo(2)
    rows = [
        {
            "id": uuid7(), "tenant_id": uuid.UUID(int=1), "email": "a@example.com",
            "username": "a", "status": "active", "roles": ["member"], "profile": {},
            "version": 1, "created_at": NOW, "updated_at": NOW,
        }
        for _ in range(3)
    ]  # fmt: skip
    bodies = [memo.body(r) for r in rows]  # type: ignore[arg-type]
    assert [orjson.loads(b)["id"] for b in bodies] == [str(r["id"]) for r in rows]
    assert list(memo._bodies) == [r["id"] for r in rows[1:]]
    # A body serves only its own version and tenant: another version of the user replaces it,
    # and the same id under another tenant is a miss.
    keys = [(rows[2]["id"], 1)]
    assert memo.lookup(uuid.UUID(int=1), keys) == [bodies[2]]  # type: ignore[arg-type]
    assert memo.lookup(uuid.UUID(int=2), keys) == [None]  # type: ignore[arg-type]
    newer = dict(rows[2], version=2, username="b")
    assert orjson.loads(memo.body(newer))["username"] == "b"  # type: ignore[arg-type]
    assert memo.lookup(uuid.UUID(int=1), keys) == [None]  # type: ignore[arg-type]
    assert orjson.loads(memo.body(rows[2]))["username"] == "a"  # type: ignore[arg-type]
    assert len(memo._bodies) == 2


def test_kept_pages_stay_within_their_bytes() -> None:
    from handlers.identity.views import ViewMemo

    memo = ViewMemo(10)  # 5,000 bytes of pages
    assert memo.max_page_bytes == 5000
    tenant = uuid.UUID(int=1)
    key = (tenant, None, None, None, 50)
    for n in range(3):
        memo.keep_page((tenant, None, None, None, n + 1), [], b"x" * 2000)
    assert [k[4] for k in memo._pages] == [2, 3]  # the oldest went
    assert memo._page_bytes == 4000
    memo.keep_page(key, [], b"y" * 6000)  # larger than the whole budget: not kept
    assert memo.page(key, []) is None and memo._page_bytes == 4000
    three = (tenant, None, None, None, 3)
    memo.keep_page(three, [], b"z" * 1000)  # replacing an entry frees its bytes
    assert memo._page_bytes == 3000 and memo.page(three, []) == b"z" * 1000


class WriteBetween:
    """The real database, with a write landing right after the page's first query."""

    def __init__(self, pg: Any, write: Callable[[], Awaitable[None]]) -> None:
        self.pg, self.write, self.queries = pg, write, 0

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self.pg.fetch(sql, *args)
        self.queries += 1
        if self.queries == 1:
            await self.write()
        return rows


@pytest.mark.parametrize("written", [False, True])
async def test_a_page_is_one_snapshot_when_a_user_is_written_between_its_queries(
    setup: Any, written: bool
) -> None:
    from handlers.identity.service import list_users as _page_bodies
    from handlers.identity.views import ViewMemo
    from server.keys import PG

    client, owner, con = setup
    rows = await insert_named(con, owner.tenant_id, "snap", 3)
    tenant = uuid.UUID(owner.tenant_id)
    memo = ViewMemo(100)
    target = uuid.UUID(rows[1].id)

    async def rename() -> None:
        if written:
            await con.execute(
                "UPDATE users SET username = 'moved', version = version + 1"
                " WHERE tenant_id = $1 AND id = $2",
                tenant,
                target,
            )

    pg = WriteBetween(client.app[PG], rename)
    body = await _page_bodies(pg, memo, tenant, None, None, None, 10)  # type: ignore[arg-type]
    page = orjson.loads(body)
    users = {u["id"]: u for u in page["items"]}
    assert page["next_cursor"] is None and len(users) == 4  # the owner and the three rows
    # Either the state the first query saw (version 1 everywhere) or, when a write landed in
    # between, a full re-read that shows it: never a mix of an old id list and new bodies.
    assert users[str(target)]["username"] == ("moved" if written else rows[1].username)
    assert users[str(target)]["version"] == (2 if written else 1)
    assert pg.queries == (3 if written else 2)
    # Every body is in the memo now: the next page is one (id, version) query, and the same
    # bytes (served whole from the page memo the second time).
    for _ in range(2):
        again = WriteBetween(client.app[PG], rename)
        written = False
        assert await _page_bodies(again, memo, tenant, None, None, None, 10) == body  # type: ignore[arg-type]
        assert again.queries == 1
    assert len(memo._pages) == 1


async def test_a_kept_page_is_served_only_for_the_same_ids_and_versions(setup: Any) -> None:
    from handlers.identity.service import list_users as _page_bodies
    from handlers.identity.views import ViewMemo
    from server.keys import PG

    client, owner, con = setup
    rows = await insert_named(con, owner.tenant_id, "kept", 3)
    tenant = uuid.UUID(owner.tenant_id)
    memo = ViewMemo(100)
    pg = client.app[PG]

    async def page(limit: int = 10) -> list[tuple[str, int]]:
        body = await _page_bodies(pg, memo, tenant, None, None, None, limit)
        assert body == await _page_bodies(pg, memo, tenant, None, None, None, limit)
        return [(u["id"], u["version"]) for u in orjson.loads(body)["items"]]

    first = await page()
    assert len(first) == 4
    target = uuid.UUID(rows[0].id)
    await con.execute(
        "UPDATE users SET username = 'kept-renamed', version = version + 1"
        " WHERE tenant_id = $1 AND id = $2",
        tenant,
        target,
    )
    assert (str(target), 2) in await page()
    await insert_named(con, owner.tenant_id, "later", 1)
    assert len(await page()) == 5
    assert len(await page(limit=2)) == 2
    assert len(memo._pages) == 2  # limit 10 and limit 2: one entry per query

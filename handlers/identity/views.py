"""The JSON shapes of users, tenants and user pages, and the memo of rendered user bodies."""

from __future__ import annotations

import uuid
from collections import OrderedDict
from typing import Any

import orjson
from asyncpg import Record

from server.http import encode_cursor, timestamp


def user_view(row: Record) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "tenant_id": str(row["tenant_id"]),
        "email": row["email"],
        "username": row["username"],
        "status": row["status"],
        "roles": list(row["roles"]),
        "profile": row["profile"],
        "version": row["version"],
        "created_at": timestamp(row["created_at"]),
        "updated_at": timestamp(row["updated_at"]),
    }


def user_body(view: dict[str, Any]) -> bytes:
    return orjson.dumps(view)


def tenant_view(row: Record) -> dict[str, Any]:
    return {"id": str(row["id"]), "name": row["name"], "created_at": timestamp(row["created_at"])}


def page_body(bodies: list[bytes], last: uuid.UUID | None) -> bytes:
    """{"items", "next_cursor"} joined from each user's body: byte for byte what orjson.dumps of
    the page would write."""
    cursor = encode_cursor(last) if last is not None else None
    return b'{"items":[%b],"next_cursor":%b}' % (b",".join(bodies), orjson.dumps(cursor))


# A page's query: tenant, cursor, search pattern, status filter, limit.
PageKey = tuple[uuid.UUID, uuid.UUID | None, str | None, str | None, int]


class ViewMemo:
    """Users' JSON bodies by id, each with the tenant and version it was written at, kept in
    this process for list pages.

    Building each user's view (two UUIDs and two timestamps to text) is most of a page's CPU.
    A body changes only with its row's version (every UPDATE of a visible column bumps it), so
    a body is never served stale: it is used only at the version it was written at. A page
    therefore asks PostgreSQL for its (id, version) pairs and fetches whole rows only for the
    bodies it lacks. Oldest entries go first past `size`; 0 turns the memo off.

    Keyed by the id alone (asyncpg's UUID hashes in C) with the tenant compared as an int, which
    is cheaper per lookup than a (tenant, id, version) tuple of stdlib UUIDs.
    """

    PAGE_BYTES_PER_BODY = 500  # a page of 50 users with its (id, version) list is ~21 kB
    RECORD_BYTES = 120  # an (id, version) asyncpg Record, roughly

    def __init__(self, size: int) -> None:
        self.size = size
        self._bodies: OrderedDict[uuid.UUID, tuple[int, int, bytes]] = OrderedDict()
        # Whole pages, each with the (id, version) list it was built from: comparing a page's
        # fresh list with the kept one replaces its lookups and the join. Bounded by bytes, in
        # proportion to the number of bodies kept.
        self.max_page_bytes = size * self.PAGE_BYTES_PER_BODY
        self._page_bytes = 0
        self._pages: OrderedDict[PageKey, tuple[list[Record], bytes, int]] = OrderedDict()

    def page(self, key: PageKey, keys: list[Record]) -> bytes | None:
        """The page body kept under `key`, if it was built from exactly these (id, version)s."""
        entry = self._pages.get(key)
        return entry[1] if entry is not None and entry[0] == keys else None

    def keep_page(self, key: PageKey, keys: list[Record], body: bytes) -> None:
        cost = len(body) + self.RECORD_BYTES * len(keys)
        if cost > self.max_page_bytes:
            return
        old = self._pages.pop(key, None)
        if old is not None:
            self._page_bytes -= old[2]
        self._pages[key] = (keys, body, cost)
        self._page_bytes += cost
        while self._page_bytes > self.max_page_bytes:
            self._page_bytes -= self._pages.popitem(last=False)[1][2]

    def lookup(self, tenant_id: uuid.UUID, keys: list[Record]) -> list[bytes | None]:
        """The body of each (id, version) record of `keys` at that version, else None."""
        tenant = tenant_id.int
        get = self._bodies.get
        bodies: list[bytes | None] = []
        for user_id, version in keys:
            entry = get(user_id)
            if entry is not None and entry[1] == version and entry[0] == tenant:
                bodies.append(entry[2])
            else:
                bodies.append(None)
        return bodies

    def body(self, row: Record) -> bytes:
        user_id, tenant, version = row["id"], row["tenant_id"].int, row["version"]
        entry = self._bodies.get(user_id)
        if entry is not None and entry[1] == version and entry[0] == tenant:
            return entry[2]
        body = user_body(user_view(row))
        if self.size:
            # orjson's bytes keep the buffer they were written into: keep a copy of the body.
            body = bytes(memoryview(body))
            self._bodies.pop(user_id, None)
            self._bodies[user_id] = (tenant, version, body)
            if len(self._bodies) > self.size:
                self._bodies.popitem(last=False)
        return body

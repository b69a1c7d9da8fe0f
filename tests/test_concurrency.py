"""Optimistic locking and the last-owner rule under concurrency."""

from __future__ import annotations

import asyncio
from typing import Any

from server.app import create_app
from server.config import Config

from .helpers import add_user, signup


async def test_twenty_patches_with_one_if_match_give_one_winner(
    aiohttp_client: Any, config: Config
) -> None:
    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    member = await add_user(client, owner)
    responses = await asyncio.gather(
        *(
            client.patch(
                f"/v1/users/{member.id}",
                json={"username": f"name{i}"},
                headers={**owner.headers, "If-Match": '"1"'},
            )
            for i in range(20)
        )
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] + [412] * 19
    winner = next(r for r in responses if r.status == 200)
    body = await winner.json()
    assert body["version"] == 2 and winner.headers["ETag"] == '"2"'
    current = await (await client.get(f"/v1/users/{member.id}", headers=owner.headers)).json()
    assert current["username"] == body["username"]


async def test_if_match_missing_or_empty_is_428_and_stale_is_412(
    aiohttp_client: Any, config: Config
) -> None:
    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    path = f"/v1/users/{owner.id}"
    assert (await client.patch(path, json={"username": "x"}, headers=owner.headers)).status == 428
    # An empty If-Match names no ETag at all: the precondition is missing, not stale.
    for blank in ("", " \t "):
        resp = await client.patch(
            path, json={"username": "x"}, headers={**owner.headers, "If-Match": blank}
        )
        assert resp.status == 428, blank
        assert (await resp.json())["title"] == "Precondition Required"
    # A request invalid in itself is refused as such before any precondition is looked at.
    for if_match in ({}, {"If-Match": ""}, {"If-Match": "garbage"}, {"If-Match": '"7"'}):
        resp = await client.patch(
            path, json={"username": "-"}, headers={**owner.headers, **if_match}
        )
        assert resp.status == 422, if_match
        assert (await resp.json())["errors"][0]["field"] == "username"
    assert (
        await client.patch(
            path, json={"username": "x"}, headers={**owner.headers, "If-Match": '"7"'}
        )
    ).status == 412
    assert (
        await client.patch(
            path, json={"username": "x"}, headers={**owner.headers, "If-Match": "garbage"}
        )
    ).status == 412
    resp = await client.patch(
        path, json={"username": "x"}, headers={**owner.headers, "If-Match": 'W/"1"'}
    )
    assert resp.status == 200


async def test_two_owners_demoting_each_other_leave_one(
    aiohttp_client: Any, config: Config
) -> None:
    client = await aiohttp_client(create_app(config))
    first = await signup(client)
    second = await add_user(client, first, ["owner"])
    a, b = await asyncio.gather(
        client.delete(f"/v1/users/{second.id}/roles/owner", headers=first.headers),
        client.delete(f"/v1/users/{first.id}/roles/owner", headers=second.headers),
    )
    assert sorted([a.status, b.status]) == [204, 409]
    page = await (await client.get("/v1/users", headers=first.headers)).json()
    assert sum("owner" in u["roles"] for u in page["items"]) == 1

"""Shared test steps: sign up a tenant, create users with roles, log in, build headers."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient

PASSWORD = "correct horse battery"
_seq = itertools.count(1)


@dataclass
class Actor:
    id: str
    tenant_id: str
    email: str
    roles: list[str]
    access_token: str
    refresh_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


async def signup(client: TestClient, tenant_name: str = "Acme") -> Actor:
    n = next(_seq)
    resp = await client.post(
        "/v1/auth/signup",
        json={
            "tenant_name": tenant_name,
            "email": f"owner{n}@example.com",
            "username": f"owner{n}",
            "password": PASSWORD,
        },
    )
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    return Actor(
        body["user"]["id"],
        body["tenant"]["id"],
        body["user"]["email"],
        body["user"]["roles"],
        body["access_token"],
        body["refresh_token"],
    )


async def login(
    client: TestClient, tenant_id: str, email: str, password: str = PASSWORD
) -> dict[str, Any]:
    resp = await client.post(
        "/v1/auth/login", json={"tenant_id": tenant_id, "email": email, "password": password}
    )
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def add_user(client: TestClient, by: Actor, roles: list[str] | None = None) -> Actor:
    """Create a user in `by`'s tenant with `roles`, then log them in."""
    n = next(_seq)
    email = f"user{n}@example.com"
    resp = await client.post(
        "/v1/users",
        json={
            "email": email,
            "username": f"user{n}",
            "password": PASSWORD,
            "roles": roles or ["member"],
        },
        headers=by.headers,
    )
    assert resp.status == 201, await resp.text()
    user = await resp.json()
    tokens = await login(client, by.tenant_id, email)
    return Actor(
        user["id"],
        by.tenant_id,
        email,
        user["roles"],
        tokens["access_token"],
        tokens["refresh_token"],
    )

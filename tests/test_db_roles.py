"""Two database roles: a schema owner runs the migrations, the server runs as a DML-only role.

A throwaway owner role (no superuser) gets a fresh database and migrates it with
DATABASE_RUNTIME_ROLE set; the runtime role then serves real requests, maintains the event
partitions through the owner's functions, and is refused every change to the schema.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from db import events
from db.migrate import MigrationError, discover, migrate
from server.app import create_app
from server.config import Config

from .conftest import Services, with_database
from .helpers import signup


@dataclasses.dataclass(frozen=True)
class Roles:
    owner_dsn: str
    runtime_dsn: str
    runtime: str


def as_user(dsn: str, user: str) -> str:
    scheme, rest = dsn.split("://", 1)
    return f"{scheme}://{user}@{rest.split('@', 1)[-1]}"


async def _admin(services: Services, *statements: str) -> None:
    con = await asyncpg.connect(services.admin_dsn)
    try:
        for sql in statements:
            await con.execute(sql)
    finally:
        await con.close()


@pytest.fixture(scope="module")
def roles(services: Services) -> Iterator[Roles]:
    tag = secrets.token_hex(3)
    owner, runtime, database = f"surge_owner_{tag}", f"surge_app_{tag}", f"surge_roles_{tag}"
    # The docs/DEPLOY.md recipe, on a throwaway database.
    asyncio.run(
        _admin(
            services,
            f"CREATE ROLE {owner} LOGIN",
            f"CREATE ROLE {runtime} LOGIN",
            f"CREATE DATABASE {database} OWNER {owner}",
        )
    )
    try:
        dsn = with_database(services.admin_dsn, database)
        asyncio.run(
            _admin(
                dataclasses.replace(services, admin_dsn=dsn),
                "REVOKE ALL ON SCHEMA public FROM PUBLIC",
            )
        )
        owner_dsn, runtime_dsn = as_user(dsn, owner), as_user(dsn, runtime)
        applied = asyncio.run(migrate(owner_dsn, runtime_role=runtime))
        assert applied == [m.filename for m in discover()]
        yield Roles(owner_dsn, runtime_dsn, runtime)
    finally:
        asyncio.run(
            _admin(
                services,
                f"DROP DATABASE IF EXISTS {database} WITH (FORCE)",
                f"DROP ROLE IF EXISTS {runtime}",
                f"DROP ROLE IF EXISTS {owner}",
            )
        )


async def test_the_runtime_role_serves_a_full_request_cycle(
    roles: Roles, config: Config, aiohttp_client: object
) -> None:
    app = create_app(dataclasses.replace(config, database_url=roles.runtime_dsn))
    client: TestClient = await aiohttp_client(app)  # type: ignore[operator]
    owner = await signup(client, "Least Privilege")
    resp = await client.get(f"/v1/users/{owner.id}", headers=owner.headers)
    assert resp.status == 200
    assert (await resp.json())["email"] == owner.email
    resp = await client.patch(
        f"/v1/users/{owner.id}",
        json={"username": "renamed"},
        headers={**owner.headers, "If-Match": '"1"'},
    )
    assert resp.status == 200, await resp.text()
    con = await asyncpg.connect(roles.runtime_dsn)
    try:
        assert await con.fetchval("SELECT current_user") == roles.runtime
        # the writes went through the outbox and the audit log too
        assert await con.fetchval("SELECT count(*) FROM outbox") >= 2
        assert await con.fetchval("SELECT count(*) FROM audit_log") >= 2
        assert await con.fetchval("SELECT max(version) FROM schema_migrations") == len(discover())
    finally:
        await con.close()


async def test_the_runtime_role_maintains_event_partitions(roles: Roles) -> None:
    """Creating and dropping day partitions runs with the owner's rights (0005)."""
    day = (datetime.now(UTC) + timedelta(days=40)).date()
    con = await asyncpg.connect(roles.runtime_dsn)
    try:
        created = await events.create_partitions(con, "events", day, day)
        assert created == [f"events_p{day:%Y%m%d}"]
        await con.execute(
            "INSERT INTO events (tenant_id, name, ts) VALUES (surge_uuid_v7(), 'x', $1)",
            datetime(day.year, day.month, day.day, 12, tzinfo=UTC),
        )
        dropped = await events.drop_partitions(con, "events", day + timedelta(days=1))
        assert f"events_p{day:%Y%m%d}" in dropped
    finally:
        await con.close()


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE sneaky (id int)",
        "ALTER TABLE users ADD COLUMN sneaky int",
        "DROP TABLE users",
        "TRUNCATE users",
        "CREATE INDEX sneaky ON users (username)",
        "CREATE FUNCTION sneaky() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "DELETE FROM schema_migrations",
    ],
)
async def test_the_runtime_role_cannot_change_the_schema(roles: Roles, statement: str) -> None:
    con = await asyncpg.connect(roles.runtime_dsn)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await con.execute(statement)
    finally:
        await con.close()


async def test_migrate_as_the_runtime_role_is_harmless_when_nothing_is_pending(
    roles: Roles,
) -> None:
    """serve with MIGRATE_ON_START as the runtime role: no DDL runs, no grant is attempted."""
    assert await migrate(roles.runtime_dsn, runtime_role=roles.runtime) == []


async def test_grants_to_an_unknown_role_are_refused(roles: Roles) -> None:
    with pytest.raises(
        MigrationError, match="DATABASE_RUNTIME_ROLE: role 'nobody_here' does not exist"
    ):
        await migrate(roles.owner_dsn, runtime_role="nobody_here")

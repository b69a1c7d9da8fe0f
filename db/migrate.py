"""Forward-only migrations: sql/migrations/NNNN_name.sql, applied in order.

Each file runs in its own transaction and is recorded with its SHA-256. The whole run holds a
PostgreSQL advisory lock on a dedicated connection, so replicas starting together apply each
file once (the others wait, then find nothing to do). A file edited after it was applied
stops the run: the schema would no longer match what the files say.

Two roles: migrations run as the schema owner; with a runtime role named, the run ends by
granting that role the DML rights the server needs on every table, sequence and function of
the schema (present and, through default privileges, future), and nothing else: it cannot
create, alter, drop or truncate. When nothing is pending the run issues no DDL at all, so a
server connected as the runtime role can still start with MIGRATE_ON_START.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from db.queries import SQL_DIR

MIGRATIONS_DIR = SQL_DIR / "migrations"

# An arbitrary constant; every replica uses the same one.
LOCK_KEY = 0x5E_26_E0_00_13_16
_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")

log = logging.getLogger("surge.migrate")


class MigrationError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str
    checksum: str

    @property
    def filename(self) -> str:
        return f"{self.version:04d}_{self.name}.sql"


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        m = _FILE.match(path.name)
        if m is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        version = int(m["version"])
        if version in found:
            raise MigrationError(f"{path.name}: version {version} is used twice")
        sql = path.read_text(encoding="utf-8")
        checksum = hashlib.sha256(sql.encode()).hexdigest()
        found[version] = Migration(version, m["name"], sql, checksum)
    return [found[v] for v in sorted(found)]


_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def migrate(
    dsn: str, directory: Path = MIGRATIONS_DIR, *, runtime_role: str | None = None
) -> list[str]:
    """Apply what is pending, then grant `runtime_role` its rights; return the files applied."""
    migrations = discover(directory)
    con = await asyncpg.connect(dsn)
    try:
        await con.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        try:
            done = await _apply(con, migrations)
            if runtime_role is not None:
                await grant_runtime_role(con, runtime_role)
            return done
        finally:
            await con.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    finally:
        await con.close()


async def _apply(con: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    rows = []
    if await con.fetchval("SELECT to_regclass('schema_migrations') IS NULL"):
        await con.execute(_CREATE_TABLE)
    else:
        rows = await con.fetch("SELECT version, name, checksum FROM schema_migrations")
    applied = {r["version"]: r for r in rows}
    for mig in migrations:
        row = applied.get(mig.version)
        if row is not None and row["checksum"] != mig.checksum:
            raise MigrationError(
                f"{mig.filename} was edited after it was applied (checksum mismatch); "
                "add a new migration instead"
            )
    done: list[str] = []
    for mig in migrations:
        if mig.version in applied:
            continue
        async with con.transaction():
            await con.execute(mig.sql)
            await con.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                mig.version,
                mig.name,
                mig.checksum,
            )
        log.info("applied migration %s", mig.filename)
        done.append(mig.filename)
    return done


# {schema} and {role} are quoted identifiers. schema_migrations stays read-only to the role.
_GRANTS = """
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role};
REVOKE INSERT, UPDATE, DELETE ON {schema}.schema_migrations FROM {role};
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role};
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {role};
ALTER DEFAULT PRIVILEGES IN SCHEMA {schema}
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role};
ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT USAGE, SELECT ON SEQUENCES TO {role};
ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT EXECUTE ON FUNCTIONS TO {role};
"""


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


async def grant_runtime_role(con: asyncpg.Connection, role: str) -> None:
    """Give `role` DML rights on everything in the current schema, now and for objects the
    migrating role creates later (new tables, day partitions). Idempotent."""
    row = await con.fetchrow(
        "SELECT current_user AS me, current_schema() AS schema,"
        " (SELECT rolsuper FROM pg_roles WHERE rolname = $1) AS super",
        role,
    )
    assert row is not None
    if row["super"] is None:
        raise MigrationError(
            f"DATABASE_RUNTIME_ROLE: role {role!r} does not exist (docs/DEPLOY.md shows how to "
            "create it)"
        )
    if row["me"] == role:
        log.info("migrations run as the runtime role %s: no grants to make", role)
        return
    if row["super"]:
        log.warning("DATABASE_RUNTIME_ROLE %s is a superuser: grants cannot restrict it", role)
    async with con.transaction():
        await con.execute(_GRANTS.format(schema=_quote(row["schema"]), role=_quote(role)))
    log.info("granted DML rights on schema %s to %s", row["schema"], role)


async def applied_versions(dsn: str) -> list[int]:
    con = await asyncpg.connect(dsn)
    try:
        rows = await con.fetch("SELECT version FROM schema_migrations ORDER BY version")
        return [r["version"] for r in rows]
    finally:
        await con.close()

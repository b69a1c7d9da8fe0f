"""Forward-only migrations: sql/migrations/NNNN_name.sql, applied in order.

Each file runs in its own transaction and is recorded with its SHA-256. The whole run holds a
PostgreSQL advisory lock on a dedicated connection, so replicas starting together apply each
file once (the others wait, then find nothing to do). A file edited after it was applied
stops the run: the schema would no longer match what the files say.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "sql" / "migrations"

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


async def migrate(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply what is pending; return the file names applied."""
    migrations = discover(directory)
    con = await asyncpg.connect(dsn)
    try:
        await con.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        try:
            return await _apply(con, migrations)
        finally:
            await con.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    finally:
        await con.close()


async def _apply(con: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    await con.execute(_CREATE_TABLE)
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


async def applied_versions(dsn: str) -> list[int]:
    con = await asyncpg.connect(dsn)
    try:
        rows = await con.fetch("SELECT version FROM schema_migrations ORDER BY version")
        return [r["version"] for r in rows]
    finally:
        await con.close()

"""python -m bench.seed: the bench database, migrated, with 100 tenants x 1,000 users.

Idempotent: the tables are truncated and reloaded on every run. Rows go in with binary COPY
(`copy_records_to_table`), which loads 100,000 users in about a second where row-by-row
INSERTs would take minutes. Writes a sample of (tenant_id, user_id) pairs to
bench/data/ids.json for the load generators.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import uvloop
from argon2 import PasswordHasher

from bench.common import (
    DATA_DIR,
    DATABASE_URL,
    EVENTS_DDL,
    EVENTS_TABLE,
    IDS_FILE,
    TENANTS,
    USERS_PER_TENANT,
)
from db.ids import uuid7
from db.migrate import migrate

# Every seeded user can log in with this password (for the locust scenarios); the hash is
# computed once per seed run, so its cost does not scale with the user count.
PASSWORD = "bench-password"
USER_COLUMNS = (
    "tenant_id",
    "id",
    "email",
    "username",
    "password_hash",
    "status",
    "roles",
    "profile",
    "version",
    "created_at",
    "updated_at",
)


async def ensure_database(dsn: str) -> None:
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    if name in ("", "test", "postgres", "template0", "template1"):
        raise SystemExit(f"refusing to seed database {name!r}: use a dedicated bench database")
    admin = urlunsplit(parts._replace(path="/postgres"))
    con = await asyncpg.connect(admin)
    try:
        exists = await con.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            # Identifiers cannot be bound parameters; the name was checked above and is quoted.
            await con.execute(f'CREATE DATABASE "{name}"')
    finally:
        await con.close()


def build_rows(
    tenants: int, per_tenant: int, password_hash: str
) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    base = datetime.now(UTC) - timedelta(days=30)
    tenant_rows: list[tuple[object, ...]] = []
    user_rows: list[tuple[object, ...]] = []
    for t in range(tenants):
        tenant_id = uuid7()
        tenant_rows.append((tenant_id, f"Bench tenant {t:03d}", base))
        for n in range(per_tenant):
            created = base + timedelta(seconds=t * per_tenant + n)
            # The first user owns the tenant, as a signup would have made it.
            roles = ["owner", "admin", "member"] if n == 0 else ["member"]
            user_rows.append(
                (
                    tenant_id,
                    uuid7(),
                    f"user{n:04d}@tenant{t:03d}.example.com",
                    f"user_{t:03d}_{n:04d}",
                    password_hash,
                    "active",
                    roles,
                    # asyncpg's default jsonb codec takes the JSON text.
                    "{}",
                    1,
                    created,
                    created,
                )
            )
    return tenant_rows, user_rows


async def seed(dsn: str, tenants: int, per_tenant: int, sample: int) -> dict[str, object]:
    await ensure_database(dsn)
    applied = await migrate(dsn)
    password_hash = PasswordHasher().hash(PASSWORD)
    tenant_rows, user_rows = build_rows(tenants, per_tenant, password_hash)
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(EVENTS_DDL)
        async with con.transaction():
            # CASCADE reaches every table that references tenants (users, refresh tokens, and
            # whatever later migrations add), so a re-run never trips a foreign key.
            await con.execute(f"TRUNCATE tenants, {EVENTS_TABLE} CASCADE")
            await con.copy_records_to_table(
                "tenants", records=tenant_rows, columns=["id", "name", "created_at"]
            )
            await con.copy_records_to_table("users", records=user_rows, columns=USER_COLUMNS)
        # Fresh statistics, or the planner guesses from an empty table on the first runs.
        await con.execute("ANALYZE tenants")
        await con.execute("ANALYZE users")
        count = await con.fetchval("SELECT count(*) FROM users")
    finally:
        await con.close()

    # A fixed seed: every run of the same data set benchmarks the same users.
    rng = random.Random(20261121)
    picked = rng.sample(user_rows, min(sample, len(user_rows)))
    pairs = [[str(row[0]), str(row[1])] for row in picked]
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    IDS_FILE.write_text(
        json.dumps(
            {
                "database": urlsplit(dsn).path.lstrip("/"),
                "tenants": tenants,
                "users_per_tenant": per_tenant,
                "password": PASSWORD,
                "pairs": pairs,
            },
            separators=(",", ":"),
        )
    )
    return {"migrations_applied": applied, "users": count, "sample": len(pairs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.seed", description=__doc__)
    parser.add_argument("--dsn", default=DATABASE_URL, help="default: BENCH_DATABASE_URL")
    parser.add_argument("--tenants", type=int, default=TENANTS)
    parser.add_argument("--users-per-tenant", type=int, default=USERS_PER_TENANT)
    parser.add_argument("--sample", type=int, default=10_000, help="pairs written to ids.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    summary = uvloop.run(seed(args.dsn, args.tenants, args.users_per_tenant, args.sample))
    elapsed = time.perf_counter() - started
    print(
        f"seeded {summary['users']} users in {args.tenants} tenants in {elapsed:.1f}s "
        f"(migrations applied: {summary['migrations_applied'] or 'none'}); "
        f"{summary['sample']} pairs in {IDS_FILE.relative_to(IDS_FILE.parents[2])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

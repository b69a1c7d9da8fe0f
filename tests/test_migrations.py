from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from db.migrate import MIGRATIONS_DIR, MigrationError, applied_versions, discover, migrate

from .conftest import Services, _create_database, _drop_database, with_database


@pytest.fixture
async def fresh_dsn(services: Services) -> AsyncIterator[str]:
    name = f"surge_mig_{secrets.token_hex(4)}"
    await _create_database(services.admin_dsn, name)
    try:
        yield with_database(services.admin_dsn, name)
    finally:
        await _drop_database(services.admin_dsn, name)


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


async def test_applies_in_order_once(fresh_dsn: str, tmp_path: Path) -> None:
    d = write(
        tmp_path / "m",
        {
            "0002_add_b.sql": "ALTER TABLE t ADD COLUMN b int;",
            "0001_create_t.sql": "CREATE TABLE t (a int);",
            "0010_fill.sql": "INSERT INTO t (a, b) VALUES (1, 2);",
        },
    )
    assert await migrate(fresh_dsn, d) == ["0001_create_t.sql", "0002_add_b.sql", "0010_fill.sql"]
    assert await migrate(fresh_dsn, d) == []  # idempotent
    assert await applied_versions(fresh_dsn) == [1, 2, 10]
    con = await asyncpg.connect(fresh_dsn)
    try:
        assert await con.fetchval("SELECT count(*) FROM t") == 1
    finally:
        await con.close()


async def test_edited_file_is_refused(fresh_dsn: str, tmp_path: Path) -> None:
    d = write(tmp_path / "m", {"0001_a.sql": "CREATE TABLE a (x int);"})
    await migrate(fresh_dsn, d)
    (d / "0001_a.sql").write_text("CREATE TABLE a (x bigint);")
    with pytest.raises(MigrationError, match=r"0001_a\.sql was edited after it was applied"):
        await migrate(fresh_dsn, d)


async def test_failed_migration_rolls_back_and_records_nothing(
    fresh_dsn: str, tmp_path: Path
) -> None:
    d = write(
        tmp_path / "m",
        {
            "0001_ok.sql": "CREATE TABLE ok (x int);",
            "0002_bad.sql": "CREATE TABLE half (x int); SELECT 1/0;",
        },
    )
    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate(fresh_dsn, d)
    assert await applied_versions(fresh_dsn) == [1]
    con = await asyncpg.connect(fresh_dsn)
    try:
        assert await con.fetchval("SELECT to_regclass('half')") is None
    finally:
        await con.close()


async def test_two_concurrent_runners_apply_each_file_once(fresh_dsn: str, tmp_path: Path) -> None:
    d = write(
        tmp_path / "m",
        {
            # not idempotent: a second application would fail on the duplicate table
            "0001_slow.sql": "SELECT pg_sleep(0.3); CREATE TABLE once (x int);",
            "0002_more.sql": "CREATE TABLE twice (x int);",
        },
    )
    a, b = await asyncio.gather(migrate(fresh_dsn, d), migrate(fresh_dsn, d))
    assert sorted([a, b], key=len) == [[], ["0001_slow.sql", "0002_more.sql"]]
    assert await applied_versions(fresh_dsn) == [1, 2]


@pytest.mark.parametrize(
    ("files", "fragment"),
    [
        ({"1_short.sql": "SELECT 1"}, "named NNNN_name.sql"),
        ({"0001_Upper.sql": "SELECT 1"}, "named NNNN_name.sql"),
        ({"0001_a.sql": "SELECT 1", "0001_b.sql": "SELECT 1"}, "used twice"),
    ],
)
def test_bad_file_names(tmp_path: Path, files: dict[str, str], fragment: str) -> None:
    with pytest.raises(MigrationError, match=fragment):
        discover(write(tmp_path / "m", files))


def test_shipped_migrations_are_numbered_without_gaps() -> None:
    versions = [m.version for m in discover(MIGRATIONS_DIR)]
    assert versions == list(range(1, len(versions) + 1))

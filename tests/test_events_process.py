"""A 202 from the real process means committed: 200 concurrent posters, SIGKILL right after the
last answer, restart, count."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid

import aiohttp
import asyncpg

from server.runner import free_port

from .conftest import ROOT, Services, server_env
from .json_logs import assert_json_log


def start(services: Services, port: int) -> subprocess.Popen[bytes]:
    env = server_env(
        services,
        port,
        ACCESS_LOG="false",
        RATE_LIMIT_BURST="100000",
        RATE_LIMIT_RATE="100000",
        HASH_CONCURRENCY="2",
        # durability is measured here, not admission: 200 posts at once all admitted
        ADAPTIVE_CONCURRENCY="false",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "server", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def ready(proc: subprocess.Popen[bytes], session: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            async with session.get(f"{base}/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the server did not become ready"
        await asyncio.sleep(0.05)


def kill(proc: subprocess.Popen[bytes]) -> str:
    """SIGKILL; what the process wrote to stderr (the first call reads it)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    logged = b""
    if proc.stderr is not None and not proc.stderr.closed:
        logged = proc.stderr.read()
        proc.stderr.close()
    return logged.decode(errors="replace")


async def test_every_202_survives_a_kill_right_after_it(clean: Services) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(clean, port)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await ready(proc, session, base)
            async with session.post(
                f"{base}/v1/auth/signup",
                json={
                    "tenant_name": "Kill",
                    "email": "kill@example.com",
                    "username": "kill",
                    "password": "correct horse battery",
                },
            ) as resp:
                assert resp.status == 201
                body = await resp.json()
            headers = {"Authorization": f"Bearer {body['access_token']}"}
            tenant = uuid.UUID(body["tenant"]["id"])

            async def post(i: int) -> int:
                events = [{"name": "poster", "props": {"poster": i, "k": k}} for k in range(5)]
                async with session.post(
                    f"{base}/v1/events", json={"events": events}, headers=headers
                ) as resp:
                    assert resp.status == 202, await resp.text()
                    accepted: int = (await resp.json())["accepted"]
                    return accepted

            accepted = await asyncio.gather(*[post(i) for i in range(200)])
        logged = kill(proc)  # the moment the last 202 is in: no graceful anything
    finally:
        kill(proc)
    assert sum(accepted) == 1000
    assert_json_log(logged, "stderr")

    proc = start(clean, port)
    try:
        async with aiohttp.ClientSession() as session:
            await ready(proc, session, base)
        con = await asyncpg.connect(clean.dsn)
        try:
            sql = "SELECT count(*), count(DISTINCT props) FROM events WHERE tenant_id = $1"
            row = await con.fetchrow(sql + " AND name = 'poster'", tenant)
            rollup = await con.fetchval(
                "SELECT sum(count) FROM event_counts WHERE tenant_id = $1 AND name = 'poster'",
                tenant,
            )
        finally:
            await con.close()
        logged = kill(proc)
    finally:
        kill(proc)
    assert_json_log(logged, "stderr after the restart")
    assert tuple(row) == (1000, 1000)
    assert rollup == 1000

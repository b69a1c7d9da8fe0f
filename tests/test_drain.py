"""DRAIN_DELAY_S: a replica told to stop leaves its load balancer before its listener closes.

A load balancer learns that a replica is going away only from its health checks (HAProxy:
/readyz every `inter`, out after `fall` failures). If the listener closed at once, a request
sent in between would meet a closed port or a connection reset (bench/cluster.py saw it: every
replica's listener closed while HAProxy still had it in rotation). So
for DRAIN_DELAY_S after SIGTERM the process keeps serving everything, /readyz answers 503
"draining", and only then does the listener close and the in-flight requests drain."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import aiohttp
import pytest

from server.app import create_app
from server.config import Config
from server.runner import free_port, serve_app


async def test_the_listener_serves_through_the_drain_delay_with_readyz_503(
    config: Config,
) -> None:
    port = free_port()
    cfg = dataclasses.replace(config, port=port, drain_delay_s=1.5, shutdown_grace_s=2)
    ready, stop = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve_app(cfg, app=create_app(cfg), ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 10)
    base = f"http://127.0.0.1:{port}"
    # a new connection per request: what a load balancer's check and a fresh client open
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        assert (await http.get(f"{base}/readyz")).status == 200
        stopped = time.monotonic()
        stop.set()
        await asyncio.sleep(0.2)
        readyz = await http.get(f"{base}/readyz")
        assert (readyz.status, (await readyz.json())["status"]) == (503, "draining")
        assert (await http.get(f"{base}/healthz")).status == 200
        assert (await http.get(f"{base}/openapi.json")).status == 200
        await asyncio.wait_for(server, 10)
        assert time.monotonic() - stopped >= 1.5
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"{base}/healthz")


async def test_without_a_drain_delay_the_listener_closes_at_once(config: Config) -> None:
    port = free_port()
    cfg = dataclasses.replace(config, port=port, drain_delay_s=0.0, shutdown_grace_s=2)
    ready, stop = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve_app(cfg, app=create_app(cfg), ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 10)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        assert (await http.get(f"http://127.0.0.1:{port}/healthz")).status == 200
        stop.set()
        await asyncio.sleep(0.2)  # the same point at which the delayed one still serves
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"http://127.0.0.1:{port}/healthz")
    await asyncio.wait_for(server, 10)


def test_drain_delay_is_a_setting_read_from_the_environment() -> None:
    assert Config().drain_delay_s == 0.0
    assert Config.from_env({"DRAIN_DELAY_S": "2.5"}).drain_delay_s == 2.5

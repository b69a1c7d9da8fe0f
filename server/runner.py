"""Process start-up and shutdown: uvloop, signals, the listener, embedded services. Only here."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
from pathlib import Path

import uvloop
from aiohttp import web

from db.migrate import migrate
from server.app import create_app
from server.config import Config
from server.devservices import EmbeddedServices
from server.keys import LIFECYCLE

log = logging.getLogger("surge")


def resolve_services(
    config: Config, *, redis: bool = True, payments: bool = False
) -> tuple[Config, EmbeddedServices]:
    """Start embedded PostgreSQL / Redis (and with `payments`, the fake payment provider) for
    whichever URL is unset; return the completed config."""
    services = EmbeddedServices(Path(config.data_dir))
    try:
        if config.database_url is None:
            config = dataclasses.replace(config, database_url=services.start_postgres())
        if redis and config.redis_url is None:
            config = dataclasses.replace(config, redis_url=services.start_redis())
        if payments and config.payments_url is None:
            webhook = f"http://127.0.0.1:{config.port}/v1/webhooks/payments"
            url, key, secret = services.start_fake_provider(webhook)
            config = dataclasses.replace(
                config, payments_url=url, payments_api_key=key, payments_webhook_secret=secret
            )
    except BaseException:
        services.stop()
        raise
    return config, services


async def serve_app(
    config: Config,
    *,
    app: web.Application | None = None,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop`), then drain: /readyz turns 503, the listener
    closes, in-flight requests get SHUTDOWN_GRACE_S to finish, then the pools close."""
    if app is None:
        app = create_app(config)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,  # our own JSON access log replaces aiohttp's
        shutdown_timeout=config.shutdown_grace_s,
        keepalive_timeout=75.0,
    )
    await runner.setup()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=2048)
        await site.start()
        log.info("serving on %s", site.name)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("shutting down: draining for up to %ss", config.shutdown_grace_s)
        app[LIFECYCLE].draining = True
    finally:
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")


def run_serve(config: Config) -> None:
    # The fake provider stands in only on a development machine (no DATABASE_URL either): a
    # deployment that forgot PAYMENTS_URL refuses payments (503) instead of faking them.
    dev = config.database_url is None
    config, services = resolve_services(config, payments=dev)
    if config.payments_url is None:
        log.warning("PAYMENTS_URL is unset: POST /v1/orders/{id}/pay answers 503")
    try:
        assert config.database_url is not None
        if config.migrate_on_start:
            for name in uvloop.run(migrate(config.database_url)):
                log.info("applied %s", name)
        uvloop.run(serve_app(config))
    finally:
        services.stop()


def run_migrate(config: Config) -> list[str]:
    config, services = resolve_services(config, redis=False)
    try:
        assert config.database_url is not None
        return uvloop.run(migrate(config.database_url))
    finally:
        services.stop()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port

"""The identity domain's resources, started in this order after the pools and Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from handlers.identity.cache import UserCache
from handlers.identity.keys import HASHER, USER_CACHE, USER_VIEWS
from handlers.identity.passwords import Hasher
from handlers.identity.views import ViewMemo
from server.keys import CONFIG, REDIS


async def hasher_ctx(app: web.Application) -> AsyncIterator[None]:
    app[HASHER] = Hasher(app[CONFIG].hash_concurrency)
    try:
        yield
    finally:
        app[HASHER].close()


async def user_cache_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    app[USER_CACHE] = UserCache(app[REDIS], config.redis_key_prefix, config.user_cache_ttl_s)
    app[USER_VIEWS] = ViewMemo(config.user_view_memo)
    try:
        yield
    finally:
        await app[USER_CACHE].close()


contexts = [hasher_ctx, user_cache_ctx]

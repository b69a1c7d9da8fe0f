"""The identity domain's shared resources, filled by its contexts (contexts.py)."""

from __future__ import annotations

from aiohttp import web

from handlers.identity.cache import UserCache
from handlers.identity.passwords import Hasher
from handlers.identity.views import ViewMemo

HASHER: web.AppKey[Hasher] = web.AppKey("hasher")
USER_CACHE: web.AppKey[UserCache] = web.AppKey("user_cache")
USER_VIEWS: web.AppKey[ViewMemo] = web.AppKey("user_views")

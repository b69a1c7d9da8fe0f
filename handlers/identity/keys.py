"""The identity domain's shared resources, filled by its contexts (contexts.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:  # temporary: these modules import this one
    from handlers.identity.cache import UserCache
    from handlers.identity.passwords import Hasher
    from handlers.identity.users import ViewMemo


HASHER: web.AppKey[Hasher] = web.AppKey("hasher")
USER_CACHE: web.AppKey[UserCache] = web.AppKey("user_cache")
USER_VIEWS: web.AppKey[ViewMemo] = web.AppKey("user_views")

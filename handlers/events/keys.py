"""The events domain's shared resources, filled by its contexts (handlers/events/contexts.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:  # temporary: these modules import this one
    from handlers.events.analytics import LiveHub
    from handlers.events.ingest import EventCounters, EventWriter


EVENT_WRITER: web.AppKey[EventWriter] = web.AppKey("event_writer")
EVENT_COUNTERS: web.AppKey[EventCounters] = web.AppKey("event_counters")
LIVE_HUB: web.AppKey[LiveHub] = web.AppKey("live_hub")

"""The events domain's shared resources, filled by its contexts (handlers/events/contexts.py)."""

from __future__ import annotations

from aiohttp import web

from handlers.events.counters import EventCounters
from handlers.events.live import LiveHub
from handlers.events.names import EventNames
from handlers.events.writer import EventWriter

EVENT_WRITER: web.AppKey[EventWriter] = web.AppKey("event_writer")
EVENT_COUNTERS: web.AppKey[EventCounters] = web.AppKey("event_counters")
LIVE_HUB: web.AppKey[LiveHub] = web.AppKey("live_hub")
EVENT_NAMES: web.AppKey[EventNames] = web.AppKey("event_names")

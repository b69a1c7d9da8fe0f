"""The events routes: POST /v1/events, GET /v1/analytics/counts, GET /v1/analytics/live."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from aiohttp import web

from handlers.events.analytics import bucket_counts, counts_view, parse_counts_query
from handlers.events.ingest import parse_batch
from handlers.events.keys import EVENT_NAMES, EVENT_WRITER, LIVE_HUB
from server import rbac
from server.http import json_response, raw_json_response
from server.keys import CONFIG, REDIS
from server.replica import read_pool
from server.validation import read_raw_json


async def post_events(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    writer = request.app[EVENT_WRITER]
    writer.check_room()  # before the body is read: a refusal under overload costs no parsing
    # No name for the parsed body: its dicts are freed here, not kept through the wait for the
    # commit, where they would survive into the cyclic GC's oldest generation and make every
    # full collection (which scans the whole heap) come sooner.
    records, counts = parse_batch(
        (await read_raw_json(request, walk_depth=False))[1], p.tenant_text, datetime.now(UTC)
    )
    names = request.app[EVENT_NAMES]
    if new_names := names.unknown(p.tenant_text, counts):  # else a set lookup per name: known
        await names.admit(p.tenant_text, new_names, records)
    await writer.submit(records, counts)
    return raw_json_response(b'{"accepted":%d}' % len(records), status=202)


async def get_counts(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    now = time.time()
    q = parse_counts_query(request.query, now)
    config = request.app[CONFIG]
    pg = await read_pool(request, p.tenant_id)
    buckets = await bucket_counts(
        pg, request.app[REDIS], config.redis_key_prefix, p.tenant_id, q, now
    )
    return json_response(counts_view(buckets))


async def live(request: web.Request) -> web.StreamResponse:
    return await request.app[LIVE_HUB].serve(request, rbac.caller(request))

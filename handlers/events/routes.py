"""The events routes: POST /v1/events, GET /v1/analytics/counts, GET /v1/analytics/live."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from aiohttp import web

from handlers.events.analytics import bucket_counts, counts_view, parse_counts_query
from handlers.events.ingest import parse_batch
from handlers.events.keys import EVENT_WRITER, LIVE_HUB
from server import rbac
from server.chain import NOSNIFF
from server.http import json_response, raw_json_response
from server.keys import CONFIG, PG_READ, RATELIMIT_HEADERS, REDIS, REQUEST_ID
from server.validation import read_raw_json


async def post_events(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    writer = request.app[EVENT_WRITER]
    writer.check_room()  # before the body is read: a refusal under overload costs no parsing
    # No name for the parsed body: its dicts are freed here, not kept through the wait for the
    # commit, where they would survive into the cyclic GC's oldest generation and make every
    # full collection (which scans the whole heap) come sooner.
    records, counts = parse_batch(
        (await read_raw_json(request, walk_depth=False))[1], str(p.tenant_id), datetime.now(UTC)
    )
    await writer.submit(records, counts)
    return raw_json_response(b'{"accepted":%d}' % len(records), status=202)


async def get_counts(request: web.Request) -> web.Response:
    p = rbac.caller(request)
    now = time.time()
    q = parse_counts_query(request.query, now)
    config = request.app[CONFIG]
    buckets = await bucket_counts(
        request.app[PG_READ], request.app[REDIS], config.redis_key_prefix, p.tenant_id, q, now
    )
    return json_response(counts_view(buckets))


async def live(request: web.Request) -> web.StreamResponse:
    p = rbac.caller(request)
    hub = request.app[LIVE_HUB]
    queue = hub.subscribe(p.tenant_id)
    try:
        resp = web.StreamResponse(headers=_stream_headers(request))
        await resp.prepare(request)
        await resp.write(b"retry: 2000\n\n")
        while (message := await queue.get()) is not None:
            await resp.write(message)
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client went away: nothing left to tell it
    finally:
        hub.unsubscribe(p.tenant_id, queue)
    return resp


def _stream_headers(request: web.Request) -> dict[str, str]:
    return {
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # proxies must pass each message on at once
        "X-Content-Type-Options": NOSNIFF,
        # The chain sets these on the response it gets back, when a stream has long sent its
        # headers; this one is prepared here, so it carries them itself.
        "X-Request-ID": request[REQUEST_ID],
        **request.get(RATELIMIT_HEADERS, {}),
    }

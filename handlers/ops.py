"""Ops endpoints: health, readiness, metrics, the OpenAPI document and its browser page."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import logging
from collections.abc import Awaitable
from functools import cache
from pathlib import Path

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from handlers.api import SPEC
from server import metrics
from server.keys import CONFIG, LIFECYCLE, PG, REDIS
from server.replica import READS

log = logging.getLogger("surge.ops")

_HEALTHY = orjson.dumps({"status": "ok"})
# Each check is bounded on its own (the Redis client's socket timeouts are shorter still): a
# dependency that hangs makes /readyz slow by at most this, never hangs it.
_PROBE_TIMEOUT_S = 1.0


def healthz(request: web.Request) -> web.Response:
    return web.Response(body=_HEALTHY, content_type="application/json")


async def _answers(probe: Awaitable[object]) -> bool:
    try:
        await asyncio.wait_for(probe, _PROBE_TIMEOUT_S)
    except Exception:
        return False
    return True


async def readyz(request: web.Request) -> web.Response:
    """Ready while PostgreSQL answers. Redis down is `degraded`, not unready: the replica still
    serves (local rate limits, no cache), and taking every replica out of the load balancer
    for a Redis blip would turn it into a full outage. With DATABASE_READ_URL, `replica` says
    `ok`, `lagging` or `down` and never makes the answer a 503: reads then use the primary."""
    app = request.app
    pg_ok, redis_ok = await asyncio.gather(
        _answers(app[PG].fetchval("SELECT 1")), _answers(app[REDIS].ping())
    )
    _record("postgres", pg_ok)
    _record("redis", redis_ok)
    checks = {"postgres": "ok" if pg_ok else "error", "redis": "ok" if redis_ok else "degraded"}
    reads = app[READS]
    if reads.replica is not None:
        # The poller's last sample (at most REPLICA_POLL_MS old), never a failure: while the
        # replica lags or is down, reads go to the primary.
        checks["replica"] = reads.state
    if app[LIFECYCLE].draining:
        status, code = "draining", 503
    elif pg_ok:
        status, code = "ready", 200
    else:
        status, code = "unavailable", 503
    body = orjson.dumps({"status": status, "checks": checks})
    return web.Response(body=body, status=code, content_type="application/json")


_last_seen: dict[str, bool] = {}


def _record(check: str, ok: bool) -> None:
    """The check's gauge, and one log line when its answer changes (not one per probe)."""
    metrics.READINESS.labels(check).set(1 if ok else 0)
    if _last_seen.get(check, True) != ok:
        if ok:
            log.info("readiness: %s answers again", check)
        else:
            log.warning("readiness: %s does not answer", check)
    _last_seen[check] = ok


def metrics_endpoint(request: web.Request) -> web.Response:
    resp = web.Response(body=metrics.exposition())
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


@cache
def _spec_bytes(public_url: str | None) -> bytes:
    """The document, serialised once per PUBLIC_URL (one per process in practice)."""
    if public_url is None:
        return orjson.dumps(SPEC)
    return orjson.dumps(SPEC | {"servers": [{"url": public_url}]})


def openapi_json(request: web.Request) -> web.Response:
    body = _spec_bytes(request.app[CONFIG].public_url)
    return web.Response(body=body, content_type="application/json")


_STATIC = Path(__file__).resolve().parent / "static"


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def _endpoint_table() -> str:
    """The endpoints as a plain table: what /docs shows without JavaScript (and to curl)."""
    esc = html.escape
    rows = []
    for path, ops in SPEC["paths"].items():
        for method, spec in ops.items():
            body = spec.get("requestBody", {}).get("content", {}).get("application/json", {})
            body_ref = body.get("schema", {}).get("$ref", "")
            codes = ", ".join(sorted(spec["responses"]))
            auth = "Bearer" if spec.get("security") else "none"
            rows.append(
                f"<tr><td><code>{esc(method.upper())}</code></td><td><code>{esc(path)}</code></td>"
                f"<td>{esc(spec.get('summary', ''))}</td>"
                f"<td>{esc(body_ref.rsplit('/', 1)[-1])}</td><td>{esc(codes)}</td>"
                f"<td>{auth}</td></tr>"
            )
    return (
        "<table><tr><th>method</th><th>path</th><th>summary</th>"
        "<th>body</th><th>responses</th><th>auth</th></tr>" + "".join(rows) + "</table>"
    )


@cache
def _docs_page() -> tuple[str, str]:
    """(HTML, Content-Security-Policy). The script and the style are inline, allowed by their
    hashes: the page loads nothing but /openapi.json, from this origin, so it works offline and
    a tampered or injected script does not run."""
    script = (_STATIC / "docs.js").read_text(encoding="utf-8")
    style = (_STATIC / "docs.css").read_text(encoding="utf-8")
    info = SPEC["info"]
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(info['title'])} reference</title>"
        f"<style>{style}</style></head><body>"
        "<main id='app' data-state='loading'><p>Loading /openapi.json ...</p>"
        f"<noscript><h1>{html.escape(info['title'])} {html.escape(info['version'])}</h1>"
        + _endpoint_table()
        + "</noscript></main>"
        f"<script>{script}</script></body></html>"
    )
    csp = (
        "default-src 'none'; "
        f"script-src {_csp_hash(script)}; style-src {_csp_hash(style)}; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return page, csp


def docs(request: web.Request) -> web.Response:
    page, csp = _docs_page()
    resp = web.Response(text=page, content_type="text/html")
    resp.headers["Content-Security-Policy"] = csp
    return resp

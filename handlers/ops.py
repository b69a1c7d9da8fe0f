"""Ops endpoints: health, readiness, metrics, the OpenAPI document and its browser page."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import html
import logging
from collections.abc import Awaitable
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from handlers import swagger_ui
from handlers.api import SPEC
from server import metrics
from server.errors import NotFound
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


def _docs_enabled(request: web.Request) -> None:
    """ENABLE_DOCS=false: no document, no page, no page files (404, as for any unknown path)."""
    if not request.app[CONFIG].enable_docs:
        raise NotFound("resource")


def openapi_json(request: web.Request) -> web.Response:
    _docs_enabled(request)
    body = _spec_bytes(request.app[CONFIG].public_url)
    return web.Response(body=body, content_type="application/json")


_STATIC = Path(__file__).resolve().parent / "static"


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def _sri(data: bytes) -> str:
    """Subresource integrity: the browser runs the file only if it is the one the page names."""
    return "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode()


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


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@cache
def _docs_page(public_url: str | None) -> tuple[str, str]:
    """(HTML, Content-Security-Policy): Swagger UI (handlers/swagger_ui.py) over /openapi.json.

    The policy lets the page run the bundle from this origin and its own initializer (inline,
    allowed by its hash), take styles from this origin, and call this origin (and PUBLIC_URL's,
    the server the document names) for "Try it out". `img-src data:`: Swagger UI's stylesheet
    draws its icons as data: URLs. Nothing else: no other origin, no eval, no inline handler."""
    script = (_STATIC / "docs.js").read_text(encoding="utf-8")
    style = (_STATIC / "docs.css").read_text(encoding="utf-8")
    bundle = (swagger_ui.DIRECTORY / swagger_ui.ASSETS[swagger_ui.SCRIPT][0]).read_bytes()
    sheet = (swagger_ui.DIRECTORY / swagger_ui.ASSETS[swagger_ui.STYLESHEET][0]).read_bytes()
    info = SPEC["info"]
    title = html.escape(info["title"])
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{title} reference</title>"
        "<link rel='icon' href='data:,'>"  # no request for /favicon.ico
        f"<link rel='stylesheet' href='/docs/{swagger_ui.STYLESHEET}' integrity='{_sri(sheet)}'>"
        f"<style>{style}</style></head><body>"
        "<main id='swagger-ui'>"
        f"<noscript><h1>{title} {html.escape(info['version'])}</h1>"
        "<p>The interactive reference needs JavaScript; the document itself is "
        "<a href='/openapi.json'>/openapi.json</a>.</p>" + _endpoint_table() + "</noscript></main>"
        f"<script src='/docs/{swagger_ui.SCRIPT}' integrity='{_sri(bundle)}'></script>"
        f"<script>{script}</script></body></html>"
    )
    connect = "'self'" if public_url is None else f"'self' {_origin(public_url)}"
    csp = (
        "default-src 'none'; "
        f"script-src 'self' {_csp_hash(script)}; style-src 'self' {_csp_hash(style)}; "
        f"connect-src {connect}; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return page, csp


def docs(request: web.Request) -> web.Response:
    _docs_enabled(request)
    page, csp = _docs_page(request.app[CONFIG].public_url)
    resp = web.Response(text=page, content_type="text/html")
    resp.headers["Content-Security-Policy"] = csp
    return resp


# A year: the names carry Swagger UI's version, so a file under one name never changes.
_IMMUTABLE = "public, max-age=31536000, immutable"
# served name -> (the file, the same gzipped); read on first use, kept for the process's life
_loaded: dict[str, tuple[bytes, bytes]] = {}


def _load(name: str) -> tuple[bytes, bytes]:
    data = (swagger_ui.DIRECTORY / swagger_ui.ASSETS[name][0]).read_bytes()
    return data, gzip.compress(data, compresslevel=9, mtime=0)


def _takes_gzip(request: web.Request) -> bool:
    for coding in request.headers.get("Accept-Encoding", "").split(","):
        name, _, params = coding.partition(";")
        if name.strip().lower() in ("gzip", "*"):
            q = params.replace(" ", "").lower()
            return not (q.startswith("q=") and q[2:].strip("0.") == "")
    return False


async def docs_asset(request: web.Request) -> web.Response:
    """A Swagger UI file of /docs, gzipped when the client takes it (the bundle is 1.5 MB, 0.45
    MB gzipped), cacheable for a year."""
    _docs_enabled(request)
    name = request.match_info["asset"]
    if name not in swagger_ui.ASSETS:
        raise NotFound("asset")
    loaded = _loaded.get(name)
    if loaded is None:  # once per process: reading and compressing 1.5 MB stays off the loop
        loaded = _loaded[name] = await asyncio.to_thread(_load, name)
    headers = {"Cache-Control": _IMMUTABLE, "Vary": "Accept-Encoding"}
    if _takes_gzip(request):
        body = loaded[1]
        headers["Content-Encoding"] = "gzip"
    else:
        body = loaded[0]
    ctype = swagger_ui.ASSETS[name][1]
    return web.Response(body=body, content_type=ctype, charset="utf-8", headers=headers)

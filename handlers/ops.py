"""Ops endpoints: health, readiness, metrics, the OpenAPI document and its HTML rendering."""

from __future__ import annotations

import asyncio
import html
from functools import cache

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from server import metrics
from server.keys import LIFECYCLE, PG, REDIS
from server.openapi import SPEC

_HEALTHY = orjson.dumps({"status": "ok"})
_PROBE_TIMEOUT_S = 1.0


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=_HEALTHY, content_type="application/json")


async def _check_pg(request: web.Request) -> str:
    try:
        await asyncio.wait_for(request.app[PG].fetchval("SELECT 1"), _PROBE_TIMEOUT_S)
    except Exception:
        return "error"
    return "ok"


async def _check_redis(request: web.Request) -> str:
    try:
        await asyncio.wait_for(request.app[REDIS].ping(), _PROBE_TIMEOUT_S)
    except Exception:
        return "error"
    return "ok"


async def readyz(request: web.Request) -> web.Response:
    pg, redis = await asyncio.gather(_check_pg(request), _check_redis(request))
    checks = {"postgres": pg, "redis": redis}
    if request.app[LIFECYCLE].draining:
        status, code = "draining", 503
    elif pg == "ok" and redis == "ok":
        status, code = "ready", 200
    else:
        status, code = "unavailable", 503
    body = orjson.dumps({"status": status, "checks": checks})
    return web.Response(body=body, status=code, content_type="application/json")


async def metrics_endpoint(request: web.Request) -> web.Response:
    resp = web.Response(body=metrics.exposition())
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


@cache
def _spec_bytes() -> bytes:
    return orjson.dumps(SPEC)


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=_spec_bytes(), content_type="application/json")


@cache
def _docs_html() -> str:
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
    schemas = []
    for name, schema in SPEC["components"]["schemas"].items():
        pretty = orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode()
        schemas.append(f'<h3 id="{esc(name)}">{esc(name)}</h3><pre>{esc(pretty)}</pre>')
    info = SPEC["info"]
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{esc(info['title'])}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2rem;max-width:75rem}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .6rem;"
        "text-align:left;vertical-align:top}pre{background:#f6f6f6;padding:.5rem}"
        "</style></head><body>"
        f"<h1>{esc(info['title'])} {esc(info['version'])}</h1><p>{esc(info['description'])}</p>"
        "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a></p>"
        "<h2>Endpoints</h2><table><tr><th>method</th><th>path</th><th>summary</th>"
        "<th>body</th><th>responses</th><th>auth</th></tr>"
        + "".join(rows)
        + "</table><h2>Schemas</h2>"
        + "".join(schemas)
        + "</body></html>"
    )


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=_docs_html(), content_type="text/html")

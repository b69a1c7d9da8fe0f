"""Every metric Surge exports is on a panel of deploy/grafana/surge.json, or listed in
docs/RUNBOOK.md ("Metrics without a dashboard panel") with the reason it needs none.

The metric names come from /metrics of a real app (real PostgreSQL and Redis) after the main
routes were used, so the families that appear only once something happened are there too. A
new metric without a panel fails here until it gets one or a line in that list."""

from __future__ import annotations

import re
from typing import Any

from server.app import create_app
from server.config import Config

from .helpers import signup
from .test_deploy import RUNBOOK, dashboard_exprs

EXCLUDED_SECTION = "## Metrics without a dashboard panel"


def families(exposition: str) -> dict[str, str]:
    """name -> type of each family in an exposition, without the `_created` gauges
    prometheus-client adds beside each counter and histogram (a start time, nothing to plot)."""
    found = dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M))
    counters = {name.removesuffix("_total") for name, kind in found.items() if kind == "counter"}
    parents = counters | {name for name, kind in found.items() if kind == "histogram"}
    return {
        name: kind
        for name, kind in found.items()
        if not (name.endswith("_created") and name.removesuffix("_created") in parents)
    }


def on_panels(kinds: dict[str, str]) -> set[str]:
    """The families the dashboard's expressions name (a histogram by its _bucket, _count or
    _sum series)."""
    named = set()
    for expr in dashboard_exprs():
        for name in re.findall(r"\b([a-z_:][a-z0-9_:]*)\b", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            named.add(base if kinds.get(base) == "histogram" else name)
    return named


def excluded() -> dict[str, str]:
    """name -> reason, from the RUNBOOK section's `- `name`: reason` bullets (a reason may
    wrap onto lines indented by two spaces)."""
    text = RUNBOOK.read_text()
    if EXCLUDED_SECTION not in text:
        return {}
    section = text.split(EXCLUDED_SECTION, 1)[1].split("\n## ", 1)[0]
    bullets = re.findall(r"^- `(surge_[a-z0-9_]+)`: (.+(?:\n  .+)*)", section, re.M)
    return {name: " ".join(reason.split()) for name, reason in bullets}


async def exposition_after_traffic(aiohttp_client: Any, config: Config) -> str:
    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    headers = owner.headers
    calls: list[tuple[str, str, Any, int]] = [
        ("GET", "/healthz", None, 200),
        ("GET", "/readyz", None, 200),
        ("GET", "/v1/me", None, 200),
        ("GET", "/v1/users", None, 200),
        ("GET", f"/v1/users/{owner.id}", None, 200),
        ("POST", "/v1/events", {"events": [{"name": "click"}]}, 202),
        ("GET", "/v1/analytics/counts?name=click", None, 200),
        ("GET", "/v1/products", None, 200),
        ("GET", "/v1/orders", None, 200),
        ("GET", "/nope", None, 404),
    ]
    for method, path, body, status in calls:
        resp = await client.request(method, path, json=body, headers=headers)
        assert resp.status == status, (method, path, await resp.text())
    resp = await client.get("/v1/me", headers={"Authorization": "Bearer not-a-token"})
    assert resp.status == 401
    resp = await client.get("/metrics")
    assert resp.status == 200
    return await resp.text()


async def test_every_exported_metric_is_on_a_panel_or_listed_as_needing_none(
    aiohttp_client: Any, config: Config
) -> None:
    kinds = families(await exposition_after_traffic(aiohttp_client, config))
    exported = set(kinds)
    assert len(exported) > 40, sorted(exported)  # the scrape really held the registry
    shown, listed = on_panels(kinds), excluded()
    missing = sorted(exported - shown - set(listed))
    assert not missing, f"{len(missing)} metrics on no panel and not listed: {missing}"
    assert not set(listed) - exported, "listed, but not exported: " + str(set(listed) - exported)
    assert not set(listed) & shown, "listed, but on a panel: " + str(set(listed) & shown)
    for name, reason in listed.items():
        assert len(reason.split()) >= 4, f"{name}: say why it needs no panel"

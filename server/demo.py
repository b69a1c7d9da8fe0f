"""`surge demo`: fill a demo tenant on a running server, then print how to log in.

It drives the server over HTTP, as any client would, and knows nothing but the public URLs:
no database access, no import of the domains (so the layering holds, and the demo shows what
the API does rather than what the tables hold). Each run signs up a tenant of its own: an
owner, an admin and a member (one password for all three), a few products, three orders (one
paid when the server has a payment provider, one left pending, one cancelled) and a few
hundred events spread over the last hour, so the counts have a shape.

A server that does not answer gets one line saying to start it (`make run`), exit code 1; an
answer the demo did not expect stops it with the request and the problem's detail.
"""

from __future__ import annotations

import asyncio
import json
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from server.config import Config

PASSWORD = "surge-demo-password"  # noqa: S105 - the demo's published password, printed for you
USERS = (  # (username, roles); the owner is the one who signs up
    ("admin", ["admin"]),
    ("member", ["member"]),
)
PRODUCTS = (  # (sku, name, price_cents, stock)
    ("mug-1", "Mug", 1250, 40),
    ("tee-1", "T-shirt", 2400, 25),
    ("poster-1", "Poster", 900, 60),
    ("stickers-1", "Sticker pack", 350, 200),
)
EVENT_NAMES = (  # (name, weight): a funnel
    ("page_view", 60),
    ("product_view", 25),
    ("add_to_cart", 9),
    ("checkout.started", 4),
    ("checkout.paid", 2),
)
EVENTS = 400
PAY_WAIT_S = 15.0  # the saga settles in well under a second against the fake provider


class DemoError(Exception):
    """What stopped the demo, in one line."""


def default_url(config: Config) -> str:
    """Where `make run` serves: HOST and PORT, a wildcard address reached on loopback."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "*") else config.host
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if config.tls_cert_file else "http"
    return f"{scheme}://{host}:{config.port}"


@dataclass
class Demo:
    """What the run made, for the summary."""

    url: str
    tenant_id: str = ""
    emails: dict[str, str] = field(default_factory=dict)  # username -> email
    products: int = 0
    orders: dict[str, str] = field(default_factory=dict)  # order id -> status
    events: int = 0
    payments_note: str = ""


class Api:
    """One session against the server; every call checks its status."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url.rstrip("/")

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: Any = None,
        expect: tuple[int, ...] = (200, 201, 202, 204),
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        sent = dict(headers or {})
        if token:
            sent["Authorization"] = f"Bearer {token}"
        try:
            async with self.session.request(
                method, self.url + path, json=body, headers=sent
            ) as resp:
                text = await resp.text()
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise DemoError(
                f"cannot reach {self.url} ({type(exc).__name__}): start the server first "
                "with `make run` (or give its address with --url)"
            ) from exc
        answer = json.loads(text) if text else None
        if resp.status not in expect:
            detail = answer.get("detail", text) if isinstance(answer, dict) else text[:200]
            raise DemoError(f"{method} {path} answered {resp.status}: {detail}")
        return resp.status, answer


async def _users(api: Api, demo: Demo, owner_token: str) -> dict[str, str]:
    """The admin and the member; returns each username's id (the owner's included)."""
    ids: dict[str, str] = {}
    for username, roles in USERS:
        email = f"{username}@example.com"
        _, user = await api.call(
            "POST",
            "/v1/users",
            token=owner_token,
            body={"email": email, "username": username, "password": PASSWORD, "roles": roles},
        )
        ids[username] = user["id"]
        demo.emails[username] = email
    return ids


async def _products(api: Api, demo: Demo, token: str) -> list[str]:
    ids = []
    for sku, name, price, stock in PRODUCTS:
        _, product = await api.call(
            "POST",
            "/v1/products",
            token=token,
            body={
                "sku": sku,
                "name": name,
                "price_cents": price,
                "currency": "EUR",
                "stock": stock,
            },
        )
        ids.append(product["id"])
    demo.products = len(ids)
    return ids


async def _order(api: Api, token: str, lines: list[tuple[str, int]]) -> str:
    items = [{"product_id": pid, "quantity": q} for pid, q in lines]
    _, order = await api.call("POST", "/v1/orders", token=token, body={"items": items})
    return str(order["id"])


async def _pay(api: Api, demo: Demo, token: str, order_id: str) -> str:
    """Pay and wait for the saga; a server without a provider leaves the order pending."""
    status, answer = await api.call(
        "POST",
        f"/v1/orders/{order_id}/pay",
        token=token,
        body={"payment_method": "pm_card_visa"},
        expect=(200, 202, 503),
    )
    if status == 503:
        demo.payments_note = (
            f"no order paid: the server answered pay with 503 ({answer.get('detail', '')}); "
            "`make run` starts a fake provider, else set PAYMENTS_URL"
        )
        return "pending"
    deadline = time.monotonic() + PAY_WAIT_S
    while answer["status"] == "paying" and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        _, answer = await api.call("GET", f"/v1/orders/{order_id}", token=token)
    return str(answer["status"])


async def _orders(api: Api, demo: Demo, owner: str, member: str, products: list[str]) -> None:
    mug, tee, poster, stickers = products
    paid = await _order(api, owner, [(mug, 2), (stickers, 3)])
    demo.orders[paid] = await _pay(api, demo, owner, paid)
    pending = await _order(api, member, [(poster, 1)])
    demo.orders[pending] = "pending"
    cancelled = await _order(api, member, [(tee, 1), (stickers, 1)])
    _, order = await api.call("POST", f"/v1/orders/{cancelled}/cancel", token=member)
    demo.orders[cancelled] = str(order["status"])


def _events(user_ids: list[str], now: datetime, rng: random.Random) -> list[dict[str, Any]]:
    """EVENTS events over the hour before `now`, named along the funnel."""
    names = [name for name, _ in EVENT_NAMES]
    weights = [weight for _, weight in EVENT_NAMES]
    paths = ["/", "/mugs", "/tees", "/posters", "/cart"]
    events = []
    for _ in range(EVENTS):
        ts = now - timedelta(seconds=rng.uniform(0, 3600))
        events.append(
            {
                "name": rng.choices(names, weights)[0],
                "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "user_id": rng.choice(user_ids),
                "props": {"path": rng.choice(paths)},
            }
        )
    return events


async def fill(url: str) -> Demo:
    demo = Demo(url.rstrip("/"))
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        api = Api(session, demo.url)
        _, signup = await api.call(
            "POST",
            "/v1/auth/signup",
            body={
                "tenant_name": "Demo shop",
                "email": "owner@example.com",
                "username": "owner",
                "password": PASSWORD,
            },
        )
        demo.tenant_id, owner = signup["tenant"]["id"], signup["access_token"]
        demo.emails["owner"] = "owner@example.com"
        ids = {"owner": signup["user"]["id"], **await _users(api, demo, owner)}
        products = await _products(api, demo, owner)
        _, login = await api.call(
            "POST",
            "/v1/auth/login",
            body={
                "tenant_id": demo.tenant_id,
                "email": demo.emails["member"],
                "password": PASSWORD,
            },
        )
        await _orders(api, demo, owner, login["access_token"], products)
        events = _events(list(ids.values()), datetime.now(UTC), random.Random(demo.tenant_id))
        _, accepted = await api.call("POST", "/v1/events", token=owner, body={"events": events})
        demo.events = int(accepted["accepted"])
    return demo


def summary(demo: Demo) -> str:
    login = json.dumps(
        {"tenant_id": demo.tenant_id, "email": demo.emails["owner"], "password": PASSWORD},
        separators=(",", ":"),
    )
    statuses = ", ".join(sorted(demo.orders.values()))
    lines = [
        f"Demo tenant ready on {demo.url}",
        f"  tenant id  {demo.tenant_id}",
        *(f"  {name:<9}  {email}" for name, email in demo.emails.items()),
        f"  password   {PASSWORD}   (all three)",
        f"  {demo.products} products, {len(demo.orders)} orders ({statuses}), "
        f"{demo.events} events over the last hour",
    ]
    if demo.payments_note:
        lines.append(f"  {demo.payments_note}")
    lines += [
        "",
        "Log in (the answer holds access_token and refresh_token):",
        f"  curl -s {demo.url}/v1/auth/login -H 'Content-Type: application/json' \\\n"
        f"    -d {shlex.quote(login)}",
        f"Then look around: GET /v1/users, /v1/orders, /v1/analytics/counts?name=page_view; "
        f"the GraphQL explorer at {demo.url}/graphql; the API reference at {demo.url}/docs",
    ]
    return "\n".join(lines)


def run(url: str) -> int:
    try:
        demo = asyncio.run(fill(url))
    except DemoError as exc:
        print(f"surge demo: {exc}", file=sys.stderr)
        return 1
    print(summary(demo))
    return 0

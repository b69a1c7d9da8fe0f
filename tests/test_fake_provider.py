"""The fake payment provider, over real HTTP: the contract Surge's pay saga is written against."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import json
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fake_provider import FakeProvider, FaultRule, Invalid, LedgerEntry, WebhookFaults, sign

from .conftest import ROOT

KEY = "fake_api_key"
SECRET = "fake_webhook_secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
CARD = {"amount": 1999, "currency": "USD", "payment_method": "pm_card_visa", "reference": "ord_1"}
DEFAULT_WEBHOOKS = {"delay_ms": 0, "duplicate": False, "reverse": False, "drop": False}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


@dataclass
class Api:
    session: aiohttp.ClientSession
    url: str
    provider: FakeProvider

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> Reply:
        sent = dict(AUTH if headers is None else headers)
        if key is not None:
            sent["Idempotency-Key"] = key
        if body is not None:
            data = json.dumps(body).encode()
        async with self.session.request(method, self.url + path, data=data, headers=sent) as r:
            raw = await r.read()
            return Reply(r.status, dict(r.headers), json.loads(raw) if raw else None)

    async def authorize(self, key: str | None = None, **changes: Any) -> Reply:
        return await self.call("POST", "/v1/authorizations", {**CARD, **changes}, key=key)

    async def op(self, op: str, auth_id: str, key: str | None = None) -> Reply:
        return await self.call("POST", f"/v1/authorizations/{auth_id}/{op}", {}, key=key)


@dataclass
class Receiver:
    """A Surge stand-in for webhooks: records every POST, fails the first `fail` of them."""

    url: str = ""
    fail: int = 0
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        if len(self.received) <= self.fail:
            return web.Response(status=500)
        return web.Response(status=204)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _headers, body in self.received]


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    provider = FakeProvider()
    url = await provider.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Api(session, url, provider)
    finally:
        await provider.close()


@pytest.fixture
async def receiver(aiohttp_server: Any, api: Api) -> Receiver:
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    server = await aiohttp_server(app)
    hook.url = str(server.make_url("/hook"))
    api.provider.webhook_url = hook.url
    return hook


def auth_view(auth_id: str, status: str, **changes: Any) -> dict[str, Any]:
    view = {
        "id": auth_id,
        "object": "authorization",
        "status": status,
        "amount": 1999,
        "currency": "USD",
        "reference": "ord_1",
    }
    return {**view, **changes}


def without_created(body: dict[str, Any]) -> dict[str, Any]:
    assert type(body["created"]) is int and abs(body["created"] - time.time()) < 5
    return {k: v for k, v in body.items() if k != "created"}


def ops(provider: FakeProvider) -> list[tuple[str, str, str | None]]:
    return [(e.op, e.authorization_id, e.idempotency_key) for e in provider.ledger]


def error(code: str, message: str, **extra: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


INJECTED_503 = error("provider_error", "Injected fault: error 503.")


# -- happy paths ------------------------------------------------------------------------------


async def test_authorize_capture_refund(api: Api) -> None:
    created = await api.authorize(key="k-auth")
    assert created.status == 201
    auth_id = created.body["id"]
    assert auth_id.startswith("auth_") and len(auth_id) == 29
    int(auth_id[5:], 16)
    assert without_created(created.body) == auth_view(auth_id, "authorized")

    captured = await api.op("capture", auth_id, key="k-cap")
    assert (captured.status, without_created(captured.body)) == (
        200,
        auth_view(auth_id, "captured"),
    )
    refunded = await api.op("refund", auth_id)
    assert (refunded.status, without_created(refunded.body)) == (
        200,
        auth_view(auth_id, "refunded"),
    )
    got = await api.call("GET", f"/v1/authorizations/{auth_id}")
    assert (got.status, got.body) == (200, refunded.body)
    assert api.provider.authorization(auth_id) == refunded.body

    assert ops(api.provider) == [
        ("authorize", auth_id, "k-auth"),
        ("capture", auth_id, "k-cap"),
        ("refund", auth_id, None),
    ]
    entry = api.provider.ledger[0]
    assert isinstance(entry, LedgerEntry)
    assert (entry.reference, entry.amount, entry.currency) == ("ord_1", 1999, "USD")
    ledger = await api.call("GET", "/_admin/ledger", headers={})
    assert ledger.status == 200
    assert [{k: v for k, v in e.items() if k != "at"} for e in ledger.body["entries"]] == [
        {
            "op": op,
            "authorization_id": auth_id,
            "reference": "ord_1",
            "amount": 1999,
            "currency": "USD",
            "idempotency_key": k,
        }
        for op, k in (("authorize", "k-auth"), ("capture", "k-cap"), ("refund", None))
    ]
    assert [e["at"] for e in ledger.body["entries"]] == [e.at for e in api.provider.ledger]
    assert api.provider.requests == [
        ("authorize", "k-auth"),
        ("capture", "k-cap"),
        ("refund", ""),
    ]


async def test_authorize_void(api: Api) -> None:
    auth_id = (await api.authorize(currency="EUR", amount=1)).body["id"]
    voided = await api.op("void", auth_id)
    assert (voided.status, without_created(voided.body)) == (
        200,
        auth_view(auth_id, "voided", currency="EUR", amount=1),
    )
    assert ops(api.provider) == [("authorize", auth_id, None), ("void", auth_id, None)]


@pytest.mark.parametrize(
    ("payment_method", "rules", "code", "message"),
    [
        ("pm_card_declined", [], "card_declined", "Your card was declined."),
        ("pm_insufficient_funds", [], "insufficient_funds", "Your card has insufficient funds."),
        (
            "pm_card_visa",
            [{"op": "authorize", "mode": "decline", "count": 1}],
            "card_declined",
            "Your card was declined.",
        ),
        (
            "pm_card_visa",
            [{"op": "*", "mode": "decline"}],
            "card_declined",
            "Your card was declined.",
        ),
    ],
)
async def test_declines(
    api: Api, payment_method: str, rules: list[dict[str, Any]], code: str, message: str
) -> None:
    api.provider.set_faults(rules)
    declined = await api.authorize(key="k1", payment_method=payment_method)
    assert declined.status == 402
    auth_id = declined.body["error"]["authorization_id"]
    assert declined.body == error(code, message, authorization_id=auth_id)
    assert without_created(api.provider.authorization(auth_id) or {}) == auth_view(
        auth_id, "declined"
    )
    assert ops(api.provider) == [("decline", auth_id, "k1")]
    again = await api.authorize(key="k1", payment_method=payment_method)
    assert (again.status, again.body, again.headers["Idempotent-Replayed"]) == (
        402,
        declined.body,
        "true",
    )
    # a decline rule on "*" leaves the other operations alone
    assert (await api.op("capture", auth_id)).body == error(
        "invalid_state", "Cannot capture an authorization that is declined."
    )
    assert len(api.provider.ledger) == 1


# -- authentication and validation ------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": f"bearer {KEY}"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer ключ"},
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/authorizations"),
        ("POST", "/v1/authorizations/auth_x/capture"),
        ("GET", "/v1/authorizations/auth_x"),
        ("GET", "/v1/nothing"),
    ],
)
async def test_unauthorized(api: Api, headers: dict[str, str], method: str, path: str) -> None:
    reply = await api.call(method, path, CARD if method == "POST" else None, headers=headers)
    assert reply.status == 401
    assert reply.headers["WWW-Authenticate"] == 'Bearer realm="fake-provider"'
    assert reply.body == error(
        "unauthorized", "Missing or invalid API key: send Authorization: Bearer <api key>."
    )
    assert api.provider.ledger == []
    assert api.provider.requests == []


AMOUNT = "amount must be an integer 1..99999999"
OBJECT = "the body must be a JSON object"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", OBJECT),
        (b"{", OBJECT),
        (b"[]", OBJECT),
        (b"null", OBJECT),
        (json.dumps({**CARD, "capture": True}).encode(), "unknown field: capture"),
        (json.dumps({**CARD, "amount": 0}).encode(), AMOUNT),
        (json.dumps({**CARD, "amount": -5}).encode(), AMOUNT),
        (json.dumps({**CARD, "amount": 100_000_000}).encode(), AMOUNT),
        (json.dumps({**CARD, "amount": True}).encode(), AMOUNT),
        (json.dumps({**CARD, "amount": 19.99}).encode(), AMOUNT),
        (json.dumps({**CARD, "amount": "1999"}).encode(), AMOUNT),
        (json.dumps({**CARD, "amount": 10**30}).encode(), AMOUNT),
        (json.dumps({k: v for k, v in CARD.items() if k != "amount"}).encode(), AMOUNT),
        (json.dumps({**CARD, "currency": "usd"}).encode(), "currency must be 3 uppercase letters"),
        (json.dumps({**CARD, "currency": "US"}).encode(), "currency must be 3 uppercase letters"),
        (
            json.dumps({**CARD, "currency": "USD\n"}).encode(),
            "currency must be 3 uppercase letters",
        ),
        (
            json.dumps({**CARD, "payment_method": ""}).encode(),
            "payment_method must be a string of 1..255 characters",
        ),
        (
            json.dumps({**CARD, "reference": "r" * 256}).encode(),
            "reference must be a string of 1..255 characters",
        ),
        (
            json.dumps({**CARD, "reference": 7}).encode(),
            "reference must be a string of 1..255 characters",
        ),
    ],
)
async def test_invalid_authorize_bodies(api: Api, data: bytes, message: str) -> None:
    reply = await api.call("POST", "/v1/authorizations", data=data, key="k")
    assert (reply.status, reply.body) == (422, error("invalid_request", message))
    assert api.provider.ledger == []
    # a refusal before execution stores nothing: the same key then works with a good body
    assert (await api.authorize(key="k")).status == 201


@pytest.mark.parametrize(
    ("data", "status", "body"),
    [
        (b"", 200, None),
        (b"{}", 200, None),
        (b" { } ", 200, None),
        (b'{"amount": 5}', 422, error("invalid_request", "unknown field: amount")),
        (b"[]", 422, error("invalid_request", OBJECT)),
        (b"nope", 422, error("invalid_request", OBJECT)),
    ],
)
async def test_capture_bodies(api: Api, data: bytes, status: int, body: Any) -> None:
    auth_id = (await api.authorize()).body["id"]
    reply = await api.call("POST", f"/v1/authorizations/{auth_id}/capture", data=data)
    assert reply.status == status
    if body is None:
        assert without_created(reply.body) == auth_view(auth_id, "captured")
    else:
        assert reply.body == body


@pytest.mark.parametrize("key", ["", "k" * 256])
async def test_idempotency_key_length(api: Api, key: str) -> None:
    reply = await api.authorize(key=key)
    assert (reply.status, reply.body) == (
        422,
        error("invalid_request", "Idempotency-Key is 1..255 characters"),
    )
    assert api.provider.ledger == []


async def test_unknown_routes_and_methods(api: Api) -> None:
    missing = await api.call("GET", "/v1/nothing")
    assert (missing.status, missing.body) == (404, error("not_found", "Not Found"))
    wrong = await api.call("DELETE", "/v1/authorizations/auth_x")
    assert (wrong.status, wrong.body) == (
        405,
        error("method_not_allowed", "Method Not Allowed"),
    )
    assert wrong.headers["Allow"] == "GET"


# -- state machine ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "op", "status", "final", "entries"),
    [
        ([], "capture", 200, "captured", 2),
        ([], "void", 200, "voided", 2),
        ([], "refund", 409, "authorized", 1),
        (["capture"], "capture", 200, "captured", 2),
        (["capture"], "void", 409, "captured", 2),
        (["capture"], "refund", 200, "refunded", 3),
        (["void"], "void", 200, "voided", 2),
        (["void"], "capture", 409, "voided", 2),
        (["void"], "refund", 409, "voided", 2),
        (["capture", "refund"], "refund", 200, "refunded", 3),
        (["capture", "refund"], "capture", 409, "refunded", 3),
        (["capture", "refund"], "void", 409, "refunded", 3),
    ],
)
async def test_transitions(
    api: Api, steps: list[str], op: str, status: int, final: str, entries: int
) -> None:
    auth_id = (await api.authorize()).body["id"]
    for step in steps:
        assert (await api.op(step, auth_id)).status == 200
    before = api.provider.authorization(auth_id)
    assert before is not None
    reply = await api.op(op, auth_id)
    assert reply.status == status
    if status == 200:
        assert without_created(reply.body) == auth_view(auth_id, final)
    else:
        assert reply.body == error(
            "invalid_state", f"Cannot {op} an authorization that is {before['status']}."
        )
    assert (api.provider.authorization(auth_id) or {})["status"] == final
    assert len(api.provider.ledger) == entries


@pytest.mark.parametrize(("method", "op"), [("POST", "capture"), ("POST", "void"), ("GET", "")])
async def test_unknown_authorization(api: Api, method: str, op: str) -> None:
    path = "/v1/authorizations/auth_000000000000000000000000" + (f"/{op}" if op else "")
    reply = await api.call(method, path, {} if method == "POST" else None)
    assert (reply.status, reply.body) == (
        404,
        error("not_found", "No authorization auth_000000000000000000000000."),
    )
    assert api.provider.authorization("auth_000000000000000000000000") is None


# -- idempotency ------------------------------------------------------------------------------


async def test_replay_returns_the_stored_answer(api: Api) -> None:
    first = await api.authorize(key="same")
    assert first.status == 201 and "Idempotent-Replayed" not in first.headers
    # the same parameters in another order and spacing are the same request
    data = json.dumps(dict(reversed(CARD.items())), indent=2).encode()
    for reply in (
        await api.authorize(key="same"),
        await api.call("POST", "/v1/authorizations", data=data, key="same"),
    ):
        assert (reply.status, reply.body, reply.headers["Idempotent-Replayed"]) == (
            201,
            first.body,
            "true",
        )
    auth_id = first.body["id"]
    capture = await api.op("capture", auth_id, key="cap")
    replay = await api.call("POST", f"/v1/authorizations/{auth_id}/capture", key="cap")
    assert (replay.status, replay.body) == (200, capture.body)
    assert ops(api.provider) == [("authorize", auth_id, "same"), ("capture", auth_id, "cap")]
    assert api.provider.requests == [("authorize", "same")] * 3 + [("capture", "cap")] * 2


@pytest.mark.parametrize(
    ("method_path", "body"),
    [
        ("authorize", {**CARD, "amount": 2000}),
        ("authorize", {**CARD, "reference": "ord_2"}),
        ("capture", {}),
    ],
)
async def test_idempotency_mismatch(api: Api, method_path: str, body: dict[str, Any]) -> None:
    auth_id = (await api.authorize(key="k")).body["id"]
    path = (
        "/v1/authorizations"
        if method_path == "authorize"
        else f"/v1/authorizations/{auth_id}/capture"
    )
    reply = await api.call("POST", path, body, key="k")
    assert (reply.status, reply.body) == (
        422,
        error("idempotency_mismatch", "This Idempotency-Key was used with another path or body."),
    )
    assert len(api.provider.ledger) == 1


async def test_concurrent_duplicate_is_409(api: Api) -> None:
    api.provider.set_faults([{"op": "authorize", "mode": "slow", "delay_ms": 400, "count": 1}])
    first = asyncio.create_task(api.authorize(key="dup"))
    while not api.provider.requests:
        await asyncio.sleep(0.01)
    second = await api.authorize(key="dup")
    assert (second.status, second.body) == (
        409,
        error(
            "idempotency_in_progress",
            "A request with this Idempotency-Key is still being processed.",
        ),
    )
    done = await first
    assert done.status == 201
    third = await api.authorize(key="dup")
    assert (third.status, third.body, third.headers["Idempotent-Replayed"]) == (
        201,
        done.body,
        "true",
    )
    assert ops(api.provider) == [("authorize", done.body["id"], "dup")]


# -- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_error_fault_is_not_stored(api: Api, status: int) -> None:
    api.provider.set_faults([FaultRule("authorize", "error", status=status, count=1)])
    failed = await api.authorize(key="k")
    assert (failed.status, failed.body) == (
        status,
        error("provider_error", f"Injected fault: error {status}."),
    )
    assert "Retry-After" not in failed.headers
    assert api.provider.ledger == []
    retried = await api.authorize(key="k")
    assert retried.status == 201 and "Idempotent-Replayed" not in retried.headers
    assert ops(api.provider) == [("authorize", retried.body["id"], "k")]


@pytest.mark.parametrize("op", ["authorize", "capture"])
async def test_lost_fault_executes_once(api: Api, op: str) -> None:
    auth_id = "" if op == "authorize" else (await api.authorize()).body["id"]
    api.provider.set_faults([{"op": op, "mode": "lost", "status": 502, "count": 1}])
    if op == "authorize":
        lost = await api.authorize(key="k")
    else:
        lost = await api.op(op, auth_id, key="k")
    assert (lost.status, lost.body) == (502, error("provider_error", "Injected fault: lost 502."))
    executed = api.provider.ledger[-1]
    assert (executed.op, executed.idempotency_key) == (op, "k")
    auth_id = executed.authorization_id
    retried = await (api.authorize(key="k") if op == "authorize" else api.op(op, auth_id, key="k"))
    assert retried.status == (201 if op == "authorize" else 200)
    assert retried.headers["Idempotent-Replayed"] == "true"
    assert without_created(retried.body) == auth_view(
        auth_id, "authorized" if op == "authorize" else "captured"
    )
    assert [e.op for e in api.provider.ledger].count(op) == 1


async def test_count_rules_expire_in_order(api: Api) -> None:
    api.provider.set_faults(
        [
            {"op": "capture", "mode": "error", "count": 5},  # another op: never consumed here
            {"op": "authorize", "mode": "error", "count": 2},
            {"op": "*", "mode": "error", "status": 500, "count": 1},
        ]
    )
    statuses = [(await api.authorize()).status for _ in range(4)]
    assert statuses == [503, 503, 500, 201]
    faults = await api.call("GET", "/_admin/faults", headers={})
    assert faults.status == 200
    assert [r["count"] for r in faults.body["rules"]] == [5, 0, 0]
    assert len(api.provider.ledger) == 1


async def test_rate_and_seed_are_deterministic(api: Api) -> None:
    api.provider.set_faults([{"op": "authorize", "mode": "error", "rate": 0.5, "seed": 42}])
    statuses = [(await api.authorize()).status for _ in range(12)]
    rng = random.Random(42)
    assert statuses == [503 if rng.random() < 0.5 else 201 for _ in range(12)]
    assert 503 in statuses and 201 in statuses
    api.provider.set_faults([{"op": "*", "mode": "error", "rate": 0}])
    assert (await api.authorize()).status == 201


async def test_429_carries_retry_after(api: Api) -> None:
    api.provider.set_faults([{"op": "authorize", "mode": "error", "status": 429, "retry_after": 7}])
    reply = await api.authorize()
    assert (reply.status, reply.headers["Retry-After"], reply.body) == (
        429,
        "7",
        error("provider_error", "Injected fault: error 429."),
    )


async def test_timeout_fault_does_not_execute(api: Api) -> None:
    api.provider.set_faults([{"op": "authorize", "mode": "timeout", "delay_ms": 200, "count": 2}])
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(api.authorize(key="k"), 0.05)
    started = time.monotonic()
    reply = await api.authorize(key="k")
    assert time.monotonic() - started >= 0.19
    assert (reply.status, reply.body) == (
        504,
        error("provider_error", "The provider did not answer in time."),
    )
    # a timeout holds no key and stores nothing: the retry executes
    assert (await api.authorize(key="k")).status == 201
    assert len(api.provider.ledger) == 1


async def test_slow_fault_answers_normally(api: Api) -> None:
    api.provider.set_faults([FaultRule("*", "slow", delay_ms=150)])
    started = time.monotonic()
    reply = await api.authorize()
    assert time.monotonic() - started >= 0.14
    assert reply.status == 201


async def test_admin_faults_round_trip(api: Api) -> None:
    rules = [{"op": "capture", "mode": "lost"}, {"op": "authorize", "mode": "timeout"}]
    hooks = {"delay_ms": 5, "duplicate": True}
    reply = await api.call(
        "POST", "/_admin/faults", {"rules": rules, "webhooks": hooks}, headers={}
    )
    expected = {
        "rules": [
            {
                "op": "capture",
                "mode": "lost",
                "status": 503,
                "retry_after": None,
                "delay_ms": None,
                "count": None,
                "rate": 1.0,
                "seed": None,
            },
            {
                "op": "authorize",
                "mode": "timeout",
                "status": None,
                "retry_after": None,
                "delay_ms": 30000,
                "count": None,
                "rate": 1.0,
                "seed": None,
            },
        ],
        "webhooks": {**DEFAULT_WEBHOOKS, **hooks},
    }
    assert (reply.status, reply.body) == (200, expected)
    got = await api.call("GET", "/_admin/faults", headers={})
    assert (got.status, got.body) == (200, expected)
    assert api.provider.webhook_faults == WebhookFaults(delay_ms=5, duplicate=True)
    reset = await api.call("DELETE", "/_admin/faults", headers={})
    assert (reset.status, reset.body) == (200, {"rules": [], "webhooks": DEFAULT_WEBHOOKS})
    assert api.provider.rules == []


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], OBJECT),
        ({"rules": {}}, "rules must be a list"),
        ({"rules": [], "extra": 1}, "unknown field: extra"),
        ({"rules": [1]}, "a rule is an object"),
        ({"rules": [{"mode": "error"}]}, "a rule needs op and mode"),
        ({"rules": [{"op": 1, "mode": "error"}]}, "op and mode are strings"),
        (
            {"rules": [{"op": "charge", "mode": "error"}]},
            "op must be one of authorize, capture, void, refund, *",
        ),
        (
            {"rules": [{"op": "*", "mode": "explode"}]},
            "mode must be one of error, lost, timeout, slow, decline",
        ),
        (
            {"rules": [{"op": "*", "mode": "error", "status": 404}]},
            "status is one of 500, 502, 503, 429, and only for error and lost",
        ),
        (
            {"rules": [{"op": "*", "mode": "error", "status": 503.0}]},
            "status is one of 500, 502, 503, 429, and only for error and lost",
        ),
        (
            {"rules": [{"op": "*", "mode": "slow", "status": 503}]},
            "status is one of 500, 502, 503, 429, and only for error and lost",
        ),
        (
            {"rules": [{"op": "*", "mode": "slow", "retry_after": 1}]},
            "retry_after is only for error and lost",
        ),
        (
            {"rules": [{"op": "*", "mode": "error", "retry_after": -1}]},
            "retry_after must be an integer 0..86400",
        ),
        (
            {"rules": [{"op": "*", "mode": "error", "delay_ms": 5}]},
            "delay_ms is only for slow and timeout",
        ),
        (
            {"rules": [{"op": "*", "mode": "slow", "delay_ms": "5"}]},
            "delay_ms must be an integer 0..600000",
        ),
        ({"rules": [{"op": "void", "mode": "decline"}]}, "decline only applies to authorize"),
        (
            {"rules": [{"op": "*", "mode": "error", "count": 0}]},
            "count must be an integer 1..1000000",
        ),
        (
            {"rules": [{"op": "*", "mode": "error", "count": True}]},
            "count must be an integer 1..1000000",
        ),
        ({"rules": [{"op": "*", "mode": "error", "rate": 1.5}]}, "rate must be a number 0..1"),
        ({"rules": [{"op": "*", "mode": "error", "rate": "1"}]}, "rate must be a number 0..1"),
        ({"rules": [{"op": "*", "mode": "error", "seed": 1.5}]}, "seed must be an integer"),
        ({"rules": [{"op": "*", "mode": "error", "when": 1}]}, "unknown rule field: when"),
        ({"rules": [{"op": "*", "mode": "error"}] * 101}, "at most 100 rules"),
        ({"webhooks": []}, "webhooks is an object"),
        ({"webhooks": {"late": True}}, "unknown webhooks field: late"),
        ({"webhooks": {"drop": 1}}, "webhooks.drop must be a boolean"),
        ({"webhooks": {"delay_ms": -1}}, "webhooks.delay_ms must be an integer 0..600000"),
    ],
)
async def test_admin_faults_validation(api: Api, payload: Any, message: str) -> None:
    api.provider.set_faults([{"op": "refund", "mode": "error"}])
    reply = await api.call("POST", "/_admin/faults", payload, headers={})
    assert (reply.status, reply.body) == (422, error("invalid_request", message))
    # nonsense changes nothing
    assert [r.op for r in api.provider.rules] == ["refund"]
    python_api = type(payload) is dict and set(payload) <= {"rules", "webhooks"}
    if python_api and type(payload.get("rules", [])) is list:
        with pytest.raises(Invalid, match=f"^{re.escape(message)}$"):
            api.provider.set_faults(payload.get("rules", []), payload.get("webhooks"))


# -- webhooks ---------------------------------------------------------------------------------


def assert_signed(headers: dict[str, str], body: bytes) -> None:
    assert headers["Content-Type"] == "application/json"
    timestamp = int(headers["Surge-Signature"].split(",")[0].removeprefix("t="))
    assert abs(timestamp - time.time()) < 5
    assert headers["Surge-Signature"] == sign(SECRET, body, timestamp)


def event_data(auth_id: str, status: str) -> dict[str, Any]:
    return {
        "authorization_id": auth_id,
        "reference": "ord_1",
        "amount": 1999,
        "currency": "USD",
        "status": status,
    }


async def test_webhooks_are_signed_and_in_order(api: Api, receiver: Receiver) -> None:
    auth_id = (await api.authorize()).body["id"]
    await api.op("capture", auth_id)
    await api.op("capture", auth_id)  # a no-op: no event
    declined = (await api.authorize(payment_method="pm_card_declined")).body
    declined_id = declined["error"]["authorization_id"]
    await api.provider.drain()
    for headers, body in receiver.received:
        assert_signed(headers, body)
    events = receiver.events()
    assert [(e["type"], e["data"]) for e in events] == [
        ("authorization.authorized", event_data(auth_id, "authorized")),
        ("authorization.captured", event_data(auth_id, "captured")),
        (
            "authorization.declined",
            event_data(declined_id, "declined") | {"failure_code": "card_declined"},
        ),
    ]
    for event in events:
        assert set(event) == {"id", "type", "created", "data"}
        assert event["id"].startswith("evt_") and len(event["id"]) == 28
        assert abs(event["created"] - time.time()) < 5
    assert events == api.provider.events


def test_sign_is_hmac_sha256_of_timestamp_dot_body() -> None:
    expected = hmac.new(b"whsec", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert sign("whsec", b'{"a":1}', 1700000000) == f"t=1700000000,v1={expected}"


async def test_failed_deliveries_are_retried(api: Api, receiver: Receiver) -> None:
    receiver.fail = 2
    started = time.monotonic()
    await api.authorize()
    await api.provider.drain()
    # 0.1 s then 0.2 s of backoff before the third try
    assert time.monotonic() - started >= 0.3
    assert len(receiver.received) == 3
    assert len({body for _h, body in receiver.received}) == 1
    for headers, body in receiver.received:
        assert_signed(headers, body)
    assert [(d.attempt, d.status) for d in api.provider.deliveries] == [
        (1, 500),
        (2, 500),
        (3, 204),
    ]


async def test_delivery_gives_up_after_five_tries(api: Api, receiver: Receiver) -> None:
    receiver.fail = 100
    await api.authorize()
    await api.provider.drain()
    assert len(receiver.received) == 5
    assert [d.attempt for d in api.provider.deliveries] == [1, 2, 3, 4, 5]


async def test_unreachable_webhook_url(api: Api) -> None:
    api.provider.webhook_url = "http://127.0.0.1:9/hook"
    api.provider.set_faults([], {"delay_ms": 0})
    await api.authorize()
    await api.provider.drain()
    deliveries = api.provider.deliveries
    assert [(d.attempt, d.status) for d in deliveries] == [(n, None) for n in range(1, 6)]
    assert all(d.error for d in deliveries)


async def test_duplicate_sends_twice_with_the_same_id(api: Api, receiver: Receiver) -> None:
    api.provider.set_faults([], {"duplicate": True})
    auth_id = (await api.authorize()).body["id"]
    await api.provider.drain()
    events = receiver.events()
    assert len(events) == 2
    assert events[0] == events[1]
    assert (events[0]["type"], events[0]["data"]) == (
        "authorization.authorized",
        event_data(auth_id, "authorized"),
    )


@pytest.mark.parametrize("flush_by", ["python", "admin", "reset"])
async def test_reverse_delivers_in_reverse_after_flush(
    api: Api, receiver: Receiver, flush_by: str
) -> None:
    api.provider.set_faults([], {"reverse": True})
    auth_id = (await api.authorize()).body["id"]
    await api.op("capture", auth_id)
    await api.op("refund", auth_id)
    await api.provider.drain()
    assert receiver.received == []
    if flush_by == "python":
        assert api.provider.flush_webhooks() == 3
    elif flush_by == "admin":
        reply = await api.call("POST", "/_admin/webhooks/flush", headers={})
        assert (reply.status, reply.body) == (200, {"flushed": 3})
    else:
        api.provider.reset_faults()
    await api.provider.drain()
    assert [e["type"] for e in receiver.events()] == [
        "authorization.refunded",
        "authorization.captured",
        "authorization.authorized",
    ]
    assert api.provider.flush_webhooks() == 0


async def test_drop_never_sends(api: Api, receiver: Receiver) -> None:
    api.provider.set_faults([], {"drop": True})
    await api.authorize()
    await api.provider.drain()
    assert receiver.received == []
    assert [e["type"] for e in api.provider.events] == ["authorization.authorized"]


async def test_delay_holds_each_delivery(api: Api, receiver: Receiver) -> None:
    api.provider.set_faults([], {"delay_ms": 150})
    started = time.monotonic()
    await api.authorize()
    await asyncio.sleep(0.05)
    assert receiver.received == []
    await api.provider.drain()
    assert time.monotonic() - started >= 0.15
    assert len(receiver.received) == 1


async def test_lost_and_replay_send_one_event(api: Api, receiver: Receiver) -> None:
    api.provider.set_faults([{"op": "authorize", "mode": "lost", "count": 1}])
    assert (await api.authorize(key="k")).status == 503
    assert (await api.authorize(key="k")).status == 201
    await api.provider.drain()
    assert [e["type"] for e in receiver.events()] == ["authorization.authorized"]


async def test_no_webhook_url_sends_nothing(api: Api) -> None:
    await api.authorize()
    await api.provider.drain(timeout=1)
    assert api.provider.deliveries == []
    assert len(api.provider.events) == 1


async def test_close_cancels_pending_deliveries() -> None:
    provider = FakeProvider(webhook_url="http://127.0.0.1:9/hook")
    url = await provider.start()
    provider.set_faults(
        [{"op": "authorize", "mode": "slow", "delay_ms": 30_000}], {"delay_ms": 60_000}
    )
    async with aiohttp.ClientSession() as session:

        async def post() -> int:
            async with session.post(url + "/v1/authorizations", json=CARD, headers=AUTH) as r:
                return r.status

        slow = asyncio.create_task(post())
        while not provider.requests:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await provider.close()
        # the sleeping request wakes up and is answered before the server goes
        assert await slow == 201
        assert time.monotonic() - started < 2
        # the event's delivery was still waiting out its delay: never attempted
        assert len(provider.events) == 1
        assert provider.deliveries == []


# -- the command line -------------------------------------------------------------------------


async def test_command_line() -> None:
    env = {**os.environ, "PAYMENTS_API_KEY": "cli_key", "PAYMENTS_WEBHOOK_SECRET": "cli_secret"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.fake_provider",
        "--port",
        "0",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert line.startswith("fake provider listening on http://127.0.0.1:")
        url = line.removeprefix("fake provider listening on ").strip()
        async with aiohttp.ClientSession() as session:
            refused = await session.post(url + "/v1/authorizations", json=CARD, headers=AUTH)
            assert refused.status == 401
            ok = await session.post(
                url + "/v1/authorizations", json=CARD, headers={"Authorization": "Bearer cli_key"}
            )
            assert ok.status == 201
            ledger = await (await session.get(url + "/_admin/ledger")).json()
            assert [e["op"] for e in ledger["entries"]] == ["authorize"]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


# -- no body gives a 5xx ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def threaded_provider() -> Iterator[str]:
    """One provider in a thread of its own, so hypothesis' examples are plain sync calls."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    provider = FakeProvider()
    try:
        yield asyncio.run_coroutine_threadsafe(provider.start(), loop).result(10)
    finally:
        asyncio.run_coroutine_threadsafe(provider.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=300)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
_valid = {
    "amount": st.integers(1, 99_999_999),
    "currency": st.sampled_from(["USD", "EUR", "JPY"]),
    "payment_method": st.sampled_from(["pm_card_visa", "pm_card_declined", "pm_insufficient_funds"])
    | st.text(min_size=1, max_size=255),
    "reference": st.text(min_size=1, max_size=255),
}
_invalid = {
    "amount": st.integers(-2, 0) | st.integers(99_999_999, 10**20) | _json,
    "currency": st.sampled_from(["usd", "US", "ÜSD", "USD\n"]) | _json,
    "payment_method": st.just("") | _json,
    "reference": st.text(min_size=256, max_size=300) | _json,
}
# Every field valid, or one of them wrong, missing or joined by an unknown one.
_near_valid = st.fixed_dictionaries(_valid) | st.sampled_from(sorted(_valid)).flatmap(
    lambda wrong: st.fixed_dictionaries(
        {k: v for k, v in _valid.items() if k != wrong},
        optional={wrong: _invalid[wrong], "extra": _json},
    )
)


def _expected_status(body: Any) -> int:
    if type(body) is not dict or set(body) != {"amount", "currency", "payment_method", "reference"}:
        return 422
    amount, currency = body["amount"], body["currency"]
    if type(amount) is not int or not 1 <= amount <= 99_999_999:
        return 422
    if (
        type(currency) is not str
        or len(currency) != 3
        or not all("A" <= c <= "Z" for c in currency)
    ):
        return 422
    for name in ("payment_method", "reference"):
        if type(body[name]) is not str or not 1 <= len(body[name]) <= 255:
            return 422
    return 402 if body["payment_method"] in ("pm_card_declined", "pm_insufficient_funds") else 201


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_json | _near_valid)
def test_arbitrary_bodies_never_give_a_5xx(threaded_provider: str, body: Any) -> None:
    parts = urlsplit(threaded_provider)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("POST", "/v1/authorizations", json.dumps(body).encode(), AUTH)
        resp = conn.getresponse()
        status, reply = resp.status, json.loads(resp.read())
    finally:
        conn.close()
    assert status == _expected_status(body)
    if status == 201:
        assert without_created(reply) == {
            "id": reply["id"],
            "object": "authorization",
            "status": "authorized",
            **{k: body[k] for k in ("amount", "currency", "reference")},
        }
    elif status == 402:
        code = {"pm_card_declined": "card_declined", "pm_insufficient_funds": "insufficient_funds"}
        assert reply["error"]["code"] == code[body["payment_method"]]
        assert set(reply["error"]) == {"code", "message", "authorization_id"}
    else:
        assert set(reply["error"]) == {"code", "message"}
        assert reply["error"]["code"] == "invalid_request"


async def test_a_journal_keeps_the_books_across_a_restart(tmp_path: Any) -> None:
    journal = str(tmp_path / "books.jsonl")
    first = FakeProvider(journal=journal)
    url = await first.start()
    async with aiohttp.ClientSession() as session:
        api = Api(session, url, first)
        auth = await api.authorize(key="k-auth")
        assert auth.status == 201
        assert (await api.op("capture", auth.body["id"], key="k-cap")).status == 200
        await first.close()

        second = FakeProvider(journal=journal)
        api = Api(session, await second.start(), second)
        try:
            assert second.ledger == first.ledger
            replay = await api.authorize(key="k-auth")
            assert (replay.status, replay.body) == (201, auth.body)  # the stored answer
            assert replay.headers["Idempotent-Replayed"] == "true"
            again = await api.op("capture", auth.body["id"])
            assert (again.status, again.body["status"]) == (200, "captured")
            assert [e.op for e in second.ledger] == ["authorize", "capture"]
        finally:
            await second.close()

"""CORS: browser apps on the origins in CORS_ALLOW_ORIGINS can call the API; others cannot."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server.app import create_app
from server.config import Config, ConfigError
from server.cors import ALLOW_HEADERS, EXPOSE_HEADERS, MAX_AGE

from .conftest import configured
from .helpers import signup

APP = "https://app.example.com"
OTHER = "https://evil.example.com"
CORS_HEADERS = {
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Allow-Credentials",
    "Access-Control-Expose-Headers",
    "Access-Control-Max-Age",
}


def cors_headers(resp: Any) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k in CORS_HEADERS}


def preflight(origin: str, method: str, headers: str = "authorization,content-type") -> dict:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


async def _client(aiohttp_client: Any, config: Config, origins: tuple[str, ...]) -> TestClient:
    client: TestClient = await aiohttp_client(
        create_app(configured(config, cors_allow_origins=origins))
    )
    return client


# (path, method asked for, the methods the path answers)
PREFLIGHTS = [
    ("/v1/users", "POST", "GET, HEAD, POST"),
    ("/v1/users", "GET", "GET, HEAD, POST"),
    ("/v1/users/01a24d85-dcd5-7fe6-9c28-3a962300110b", "PATCH", "DELETE, GET, HEAD, PATCH"),
    ("/v1/users/x/roles/admin", "PUT", "DELETE, PUT"),
    ("/v1/orders", "POST", "GET, HEAD, POST"),
    ("/v1/orders/01a24d85-dcd5-7fe6-9c28-3a962300110b/pay", "POST", "POST"),
    ("/v1/auth/login", "POST", "POST"),
    ("/v1/me", "GET", "GET, HEAD"),
    ("/graphql", "POST", "GET, HEAD, POST"),
    ("/openapi.json", "GET", "GET, HEAD"),
]


@pytest.mark.parametrize(("path", "method", "methods"), PREFLIGHTS)
async def test_preflight_from_an_allowed_origin(
    aiohttp_client: Any, config: Config, path: str, method: str, methods: str
) -> None:
    # A burst of 1: a preflight needs no token and takes nothing from any bucket.
    config = configured(config, rate_limit_burst=1, rate_limit_rate=0.001)
    client = await _client(aiohttp_client, config, ("https://other.example", APP))
    for _ in range(3):
        resp = await client.options(path, headers=preflight(APP, method))
        assert resp.status == 204, await resp.text()
        assert await resp.read() == b""
        assert cors_headers(resp) == {
            "Access-Control-Allow-Origin": APP,
            "Access-Control-Allow-Methods": methods,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": MAX_AGE,
            "Access-Control-Expose-Headers": EXPOSE_HEADERS,
        }
        assert resp.headers["Vary"] == "Origin"
        assert "RateLimit-Remaining" not in resp.headers


@pytest.mark.parametrize(
    ("origins", "origin", "path", "status"),
    [
        ((APP,), OTHER, "/v1/users", 403),  # not allowed
        ((APP,), APP + ":8443", "/v1/users", 403),  # another port is another origin
        ((APP,), "http://app.example.com", "/v1/users", 403),  # and another scheme
        ((APP,), "null", "/v1/users", 403),  # a sandboxed page
        ((APP,), APP, "/v1/nothing-here", 404),  # allowed, but no such path
        ((), APP, "/v1/users", 405),  # no setting: OPTIONS is a method nobody answers
    ],
)
async def test_preflight_refused(
    aiohttp_client: Any,
    config: Config,
    origins: tuple[str, ...],
    origin: str,
    path: str,
    status: int,
) -> None:
    client = await _client(aiohttp_client, config, origins)
    resp = await client.options(path, headers=preflight(origin, "POST"))
    assert resp.status == status
    allowed = origin in origins
    assert cors_headers(resp) == (
        {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": EXPOSE_HEADERS}
        if allowed
        else {}
    )
    assert resp.headers.get("Vary") == ("Origin" if origins else None)


async def test_actual_requests_carry_the_exposed_headers(
    aiohttp_client: Any, config: Config
) -> None:
    client = await _client(aiohttp_client, config, (APP,))
    owner = await signup(client)
    headers = {**owner.headers, "Origin": APP}
    answers = [
        await client.get("/v1/me", headers=headers),
        await client.post(
            "/v1/users",
            json={
                "email": "a@example.com",
                "username": "a",
                "password": "correct horse",
                "roles": ["member"],
            },
            headers=headers,
        ),
        await client.get("/v1/users/not-an-id", headers=headers),  # 404
        await client.get("/healthz", headers={"Origin": APP}),
    ]
    assert [r.status for r in answers] == [200, 201, 404, 200]
    for resp in answers:
        assert cors_headers(resp) == {
            "Access-Control-Allow-Origin": APP,
            "Access-Control-Expose-Headers": EXPOSE_HEADERS,
        }
        assert resp.headers["Vary"] == "Origin"
    # a stream sends its headers itself (an EventSource on the app's page reads it)
    async with client.get("/v1/analytics/live", headers=headers) as live:
        assert live.status == 200
        assert cors_headers(live) == {
            "Access-Control-Allow-Origin": APP,
            "Access-Control-Expose-Headers": EXPOSE_HEADERS,
        }
    for other in ({"Origin": OTHER}, {}):
        resp = await client.get("/v1/me", headers={**owner.headers, **other})
        assert resp.status == 200
        assert cors_headers(resp) == {}
        assert resp.headers["Vary"] == "Origin"  # a cache must not serve it to APP


async def test_refusals_are_readable_by_the_app(aiohttp_client: Any, config: Config) -> None:
    """A 401 or a 429 carries the CORS headers: else the browser hides it (and Retry-After)
    from the app, which sees only a network error."""
    config = configured(config, rate_limit_burst=1, rate_limit_rate=0.001)
    client = await _client(aiohttp_client, config, (APP,))
    first = await client.get("/v1/me", headers={"Origin": APP})
    second = await client.get("/v1/me", headers={"Origin": APP})
    assert (first.status, second.status) == (401, 429)
    for resp in (first, second):
        assert cors_headers(resp) == {
            "Access-Control-Allow-Origin": APP,
            "Access-Control-Expose-Headers": EXPOSE_HEADERS,
        }
    assert "Retry-After" in second.headers


async def test_any_origin(aiohttp_client: Any, config: Config) -> None:
    """`*`: every origin, answered `*` (never with credentials, which Surge never asks for)."""
    client = await _client(aiohttp_client, config, ("*",))
    resp = await client.options("/v1/users", headers=preflight(OTHER, "POST"))
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in resp.headers
    assert "Vary" not in resp.headers
    resp = await client.get("/v1/me", headers={"Origin": OTHER})
    assert resp.status == 401
    assert cors_headers(resp) == {
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Expose-Headers": EXPOSE_HEADERS,
    }


async def test_no_setting_no_headers(aiohttp_client: Any, config: Config) -> None:
    assert config.cors_allow_origins == ()
    client = await _client(aiohttp_client, config, ())
    owner = await signup(client)
    resp = await client.get("/v1/me", headers={**owner.headers, "Origin": APP})
    assert resp.status == 200
    assert cors_headers(resp) == {}
    assert "Vary" not in resp.headers


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ("", ()),
        ("https://App.Example.com", ("https://app.example.com",)),
        (
            " https://a.example , http://localhost:5173/ ",
            ("https://a.example", "http://localhost:5173"),
        ),
        ("*", ("*",)),
    ],
)
def test_setting_parsed(raw: str, parsed: tuple[str, ...]) -> None:
    assert Config.from_env({"CORS_ALLOW_ORIGINS": raw}).cors_allow_origins == parsed


@pytest.mark.parametrize(
    "raw",
    [
        "app.example.com",  # no scheme
        "https://app.example.com/path",  # an origin has no path
        "ftp://app.example.com",
        "*, https://app.example.com",  # `*` stands alone
        "https://user@app.example.com",
        "https://app.example.com:99999",
    ],
)
def test_setting_refused(raw: str) -> None:
    with pytest.raises(ConfigError, match="CORS_ALLOW_ORIGINS"):
        Config.from_env({"CORS_ALLOW_ORIGINS": raw})

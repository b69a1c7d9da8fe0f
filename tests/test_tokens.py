"""Access-token attacks and refresh-token rotation, reuse, grace and revocation."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
import uuid
from typing import Any

import jwt
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import metrics
from server.app import create_app
from server.config import Config
from server.metrics import TOKEN_FAILURES
from server.tokens import TOKENS, TokenError, TokenService, header_segment
from server.tokens import sign as sign_with

from .helpers import add_user, login, signup

KEY = b"t" * 40
OLD_KEY = b"o" * 40


def service(**kw: Any) -> TokenService:
    return TokenService([("k2", KEY), ("k1", OLD_KEY)], "surge", "surge-api", 900, **kw)


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": "surge",
        "aud": "surge-api",
        "sub": str(uuid.uuid4()),
        "tid": str(uuid.uuid4()),
        "roles": ["member"],
        "iat": now,
        "exp": now + 60,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def sign(payload: dict[str, Any], key: bytes = KEY, **headers: Any) -> str:
    hdr = {"kid": "k2", "typ": "at+jwt", **headers}
    return jwt.encode(payload, key, algorithm="HS256", headers=hdr)


def test_issued_token_round_trips() -> None:
    ts = service()
    user, tenant = uuid.uuid4(), uuid.uuid4()
    p = ts.verify(ts.issue(user, tenant, ["admin", "member"]))
    assert (p.user_id, p.tenant_id, p.roles) == (user, tenant, frozenset({"admin", "member"}))


@settings(max_examples=60)
@given(
    kid=st.text(min_size=1, max_size=20),
    roles=st.lists(st.sampled_from(["owner", "admin", "member"]), unique=True),
    key=st.binary(min_size=32, max_size=64),
)
def test_issued_tokens_are_what_pyjwt_writes_and_reads(
    kid: str, roles: list[str], key: bytes
) -> None:
    """Signing is by hand (PyJWT would import `cryptography` into every worker); PyJWT, the
    reference, decodes what we issue, and its header segment for the same kid is ours, so
    tokens issued by either verify here."""
    ts = TokenService([(kid, key)], "surge", "surge-api", 900)
    user, tenant = uuid.uuid4(), uuid.uuid4()
    token = ts.issue(user, tenant, roles)
    decoded = jwt.decode(token, key, algorithms=["HS256"], audience="surge-api", issuer="surge")
    assert (decoded["sub"], decoded["tid"], decoded["roles"]) == (
        str(user),
        str(tenant),
        sorted(roles),
    )
    assert decoded["exp"] - decoded["iat"] == 900
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "kid": kid, "typ": "at+jwt"}
    theirs = jwt.encode(decoded, key, algorithm="HS256", headers={"kid": kid, "typ": "at+jwt"})
    assert theirs.split(".")[0] == token.split(".")[0]
    assert ts.verify(theirs).user_id == user


def test_previous_key_still_verifies() -> None:
    assert service().verify(sign(claims(), OLD_KEY, kid="k1")).roles == {"member"}


ATTACKS = {
    "alg none": lambda: (
        b64({"alg": "none", "typ": "at+jwt", "kid": "k2"}) + "." + b64(claims()) + "."
    ),
    "alg HS512": lambda: jwt.encode(
        claims(), KEY * 2, algorithm="HS512", headers={"kid": "k2", "typ": "at+jwt"}
    ),
    "wrong key": lambda: sign(claims(), b"x" * 40),
    "unknown kid": lambda: sign(claims(), kid="k9"),
    "kid of the other key": lambda: sign(claims(), OLD_KEY),
    "no typ": lambda: jwt.encode(claims(), KEY, algorithm="HS256", headers={"kid": "k2"}),
    "id token typ": lambda: sign(claims(), typ="JWT"),
    "expired": lambda: sign(claims(exp=int(time.time()) - 1)),
    "wrong audience": lambda: sign(claims(aud="other-api")),
    "wrong issuer": lambda: sign(claims(iss="evil")),
    "no exp": lambda: sign(claims(exp=None)),
    "no tenant": lambda: sign(claims(tid=None)),
    "bad roles": lambda: sign(claims(roles=["superuser"])),
    "roles not a list": lambda: sign(claims(roles="owner")),
    "sub not a uuid": lambda: sign(claims(sub="admin")),
    "garbage": lambda: "not.a.jwt",
    "tampered claims": lambda: (
        lambda t: t.split(".")[0] + "." + b64(claims(roles=["owner"])) + "." + t.split(".")[2]
    )(sign(claims())),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_are_refused(attack: str) -> None:
    with pytest.raises(TokenError) as refused:
        service().verify(ATTACKS[attack]())
    assert refused.value.reason in TOKEN_FAILURES


def forged(tokens: TokenService, reason: str) -> list[str]:
    """Tokens the server `tokens` refuses for `reason`."""
    header, key = header_segment(tokens.signing_kid), tokens.signing_key
    ok = claims(iss=tokens.issuer, aud=tokens.audience)
    tampered = sign_with(header, ok, key).split(".")
    return {
        "bad_header": [ATTACKS["alg none"](), ATTACKS["unknown kid"](), "not.a.jwt"],
        "bad_signature": [
            sign_with(header, ok, b"x" * 40),
            ".".join([tampered[0], b64({**ok, "roles": ["owner"]}), tampered[2]]),
        ],
        "expired": [sign_with(header, {**ok, "exp": int(time.time()) - 1}, key)],
        "wrong_audience": [
            sign_with(header, {**ok, "aud": "other-api"}, key),
            sign_with(header, {**ok, "iss": "evil"}, key),
        ],
        "malformed": [
            sign_with(header, {**ok, "sub": "admin"}, key),
            sign_with(header, {**ok, "roles": ["superuser"]}, key),
            sign_with(header, {}, key),  # no claims at all
        ],
    }[reason]


def auth_failures() -> dict[str, float]:
    found = {}
    for reason in TOKEN_FAILURES:
        value = metrics.REGISTRY.get_sample_value("surge_auth_failures_total", {"reason": reason})
        assert value is not None, f"no series for reason={reason}: counters start at 0"
        found[reason] = value
    return found


@pytest.mark.parametrize("reason", TOKEN_FAILURES)
async def test_refused_access_tokens_are_counted_by_reason(
    aiohttp_client: Any, config: Config, reason: str
) -> None:
    client = await aiohttp_client(create_app(config))
    tokens = forged(client.app[TOKENS], reason)
    before = auth_failures()
    for token in tokens:
        resp = await client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 401
    after = auth_failures()
    assert {r: after[r] - before[r] for r in TOKEN_FAILURES if after[r] != before[r]} == {
        reason: len(tokens)
    }


@pytest.mark.parametrize("attack", ["alg none", "wrong key", "expired", "tampered claims"])
async def test_attacks_get_401_over_http(aiohttp_client: Any, config: Config, attack: str) -> None:
    client = await aiohttp_client(create_app(config))
    resp = await client.get("/v1/me", headers={"Authorization": f"Bearer {ATTACKS[attack]()}"})
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert resp.headers["Content-Type"] == "application/problem+json"


@pytest.mark.parametrize("header", [None, "Basic dXNlcjpwYXNz", "Bearer", "Bearer "])
async def test_missing_or_other_schemes_are_401(
    aiohttp_client: Any, config: Config, header: str | None
) -> None:
    client = await aiohttp_client(create_app(config))
    resp = await client.get("/v1/me", headers={"Authorization": header} if header else {})
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert "RateLimit-Limit" in resp.headers


async def test_a_verified_token_costs_no_database_round_trip(
    aiohttp_client: Any, config: Config
) -> None:
    app = create_app(config)
    client = await aiohttp_client(app)
    owner = await signup(client)
    from server.keys import PG

    pg = app[PG]
    calls = 0
    original = pg.connection

    def counting() -> Any:
        nonlocal calls
        calls += 1
        return original()

    pg.connection = counting  # type: ignore[method-assign]
    resp = await client.get("/v1/no-such-route", headers=owner.headers)  # authenticated, 404
    assert resp.status == 404
    assert calls == 0


async def refresh(client: Any, token: str) -> Any:
    return await client.post("/v1/auth/refresh", json={"refresh_token": token})


async def test_refresh_rotates_and_reuse_revokes_the_family(
    aiohttp_client: Any, config: Config
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(config, refresh_reuse_grace_s=0)))
    owner = await signup(client)
    first = await refresh(client, owner.refresh_token)
    assert first.status == 200
    pair = await first.json()
    assert set(pair) == {"access_token", "refresh_token", "expires_in"}
    assert pair["refresh_token"] != owner.refresh_token
    await asyncio.sleep(0.01)
    # the spent token again: theft suspected, the whole family dies
    assert (await refresh(client, owner.refresh_token)).status == 401
    assert (await refresh(client, pair["refresh_token"])).status == 401
    # another login is another family, unaffected
    other = await login(client, owner.tenant_id, owner.email)
    assert (await refresh(client, other["refresh_token"])).status == 200


async def test_two_tabs_within_the_grace_window_both_succeed(
    aiohttp_client: Any, config: Config
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(config, refresh_reuse_grace_s=10)))
    owner = await signup(client)
    a, b = await asyncio.gather(
        refresh(client, owner.refresh_token), refresh(client, owner.refresh_token)
    )
    assert (a.status, b.status) == (200, 200)
    ta, tb = (await a.json())["refresh_token"], (await b.json())["refresh_token"]
    assert ta != tb
    assert (await refresh(client, ta)).status == 200
    assert (await refresh(client, tb)).status == 200


async def test_reuse_after_the_grace_window_revokes(aiohttp_client: Any, config: Config) -> None:
    client = await aiohttp_client(
        create_app(dataclasses.replace(config, refresh_reuse_grace_s=0.2))
    )
    owner = await signup(client)
    new = await (await refresh(client, owner.refresh_token)).json()
    await asyncio.sleep(0.4)
    assert (await refresh(client, owner.refresh_token)).status == 401
    assert (await refresh(client, new["refresh_token"])).status == 401


@pytest.mark.parametrize("how", ["logout", "password change", "deletion", "suspension"])
async def test_revocation(aiohttp_client: Any, config: Config, how: str) -> None:
    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    member = await add_user(client, owner)
    if how == "logout":
        resp = await client.post("/v1/auth/logout", json={"refresh_token": member.refresh_token})
    elif how == "password change":
        resp = await client.put(
            "/v1/me/password",
            json={"old_password": "correct horse battery", "new_password": "a new password"},
            headers=member.headers,
        )
    elif how == "deletion":
        resp = await client.delete(f"/v1/users/{member.id}", headers=owner.headers)
    else:
        resp = await client.patch(
            f"/v1/users/{member.id}",
            json={"status": "suspended"},
            headers={**owner.headers, "If-Match": "*"},
        )
    assert resp.status in (200, 204)
    assert (await refresh(client, member.refresh_token)).status == 401
    # the owner's own session is untouched
    assert (await refresh(client, owner.refresh_token)).status == 200


async def test_logout_of_an_unknown_token_is_204(aiohttp_client: Any, config: Config) -> None:
    client = await aiohttp_client(create_app(config))
    resp = await client.post("/v1/auth/logout", json={"refresh_token": "never-issued"})
    assert resp.status == 204


async def test_refresh_tokens_are_stored_only_as_hashes(
    aiohttp_client: Any, config: Config
) -> None:
    import asyncpg

    client = await aiohttp_client(create_app(config))
    owner = await signup(client)
    con = await asyncpg.connect(config.database_url)
    try:
        rows = await con.fetch("SELECT token_hash FROM refresh_tokens")
    finally:
        await con.close()
    assert len(rows) == 1
    assert owner.refresh_token.encode() not in rows[0]["token_hash"]
    assert len(rows[0]["token_hash"]) == 32
    assert len(base64.urlsafe_b64decode(owner.refresh_token + "=")) == 32  # 256 bits


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_single_character_change_is_refused(data: st.DataObject) -> None:
    ts = service()
    token = ts.issue(uuid.uuid4(), uuid.uuid4(), ["member"])
    # What is drawn must not depend on the token (random ids, the clock): hypothesis replays
    # the draws and refuses a strategy whose draws change between runs (a filter on token[i]
    # did, on a clean CI run).
    i = data.draw(st.integers(0, 1 << 16)) % len(token)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    c = data.draw(st.sampled_from(alphabet))
    if c == token[i]:
        c = alphabet[(alphabet.index(c) + 1) % len(alphabet)]
    with pytest.raises(TokenError):
        ts.verify(token[:i] + c + token[i + 1 :])
    assert ts.verify(token).roles == {"member"}

"""Access tokens: short-lived JWTs per RFC 8725 / RFC 9068, verified in memory.

HS256 only (an allow-list of one: no `alg=none`, no RS/HS confusion), `typ` must be `at+jwt`,
`iss`, `aud`, `exp`, `iat`, `sub` and the tenant and roles claims are required, and `kid`
picks the key so keys can rotate: JWT_KEYS lists the signing key first, then the previous ones
that still verify. `gen`, the user's token generation, lets a revocation refuse the tokens issued
before it (server/revocation.py); a token without it is of generation 0.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections import OrderedDict

import orjson
from aiohttp import web

from server.config import Config, parse_jwt_keys
from server.principal import Principal
from server.rbac import RANK

log = logging.getLogger("surge.tokens")

ALGORITHM = "HS256"
TYP = "at+jwt"
ROLES = frozenset(RANK)


class TokenError(Exception):
    """A refused access token; `reason` is one of server.metrics.TOKEN_FAILURES, the label
    values of surge_auth_failures_total."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def header_segment(kid: str) -> str:
    """The JOSE header segment for `kid`, byte for byte what PyJWT writes (sorted keys, no
    spaces): tokens issued before signing moved here keep verifying."""
    header = {"alg": ALGORITHM, "kid": kid, "typ": TYP}
    return _b64(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())


def sign(header_seg: str, claims: dict[str, object], key: bytes) -> str:
    """An HS256 JWS in compact form. By hand, as verify is: PyJWT pulls in `cryptography`, 8.5 MB
    of every worker's RSS, for algorithms Surge never uses (tests check PyJWT decodes these)."""
    signing_input = f"{header_seg}.{_b64(orjson.dumps(claims))}"
    mac = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


class TokenService:
    def __init__(
        self,
        keys: list[tuple[str, bytes]],
        issuer: str,
        audience: str,
        ttl_s: int,
        cache_size: int = 10_000,
    ) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self.signing_kid, self.signing_key = keys[0]
        self.keys = dict(keys)
        self.issuer = issuer
        self.audience = audience
        self.ttl_s = ttl_s
        # A verified token string maps to its principal until it expires: the signature is
        # over the exact bytes, so an identical string verifies identically. Bounded LRU.
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._cache_size = cache_size
        # The exact header segment issue() writes for each key id: verify() accepts only these.
        self._header_keys = {header_segment(kid): secret for kid, secret in keys}
        self._signing_header = header_segment(self.signing_kid)

    @classmethod
    def from_config(cls, config: Config) -> TokenService:
        if config.jwt_keys:
            keys = parse_jwt_keys(config.jwt_keys)
        else:
            log.warning("JWT_KEYS is not set: signing with a random key that dies with the process")
            keys = [("dev", secrets.token_bytes(32))]
        return cls(keys, config.jwt_issuer, config.jwt_audience, config.access_token_ttl_s)

    def issue(
        self,
        user_id: uuid.UUID,
        tenant_id: uuid.UUID,
        roles: frozenset[str] | list[str],
        generation: int = 0,
    ) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": str(user_id),
            "tid": str(tenant_id),
            "roles": sorted(roles),
            "iat": now,
            "exp": now + self.ttl_s,
            "jti": secrets.token_hex(8),
            "gen": generation,
        }
        return sign(self._signing_header, claims, self.signing_key)

    def verify(self, token: str) -> Principal:
        hit = self._cache.get(token)
        if hit is not None:
            principal, exp = hit
            if time.time() < exp:
                return principal
            del self._cache[token]
            raise TokenError("expired")
        principal, exp = self._verify(token)
        self._cache[token] = (principal, exp)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        """HS256 verification by hand: PyJWT's generic decode is on every request's path
        (docs/PERFORMANCE.md). Stricter than the generic path: the header segment must be byte
        for byte one this service issues (so alg, typ and kid are pinned), the signature is
        compared in constant time on its canonical encoding, then every claim is checked."""
        header_seg, dot, rest = token.partition(".")
        payload_seg, dot2, sig_seg = rest.partition(".")
        key = self._header_keys.get(header_seg)
        if key is None:
            raise TokenError("bad_header")
        if not dot or not dot2 or "." in sig_seg:
            raise TokenError("malformed")
        signing_input = token[: len(header_seg) + 1 + len(payload_seg)].encode("ascii", "replace")
        expected = base64.urlsafe_b64encode(hmac.new(key, signing_input, hashlib.sha256).digest())
        if not hmac.compare_digest(expected.rstrip(b"="), sig_seg.encode("ascii", "replace")):
            raise TokenError("bad_signature")
        try:
            claims = orjson.loads(
                base64.urlsafe_b64decode(payload_seg + "=" * (-len(payload_seg) % 4))
            )
            exp, iat, roles = claims["exp"], claims["iat"], claims["roles"]
            generation = claims.get("gen", 0)
            aud = claims["aud"]
            if claims["iss"] != self.issuer:
                raise TokenError("wrong_audience")
            if aud != self.audience and not (isinstance(aud, list) and self.audience in aud):
                raise TokenError("wrong_audience")
            if type(exp) is not int or type(iat) is not int or type(generation) is not int:
                raise TokenError("malformed")
            if exp <= time.time():
                raise TokenError("expired")
            if not isinstance(roles, list) or not set(roles) <= ROLES:
                raise TokenError("malformed")
            principal = Principal(
                uuid.UUID(claims["sub"]), uuid.UUID(claims["tid"]), frozenset(roles), generation
            )
        except TokenError:
            raise
        except (KeyError, ValueError, TypeError, AttributeError, binascii.Error) as exc:
            raise TokenError("malformed") from exc
        return principal, float(exp)


TOKENS = web.AppKey("tokens", TokenService)

"""Access tokens: short-lived JWTs per RFC 8725 / RFC 9068, verified in memory.

HS256 only (an allow-list of one: no `alg=none`, no RS/HS confusion), `typ` must be `at+jwt`,
`iss`, `aud`, `exp`, `iat`, `sub` and the tenant and roles claims are required, and `kid`
picks the key so keys can rotate: JWT_KEYS lists the signing key first, then the previous ones
that still verify.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections import OrderedDict

import jwt
from aiohttp import web

from server.config import Config, parse_jwt_keys
from server.principal import Principal

log = logging.getLogger("surge.tokens")

ALGORITHM = "HS256"
TYP = "at+jwt"
ROLES = frozenset({"owner", "admin", "member"})


class TokenError(Exception):
    pass


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

    @classmethod
    def from_config(cls, config: Config) -> TokenService:
        if config.jwt_keys:
            keys = parse_jwt_keys(config.jwt_keys)
        else:
            log.warning("JWT_KEYS is not set: signing with a random key that dies with the process")
            keys = [("dev", secrets.token_bytes(32))]
        return cls(keys, config.jwt_issuer, config.jwt_audience, config.access_token_ttl_s)

    def issue(
        self, user_id: uuid.UUID, tenant_id: uuid.UUID, roles: frozenset[str] | list[str]
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
        }
        return jwt.encode(
            claims,
            self.signing_key,
            algorithm=ALGORITHM,
            headers={"kid": self.signing_kid, "typ": TYP},
        )

    def verify(self, token: str) -> Principal:
        hit = self._cache.get(token)
        if hit is not None:
            principal, exp = hit
            if time.time() < exp:
                return principal
            del self._cache[token]
            raise TokenError("expired")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError("malformed") from exc
        if header.get("alg") != ALGORITHM or header.get("typ") != TYP:
            raise TokenError("unexpected header")
        key = self.keys.get(header.get("kid", ""))
        if key is None:
            raise TokenError("unknown key")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "tid", "roles"]},
            )
            roles = claims["roles"]
            if not isinstance(roles, list) or not set(roles) <= ROLES:
                raise TokenError("bad roles")
            principal = Principal(
                uuid.UUID(claims["sub"]), uuid.UUID(claims["tid"]), frozenset(roles)
            )
        except (jwt.PyJWTError, ValueError, TypeError, AttributeError) as exc:
            raise TokenError(str(exc)) from exc
        self._cache[token] = (principal, float(claims["exp"]))
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return principal


TOKENS = web.AppKey("tokens", TokenService)

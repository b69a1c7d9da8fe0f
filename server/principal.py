"""Who is calling: the verified claims of an access token."""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import UUID


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: UUID
    tenant_id: UUID
    roles: frozenset[str]
    # The token's `gen` claim: its user's token generation when issued (server/revocation.py).
    generation: int = field(default=0, compare=False)
    # The rate-limit bucket's key and the tenant as text (the user cache's keys), formatted once
    # per verified token instead of per request.
    rate_key: str = field(default="", compare=False)
    tenant_text: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.rate_key:
            object.__setattr__(self, "rate_key", f"u:{self.user_id}")
        if not self.tenant_text:
            object.__setattr__(self, "tenant_text", str(self.tenant_id))

"""Role-based access, enforced here and nowhere else: owner > admin > member.

Members read; admins and owners create, update, deactivate users and grant roles up to their
own rank; nobody acts on a user who outranks them; the last active owner cannot be removed.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

from server.errors import Conflict, Forbidden, Unauthorized
from server.keys import PRINCIPAL
from server.principal import Principal

RANK = {"member": 1, "admin": 2, "owner": 3}
ROLES = tuple(sorted(RANK, key=RANK.__getitem__, reverse=True))  # owner, admin, member


def rank(roles: Iterable[str]) -> int:
    return max((RANK.get(r, 0) for r in roles), default=0)


def normalize(roles: Iterable[str]) -> list[str]:
    """Canonical order (owner, admin, member), no duplicates, always including member."""
    wanted = set(roles) | {"member"}
    return [r for r in ROLES if r in wanted]


def caller(request: web.Request) -> Principal:
    principal: Principal | None = request.get(PRINCIPAL)
    if principal is None:  # the auth middleware refuses these first; this keeps mypy honest
        raise Unauthorized("an access token is required", error="")
    return principal


def require_admin(principal: Principal) -> None:
    if rank(principal.roles) < RANK["admin"]:
        raise Forbidden("this needs the admin or owner role")


def require_can_grant(principal: Principal, roles: Iterable[str]) -> None:
    require_admin(principal)
    if rank(roles) > rank(principal.roles):
        raise Forbidden("you can grant roles up to your own")


def require_outranks_or_equals(principal: Principal, target_roles: Iterable[str]) -> None:
    if rank(target_roles) > rank(principal.roles):
        raise Forbidden("the target user outranks you")


def require_not_last_owner(active_owners: int) -> None:
    if active_owners <= 1:
        raise Conflict("the tenant's last owner cannot be removed, suspended or demoted")

"""The identity routes (temporary re-export while the domain is reshaped)."""

from handlers.identity.auth import login, logout, refresh, signup
from handlers.identity.users import (
    change_password,
    create_user,
    delete_user,
    get_me,
    get_user,
    grant_role,
    list_users,
    patch_user,
    revoke_role,
)

__all__ = [
    "change_password",
    "create_user",
    "delete_user",
    "get_me",
    "get_user",
    "grant_role",
    "list_users",
    "login",
    "logout",
    "patch_user",
    "refresh",
    "revoke_role",
    "signup",
]

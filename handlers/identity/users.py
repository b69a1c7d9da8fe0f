"""Temporary: handlers/graphql still imports these two names from here. Delete this module once
it imports `handlers.identity.views.user_view` and `db.users.prefix_pattern` instead."""

from db.users import prefix_pattern as _prefix_pattern
from handlers.identity.views import user_view

__all__ = ["_prefix_pattern", "user_view"]

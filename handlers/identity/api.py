"""OpenAPI paths and schemas of the Auth and Users sections (request schemas are the validators)."""

from __future__ import annotations

from db.users import STATUSES
from server.openapi import (
    INVISIBLE,
    SPACE_OR_CONTROL,
    UUID_PATTERN,
    Json,
    json_content,
    op,
    problem,
    query_param,
    ref,
)
from server.rbac import ROLES

MAX_PROFILE_BYTES = 4096

_EMAIL_PART = f"[^@{SPACE_OR_CONTROL}{INVISIBLE}]+"
EMAIL = {
    "type": "string",
    "minLength": 3,
    "maxLength": 254,
    "pattern": f"^{_EMAIL_PART}@{_EMAIL_PART}\\.{_EMAIL_PART}$",
    "description": (
        "Case-insensitively unique within a tenant; stored and compared NFKC-normalised (an"
        " address that is no longer one once normalised is 422)"
    ),
}
USERNAME = {
    "type": "string",
    "minLength": 1,
    "maxLength": 64,
    "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
}
PASSWORD = {"type": "string", "minLength": 8, "maxLength": 128}
ROLE = {"type": "string", "enum": list(ROLES)}
PROFILE = {
    "type": "object",
    "additionalProperties": True,
    "maxProperties": 50,
    "description": f"Free-form JSON object, at most {MAX_PROFILE_BYTES} bytes serialised",
}


def _obj(required: list[str], props: Json, **extra: object) -> Json:
    return {
        "type": "object",
        "required": required,
        "properties": props,
        "additionalProperties": False,
        **extra,
    }


SCHEMAS: Json = {
    "SignupRequest": _obj(
        ["tenant_name", "email", "username", "password"],
        {
            "tenant_name": {"type": "string", "minLength": 1, "maxLength": 100},
            "email": EMAIL,
            "username": USERNAME,
            "password": PASSWORD,
        },
    ),
    "LoginRequest": _obj(
        ["tenant_id", "email", "password"],
        {
            "tenant_id": {"type": "string", "format": "uuid", "pattern": UUID_PATTERN},
            "email": {
                "type": "string",
                "minLength": 1,
                "maxLength": 254,
                "pattern": f"^[^{INVISIBLE}]+$",
            },
            "password": {"type": "string", "minLength": 1, "maxLength": 128},
        },
    ),
    "RefreshRequest": _obj(
        ["refresh_token"], {"refresh_token": {"type": "string", "minLength": 1, "maxLength": 512}}
    ),
    "LogoutRequest": _obj(
        ["refresh_token"], {"refresh_token": {"type": "string", "minLength": 1, "maxLength": 512}}
    ),
    "PasswordChangeRequest": _obj(
        ["old_password", "new_password"],
        {
            "old_password": {"type": "string", "minLength": 1, "maxLength": 128},
            "new_password": PASSWORD,
        },
    ),
    "CreateUserRequest": _obj(
        ["email", "username", "password"],
        {
            "email": EMAIL,
            "username": USERNAME,
            "password": PASSWORD,
            "roles": {
                "type": "array",
                "items": ROLE,
                "minItems": 1,
                "maxItems": 3,
                "uniqueItems": True,
            },
            "profile": PROFILE,
        },
    ),
    "PatchUserRequest": _obj(
        [],
        {
            "username": USERNAME,
            "profile": PROFILE,
            # Deleting is DELETE /v1/users/{id}, not a status a PATCH sets.
            "status": {"type": "string", "enum": [s for s in STATUSES if s != "deleted"]},
        },
        minProperties=1,
    ),
    "User": {
        "type": "object",
        "required": [
            "id",
            "tenant_id",
            "email",
            "username",
            "status",
            "roles",
            "profile",
            "version",
            "created_at",
            "updated_at",
        ],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "tenant_id": {"type": "string", "format": "uuid"},
            "email": {"type": "string"},
            "username": {"type": "string"},
            "status": {"type": "string", "enum": list(STATUSES)},
            "roles": {"type": "array", "items": ROLE},
            "profile": {"type": "object", "additionalProperties": True},
            "version": {"type": "integer"},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
        },
    },
    "Tenant": {
        "type": "object",
        "required": ["id", "name", "created_at"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "name": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
    "TokenPair": {
        "type": "object",
        "required": ["access_token", "refresh_token", "expires_in"],
        "properties": {
            "access_token": {"type": "string", "description": "JWT, Bearer"},
            "refresh_token": {"type": "string", "description": "Opaque; single use"},
            "expires_in": {"type": "integer", "description": "Seconds the access token lives"},
        },
    },
    "SignupResponse": {
        "type": "object",
        "required": ["tenant", "user", "access_token", "refresh_token", "expires_in"],
        "properties": {
            "tenant": ref("Tenant"),
            "user": ref("User"),
            "access_token": {"type": "string"},
            "refresh_token": {"type": "string"},
            "expires_in": {"type": "integer"},
        },
    },
    "UserPage": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": ref("User")},
            "next_cursor": {"type": ["string", "null"]},
        },
    },
}


def _empty(desc: str) -> Json:
    return {"description": desc}


USER_ID = {
    "name": "user_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
ROLE_PARAM = {"name": "role", "in": "path", "required": True, "schema": ROLE}
# member is the base role every user holds: it is granted, never revoked.
REVOCABLE_ROLE_PARAM = ROLE_PARAM | {
    "schema": {"type": "string", "enum": [r for r in ROLES if r != "member"]}
}
IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "required": True,
    # Not empty: an empty If-Match names no ETag, which is a missing precondition (428).
    "schema": {"type": "string", "minLength": 1, "pattern": r"[^\t ]"},
    "description": 'The ETag you read, e.g. "3", or `*` for any version',
}


LIST_PARAMS = [
    query_param(
        "limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}, "Page size"
    ),
    query_param("cursor", {"type": "string"}, "next_cursor of the previous page"),
    query_param(
        "q",
        {"type": "string", "minLength": 1, "maxLength": 254},
        "Case-insensitive literal prefix of username or email",
    ),
    query_param(
        "status",
        {"type": "string", "enum": list(STATUSES)},
        "Default: all but deleted",
    ),
]
FORBIDDEN = problem("Your role does not allow this")
NOT_FOUND = problem("No such user in your tenant")
LAST_OWNER = problem("The tenant's last owner cannot be removed")
AUTH_401 = problem("Wrong credentials, or an invalid, expired or revoked refresh token")

PATHS: Json = {
    "/v1/auth/signup": {
        "post": op(
            "Create a tenant and its owner; returns a token pair",
            "auth",
            {"201": json_content("Created", ref("SignupResponse"))},
            body="SignupRequest",
            auth=False,
        )
    },
    "/v1/auth/login": {
        "post": op(
            "Exchange credentials for a token pair",
            "auth",
            {"200": json_content("Logged in", ref("TokenPair")), "401": AUTH_401},
            body="LoginRequest",
            auth=False,
        )
    },
    "/v1/auth/refresh": {
        "post": op(
            "Rotate a refresh token; reusing a spent one revokes its family",
            "auth",
            {"200": json_content("A new pair", ref("TokenPair")), "401": AUTH_401},
            body="RefreshRequest",
            auth=False,
        )
    },
    "/v1/auth/logout": {
        "post": op(
            "Revoke the refresh token's family",
            "auth",
            {"204": _empty("Logged out (also when the token was unknown)")},
            body="LogoutRequest",
            auth=False,
        )
    },
    "/v1/auth/logout-all": {
        "post": op(
            "Revoke all of the caller's refresh tokens and, within 1 s, their access tokens",
            "auth",
            {"204": _empty("Logged out everywhere")},
        )
    },
    "/v1/me": {
        "get": op(
            "The caller",
            "users",
            {"200": json_content("The caller", ref("User"), ETag='"<version>"')},
        )
    },
    "/v1/me/password": {
        "put": op(
            "Change the caller's password; revokes the caller's refresh tokens",
            "users",
            {"204": _empty("Changed")},
            body="PasswordChangeRequest",
        )
    },
    "/v1/users": {
        "get": op(
            "List the tenant's users (keyset pagination)",
            "users",
            {"200": json_content("A page", ref("UserPage"))},
            params=LIST_PARAMS,
        ),
        "post": op(
            "Create a user (admin); roles up to your own",
            "users",
            {
                "201": json_content(
                    "Created", ref("User"), ETag='"<version>"', Location="/v1/users/{id}"
                ),
                "403": FORBIDDEN,
                "409": problem("The email is taken in this tenant"),
            },
            body="CreateUserRequest",
        ),
    },
    "/v1/users/{user_id}": {
        "get": op(
            "A user by id",
            "users",
            {"200": json_content("The user", ref("User"), ETag='"<version>"'), "404": NOT_FOUND},
            params=[USER_ID],
        ),
        "patch": op(
            "Update a user (admin) with optimistic locking",
            "users",
            {
                "200": json_content("Updated", ref("User"), ETag='"<version>"'),
                "403": FORBIDDEN,
                "404": NOT_FOUND,
                "409": LAST_OWNER,
                "412": problem(
                    "If-Match names another version: the user changed since you read it"
                ),
                "428": problem("If-Match is missing or empty"),
            },
            body="PatchUserRequest",
            params=[USER_ID, IF_MATCH],
        ),
        "delete": op(
            "Soft-delete a user (admin): status becomes deleted, login stops working",
            "users",
            {"204": _empty("Deleted"), "403": FORBIDDEN, "404": NOT_FOUND, "409": LAST_OWNER},
            params=[USER_ID],
        ),
    },
    "/v1/users/{user_id}/roles/{role}": {
        "put": op(
            "Grant a role (admin; up to your own)",
            "users",
            {
                "204": _empty("Granted (or already held)"),
                "403": FORBIDDEN,
                "404": NOT_FOUND,
                "422": problem("Unknown role"),
            },
            params=[USER_ID, ROLE_PARAM],
        ),
        "delete": op(
            "Revoke a role (admin; up to your own)",
            "users",
            {
                "204": _empty("Revoked (or not held)"),
                "403": FORBIDDEN,
                "404": NOT_FOUND,
                "409": LAST_OWNER,
                "422": problem("Unknown role, or member"),
            },
            params=[USER_ID, REVOCABLE_ROLE_PARAM],
        ),
    },
}

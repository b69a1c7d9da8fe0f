"""OpenAPI paths and schemas of the Auth and Users sections (request schemas are the validators)."""

from __future__ import annotations

from db.users import STATUSES
from server.openapi import (
    EXAMPLE_OWNER_ID,
    EXAMPLE_TENANT_ID,
    EXAMPLE_USER_ID,
    INVISIBLE,
    SPACE_OR_CONTROL,
    UUID_PATTERN,
    Json,
    example,
    json_content,
    op,
    problem,
    query_param,
    ref,
    response_ref,
    with_headers,
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
    "description": "The user's id",
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
# The examples' tokens: made by a test server with a throwaway key, expired long ago.
EXAMPLE_JWT = (
    "eyJhbGciOiJIUzI1NiIsImtpZCI6ImsyIiwidHlwIjoiYXQrand0In0.eyJpc3MiOiJzdXJnZSIsImF1ZCI6InN1cm"
    "dlLWFwaSIsInN1YiI6IjAxYTI0ZTFhLTVjZmYtN2YwNy05ZTYxLWFhZGMzMGE0ODFjNyIsInRpZCI6IjAxYTI0ZTFh"
    "LTVjZmYtNzkyOS1hMzMzLWU3YmYwYWNlYmM2ZCIsInJvbGVzIjpbIm1lbWJlciIsIm93bmVyIl0sImlhdCI6MTc5Nj"
    "YwNjY4MCwiZXhwIjoxNzk2NjA3NTgwLCJqdGkiOiI5MjI5ZWMzMmEwZjY1Y2E2IiwiZ2VuIjowfQ.ocgKxShkxv5FBH"
    "Lur4cYuDIUp8ho0fSj2WtnRvVJx0I"
)
EXAMPLE_REFRESH = "ZcWv_1inOtHz_oZRwmECrk0INRmq92J3rOHVTxf2nHw"
CREATED_AT = "2026-11-21T10:00:00.123Z"
TENANT = {"id": EXAMPLE_TENANT_ID, "name": "Acme", "created_at": CREATED_AT}
OWNER = {
    "id": EXAMPLE_OWNER_ID,
    "tenant_id": EXAMPLE_TENANT_ID,
    "email": "ann@example.com",
    "username": "ann",
    "status": "active",
    "roles": ["owner", "member"],
    "profile": {},
    "version": 1,
    "created_at": CREATED_AT,
    "updated_at": CREATED_AT,
}
ADMIN = OWNER | {
    "id": EXAMPLE_USER_ID,
    "email": "bob@example.com",
    "username": "bob",
    "roles": ["admin", "member"],
    "profile": {"team": "ops"},
    "created_at": "2026-11-21T10:05:42.250Z",
    "updated_at": "2026-11-21T10:05:42.250Z",
}


EXAMPLES: Json = {
    "SignupRequest": example(
        "A new tenant, Acme, and its owner",
        {
            "tenant_name": "Acme",
            "email": "ann@example.com",
            "username": "ann",
            "password": "correct horse battery",
        },
    ),
    "LoginRequest": example(
        "Acme's owner logs in",
        {
            "tenant_id": EXAMPLE_TENANT_ID,
            "email": "ann@example.com",
            "password": "correct horse battery",
        },
    ),
    "RefreshRequest": example(
        "The refresh token last received", {"refresh_token": EXAMPLE_REFRESH}
    ),
    "LogoutRequest": example(
        "The refresh token of this session", {"refresh_token": EXAMPLE_REFRESH}
    ),
    "PasswordChangeRequest": example(
        "The current password, then the new one",
        {"old_password": "correct horse battery", "new_password": "staple battery horse"},
    ),
    "CreateUserRequest": example(
        "An admin of the team ops",
        {
            "email": "bob@example.com",
            "username": "bob",
            "password": "hunter2hunter2",
            "roles": ["admin"],
            "profile": {"team": "ops"},
        },
    ),
    "PatchUserRequest": example("A new username", {"username": "bobby"}),
    "SignupResponse": example(
        "The tenant, its owner and the owner's tokens",
        {
            "tenant": TENANT,
            "user": OWNER,
            "access_token": EXAMPLE_JWT,
            "refresh_token": EXAMPLE_REFRESH,
            "expires_in": 900,
        },
    ),
    "TokenPair": example(
        "An access token for 15 minutes and its refresh token",
        {"access_token": EXAMPLE_JWT, "refresh_token": EXAMPLE_REFRESH, "expires_in": 900},
    ),
    "Owner": example("The tenant's owner", OWNER),
    "Admin": example("An admin", ADMIN),
    "RenamedAdmin": example(
        "The admin, renamed: version 2",
        ADMIN | {"username": "bobby", "version": 2, "updated_at": "2026-11-21T11:30:00.000Z"},
    ),
    "UserPage": example(
        "A page of two users, more to follow",
        {"items": [OWNER, ADMIN], "next_cursor": "AaJOGl2CeF6ORDfUaS2RhA"},
    ),
}

# Answers several operations give, in components.responses.
RESPONSES: Json = {
    "UserNotFound": problem(404, "No such user in your tenant", "user not found"),
    "LastOwner": problem(
        409,
        "The tenant's last owner cannot be removed",
        "the tenant's last owner cannot be removed, suspended or demoted",
    ),
    "CredentialsRefused": with_headers(
        problem(
            401,
            "Wrong credentials, or an invalid, expired or revoked refresh token",
            "wrong tenant, email or password",
        ),
        "WWW-Authenticate",
    ),
}
FORBIDDEN = response_ref("Forbidden")
NOT_FOUND = response_ref("UserNotFound")
LAST_OWNER = response_ref("LastOwner")
AUTH_401 = response_ref("CredentialsRefused")
UNKNOWN_ROLE = {"field": "role", "message": f"must be one of {', '.join(ROLES)}"}

PATHS: Json = {
    "/v1/auth/signup": {
        "post": op(
            "Create a tenant and its owner; returns a token pair",
            "auth",
            {"201": json_content("Created", ref("SignupResponse"), "SignupResponse")},
            body="SignupRequest",
            auth=False,
        )
    },
    "/v1/auth/login": {
        "post": op(
            "Exchange credentials for a token pair",
            "auth",
            {"200": json_content("Logged in", ref("TokenPair"), "TokenPair"), "401": AUTH_401},
            body="LoginRequest",
            auth=False,
        )
    },
    "/v1/auth/refresh": {
        "post": op(
            "Rotate a refresh token; reusing a spent one revokes its family",
            "auth",
            {"200": json_content("A new pair", ref("TokenPair"), "TokenPair"), "401": AUTH_401},
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
            {"200": json_content("The caller", ref("User"), "Owner", headers=("ETag",))},
        )
    },
    "/v1/me/password": {
        "put": op(
            "Change the caller's password; revokes the caller's refresh tokens",
            "users",
            {
                "204": _empty("Changed"),
                "422": problem(
                    422,
                    "Validation failed (`errors` names each offending field), or old_password is"
                    " not the current password",
                    "the request body is not valid",
                    errors=[{"field": "old_password", "message": "is not the current password"}],
                ),
            },
            body="PasswordChangeRequest",
        )
    },
    "/v1/users": {
        "get": op(
            "List the tenant's users (keyset pagination)",
            "users",
            {"200": json_content("A page", ref("UserPage"), "UserPage")},
            params=LIST_PARAMS,
        ),
        "post": op(
            "Create a user (admin); roles up to your own",
            "users",
            {
                "201": json_content("Created", ref("User"), "Admin", headers=("ETag", "Location")),
                "403": FORBIDDEN,
                "409": problem(
                    409,
                    "The email is taken in this tenant",
                    "a user with this email already exists in this tenant",
                ),
            },
            body="CreateUserRequest",
        ),
    },
    "/v1/users/{user_id}": {
        "get": op(
            "A user by id",
            "users",
            {
                "200": json_content("The user", ref("User"), "Admin", headers=("ETag",)),
                "404": NOT_FOUND,
            },
            params=[USER_ID],
        ),
        "patch": op(
            "Update a user (admin) with optimistic locking",
            "users",
            {
                "200": json_content("Updated", ref("User"), "RenamedAdmin", headers=("ETag",)),
                "403": FORBIDDEN,
                "404": NOT_FOUND,
                "409": LAST_OWNER,
                "412": problem(
                    412,
                    "If-Match names another version: the user changed since you read it",
                    "the user has changed (now version 2)",
                ),
                "428": problem(
                    428,
                    "If-Match is missing or empty",
                    "this request needs an If-Match header with the ETag you read",
                ),
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
                "422": problem(422, "Unknown role", "unknown role", errors=[UNKNOWN_ROLE]),
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
                "422": problem(
                    422, "Unknown role, or member", "unknown role", errors=[UNKNOWN_ROLE]
                ),
            },
            params=[USER_ID, REVOCABLE_ROLE_PARAM],
        ),
    },
}

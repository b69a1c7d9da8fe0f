"""Identity: tenants, users, roles, tokens (signup, login, refresh, logout, /v1/me, /v1/users)."""

-- Refresh tokens: only their SHA-256 is stored. The token itself is the credential, so the
-- lookup is by hash; everything after it is scoped to the row's tenant.

-- name: insert_refresh_token
INSERT INTO refresh_tokens (token_hash, tenant_id, user_id, family_id, expires_at)
VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5));

-- name: take_refresh_token
-- Locks the token row so two concurrent refreshes of one token are decided one after the other.
SELECT r.tenant_id, r.user_id, r.family_id, r.expires_at, r.used_at, r.revoked_at,
       now() AS now, u.status, u.roles, u.token_generation
FROM refresh_tokens r
JOIN users u ON u.tenant_id = r.tenant_id AND u.id = r.user_id
WHERE r.token_hash = $1
FOR UPDATE OF r;

-- name: mark_refresh_token_used
UPDATE refresh_tokens SET used_at = now() WHERE token_hash = $1 AND used_at IS NULL;

-- name: revoke_family
UPDATE refresh_tokens SET revoked_at = now()
WHERE tenant_id = $1 AND family_id = $2 AND revoked_at IS NULL;

-- name: revoke_family_of_token
UPDATE refresh_tokens SET revoked_at = now()
WHERE revoked_at IS NULL
  AND (tenant_id, family_id) = (SELECT tenant_id, family_id FROM refresh_tokens WHERE token_hash = $1);

-- name: revoke_user_tokens
UPDATE refresh_tokens SET revoked_at = now()
WHERE tenant_id = $1 AND user_id = $2 AND revoked_at IS NULL;

-- Access tokens (server/revocation.py): a user's tokens of older generations stop working.

-- name: revoke_access_tokens
-- clock_timestamp(), not now(): a sweep that reads past a revocation's time must find it
-- committed, so the time is taken as late in the transaction as it can be.
UPDATE users SET token_generation = token_generation + 1, tokens_revoked_at = clock_timestamp()
WHERE tenant_id = $1 AND id = $2
RETURNING token_generation;

-- name: token_generation
SELECT token_generation FROM users WHERE tenant_id = $1 AND id = $2;

-- name: revoked_since
-- Every tenant's users whose tokens were revoked in the last $1 seconds, by the database's clock
-- (served by users_tokens_revoked_at).
SELECT id, token_generation
FROM users
WHERE tokens_revoked_at > clock_timestamp() - make_interval(secs => $1);

-- Users and tenants. tenant_id is in every WHERE clause: another tenant's id finds nothing.
-- The column list of a user is the same everywhere so every statement feeds one view.

-- name: insert_tenant
INSERT INTO tenants (id, name) VALUES ($1, $2)
RETURNING id, name, created_at;

-- name: lock_tenant
-- Serialises changes that must keep an owner (role revokes, suspensions, deletions).
SELECT id FROM tenants WHERE id = $1 FOR UPDATE;

-- name: insert_user
INSERT INTO users (tenant_id, id, email, username, password_hash, roles, profile)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING id, tenant_id, email, username, status, roles, profile, version, created_at, updated_at;

-- name: get_user
SELECT id, tenant_id, email, username, status, roles, profile, version, created_at, updated_at
FROM users
WHERE tenant_id = $1 AND id = $2;

-- name: get_user_for_update
SELECT id, tenant_id, email, username, status, roles, profile, version, created_at, updated_at
FROM users
WHERE tenant_id = $1 AND id = $2
FOR UPDATE;

-- name: get_login
-- The login lookup: served by users_tenant_email_key.
SELECT id, password_hash, status, roles, token_generation
FROM users
WHERE tenant_id = $1 AND lower(email) = lower($2);

-- name: get_password_hash
SELECT password_hash FROM users WHERE tenant_id = $1 AND id = $2 AND status = 'active';

-- name: rehash_password
-- A new hash of the same password (parameters changed): not a user-visible change, no version bump.
UPDATE users SET password_hash = $3 WHERE tenant_id = $1 AND id = $2 AND password_hash = $4;

-- name: change_password
UPDATE users
SET password_hash = $3, version = version + 1, updated_at = now()
WHERE tenant_id = $1 AND id = $2 AND status = 'active'
RETURNING id, tenant_id, email, username, status, roles, profile, version, created_at, updated_at;

-- name: list_users
-- Keyset pagination on id (UUIDv7: creation order); rows inserted while a client pages
-- land after its cursor, so pages never repeat or skip a row. $3 is a LIKE prefix pattern
-- with %, _ and \ escaped; $4 a status filter (default: everything but deleted).
SELECT id, tenant_id, email, username, status, roles, profile, version, created_at, updated_at
FROM users
WHERE tenant_id = $1
  AND ($2::uuid IS NULL OR id > $2)
  AND ($3::text IS NULL OR lower(username) LIKE lower($3) OR lower(email) LIKE lower($3))
  AND (CASE WHEN $4::text IS NULL THEN status <> 'deleted' ELSE status = $4 END)
ORDER BY id
LIMIT $5;

-- name: list_user_versions
-- list_users' page as (id, version) only: a version names a user's whole visible state, so a body
-- serialized at that version is reused (ViewMemo, handlers/identity/views.py) without decoding
-- the row.
SELECT id, version
FROM users
WHERE tenant_id = $1
  AND ($2::uuid IS NULL OR id > $2)
  AND ($3::text IS NULL OR lower(username) LIKE lower($3) OR lower(email) LIKE lower($3))
  AND (CASE WHEN $4::text IS NULL THEN status <> 'deleted' ELSE status = $4 END)
ORDER BY id
LIMIT $5;

-- name: get_users_at_versions
-- The rows still at the versions list_user_versions saw ($2 ids, $3 versions, pairwise); a row
-- written since is missing from the answer.
SELECT id, tenant_id, email, username, status, roles, profile, version, created_at, updated_at
FROM users
WHERE tenant_id = $1
  AND (id, version) IN (SELECT * FROM unnest($2::uuid[], $3::integer[]));

-- name: patch_user
-- Optimistic locking in one statement: the row changes only if its version is still $3 and
-- the caller outranks or equals the target ($7; the CASE is server/rbac.py's RANK). No row back:
-- handlers/identity/service.py tells why (404, 403 or 412).
UPDATE users
SET username   = coalesce($4, username),
    profile    = coalesce($5, profile),
    status     = coalesce($6, status),
    version    = version + 1,
    updated_at = now()
WHERE tenant_id = $1 AND id = $2
  AND ($3::integer IS NULL OR version = $3)
  AND status <> 'deleted'
  AND (CASE WHEN 'owner' = ANY (roles) THEN 3 WHEN 'admin' = ANY (roles) THEN 2 ELSE 1 END) <= $7
RETURNING id, tenant_id, email, username, status, roles, profile, version, created_at, updated_at;

-- name: set_status
UPDATE users
SET status = $3, version = version + 1, updated_at = now()
WHERE tenant_id = $1 AND id = $2
RETURNING id, tenant_id, email, username, status, roles, profile, version, created_at, updated_at;

-- name: set_roles
UPDATE users
SET roles = $3, version = version + 1, updated_at = now()
WHERE tenant_id = $1 AND id = $2
RETURNING id, tenant_id, email, username, status, roles, profile, version, created_at, updated_at;

-- name: count_active_owners
SELECT count(*) FROM users WHERE tenant_id = $1 AND status = 'active' AND 'owner' = ANY (roles);

-- Identity: tenants, users (with their roles), refresh tokens, the audit log and the outbox.
-- Every tenant-owned table leads its primary key with tenant_id: every statement filters on it,
-- and the index serves that filter first.

CREATE TABLE tenants (
    id         uuid PRIMARY KEY DEFAULT surge_uuid_v7(),
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id            uuid NOT NULL DEFAULT surge_uuid_v7(),
    email         text NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
    username      text NOT NULL CHECK (length(username) BETWEEN 1 AND 64),
    password_hash text NOT NULL,
    status        text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended', 'deleted')),
    -- The user's roles live on the row: the hot read path (a user by id) is one index lookup
    -- with no join, and the access token carries them so requests never look them up.
    roles         text[] NOT NULL DEFAULT '{member}'
                  CHECK (roles <@ ARRAY['owner', 'admin', 'member']::text[] AND 'member' = ANY (roles)),
    profile       jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(profile) = 'object'),
    version       integer NOT NULL DEFAULT 1,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
-- Case-insensitive unique email per tenant; also the login lookup.
CREATE UNIQUE INDEX users_tenant_email_key ON users (tenant_id, lower(email));
-- ?q= prefix search (text_pattern_ops makes LIKE 'abc%' an index range scan).
CREATE INDEX users_tenant_username_prefix ON users (tenant_id, lower(username) text_pattern_ops);
CREATE INDEX users_tenant_email_prefix ON users (tenant_id, lower(email) text_pattern_ops);

CREATE TABLE refresh_tokens (
    token_hash  bytea PRIMARY KEY,             -- SHA-256 of the opaque token; the token itself is never stored
    tenant_id   uuid NOT NULL,
    user_id     uuid NOT NULL,
    family_id   uuid NOT NULL,                 -- one login = one family; reuse revokes the family
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,                   -- set when rotated
    revoked_at  timestamptz,
    FOREIGN KEY (tenant_id, user_id) REFERENCES users (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user ON refresh_tokens (tenant_id, user_id);

CREATE TABLE audit_log (
    tenant_id   uuid NOT NULL,
    id          uuid NOT NULL DEFAULT surge_uuid_v7(),
    actor_id    uuid,                          -- null for the provider or the system
    action      text NOT NULL,                 -- 'user.created', 'user.role_granted', ...
    target_type text NOT NULL,
    target_id   uuid,
    request_id  text,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

-- Transactional outbox: written in the same transaction as the change it announces; a relay
-- moves rows to a Redis Stream in id order.
CREATE TABLE outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    uuid NOT NULL DEFAULT surge_uuid_v7() UNIQUE,
    tenant_id   uuid NOT NULL,
    topic       text NOT NULL,
    aggregate_id uuid,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Access-token revocation: a user's access tokens carry the user's token generation (the `gen`
-- claim); suspending, deleting, a password change or a role change bumps it in the same
-- transaction, and a token of an older generation is refused (server/revocation.py).
-- tokens_revoked_at says when: processes load the bumps of the last access-token lifetime when
-- they start and sweep for new ones, so none is missed while Redis pub/sub is down.
ALTER TABLE users
    ADD COLUMN token_generation integer NOT NULL DEFAULT 0,
    ADD COLUMN tokens_revoked_at timestamptz;
-- Only revoked users are indexed: the sweep reads the recent few, whatever the table's size.
CREATE INDEX users_tokens_revoked_at ON users (tokens_revoked_at)
    WHERE tokens_revoked_at IS NOT NULL;

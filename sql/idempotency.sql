-- Idempotency keys of order-changing requests: the first request with a key claims it, its
-- response is stored with the change, and a retry with the same key gets that response.

-- name: claim_idempotency_key
-- The first request with a key inserts it; a key whose record expired (24 h), or whose first
-- request died before finishing ($5 seconds ago), is taken over. Returns the row either way
-- (claimed = true when this request now owns it).
WITH claimed AS (
    INSERT INTO idempotency_keys (tenant_id, user_id, key, fingerprint)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT (tenant_id, user_id, key) DO UPDATE
    SET fingerprint = EXCLUDED.fingerprint, response_status = NULL, response_body = NULL,
        response_headers = NULL, created_at = now(), expires_at = now() + interval '24 hours'
    WHERE idempotency_keys.expires_at < now()
       OR (idempotency_keys.response_status IS NULL
           AND idempotency_keys.created_at < now() - make_interval(secs => $5))
    RETURNING fingerprint, response_status, response_body, response_headers, true AS claimed
)
SELECT fingerprint, response_status, response_body, response_headers, claimed FROM claimed
UNION ALL
SELECT fingerprint, response_status, response_body, response_headers, false
FROM idempotency_keys
WHERE tenant_id = $1 AND user_id = $2 AND key = $3 AND NOT EXISTS (SELECT FROM claimed);

-- name: complete_idempotency_key
-- Stores the response, in the same transaction as the change it reports.
UPDATE idempotency_keys
SET response_status = $4, response_body = $5, response_headers = $6
WHERE tenant_id = $1 AND user_id = $2 AND key = $3 AND response_status IS NULL;

-- name: drop_idempotency_key
-- The request failed before changing anything: the key is free for a retry.
DELETE FROM idempotency_keys
WHERE tenant_id = $1 AND user_id = $2 AND key = $3 AND response_status IS NULL;

-- name: prune_idempotency_keys
DELETE FROM idempotency_keys WHERE expires_at < now();

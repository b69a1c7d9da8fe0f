-- The pay saga's state, idempotency keys and provider webhook events.

-- name: insert_payment
-- The saga's first row, written in the transaction that moves the order to `paying`; the
-- lease is taken at once by the process that will run it.
INSERT INTO payments (tenant_id, order_id, step, payment_method, amount_cents, currency, lease_until)
VALUES ($1, $2, 'authorizing', $3, $4, $5, now() + make_interval(secs => $6))
RETURNING tenant_id, order_id, step, payment_method, amount_cents, currency, authorization_id,
          outcome, attempts;

-- name: claim_payment
-- Takes (or renews, $4 = true) the saga's lease. Nobody else's live lease is ever taken over.
UPDATE payments
SET lease_until = now() + make_interval(secs => $3), attempts = attempts + 1
WHERE tenant_id = $1 AND order_id = $2
  AND step IN ('authorizing', 'capturing', 'voiding', 'refunding')
  AND (lease_until IS NULL OR lease_until < now() OR $4)
RETURNING tenant_id, order_id, step, payment_method, amount_cents, currency, authorization_id,
          outcome, attempts;

-- name: release_payment
-- Gives the lease up (clean shutdown): another process may resume the saga at once.
UPDATE payments SET lease_until = NULL WHERE tenant_id = $1 AND order_id = $2;

-- name: get_payment
SELECT tenant_id, order_id, step, payment_method, amount_cents, currency, authorization_id,
       outcome, attempts
FROM payments
WHERE tenant_id = $1 AND order_id = $2;

-- name: payment_by_authorization
SELECT tenant_id, order_id, step, payment_method, amount_cents, currency, authorization_id,
       outcome, attempts
FROM payments
WHERE authorization_id = $1;

-- name: move_payment
-- From a step in $3 to $4; the authorization id and outcome are kept unless given.
UPDATE payments
SET step = $4, authorization_id = coalesce($5, authorization_id), outcome = coalesce($6, outcome),
    updated_at = now()
WHERE tenant_id = $1 AND order_id = $2 AND step = ANY($3::text[])
RETURNING tenant_id, order_id, step, payment_method, amount_cents, currency, authorization_id,
          outcome, attempts;

-- name: stale_payments
-- Sagas in flight whose process let the lease go or died: resumed by whoever finds them.
SELECT tenant_id, order_id
FROM payments
WHERE step IN ('authorizing', 'capturing', 'voiding', 'refunding')
  AND (lease_until IS NULL OR lease_until < now())
ORDER BY lease_until NULLS FIRST
LIMIT $1;

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

-- name: insert_webhook_event
-- An event id already here was processed: the insert returns nothing and the caller stops.
INSERT INTO webhook_events (event_id, event_type, tenant_id, order_id)
VALUES ($1, $2, $3, $4)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id;

-- name: prune_webhook_events
DELETE FROM webhook_events WHERE received_at < now() - make_interval(days => $1);

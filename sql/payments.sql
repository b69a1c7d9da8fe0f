-- The pay saga's state and provider webhook events.

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

-- name: insert_webhook_event
-- An event id already here was processed: the insert returns nothing and the caller stops.
INSERT INTO webhook_events (event_id, event_type, tenant_id, order_id)
VALUES ($1, $2, $3, $4)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id;

-- name: prune_webhook_events
DELETE FROM webhook_events WHERE received_at < now() - make_interval(days => $1);

-- name: record_event
-- Append an audit row and an outbox event in one statement (one round trip), inside the
-- caller's transaction. $1 tenant, $2 actor, $3 action (also the outbox topic),
-- $4 target type, $5 target id, $6 request id, $7 details (jsonb), $8 outbox payload (jsonb),
-- $9 the audit row's id (made by the caller: monotonic, so rows of one transaction keep order).
WITH audit AS (
    INSERT INTO audit_log (id, tenant_id, actor_id, action, target_type, target_id, request_id, details)
    VALUES ($9, $1, $2, $3, $4, $5, $6, $7)
)
INSERT INTO outbox (tenant_id, topic, aggregate_id, payload)
VALUES ($1, $3, $5, $8);

-- name: list_audit
-- Newest first, keyset on id (UUIDv7, so id order is time order).
SELECT id, actor_id, action, target_type, target_id, request_id, details, created_at
FROM audit_log
WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id < $2)
ORDER BY id DESC
LIMIT $3;

-- name: record_audit
-- An audit row alone, for state changes nobody outside needs to hear about (order.paying,
-- payment.authorized, ...). Same parameters as record_event without the outbox payload.
INSERT INTO audit_log (id, tenant_id, actor_id, action, target_type, target_id, request_id, details)
VALUES ($8, $1, $2, $3, $4, $5, $6, $7);

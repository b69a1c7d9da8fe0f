-- The outbox relay and the stream consumers' bookkeeping. The advisory lock key 6785019002
-- is the one the outbox_writer_lock trigger takes (0003_events.sql): classid 1, objid
-- 2490051706 in pg_locks.

-- name: ensure_position
INSERT INTO outbox_relay (stream) VALUES ($1) ON CONFLICT (stream) DO NOTHING;

-- name: lock_position
-- The relay that gets this row publishes; replicas that find it locked skip their round.
SELECT last_id FROM outbox_relay WHERE stream = $1 FOR UPDATE SKIP LOCKED;

-- name: advance_position
UPDATE outbox_relay SET last_id = $2, updated_at = now() WHERE stream = $1;

-- name: last_outbox_id
-- The last id the outbox's identity sequence handed out (0 before the first).
SELECT coalesce(pg_sequence_last_value('outbox_id_seq'), 0)::bigint;

-- name: outbox_writers
-- Transactions of this database holding the outbox writer lock right now.
SELECT coalesce(array_agg(virtualtransaction), '{}')::text[]
FROM pg_locks
WHERE locktype = 'advisory' AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid = 1 AND objid = 2490051706 AND objsubid = 1;

-- name: count_writers_running
-- How many of the transactions $1 (from outbox_writers) still hold the writer lock.
SELECT count(*)::int
FROM pg_locks
WHERE locktype = 'advisory' AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid = 1 AND objid = 2490051706 AND objsubid = 1
  AND virtualtransaction = ANY ($1::text[]);

-- name: fetch_outbox
-- The next rows to publish: after the relayed position $1, up to the safe id $2, in id order.
SELECT id, event_id, tenant_id, topic, aggregate_id, payload::text AS payload, created_at
FROM outbox
WHERE id > $1 AND id <= $2
ORDER BY id
LIMIT $3;

-- name: outbox_lag
-- Ids not yet relayed, and the age in seconds of the oldest row not yet relayed.
WITH pos AS (SELECT coalesce((SELECT last_id FROM outbox_relay WHERE stream = $1), 0) AS last_id)
SELECT coalesce(pg_sequence_last_value('outbox_id_seq'), 0) - pos.last_id AS ids,
       coalesce(extract(epoch FROM now() - (
           SELECT created_at FROM outbox WHERE id > pos.last_id ORDER BY id LIMIT 1
       )), 0)::float8 AS seconds
FROM pos;

-- name: claim_consumed
-- Records that consumer $1 applies the events $2; returns only the ids it had not applied
-- before, in the caller's transaction, so the effect and the record commit together.
INSERT INTO stream_consumed (consumer, event_id)
SELECT $1, e FROM unnest($2::uuid[]) AS e
ON CONFLICT (consumer, event_id) DO NOTHING
RETURNING event_id;

-- name: prune_consumed
-- Forgets applied ids older than $1: the stream no longer holds anything that old.
DELETE FROM stream_consumed WHERE consumed_at < $1;

-- name: prune_outbox
-- Deletes, of the $2 oldest rows every stream has relayed (at or below the lowest position),
-- those created more than $1 ago. Only that prefix of the table in id order is read, so a
-- round with nothing due reads at most $2 rows (not the whole retention); the price is that
-- a row behind younger ones (its transaction ran long) goes when they do. SKIP LOCKED:
-- replicas pruning at once take disjoint batches instead of queueing on the same rows.
-- No position row: nothing has been relayed, nothing is deleted.
WITH batch AS (
    SELECT id FROM outbox
    WHERE id <= (SELECT min(last_id) FROM outbox_relay)
    ORDER BY id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM outbox
    WHERE id IN (SELECT id FROM batch) AND created_at < now() - $1::interval
    RETURNING 1
)
SELECT count(*)::int FROM gone;

-- name: oldest_outbox_age
-- Age in seconds of the oldest row kept (0 when the outbox is empty).
SELECT coalesce(extract(epoch FROM now() - (
    SELECT created_at FROM outbox ORDER BY id LIMIT 1
)), 0)::float8;

-- name: wait_position
-- The relayed position, row-locked until the transaction ends; unlike lock_position it waits
-- for a relay round in progress. A replay holds it, so relays skip their rounds meanwhile.
SELECT last_id FROM outbox_relay WHERE stream = $1 FOR UPDATE;

-- name: replay_first_id
-- The lowest id of a row created at or after $1, at or below the relayed position $2. Found
-- by the primary key from the oldest row: created_at has no index (it would cost every
-- write), and a replay is rare.
SELECT id FROM outbox WHERE created_at >= $1 AND id <= $2 ORDER BY id LIMIT 1;

-- name: replay_last_id
-- The highest id of a row created before $1, at or below the relayed position $2.
SELECT id FROM outbox WHERE created_at < $1 AND id <= $2 ORDER BY id DESC LIMIT 1;

-- name: fetch_replay
-- The next rows of a replay: after id $1, up to id $2, created in [$3, $4), in id order
-- (created_at follows the id only roughly: a transaction commits after it began).
SELECT id, event_id, tenant_id, topic, aggregate_id, payload::text AS payload, created_at
FROM outbox
WHERE id > $1 AND id <= $2 AND created_at >= $3 AND created_at < $4
ORDER BY id
LIMIT $5;

-- name: oldest_outbox_time
-- When the oldest row kept was written (no row: NULL).
SELECT created_at FROM outbox ORDER BY id LIMIT 1;

-- Events, their one-minute rollups, and the day partitions behind both. Raw events are written
-- by COPY (db/events.py), not by a statement here. tenant_id is in every WHERE clause.

-- name: add_counts
-- Adds one commit's per-minute counts to the rollups, in the same transaction as its events.
-- Rows are locked in key order, so two transactions adding to the same rows queue instead of
-- deadlocking. $1 tenant ids, $2 names, $3 minutes, $4 counts (parallel arrays), $5 shard.
INSERT INTO event_counts AS c (tenant_id, name, minute, shard, count)
SELECT t, n, m, $5, k
FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::bigint[]) AS u (t, n, m, k)
ORDER BY t, n, m
ON CONFLICT (tenant_id, name, minute, shard) DO UPDATE SET count = c.count + excluded.count;

-- name: count_buckets
-- Counts of one event name per bucket ($4: 1 minute, 1 hour or 1 day, aligned to the Unix
-- epoch) over [$3, $5), leaving out minutes in [$6, $7) (the window Redis answers for).
-- Served by the primary key and partition pruning on `minute`.
SELECT date_bin($4::interval, minute, timestamptz '1970-01-01 00:00:00+00') AS bucket,
       sum(count)::bigint AS count
FROM event_counts
WHERE tenant_id = $1 AND name = $2 AND minute >= $3 AND minute < $5
  AND NOT (minute >= $6 AND minute < $7)
GROUP BY 1
ORDER BY 1;

-- name: insert_events
-- The low-volume insert (stream consumers): parallel arrays, props as JSON text.
INSERT INTO events (tenant_id, ts, name, user_id, props)
SELECT t, ts, n, u, p::jsonb
FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::uuid[], $5::text[]) AS x (t, ts, n, u, p);

-- name: create_partitions
-- Day partitions of $1 (events or event_counts) for the UTC days $2..$3; returns the new ones.
SELECT surge_create_day_partitions($1::text::regclass, $2, $3) AS name;

-- name: drop_partitions
-- Drops the day partitions of $1 for days before $2; returns their names.
SELECT surge_drop_day_partitions($1::text::regclass, $2) AS name;

-- name: list_partitions
SELECT c.relname::text AS name
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = $1::text::regclass
ORDER BY c.relname;

-- name: stray_partitions
-- Tables named like a day partition of $1 (events or event_counts), in its schema, that are
-- not attached to it: a detached partition, whose rows no query reads and no retention drops.
SELECT c.relname::text AS name
FROM pg_class c
JOIN pg_class p ON p.oid = $1::text::regclass
WHERE c.relnamespace = p.relnamespace
  AND c.relkind IN ('r', 'p')
  AND c.relname ~ ('^' || p.relname || '_p[0-9]{8}(_[0-9]+)?$')
  AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid AND i.inhparent = p.oid)
ORDER BY 1;

-- Events and analytics, and the outbox relay's bookkeeping.

-- Raw events, one partition per UTC day of `ts`. Retention drops whole partitions (no DELETE,
-- no vacuum debt), and ingestion only ever touches the few recent ones. There is no b-tree
-- index: nothing reads single events back, and every index entry would cost the
-- 100k events/s ingestion path; counts come from event_counts below. No CHECK constraints
-- either, for the same reason: POST /v1/events validates every field before it gets here.
CREATE TABLE events (
    tenant_id   uuid NOT NULL,
    ts          timestamptz NOT NULL,
    name        text NOT NULL,
    user_id     uuid,
    props       jsonb NOT NULL DEFAULT '{}'::jsonb,
    received_at timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (ts);
-- A few hundred bytes per partition, for ad-hoc time-range scans.
CREATE INDEX events_ts_brin ON events USING brin (ts);

-- One-minute rollups, written in the same transaction as the events they count, so PostgreSQL
-- always agrees with itself. `shard` is per writer process: each process upserts its own rows,
-- so replicas never queue on one hot (tenant, name, minute) row; readers sum the shards.
CREATE TABLE event_counts (
    tenant_id uuid NOT NULL,
    name      text NOT NULL,
    minute    timestamptz NOT NULL,
    shard     smallint NOT NULL,
    count     bigint NOT NULL,
    PRIMARY KEY (tenant_id, name, minute, shard)
) PARTITION BY RANGE (minute);

-- Day partitions of a table partitioned by a timestamptz range, named <table>_pYYYYMMDD.
-- A new partition is created on its own, then attached: ATTACH takes SHARE UPDATE EXCLUSIVE
-- on the parent, which does not block the COPYs going on, where CREATE TABLE ... PARTITION OF
-- would wait for them and make new ones wait behind it. The transaction-scoped advisory lock
-- lets replicas running this at the same moment take turns instead of racing on the catalog.
CREATE FUNCTION surge_create_day_partitions(parent regclass, first_day date, last_day date)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    day  date;
    part text;
BEGIN
    PERFORM pg_advisory_xact_lock(6785019001);
    FOR day IN SELECT d::date FROM generate_series(first_day, last_day, interval '1 day') AS d LOOP
        part := format('%s_p%s', parent::text, to_char(day, 'YYYYMMDD'));
        CONTINUE WHEN to_regclass(part) IS NOT NULL;
        EXECUTE format('CREATE TABLE %I (LIKE %s INCLUDING DEFAULTS)', part, parent);
        EXECUTE format(
            'ALTER TABLE %s ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
            parent, part,
            day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC'
        );
        RETURN NEXT part;
    END LOOP;
END
$$;

-- Drop the day partitions of `parent` that end on or before `before_day`. DROP needs an
-- ACCESS EXCLUSIVE lock on the parent; the lock timeout keeps it from stalling ingestion
-- behind a long query (the next maintenance round tries again).
CREATE FUNCTION surge_drop_day_partitions(parent regclass, before_day date)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    part record;
BEGIN
    PERFORM set_config('lock_timeout', '2s', true);
    PERFORM pg_advisory_xact_lock(6785019001);
    FOR part IN
        SELECT c.oid::regclass AS rel, c.relname::text AS name
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = parent
          AND c.relname ~ '_p[0-9]{8}$'
          AND to_date(right(c.relname, 8), 'YYYYMMDD') < before_day
        ORDER BY c.relname
    LOOP
        EXECUTE format('DROP TABLE %s', part.rel);
        RETURN NEXT part.name;
    END LOOP;
END
$$;

-- The outbox relay publishes in id order, so it must never move past an id whose transaction
-- has not finished yet: that row would become visible later, behind the relayed position, and
-- be skipped for good. Every statement inserting into the outbox therefore holds a shared
-- advisory lock (taken before the identity value is drawn, released at commit). The relay
-- reads the sequence's last value H, then the holders of that lock; once those holders are
-- gone, every id <= H is final. Shared locks never conflict with each other, and the relay
-- never takes this lock itself: writers are never blocked. This relies on the identity
-- sequence's default CACHE 1 (a cached block of ids would be handed out after H was read).
CREATE FUNCTION surge_outbox_writer_lock() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(6785019002);
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_writer_lock
    BEFORE INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION surge_outbox_writer_lock();

-- How far each stream has been fed. One row per stream; the relay holding its row lock
-- (FOR UPDATE SKIP LOCKED) is the only one publishing, the other replicas skip.
CREATE TABLE outbox_relay (
    stream     text PRIMARY KEY,
    last_id    bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Stream messages a consumer has already applied, by event id: the relay delivers at least
-- once, and a consumer records the id in the same transaction as its effect, so each event
-- takes effect exactly once.
CREATE TABLE stream_consumed (
    consumer    text NOT NULL,
    event_id    uuid NOT NULL,
    consumed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX stream_consumed_age ON stream_consumed (consumed_at);

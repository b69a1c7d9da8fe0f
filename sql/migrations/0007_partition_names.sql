-- Day partitions whose name is taken. A table named like a day's partition that is not one (a
-- partition an operator detached, say) made the day's partition impossible to create: the old
-- function took the name for proof that the day was covered, every event of that day failed
-- its commit, and no maintenance round healed it. Now a day is covered only by a table
-- attached to the parent; when its name is taken by anything else the partition is made under
-- the next free name, <table>_pYYYYMMDD_N, and the other table is left alone for the operator
-- (server logs name it every maintenance round: handlers/events/partitions.py).
CREATE OR REPLACE FUNCTION surge_create_day_partitions(parent regclass, first_day date, last_day date)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    day  date;
    base text;
    part text;
    rel  regclass;
    n    int;
BEGIN
    PERFORM pg_advisory_xact_lock(6785019001);
    FOR day IN SELECT d::date FROM generate_series(first_day, last_day, interval '1 day') AS d LOOP
        base := format('%s_p%s', parent::text, to_char(day, 'YYYYMMDD'));
        n := 0;
        LOOP
            part := CASE WHEN n = 0 THEN base ELSE format('%s_%s', base, n) END;
            rel := to_regclass(part);
            IF rel IS NULL THEN
                EXECUTE format('CREATE TABLE %I (LIKE %s INCLUDING DEFAULTS)', part, parent);
                EXECUTE format(
                    'ALTER TABLE %s ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                    parent, part,
                    day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC'
                );
                RETURN NEXT part;
                EXIT;
            END IF;
            EXIT WHEN EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = rel AND inhparent = parent);
            n := n + 1;
        END LOOP;
    END LOOP;
END
$$;

-- Drops the day partitions of `parent` that end on or before `before_day`, under either name.
CREATE OR REPLACE FUNCTION surge_drop_day_partitions(parent regclass, before_day date)
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
          AND c.relname ~ '_p[0-9]{8}(_[0-9]+)?$'
          AND to_date(substring(c.relname FROM '_p([0-9]{8})(?:_[0-9]+)?$'), 'YYYYMMDD') < before_day
        ORDER BY c.relname
    LOOP
        EXECUTE format('DROP TABLE %s', part.rel);
        RETURN NEXT part.name;
    END LOOP;
END
$$;

-- CREATE OR REPLACE resets what 0005_runtime_role.sql set; its grants stay.
DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION surge_create_day_partitions(regclass, date, date)'
        ' SECURITY DEFINER SET search_path = %I, pg_temp',
        current_schema()
    );
    EXECUTE format(
        'ALTER FUNCTION surge_drop_day_partitions(regclass, date)'
        ' SECURITY DEFINER SET search_path = %I, pg_temp',
        current_schema()
    );
END
$$;

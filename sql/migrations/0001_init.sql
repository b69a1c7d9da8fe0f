-- Foundation: helpers every later migration may use.

-- UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then random bits, so ids sort by creation
-- time and b-tree inserts stay at the right edge of the index. The application usually makes
-- ids itself (server/ids.py); this default covers rows written by SQL alone.
CREATE OR REPLACE FUNCTION surge_uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT encode(
        set_bit(
            set_bit(
                overlay(uuid_send(gen_random_uuid())
                        PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                        FROM 1 FOR 6),
                52, 1),
            53, 1),
        'hex')::uuid
$$;

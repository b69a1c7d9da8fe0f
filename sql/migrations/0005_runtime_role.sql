-- Least privilege: the server may connect as a runtime role with DML rights only
-- (DATABASE_RUNTIME_ROLE; the migrator grants them). Partition maintenance still creates and
-- drops day partitions while serving, so these two functions run with the rights of their
-- owner, the schema owner that ran this migration. Their search_path is pinned to this schema
-- (pg_temp last) so a caller cannot slip its own objects in, and only roles granted EXECUTE
-- (the owner, the runtime role) may call them.
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
REVOKE EXECUTE ON FUNCTION surge_create_day_partitions(regclass, date, date) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION surge_drop_day_partitions(regclass, date) FROM PUBLIC;

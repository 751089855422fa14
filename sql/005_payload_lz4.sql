-- 005_payload_lz4.sql: compress large payloads with lz4 instead of pglz.
--
-- A payload over about 2 kB is compressed when it is stored (TOAST).  With
-- PostgreSQL's default, pglz, that compression was 30 % of the staging
-- backend's CPU on rows with a 2 kB text column (bench/run workload (c),
-- profiled with bench/profile); with lz4 the staging backend's CPU on that
-- workload fell by 29 %, and workers decompress faster too.  Partitions
-- created later take the parent's method; SET COMPRESSION on the parent does
-- not reach the existing ones, so each is altered.  Only new values are
-- stored differently: old values stay pglz and both read the same.  A server
-- built without lz4 keeps pglz.
DO $$
DECLARE
    part REGCLASS;
BEGIN
    ALTER TABLE walpipe.raw_events ALTER COLUMN payload SET COMPRESSION lz4;
    FOR part IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'walpipe.raw_events'::regclass LOOP
        EXECUTE format('ALTER TABLE %s ALTER COLUMN payload SET COMPRESSION lz4', part);
    END LOOP;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'raw_events.payload keeps pglz compression: this PostgreSQL was built without lz4';
END
$$;

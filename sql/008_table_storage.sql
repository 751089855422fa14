-- 008_table_storage.sql: what the source's catalog said of each captured
-- table's storage when walpipe last recorded it, so that a rewrite (which
-- changes rows without row changes in the WAL) is noticed.
--
-- `walpipe run` polls pg_class every few seconds (src/apply/rewrites.c).  A
-- new relfilenode under the same oid is a TRUNCATE (in the stream: nothing
-- to do) or a rewrite (ADD COLUMN with a volatile default, ALTER COLUMN TYPE
-- ... USING, VACUUM FULL, CLUSTER: recorded in walpipe.divergences); a new
-- oid under the same name is a table dropped and created again.
ALTER TABLE walpipe.source_tables
    ADD COLUMN relid       OID,     -- pg_class.oid when recorded; NULL until the first poll
    ADD COLUMN relfilenode OID,     -- pg_class.relfilenode when recorded
    ADD COLUMN storage_lsn PG_LSN;  -- the source's WAL insert position read just before that catalog read
COMMENT ON COLUMN walpipe.source_tables.replica_identity IS
    'default | index | full | nothing, or gone: a table walpipe has changes of that was no longer in the catalog';

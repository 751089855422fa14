-- 007_divergences.sql: a mirror never diverges silently.
--
-- One row each time walpipe learns that a mirror table has missed, or may
-- have missed, a change of its source table: wal2json dropped an UPDATE or
-- DELETE (no replica identity), the source rewrote the table without row
-- changes in the WAL (ADD COLUMN with a volatile default, ALTER COLUMN TYPE
-- ... USING), an event was parked in the dead-letter queue, `walpipe verify`
-- found differing rows, or an operator asked.  Whoever detects it records it
-- (capture, apply or a command; src/base/diverge.c); a resync (a re-snapshot
-- of the table with a truncate at its consistent point, ordered before its
-- rows) whose consistent point is past `lsn` resolves it.
--
-- The mirror of (source, schema_name, table_name) is diverged while it has
-- an open row (resolved_at IS NULL).  'parked': an event was parked because
-- of what it carries (a key value it lacks, a lost NaN): a resync repairs
-- it.  'apply_failed': an event failed max_attempts times on the mirror's
-- own SQL (a constraint, a type the mirror column cannot hold): a resync
-- would fail alike, so only fixing the mirror and `walpipe dlq retry` do.
CREATE TABLE walpipe.divergences (
    id           BIGSERIAL   PRIMARY KEY,
    source       TEXT        NOT NULL,
    schema_name  TEXT        NOT NULL,
    table_name   TEXT        NOT NULL,
    kind         TEXT        NOT NULL,
    lsn          PG_LSN      NOT NULL DEFAULT '0/0',  -- where the mirror lost the change ('0/0': not known)
    reason       TEXT        NOT NULL,
    detected_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    resolved_at  TIMESTAMPTZ,                          -- NULL while open
    resolved_by  TEXT,                                 -- what resolved it, e.g. the resync's snapshot and consistent point
    CONSTRAINT divergences_kind CHECK (kind IN ('dropped_change', 'rewrite', 'parked', 'apply_failed', 'verify', 'manual'))
);
-- The same loss reported twice (a transaction decoded again after a restart,
-- a catalog poll that sees the same rewrite) is one row while it is open.
CREATE UNIQUE INDEX divergences_open_once ON walpipe.divergences (source, schema_name, table_name, kind, lsn)
    WHERE resolved_at IS NULL;
CREATE INDEX divergences_open ON walpipe.divergences (source, schema_name, table_name) WHERE resolved_at IS NULL;

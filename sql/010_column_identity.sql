-- 010_column_identity.sql: mirror columns follow source columns by identity
-- (attnum), not by name, and know the value rows read for a column added
-- with a constant default.
--
-- A column's name can change (ALTER TABLE ... RENAME COLUMN) and a name can
-- come back as another column (DROP COLUMN x, ADD COLUMN x).  The column's
-- attnum does neither: wal2json sends it with every new tuple
-- (include-column-positions, recorded as "position" in
-- walpipe.table_schemas.columns), and the mirror keeps the attnum of each of
-- its columns here, so a newer shape that shows a known attnum under a new
-- name renames the mirror column instead of dropping it, and an event of an
-- older shape applies by position.  Shapes recorded without positions (by a
-- walpipe before this one) are followed by name, as before.

-- mirror column name -> source attnum; a column missing here (a mirror from
-- before, or created from names only) is matched by name until a shape with
-- positions names it.
ALTER TABLE walpipe.mirrors ADD COLUMN column_attnums JSONB NOT NULL DEFAULT '{}';

-- What `walpipe run` reads from each source's catalog about the columns of
-- the captured tables (src/apply/columns.c): every attnum the table ever
-- used, dropped ones too.  has_missing/missing_value are
-- pg_attribute.atthasmissing/attmissingval: the value rows that existed when
-- the column was added with a constant DEFAULT read for it (ADD COLUMN
-- writes no row changes to the WAL).  missing_value is the type's text
-- output under walpipe's pinned session settings, as events carry values.
-- read_lsn is the source's WAL position taken before the catalog was read:
-- every column added by a transaction that committed before read_lsn is in
-- the read.
CREATE TABLE walpipe.source_columns (
    source        TEXT        NOT NULL,
    schema_name   TEXT        NOT NULL,
    table_name    TEXT        NOT NULL,
    attnum        INT         NOT NULL,
    name          TEXT        NOT NULL,
    type          TEXT        NOT NULL,   -- format_type() on the source
    dropped       BOOLEAN     NOT NULL,
    has_missing   BOOLEAN     NOT NULL,
    missing_value TEXT,                   -- NULL unless has_missing (and readable: see columns.c)
    read_lsn      PG_LSN      NOT NULL,
    read_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (source, schema_name, table_name, attnum)
);

-- The stale map (see 003_workers.sql) after the mirror renamed or dropped
-- columns: each key in old_names becomes the matching new_names entry, or
-- goes when that is NULL.  Renames happen all at once (a swap of two names
-- stays a swap).
CREATE FUNCTION walpipe.stale_rename(stale JSONB, old_names TEXT[], new_names TEXT[]) RETURNS JSONB
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT nullif(coalesce(jsonb_object_agg(coalesce(n.new_name, e.key), e.value)
                           FILTER (WHERE n.old_name IS NULL OR n.new_name IS NOT NULL), '{}'::jsonb), '{}'::jsonb)
    FROM jsonb_each($1) e
    LEFT JOIN unnest($2, $3) AS n(old_name, new_name) ON n.old_name = e.key
$$;

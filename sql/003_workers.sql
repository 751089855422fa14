-- 003_workers.sql: transform workers: source table keys, the mirror registry,
-- apply failures in the dead-letter queue, and the version helpers the mirror
-- SQL uses.  See src/mirror.c for why the mirror is correct in any order.

-- What `walpipe run` reads from each source's catalog (workers only talk to
-- staging): the columns that identify a row of each captured table, which the
-- mirror uses as its primary key.  The change stream does not carry them:
-- inserts name no key, and updates/deletes carry the replica identity only.
CREATE TABLE walpipe.source_tables (
    source           TEXT        NOT NULL,
    schema_name      TEXT        NOT NULL,
    table_name       TEXT        NOT NULL,
    replica_identity TEXT        NOT NULL,   -- default | index | full | nothing
    key_columns      JSONB,                  -- the mirror's key, [{"name","type","typeoid"}] in index order; NULL if none
    not_null_columns TEXT[],                 -- NOT NULL columns (a null there is a value wal2json lost: NaN, Infinity)
    problem          TEXT,                   -- why the table cannot be mirrored; NULL when it can
    discovered_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (source, schema_name, table_name)
);

-- One row per mirror table the workers keep.  The version of a change is
-- (commit LSN, seq); every *_lsn/*_seq pair below is one.
CREATE TABLE walpipe.mirrors (
    id            SERIAL      PRIMARY KEY,
    source        TEXT        NOT NULL,
    schema_name   TEXT        NOT NULL,
    table_name    TEXT        NOT NULL,
    mirror_schema TEXT        NOT NULL,
    mirror_table  TEXT        NOT NULL,
    tombstones    TEXT        NOT NULL,   -- table in schema walpipe: deleted keys and the version that deleted them
    key_columns   TEXT[]      NOT NULL,
    shape_lsn     PG_LSN      NOT NULL DEFAULT '0/0',  -- newest change whose column set the mirror follows
    shape_seq     INT         NOT NULL DEFAULT -1,
    truncated_lsn PG_LSN      NOT NULL DEFAULT '0/0',  -- newest TRUNCATE applied; older changes are ignored
    truncated_seq INT         NOT NULL DEFAULT -1,
    generation    INT         NOT NULL DEFAULT 1,      -- bumped by every ALTER walpipe applies to the mirror
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (source, schema_name, table_name),
    UNIQUE (mirror_schema, mirror_table)
);

-- dead_letters serves both failures: kind 'decode' rows are stream messages
-- walpipe could not decode (raw holds them; they never became events and
-- cannot be retried), kind 'apply' rows are staged events a worker could not
-- apply (event_id points at raw_events; retried with backoff).  `reason` is
-- the error message of the last attempt.
ALTER TABLE walpipe.dead_letters RENAME COLUMN failed_at TO first_failed_at;
ALTER TABLE walpipe.dead_letters
    ALTER COLUMN raw DROP NOT NULL,
    ADD COLUMN kind              TEXT        NOT NULL DEFAULT 'decode',
    ADD COLUMN event_id          BIGINT,                -- walpipe.raw_events (id, received_at)
    ADD COLUMN event_received_at TIMESTAMPTZ,
    ADD COLUMN event_type        TEXT,
    ADD COLUMN schema_name       TEXT,
    ADD COLUMN table_name        TEXT,
    ADD COLUMN attempt_count     INT         NOT NULL DEFAULT 1,
    ADD COLUMN last_failed_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    ADD COLUMN next_attempt_at   TIMESTAMPTZ,          -- next automatic retry; NULL = parked (only `walpipe dlq retry`)
    ADD CONSTRAINT dead_letters_kind CHECK (kind IN ('decode', 'apply')),
    ADD CONSTRAINT dead_letters_kind_fields CHECK ((kind = 'decode' AND raw IS NOT NULL)
                                                   OR (kind = 'apply' AND event_id IS NOT NULL));
CREATE UNIQUE INDEX dead_letters_event ON walpipe.dead_letters (event_id) WHERE kind = 'apply';
CREATE INDEX dead_letters_due ON walpipe.dead_letters (next_attempt_at) WHERE next_attempt_at IS NOT NULL;

-- A change's version as one number: commit LSN * 2^32 + seq.
CREATE FUNCTION walpipe.ver(lsn PG_LSN, seq INT) RETURNS NUMERIC
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ($1 - '0/0'::pg_lsn) * 4294967296 + $2 $$;

-- _walpipe_stale maps a column whose value is older than its row (an update
-- left it out as unchanged TOAST) to the version of that value.
-- True when column col is stale and older than the change (lsn, seq).
CREATE FUNCTION walpipe.stale_lt(stale JSONB, col TEXT, lsn PG_LSN, seq INT) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ($1 ->> $2)::numeric < walpipe.ver($3, $4) $$;

-- The stale map after a newer change wrote every column except absent; the
-- row's previous version was (lsn, seq).
CREATE FUNCTION walpipe.stale_keep(stale JSONB, absent TEXT[], lsn PG_LSN, seq INT) RETURNS JSONB
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT jsonb_object_agg(c, coalesce($1 -> c, to_jsonb(walpipe.ver($3, $4)))) FROM unnest($2) c $$;

-- The stale map after an older change (lsn, seq) filled the stale columns of
-- present that were older still.
CREATE FUNCTION walpipe.stale_fill(stale JSONB, present TEXT[], lsn PG_LSN, seq INT) RETURNS JSONB
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT jsonb_object_agg(key, CASE WHEN key = ANY($2) AND value::text::numeric < walpipe.ver($3, $4)
                                      THEN to_jsonb(walpipe.ver($3, $4)) ELSE value END)
    FROM jsonb_each($1)
$$;

-- 001_init.sql: walpipe's staging schema.
--
-- raw_events holds every captured change exactly once.  Exactly-once rests on
-- walpipe.checkpoints: walpipe updates a source's checkpoint row in the same
-- transaction as the raw_events rows it covers, and acknowledges an LSN to the
-- source only after that transaction commits.
CREATE SCHEMA IF NOT EXISTS walpipe;

CREATE TABLE walpipe.raw_events (
    id          BIGSERIAL,
    source      TEXT        NOT NULL,
    event_type  TEXT        NOT NULL
        CHECK (event_type IN ('insert', 'update', 'delete', 'truncate', 'message', 'snapshot')),
    payload     JSONB       NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),  -- when the row was written, not when its batch began
    processed   BOOLEAN     NOT NULL DEFAULT false,
    -- one id per staging transaction, set by walpipe with SET LOCAL walpipe.batch_id
    batch_id    UUID        DEFAULT nullif(current_setting('walpipe.batch_id', true), '')::uuid,
    lsn         PG_LSN,      -- commit end LSN of the source transaction (message end LSN for non-transactional messages)
    xid         BIGINT,
    commit_ts   TIMESTAMPTZ,
    seq         INT,         -- ordinal of the change within its transaction, from 1; 0 for non-transactional messages
    schema_name TEXT,
    table_name  TEXT,
    shape_id    BIGINT,      -- walpipe.table_schemas(source, shape_id): column names and types
    PRIMARY KEY (id, received_at)
) PARTITION BY RANGE (received_at);

-- Rows land here only if walpipe could not create the day's partition ahead of time.
CREATE TABLE walpipe.raw_events_default PARTITION OF walpipe.raw_events DEFAULT;

CREATE INDEX raw_events_unprocessed ON walpipe.raw_events (id) WHERE NOT processed;
CREATE INDEX raw_events_received_brin ON walpipe.raw_events USING brin (received_at);
CREATE INDEX raw_events_source_lsn ON walpipe.raw_events USING brin (source, lsn);

-- Creates the daily partitions of raw_events from today up to days_ahead days ahead.
CREATE FUNCTION walpipe.ensure_partitions(days_ahead INT) RETURNS INT
LANGUAGE plpgsql AS $$
DECLARE
    d DATE;
    created INT := 0;
    part TEXT;
BEGIN
    -- several sources' stagers call this at once; serialize them
    PERFORM pg_advisory_xact_lock(7745637466);
    FOR i IN 0..days_ahead LOOP
        d := (now() AT TIME ZONE 'UTC')::date + i;
        part := 'raw_events_' || to_char(d, 'YYYYMMDD');
        IF to_regclass('walpipe.' || quote_ident(part)) IS NULL THEN
            EXECUTE format('CREATE TABLE walpipe.%I PARTITION OF walpipe.raw_events FOR VALUES FROM (%L) TO (%L)',
                           part, (d::timestamp AT TIME ZONE 'UTC'), ((d + 1)::timestamp AT TIME ZONE 'UTC'));
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END
$$;

CREATE TABLE walpipe.table_schemas (
    source      TEXT        NOT NULL,
    shape_id    BIGINT      NOT NULL,
    schema_name TEXT        NOT NULL,
    table_name  TEXT        NOT NULL,
    columns     JSONB       NOT NULL,  -- [{"name":..,"type":..,"typeoid":N}, ...] in column order
    first_lsn   PG_LSN,
    first_seen  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (source, shape_id)
);

CREATE TABLE walpipe.checkpoints (
    source     TEXT PRIMARY KEY,
    slot       TEXT        NOT NULL,
    systemid   TEXT        NOT NULL,
    lsn        PG_LSN      NOT NULL,  -- every source transaction ending at or before this LSN is staged
    txn_end    PG_LSN,                -- a transaction partly staged: its commit end LSN ...
    txn_seq    INT,                   -- ... and the last of its changes (seq) already staged
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE walpipe.dead_letters (
    id         BIGSERIAL PRIMARY KEY,
    source     TEXT        NOT NULL,
    lsn        PG_LSN,               -- commit end LSN of the enclosing transaction, or the message LSN
    seq        INT,
    raw        BYTEA       NOT NULL, -- the message exactly as received, whole
    reason     TEXT        NOT NULL,
    failed_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

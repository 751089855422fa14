-- 012_sinks.sql: sinks (src/sink/): consumers of raw_events with their own durable position per source.
--
-- A sink reads one source's events in (lsn, seq, id) order: one stager per source commits in (lsn, seq)
-- order, and id breaks the one tie there is, the rows of the initial snapshot (all at the slot's consistent
-- point, seq 0).  Its position is the last event, in that order, its plugin reported durable downstream;
-- it only ever moves forward, and only over durable events (src/sink/sink.c).
CREATE TABLE walpipe.sink_positions (
    sink             TEXT        NOT NULL,
    source           TEXT        NOT NULL,
    lsn              PG_LSN      NOT NULL DEFAULT '0/0',  -- the last durable event's (lsn, seq, id) ...
    seq              INT         NOT NULL DEFAULT -2147483648,
    event_id         BIGINT      NOT NULL DEFAULT 0,      -- ... raw_events.id
    events_delivered BIGINT      NOT NULL DEFAULT 0,      -- events the sink passed (delivered or filtered out)
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (sink, source)
);

-- The ordered read "this source's events after (lsn, seq, id)" needs a btree on raw_events (source, lsn, seq,
-- id) (the BRIN on (source, lsn) cannot return rows in order).  Every staged row pays for it (10-20 % more of
-- the staging backend's CPU per row, README "Sinks"), so `walpipe init` creates it only for a configuration
-- with a [sink] section (src/base/migrate.c), as it does the optional GIN index; a sink waits for it.

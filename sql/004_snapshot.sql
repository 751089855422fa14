-- 004_snapshot.sql: initial and requested snapshots.
--
-- An initial snapshot copies, under the snapshot a new slot exported, every
-- row that existed before the slot's consistent point; streaming then starts
-- from that point, so no change is missed and none is applied twice.
-- Snapshot rows land in raw_events as event_type 'snapshot' with lsn = the
-- consistent point and seq = 0.

-- 'none': no snapshot taken (snapshot = never, or an adopted slot); 'in_progress':
-- copying; a crash here means the exported snapshot is gone and the copy starts
-- over (rows of the unfinished attempt are deleted first); 'done'.
ALTER TABLE walpipe.checkpoints
    ADD COLUMN snapshot_state TEXT NOT NULL DEFAULT 'none'
        CHECK (snapshot_state IN ('none', 'in_progress', 'done')),
    ADD COLUMN snapshot_lsn PG_LSN;

CREATE TABLE walpipe.snapshots (
    id          BIGSERIAL PRIMARY KEY,
    source      TEXT        NOT NULL,
    kind        TEXT        NOT NULL CHECK (kind IN ('initial', 'requested')),
    lsn         PG_LSN      NOT NULL,  -- consistent point of the slot that exported the snapshot
    state       TEXT        NOT NULL DEFAULT 'running'
        CHECK (state IN ('running', 'done', 'failed', 'superseded')),
    tables      TEXT[]      NOT NULL DEFAULT '{}',
    rows        BIGINT      NOT NULL DEFAULT 0,
    started_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ
);

-- One row per copied chunk (a ctid range of one table), committed with its rows.
CREATE TABLE walpipe.snapshot_chunks (
    snapshot_id BIGINT      NOT NULL REFERENCES walpipe.snapshots (id) ON DELETE CASCADE,
    schema_name TEXT        NOT NULL,
    table_name  TEXT        NOT NULL,
    chunk       INT         NOT NULL,
    rows        BIGINT      NOT NULL,
    done_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (snapshot_id, schema_name, table_name, chunk)
);

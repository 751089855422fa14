-- 011: what `walpipe status` reads without scanning raw_events: the commit time of the newest change each
-- source staged and how many events it staged (both written with the checkpoint, in the same transaction),
-- and a snapshot's estimated rows (pg_class.reltuples of its tables when it began) for its progress.
ALTER TABLE walpipe.checkpoints
    ADD COLUMN last_commit_ts TIMESTAMPTZ,        -- source commit time of the newest staged change
    ADD COLUMN staged_events  BIGINT NOT NULL DEFAULT 0;  -- streamed events staged since the checkpoint was created
ALTER TABLE walpipe.snapshots
    ADD COLUMN estimated_rows BIGINT;             -- NULL: not known (tables never analyzed)

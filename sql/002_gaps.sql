-- 002_gaps.sql: gaps an operator accepted with `walpipe run --accept-gap SOURCE`.
--
-- walpipe refuses to stream when staging's checkpoint and the source's slot
-- disagree in a way that means changes are missing from staging (slot ahead of
-- the checkpoint, slot dropped or recreated).  Accepting such a gap is an
-- explicit act and leaves this record, written in the same transaction that
-- moves the checkpoint over the gap.
CREATE TABLE walpipe.accepted_gaps (
    id          BIGSERIAL PRIMARY KEY,
    source      TEXT        NOT NULL,
    slot        TEXT        NOT NULL,
    from_lsn    PG_LSN      NOT NULL,  -- the checkpoint before: staging holds everything up to here
    to_lsn      PG_LSN      NOT NULL,  -- where streaming resumed: changes in between may be missing
    reason      TEXT        NOT NULL,
    accepted_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

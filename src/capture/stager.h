/*
 * stager.h: lands a source's segments in walpipe.raw_events, exactly once.
 *
 * One stager per source, with its own staging connection.  See stager.c for
 * the invariant that makes staging exactly-once.
 */
#ifndef WP_STAGER_H
#define WP_STAGER_H

#include "wp_setup.h"

#include "config.h"
#include "pipeline.h"

typedef struct wp_checkpoint {
    char slot[64];
    char systemid[32];
    wp_position_t pos;
    char snapshot_state[16]; /* none | in_progress | done */
} wp_checkpoint_t;

typedef struct wp_stager wp_stager_t;

/* Borrows config and source; they must outlive the stager. */
wp_stager_t *wp_stager_create(const wp_config_t *config, const wp_source_config_t *source);
void wp_stager_destroy(wp_stager_t *stager); /* NULL is a no-op */

/*
 * Connects to staging and checks that its schema is initialized.  Returns 0,
 * or -1 after logging why; *fatal is set when retrying cannot help (for
 * example the schema was never initialized with `walpipe init`).
 */
int wp_stager_open(wp_stager_t *stager, bool *fatal);
void wp_stager_close(wp_stager_t *stager);
bool wp_stager_is_open(const wp_stager_t *stager);

const char *wp_stager_source_name(const wp_stager_t *stager);

/* Returns 1 and fills *out if the source has a checkpoint, 0 if not, -1 on error (logged). */
int wp_stager_checkpoint_read(wp_stager_t *stager, wp_checkpoint_t *out);

/*
 * Records the first checkpoint of the source: its slot, the cluster's
 * systemid, the slot's start LSN, and whether an initial snapshot is being
 * copied ("in_progress") or none is taken ("none").
 */
int wp_stager_checkpoint_init(wp_stager_t *stager, const char *systemid, wp_lsn_t lsn, const char *snapshot_state);

/* Marks the initial snapshot copied: from now on the source streams. */
int wp_stager_snapshot_done(wp_stager_t *stager);

/* Deletes the rows of an initial snapshot that never finished and marks it superseded, in one transaction. */
int wp_stager_snapshot_discard(wp_stager_t *stager);

/* Records a snapshot (walpipe.snapshots) and returns its id. */
int wp_stager_snapshot_begin(wp_stager_t *stager, const char *kind, wp_lsn_t lsn, int64_t *id);
/* Records the rows a snapshot expects to copy (planner estimate; rows <= 0: unknown), for its progress. */
int wp_stager_snapshot_estimate(wp_stager_t *stager, int64_t id, int64_t rows);
int wp_stager_snapshot_finish(wp_stager_t *stager, int64_t id, const char *state, const char *tables_literal,
                              uint64_t rows);

/*
 * Ends a resync (a requested snapshot that staged a truncate at its
 * consistent point cp before each table's rows) in one transaction: records
 * the snapshot's end as done or failed; when done, resolves the open
 * divergences below cp of each of the n tables (schemas[i].tables[i]); when
 * failed, records a "manual" divergence at cp for each table whose truncate
 * committed (truncated[i]): its mirror misses rows until a resync completes.
 */
int wp_stager_resync_finish(wp_stager_t *stager, int64_t id, bool done, const char *tables_literal, uint64_t rows,
                            const char *const *schemas, const char *const *tables, const bool *truncated, size_t n,
                            wp_lsn_t cp);

/*
 * Snapshot copy, outside the streaming loop: adds a segment's rows to the open
 * staging transaction (opening it if needed), then commits them together with
 * the walpipe.snapshot_chunks row of the chunk they came from.  On error the
 * transaction is rolled back and the connection closed (wp_stager_open again).
 */
int wp_stager_add_segment(wp_stager_t *stager, wp_segment_t *segment);
int wp_stager_commit_chunk(wp_stager_t *stager, int64_t snapshot_id, const char *schema, const char *table, int chunk,
                           uint64_t rows);

/*
 * Moves the checkpoint from `from` to `to` over a gap the operator accepted
 * (--accept-gap), recording it in walpipe.accepted_gaps in the same transaction.
 */
int wp_stager_accept_gap(wp_stager_t *stager, wp_lsn_t from, wp_lsn_t to, const char *reason);

/*
 * Thread body.  Stages segments popped from queue, committing each batch
 * together with its checkpoint and then publishing the new durable position.
 * Returns 0 after committing a final segment, -1 on error (logged; the queue
 * is marked failed and the open staging transaction rolled back).
 */
int wp_stager_run(wp_stager_t *stager, wp_queue_t *queue);

#endif /* WP_STAGER_H */

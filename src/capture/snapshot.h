/*
 * snapshot.h: copy a source's existing rows into raw_events under an
 * exported snapshot, in parallel chunks.
 */
#ifndef WP_SNAPSHOT_H
#define WP_SNAPSHOT_H

#include "wp_setup.h"

#include "config.h"

typedef struct wp_snapshot_job {
    const wp_config_t *config;
    const wp_source_config_t *source;
    const char *snapshot_name;   /* exported by the slot's replication connection, which must stay idle */
    wp_lsn_t lsn;                /* the slot's consistent point: lsn of every snapshot row */
    const char *kind;            /* "initial" or "requested" */
    const wp_table_ref_t *tables; /* NULL: the source's `tables`, or every user table if that is unset too */
    size_t ntables;
    bool resync;                 /* a resync: truncate each table at (lsn, -1) first; see wp_snapshot_copy */
    int64_t *snapshot_id;        /* NULL, or receives the id of the snapshot in walpipe.snapshots */
} wp_snapshot_job_t;

/*
 * Copies the tables: every row becomes a raw_events row with event_type
 * 'snapshot', lsn = job->lsn, seq = 0, payload {"after": {...}} encoded by the
 * same rules as streamed inserts.  Each chunk (a ctid range of one table)
 * commits with its walpipe.snapshot_chunks row; a chunk whose staging
 * transaction fails is retried while the snapshot can still be imported.
 *
 * A resync (job->resync) also stages, in the transaction of each table's
 * first chunk, a 'truncate' event at (lsn, seq -1) with payload
 * {"snapshot": <id>}: ordered after every change older than the consistent
 * point and before the table's rows at (lsn, 0), it makes the mirror drop
 * the rows the source no longer has.  When every chunk has committed, the
 * table's open divergences below lsn are resolved with the snapshot's end
 * (stager.c, wp_stager_resync_finish).
 *
 * Returns 0, or -1 after logging why.
 */
int wp_snapshot_copy(const wp_snapshot_job_t *job, uint64_t *rows);

/*
 * `walpipe snapshot`: resyncs tables of a running source (resync.h) alongside
 * streaming.  Returns an exit code.
 */
int wp_snapshot_command(const wp_config_t *config, const char *source_name, const char *const *tables, int ntables);

#endif /* WP_SNAPSHOT_H */

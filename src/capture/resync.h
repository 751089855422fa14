/*
 * resync.h: make mirrors of source tables exactly equal to the source again,
 * while streaming goes on: on request (`walpipe snapshot`, `walpipe verify
 * --resync`) and by itself in `walpipe run` ([workers] resync = auto).
 */
#ifndef WP_RESYNC_H
#define WP_RESYNC_H

#include "wp_setup.h"

#include <walpipe/lsn.h>

#include "config.h"

/*
 * Resyncs n tables (schemas[i].tables[i], names as they are, unquoted) of
 * source in one snapshot; n = 0 means the source's `tables`, or all its
 * tables.  A temporary slot exports a snapshot at its consistent point cp;
 * each table's rows are staged at (cp, 0) after a truncate at (cp, -1), and
 * once every table is copied its divergences below cp are resolved
 * (snapshot.h).  Blocking; a partitioned table stands for its partitions.
 * Sets *cp_out (may be NULL) to cp.  Returns 0, or -1 (logged).
 */
int wp_resync_tables(const wp_config_t *config, const wp_source_config_t *source, char *const *schemas,
                     char *const *tables, size_t n, wp_lsn_t *cp_out);

typedef struct wp_resyncer wp_resyncer_t;

/*
 * `walpipe run`'s automatic resync (config->resync_auto): a thread that
 * wakes on NOTIFY walpipe_diverged and every few seconds, and resyncs the
 * tables of the configured sources that have open divergences (README,
 * "Resync").  Returns NULL when resync = off.  Borrows config.
 */
wp_resyncer_t *wp_resyncer_start(const wp_config_t *config);

/* Waits for the thread after a stop request (a resync in progress stops early) and frees it.  NULL is a no-op. */
void wp_resyncer_stop(wp_resyncer_t *resyncer);

#endif /* WP_RESYNC_H */

/*
 * rewrites.h: notice the source rewriting a captured table without row
 * changes in the WAL, and mark its mirror diverged (see rewrites.c).
 */
#ifndef WP_REWRITES_H
#define WP_REWRITES_H

#include "wp_setup.h"

#include <libpq-fe.h>

#include "config.h"

typedef struct wp_rewrites wp_rewrites_t;

/* The NOTIFY walpipe_discover payload that asks `walpipe run` to poll now (a worker met a newer shape). */
#define WP_REWRITES_POLL_NOW "storage"

/* State of the polls of config's sources (their plain connections, the changes waiting to be judged). */
wp_rewrites_t *wp_rewrites_create(const wp_config_t *config);
void wp_rewrites_destroy(wp_rewrites_t *r); /* NULL is a no-op */

/*
 * One poll of every source: reads pg_class for each table recorded in
 * walpipe.source_tables that can be mirrored, and records in staging (on
 * conn, in transactions of its own) what changed since the last poll: a
 * first sight (the baseline), a new relfilenode that a staged TRUNCATE of
 * the same transaction explains (nothing to report), a new relfilenode that
 * none explains (a "rewrite" divergence at the source's WAL position after
 * it), a new oid (dropped and created again: also a "rewrite" divergence).
 * A change is judged only once staging holds every transaction up to that
 * position.  Sets *rediscover when a table was created again (its key may
 * differ).  Returns 0, or -1 when a source or staging could not be asked
 * (logged; tried again at the next poll).
 */
int wp_rewrites_poll(wp_rewrites_t *r, PGconn *staging, bool *rediscover);

#endif /* WP_REWRITES_H */

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

const char *wp_stager_source_name(const wp_stager_t *stager);

/* Returns 1 and fills *out if the source has a checkpoint, 0 if not, -1 on error (logged). */
int wp_stager_checkpoint_read(wp_stager_t *stager, wp_checkpoint_t *out);

/* Records the first checkpoint of the source: its slot, the cluster's systemid, the slot's start LSN. */
int wp_stager_checkpoint_init(wp_stager_t *stager, const char *systemid, wp_lsn_t lsn);

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

/*
 * source.h: runs one configured source: reader + stager, reconnecting with
 * backoff until stopped or a fatal error.
 */
#ifndef WP_SOURCE_H
#define WP_SOURCE_H

#include "wp_setup.h"

#include "config.h"

typedef struct wp_source wp_source_t;

/*
 * Starts the source's thread.  Borrows config and source_config.  accept_gap:
 * the operator accepts (and walpipe records) a gap between staging's
 * checkpoint and the slot instead of refusing to start.
 */
wp_source_t *wp_source_start(const wp_config_t *config, const wp_source_config_t *source_config, bool accept_gap);

/* Waits for the thread to end; returns 0 if it stopped on request, -1 after a fatal error.  Frees the source. */
int wp_source_join(wp_source_t *source);

#endif /* WP_SOURCE_H */

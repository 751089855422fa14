/*
 * lagguard.h: `walpipe run`'s watch over its sources' slots and staging.
 *
 * Every second it probes each source and staging (probe.h), sets the gauges
 * that /metrics serves, and warns (log line and walpipe_lag_warning) while a
 * source's slot retains more WAL than max_lag_bytes, staging is more than
 * max_lag_seconds behind, confirmed_flush_lsn stands still for
 * max_stall_seconds while the source writes, or safe_wal_size falls below
 * min_safe_wal_size: early, before max_slot_wal_keep_size invalidates the slot.
 * From the same look it follows each source's catch-up after an outage
 * (catchup.h): logged every 10 s while catching up, and its gauges.
 */
#ifndef WP_LAGGUARD_H
#define WP_LAGGUARD_H

#include "wp_setup.h"

#include "config.h"

typedef struct wp_lagguard wp_lagguard_t;

/* Starts the guard thread; with_sources false watches staging only (`walpipe work`).  Borrows config. */
wp_lagguard_t *wp_lagguard_start(const wp_config_t *config, bool with_sources);

/* Asks the thread to end, joins it and frees it; NULL is a no-op. */
void wp_lagguard_stop(wp_lagguard_t *guard);

#endif /* WP_LAGGUARD_H */

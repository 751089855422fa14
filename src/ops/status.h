/*
 * status.h: `walpipe status`: how every source, consumer and staging is
 * doing, read only, whether or not `walpipe run` is running.
 */
#ifndef WP_STATUS_H
#define WP_STATUS_H

#include "wp_setup.h"

#include "config.h"

/*
 * Prints the status once (watch_seconds 0) or every watch_seconds until
 * SIGINT/SIGTERM; as a table, or as JSON (README "walpipe status --json").
 * Returns WP_EXIT_OK when staging and every source answered, WP_EXIT_FATAL
 * (1) when one did not (the rest is printed all the same).
 */
int wp_status_command(const wp_config_t *config, bool json, long watch_seconds);

#endif /* WP_STATUS_H */

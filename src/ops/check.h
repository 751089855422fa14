/*
 * check.h: `walpipe check`: the production checklist as a command (see
 * check.c): every source and staging, one line per check, pass / warn /
 * fail with the fix.
 */
#ifndef WP_CHECK_H
#define WP_CHECK_H

#include "wp_setup.h"

#include "config.h"

/*
 * Runs every check of every source of config and of its staging database,
 * read-only but for one temporary logical slot per source (the wal2json
 * probe, dropped at once), and prints one line per check and a summary on
 * stdout (json: one JSON object per line, then {"summary": ...}).  Returns
 * 0 when no check fails (warnings allowed), 1 otherwise.
 */
int wp_check_command(const wp_config_t *config, bool json);

#endif /* WP_CHECK_H */

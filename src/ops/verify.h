/*
 * verify.h: `walpipe verify`: compare each mirror table with its source table
 * by checksums over key ranges, at matching positions (see verify.c), and
 * optionally resync the tables that differ.
 */
#ifndef WP_VERIFY_H
#define WP_VERIFY_H

#include "wp_setup.h"

#include "config.h"

typedef struct wp_verify_opts {
    const char *source;          /* NULL: every configured source */
    const char *const *tables;   /* "schema.table" as on the command line (config syntax); NULL: all captured */
    int ntables;
    bool resync;                 /* record a divergence for each table that differs, resync it, verify again */
    long range_rows;             /* mirror rows per key range; default 10000 */
    long wait_seconds;           /* how long to wait for the mirror to reach a position; default 300 */
    bool json;                   /* one JSON object per line instead of text */
} wp_verify_opts_t;

/*
 * Runs the comparison, prints one line per table and a summary on stdout
 * (text, or with json one JSON object per line: each table, then {"summary": ...})
 * (progress goes to the log on stderr).  Returns 0 when every table compared
 * is equal, 1 when something differs, is missing or could not be compared,
 * 2 on a usage error (unknown source, a bad --table).
 */
int wp_verify_command(const wp_config_t *config, const wp_verify_opts_t *opts);

#endif /* WP_VERIFY_H */

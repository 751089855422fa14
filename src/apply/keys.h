/*
 * keys.h: key discovery: the columns that identify each captured table's
 * rows, from the source's catalog into walpipe.source_tables (see keys.c).
 */
#ifndef WP_KEYS_H
#define WP_KEYS_H

#include "wp_setup.h"

#include <libpq-fe.h>

#include "config.h"
#include "mem.h"

/*
 * Reads the key of every captured table of source from the source's catalog
 * (a plain connection, not replication) and records it in
 * walpipe.source_tables on staging.  Logs each table that cannot be mirrored
 * and why the first time it sees it (named is a per-process set of
 * "source\tschema\ttable" already named, owned by the caller).  Returns 0, or
 * -1 after logging why.
 */
int wp_keys_discover(const wp_source_config_t *source, PGconn *staging, wp_buf_t *named);

/*
 * The advisory lock key (int, int) that a `walpipe run` discovering keys
 * holds shared on its staging session while it listens for requests: a
 * worker that finds nobody holding it knows that no one will answer, and
 * does not wait (the mirror creation lock is (774563, 0)).
 */
#define WP_KEYS_DISCOVERY_LOCK "774563, 8"

/* A table a worker asked for (NOTIFY walpipe_discover): it has staged changes and no key recorded. */
typedef struct wp_keys_request {
    const char *schema;
    const char *table;
} wp_keys_request_t;

/*
 * wp_keys_discover, also reading the requested tables req[0..nreq) (even
 * where `tables` does not list them: their changes are staged); only those
 * when only is set (cheap whatever the size of the catalog).  A requested
 * table that the source's catalog does not hold is recorded as gone (a
 * problem: dropped or renamed before walpipe read its key), unless a row
 * from when it existed is recorded already.
 */
int wp_keys_discover_tables(const wp_source_config_t *source, PGconn *staging, wp_buf_t *named,
                            const wp_keys_request_t *req, size_t nreq, bool only);

/*
 * The read half of wp_keys_discover, for `walpipe check`: runs the same
 * catalog query on conn (a plain connection to source, client_encoding
 * UTF8) and writes nothing.  Returns the result, one row per captured table
 * in name order: schema, table, replica identity (default, index, full,
 * nothing), the key columns the mirror would use as JSON [{name, type,
 * typeoid}] (NULL: no usable key), the NOT NULL columns; the caller
 * PQclears it.  NULL after logging why.
 */
PGresult *wp_keys_read(PGconn *conn, const wp_source_config_t *source);

/* Why a table of that replica identity, with or without a usable key, cannot be mirrored; NULL when it can. */
const char *wp_keys_problem(const char *identity, bool has_key);

#endif /* WP_KEYS_H */

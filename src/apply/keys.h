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

#endif /* WP_KEYS_H */

/*
 * columns.h: the source column catalog: what each captured table's columns
 * are by attnum, from the source's catalog into walpipe.source_columns (see
 * columns.c).
 */
#ifndef WP_COLUMNS_H
#define WP_COLUMNS_H

#include "wp_setup.h"

#include <libpq-fe.h>

#include "config.h"
#include "keys.h"

/*
 * Reads the columns of every captured table of source from the source's
 * catalog (a plain connection, not replication): attnum, name, type,
 * dropped, and the value rows read for a column added with a constant
 * DEFAULT (attmissingval), with the source's WAL position taken before the
 * read; and replaces the source's rows of walpipe.source_columns on staging
 * with them in one transaction.  Returns 0, or -1 after logging why.
 */
int wp_columns_discover(const wp_source_config_t *source, PGconn *staging);

/*
 * wp_columns_discover, also reading the requested tables req[0..nreq) (the
 * tables workers asked for: see keys.h); only those when only is set (then
 * only their rows are replaced: cheap whatever the size of the catalog).
 */
int wp_columns_discover_tables(const wp_source_config_t *source, PGconn *staging, const wp_keys_request_t *req,
                               size_t nreq, bool only);

#endif /* WP_COLUMNS_H */

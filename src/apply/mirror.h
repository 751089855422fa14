/*
 * mirror.h: the mirror transform: one table in the mirror schema per captured
 * source table, kept equal to the source by applying staged events.
 *
 * This module owns the SQL: the mirror registry (walpipe.mirrors), creating
 * and altering mirror tables and the statements that apply one change.
 * applier.c decides when to run them; see mirror.c for why applying them in
 * any order, any number of times, converges to the source's state.
 */
#ifndef WP_MIRROR_H
#define WP_MIRROR_H

#include "wp_setup.h"

#include <libpq-fe.h>

#include <walpipe/lsn.h>

#include "config.h"
#include "mem.h"
#include "shape.h"

/* ---------------------------------------------------------------- mirrors */

/* Why an event could not be applied, which decides what happens to it. */
typedef enum wp_fail {
    WP_FAIL_NONE = 0,
    WP_FAIL_RETRY,     /* dead-letter it; retry with backoff */
    WP_FAIL_PARK,      /* dead-letter it; retrying cannot help until someone fixes the cause */
    WP_FAIL_NO_KEY,    /* the table's key is not discovered yet: ask `walpipe run`, then retry */
    WP_FAIL_TRANSIENT, /* deadlock, lost connection: roll back the claim and claim again */
    WP_FAIL_DEFER,     /* must wait for older changes: dead-letter it, retry with backoff, never park */
    WP_FAIL_NO_COLUMNS, /* the source's column catalog is older than a column the mirror adds: ask `walpipe run`
                           to read it (walpipe.source_columns), then retry */
} wp_fail_t;

/* One column of a mirror table, as the mirror's catalog says. */
typedef struct wp_mcol {
    char *name;
    char *qname;     /* quoted identifier */
    char *lit;       /* the name as a quoted SQL literal */
    char *type;      /* format_type(atttypid, atttypmod) */
    unsigned typoid; /* parameter type of values for this column */
    bool is_key;
    bool src_not_null; /* NOT NULL on the source (walpipe.source_tables) */
    int attnum;        /* the source column's attnum (walpipe.mirrors.column_attnums); -1 when not known */
    bool has_default;  /* the mirror column has a DEFAULT: the source's missing value (mirror.c) */
} wp_mcol_t;

typedef struct wp_mirror {
    int id;
    int generation;
    char *source, *schema, *table; /* the source table */
    char *qmirror;                 /* "mirror_schema"."mirror_table" */
    char *qtomb;                   /* walpipe."tombstones_<id>" */
    wp_lsn_t shape_lsn;            /* first_lsn of the newest shape the columns follow */
    wp_mcol_t *cols;               /* user columns in attnum order (no _walpipe_*) */
    size_t ncols;
    size_t *keys; /* indexes into cols, in key order */
    size_t nkeys;
} wp_mirror_t;

/*
 * Loads the mirror of source.schema.table from walpipe.mirrors and the
 * catalog, creating it (registry row, mirror table, tombstone table) when it
 * does not exist yet.  shape, when not NULL, gives the columns to create it
 * with (shape_full: an insert's, which lists every column; an update's may
 * leave unchanged TOAST columns out, and the columns older shapes have are
 * added); otherwise it starts with the key columns alone.  Returns the mirror,
 * or NULL with *fail and err set.  Runs inside the caller's transaction.
 *
 * A column that older shapes of the table lack was added to the source
 * while rows existed: it gets the value those rows read
 * (walpipe.source_columns) as its DEFAULT.  When the catalog was not read
 * since the column appeared, this fails with WP_FAIL_NO_COLUMNS, unless
 * catalog_waited (the caller asked for a read and waited already): then the
 * column gets no default and the mirror is recorded as diverged.
 */
wp_mirror_t *wp_mirror_open(PGconn *conn, const wp_config_t *config, const char *source, const char *schema,
                            const char *table, const wp_tshape_t *shape, bool shape_full, bool catalog_waited,
                            wp_fail_t *fail, char *err, size_t errlen);

/* Re-reads the mirror's columns from the catalog.  Returns 0 or -1 (err set). */
int wp_mirror_reload(PGconn *conn, wp_mirror_t *m, char *err, size_t errlen);

void wp_mirror_destroy(wp_mirror_t *m);

/*
 * Brings the mirror's columns to shape when shape is newer than the one they
 * follow.  Columns are matched by attnum where both sides know it, else by
 * name: a known attnum under a new name is renamed (key columns too, with
 * the tombstone table and the registry), a new attnum is added (with the
 * value existing rows read, as for wp_mirror_open; catalog_waited likewise),
 * a changed type is altered, and (full: the shape is an insert's, not an
 * update's that may leave TOAST columns out) a column the source no longer
 * has is dropped.  A name taken by a new column from one that is neither
 * dropped nor known (a non-full shape) is freed by renaming that one to
 * "_walpipe_att<attnum>" until a later shape says.  Sets *changed when it
 * altered the table or the registry.  Returns 0, or -1 with *fail and err set.
 */
int wp_mirror_follow(PGconn *conn, wp_mirror_t *m, const wp_tshape_t *shape, bool full, bool catalog_waited,
                     bool *changed, wp_fail_t *fail, char *err, size_t errlen);

/* Applies a TRUNCATE at version (lsn, seq).  Returns 0, or -1 with *fail and err set. */
int wp_mirror_truncate(PGconn *conn, wp_mirror_t *m, wp_lsn_t lsn, int seq, wp_fail_t *fail, char *err,
                       size_t errlen);

/*
 * Statement texts and parameter types.  Every statement takes its row values
 * first (one text parameter per column, typed as the column), then the
 * change's version: $n pg_lsn, $n+1 int4.
 *
 * upsert: writes the row image at the version.  absent[i] marks columns the
 *   change left out (unchanged TOAST): they keep the mirror's value.
 *   Parameters: one per column not absent, in column order.
 * delete: records the tombstone and locks or reserves the key (statement 1),
 *   then removes the row if it is not newer (statement 2).  Parameters: keys.
 * read: the current values of the absent columns, by key (a key change must
 *   carry them to the new key).  Parameters: keys, no version.
 * sweep: removes rows this transaction wrote that a concurrently committed
 *   tombstone makes dead.  Parameters: one text[] per key column, no version.
 */
void wp_mirror_sql_upsert(const wp_mirror_t *m, const bool *absent, wp_buf_t *sql, unsigned *types, int *ntypes);
void wp_mirror_sql_delete(const wp_mirror_t *m, int which, wp_buf_t *sql, unsigned *types, int *ntypes);
void wp_mirror_sql_read(const wp_mirror_t *m, const bool *absent, wp_buf_t *sql, unsigned *types, int *ntypes);
void wp_mirror_sql_sweep(const wp_mirror_t *m, wp_buf_t *sql, unsigned *types, int *ntypes);

/*
 * pending: whether an older change of the key (as old or new key) is not
 * applied yet: still unprocessed, or in the dead-letter queue.  Parameters:
 * $1 source, $2 version lsn, $3 version seq, then the key values (text).
 */
void wp_mirror_sql_pending(const wp_mirror_t *m, wp_buf_t *sql);

/* Sorts err into a wp_fail_t by SQLSTATE (40001, 40P01, 55P03, connection → TRANSIENT; else RETRY). */
wp_fail_t wp_mirror_classify(const PGresult *res, PGconn *conn);

#endif /* WP_MIRROR_H */

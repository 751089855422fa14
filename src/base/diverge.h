/*
 * diverge.h: the record of mirrors that missed changes (walpipe.divergences).
 *
 * Whoever learns that a mirror table has missed, or may have missed, a
 * change of its source table records it here: the stager (wal2json dropped
 * an UPDATE/DELETE), key discovery (the source rewrote a table), the dead-
 * letter queue (an event parked), `walpipe verify` (rows differ), an
 * operator.  A resync whose consistent point is past the divergence's LSN
 * resolves it.  A mirror is "diverged" while it has an open row.
 */
#ifndef WP_DIVERGE_H
#define WP_DIVERGE_H

#include "wp_setup.h"

#include <libpq-fe.h>

#include <walpipe/lsn.h>

/* Kinds, as walpipe.divergences.kind holds them (sql/007_divergences.sql). */
#define WP_DIVERGE_DROPPED_CHANGE "dropped_change" /* wal2json dropped an UPDATE/DELETE (no replica identity) */
#define WP_DIVERGE_REWRITE "rewrite"               /* the source rewrote the table without row changes in the WAL */
#define WP_DIVERGE_PARKED "parked"                 /* an event was parked for what it carries: a resync repairs it */
#define WP_DIVERGE_APPLY_FAILED "apply_failed"     /* an event failed max_attempts times on the mirror's own SQL:
                                                      fix the mirror, `walpipe dlq retry` (a resync would fail alike) */
#define WP_DIVERGE_VERIFY "verify"                 /* `walpipe verify` found rows that differ */
#define WP_DIVERGE_MANUAL "manual"                 /* an operator asked for a resync */

/*
 * Records, on conn and inside the caller's transaction if one is open, that
 * the mirror of source.schema.table diverged at lsn (WP_LSN_INVALID: not
 * known) for reason (UTF-8; cut to 1000 bytes on a character boundary).  The
 * same (table, kind, lsn) while still open is one row: recording it again
 * changes nothing and logs nothing.  A new divergence is logged once as a
 * WARNING here, and sends NOTIFY walpipe_diverged (payload: the source) at
 * the caller's commit, which wakes `walpipe run`'s automatic resync.  Every value is passed as a parameter.  Returns 1 when a new
 * row was recorded, 0 when it was already open, -1 on error (logged; the
 * caller's transaction is then aborted).
 */
int wp_diverge_record(PGconn *conn, const char *source, const char *schema, const char *table, const char *kind,
                      wp_lsn_t lsn, const char *reason);

/*
 * Resolves the open divergences of source.schema.table whose lsn is below
 * upto (a resync's consistent point; every change at or below it is in the
 * resync's copy), naming by (UTF-8) as what resolved them.  Returns the
 * number resolved, or -1 on error (logged).
 */
int wp_diverge_resolve(PGconn *conn, const char *source, const char *schema, const char *table, wp_lsn_t upto,
                       const char *by);

/*
 * Sets *n to the number of diverged mirrors (tables with an open
 * divergence), read from the open-divergence index.  Returns 0, or -1
 * (logged).
 */
int wp_diverge_count_open(PGconn *conn, long long *n);

#endif /* WP_DIVERGE_H */

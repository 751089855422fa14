/*
 * diverge.c: the record of mirrors that missed changes (walpipe.divergences).
 *
 * Job: one INSERT ... ON CONFLICT DO NOTHING per report (and a NOTIFY
 * walpipe_diverged, payload the source, when it is new), one UPDATE per
 * resolution, on the caller's connection and in its transaction, so that a
 * divergence commits with whatever revealed it (the stager's batch, a
 * claim's dead letters) or not at all.
 *
 * Invariant: a mirror with a missed change that walpipe knows of has an open
 * row, logged once when it first appears; every value is a parameter and
 * every text valid UTF-8 (the reason is scrubbed and cut on a character
 * boundary).
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "diverge.h"
#include "log.h"
#include "mem.h"
#include "utf8.h"

#define REASON_MAX 1000

int wp_diverge_record(PGconn *conn, const char *source, const char *schema, const char *table, const char *kind,
                      wp_lsn_t lsn, const char *reason)
{
    char lsnbuf[WP_LSN_STRLEN];
    size_t len = strlen(reason);
    char *why = wp_strdup(reason);
    int rc = -1;

    wp_utf8_scrub(why, true);
    why[wp_utf8_clip(why, len, REASON_MAX)] = '\0';
    wp_lsn_format(lsn, lsnbuf);

    const char *params[] = {source, schema, table, kind, lsnbuf, why};
    PGresult *res = PQexecParams(conn,
                                 "INSERT INTO walpipe.divergences (source, schema_name, table_name, kind, lsn, reason) "
                                 "VALUES ($1, $2, $3, $4, $5, $6) "
                                 "ON CONFLICT (source, schema_name, table_name, kind, lsn) WHERE resolved_at IS NULL "
                                 "DO NOTHING",
                                 6, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        wp_error("[diverge] could not record that the mirror of \"%s\".\"%s\" of source \"%s\" diverged: %s", schema,
                 table, source, PQerrorMessage(conn));
        goto out;
    }
    rc = strcmp(PQcmdTuples(res), "1") == 0 ? 1 : 0;
    if (rc == 1) {
        /* wakes `walpipe run`'s automatic resync when the caller's transaction commits */
        PQclear(res);
        const char *p1[] = {source};
        res = PQexecParams(conn, "SELECT pg_notify('walpipe_diverged', $1)", 1, NULL, p1, NULL, NULL, 0);
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            wp_error("[diverge] could not notify that the mirror of \"%s\".\"%s\" of source \"%s\" diverged: %s",
                     schema, table, source, PQerrorMessage(conn));
            rc = -1;
            goto out;
        }
        wp_warn("[diverge] the mirror of \"%s\".\"%s\" of source \"%s\" has diverged from its source (%s at %s): %s; "
                "it stays marked in walpipe.divergences until a resync at a later position",
                schema, table, source, kind, lsn == WP_LSN_INVALID ? "an unknown position" : lsnbuf, why);
    }
out:
    PQclear(res);
    free(why);
    return rc;
}

int wp_diverge_resolve(PGconn *conn, const char *source, const char *schema, const char *table, wp_lsn_t upto,
                       const char *by)
{
    char lsnbuf[WP_LSN_STRLEN];
    char *what = wp_strdup(by);
    int rc = -1;

    wp_utf8_scrub(what, true);
    wp_lsn_format(upto, lsnbuf);

    const char *params[] = {source, schema, table, lsnbuf, what};
    PGresult *res = PQexecParams(conn,
                                 "UPDATE walpipe.divergences SET resolved_at = now(), resolved_by = $5 "
                                 "WHERE source = $1 AND schema_name = $2 AND table_name = $3 AND resolved_at IS NULL "
                                 "AND lsn < $4::pg_lsn",
                                 5, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        wp_error("[diverge] could not mark the divergences of \"%s\".\"%s\" of source \"%s\" resolved: %s", schema,
                 table, source, PQerrorMessage(conn));
        goto out;
    }
    rc = atoi(PQcmdTuples(res));
    if (rc > 0)
        wp_info("[diverge] the mirror of \"%s\".\"%s\" of source \"%s\" is resynced: %d divergence(s) resolved by %s",
                schema, table, source, rc, what);
out:
    PQclear(res);
    free(what);
    return rc;
}

int wp_diverge_count_open(PGconn *conn, long long *n)
{
    PGresult *res = PQexec(conn, "SELECT count(*) FROM (SELECT DISTINCT source, schema_name, table_name "
                                 "FROM walpipe.divergences WHERE resolved_at IS NULL) d");
    int rc = -1;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_error("[diverge] could not count the diverged mirrors: %s", PQerrorMessage(conn));
        goto out;
    }
    *n = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    rc = 0;
out:
    PQclear(res);
    return rc;
}

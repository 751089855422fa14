/*
 * dlq.c: the dead-letter queue of events the mirror could not apply.
 *
 * Job: record a failed event (in the worker's claim transaction, next to
 * marking it processed), retry due ones with exponential backoff, and the
 * `walpipe dlq list | retry | drop` commands.
 *
 * Design: one table, walpipe.dead_letters, for both kinds of failure.  The
 * stager's rows (kind 'decode') are stream messages that never became events;
 * the workers' rows (kind 'apply') point at their raw_events row by
 * (event_id, event_received_at), which stays processed = true so that no
 * claim picks it up again: the dead letter, not the raw event, drives its
 * retries.  One table gives one number to watch and one command to manage.
 * Retrying is safe at any time and in any order, because applying is
 * idempotent and order-safe (mirror.c): a retried old event never
 * overwrites what newer ones wrote.
 *
 * Invariant: a failed event always has exactly one apply dead letter
 * (unique on event_id), and attempt_count counts every failed attempt.  It
 * is retried automatically while attempt_count < max_attempts and the
 * failure is not one retrying cannot fix (a table without a key, a lost NaN):
 * those are parked at once (next_attempt_at NULL).  A deferred event (one
 * that must wait for older changes, see worker.c) is retried until it
 * applies, at most 5 s apart, and never parked.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "diverge.h"
#include "dlq.h"
#include "log.h"
#include "metrics.h"
#include "pg.h"

#define RETRY_CHUNK 100
#define MAX_BACKOFF_MS "86400000"
#define DEFER_MAX_MS "5000"

int wp_dlq_record(PGconn *conn, const wp_config_t *config, const wp_event_t *ev)
{
    char id[24], max[16], backoff[16];
    snprintf(id, sizeof id, "%lld", (long long)ev->id);
    snprintf(max, sizeof max, "%d", config->max_attempts);
    snprintf(backoff, sizeof backoff, "%d", config->retry_backoff_ms);
    const char *params[] = {ev->source, ev->lsn_text,  ev->seq_text, id,        ev->received_at, ev->type,
                            ev->schema, ev->table,     ev->error,    ev->fail == WP_FAIL_PARK ? "park" : ev->fail == WP_FAIL_DEFER ? "defer" : "retry",
                            max,        backoff};
    PGresult *res = PQexecParams(
        conn,
        "INSERT INTO walpipe.dead_letters AS d (kind, source, lsn, seq, event_id, event_received_at, event_type, "
        "schema_name, table_name, reason, next_attempt_at) "
        "VALUES ('apply', $1, $2, $3, $4, $5, $6, $7, $8, $9, "
        "        CASE WHEN $10::text = 'park' OR ($10::text = 'retry' AND $11::int <= 1) THEN NULL "
        "             ELSE now() + $12::int * interval '1 ms' END) "
        "ON CONFLICT (event_id) WHERE kind = 'apply' DO UPDATE SET reason = excluded.reason, "
        "  attempt_count = d.attempt_count + 1, last_failed_at = now(), "
        "  next_attempt_at = CASE WHEN $10::text = 'park' OR ($10::text = 'retry' AND d.attempt_count + 1 >= $11::int) THEN NULL "
        "    WHEN $10::text = 'defer' THEN now() + least($12::float8 * power(2, d.attempt_count), " DEFER_MAX_MS ") * "
        "interval '1 ms' "
        "    ELSE now() + least($12::float8 * power(2, d.attempt_count), " MAX_BACKOFF_MS ") * interval '1 ms' END "
        "RETURNING d.next_attempt_at IS NULL, d.attempt_count, "
        "  EXISTS (SELECT 1 FROM walpipe.mirrors m WHERE (m.source, m.schema_name, m.table_name) = ($1, $7, $8))",
        12, NULL, params, NULL, NULL, 0);
    int rc = -1;
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        wp_error("staging: could not record a dead letter: %s", PQerrorMessage(conn));
        goto out;
    }
    /*
     * A parked event is a change its mirror has missed until someone acts:
     * the mirror is marked diverged, in this transaction.  A table that has no
     * mirror (it cannot be mirrored: no key, or gone) is no mirror to mark.
     * Parked at once (WP_FAIL_PARK) is for what the event carries, which a
     * resync repairs; parked after max_attempts is an error of the mirror's
     * own SQL, which a resync would meet again (kind apply_failed, not
     * resynced automatically).
     */
    if (ev->schema && ev->table && PQgetvalue(res, 0, 0)[0] == 't' && PQgetvalue(res, 0, 2)[0] == 't' &&
        wp_diverge_record(conn, ev->source, ev->schema, ev->table,
                          ev->fail == WP_FAIL_PARK ? WP_DIVERGE_PARKED : WP_DIVERGE_APPLY_FAILED, ev->lsn, ev->error) < 0)
        goto out;
    rc = 0;
    if (ev->fail == WP_FAIL_DEFER && atoi(PQgetvalue(res, 0, 1)) > 1)
        wp_debug("event %lld deferred again: %s", (long long)ev->id, ev->error); /* said once at info */
    else if (ev->fail == WP_FAIL_DEFER)
        wp_info("event %lld (%s on \"%s\".\"%s\" of source \"%s\") deferred: %s", (long long)ev->id, ev->type,
                ev->schema ? ev->schema : "", ev->table ? ev->table : "", ev->source, ev->error);
    else
        wp_warn("event %lld (%s on \"%s\".\"%s\" of source \"%s\") could not be applied%s: %s", (long long)ev->id,
                ev->type, ev->schema ? ev->schema : "", ev->table ? ev->table : "", ev->source,
                ev->fail == WP_FAIL_PARK ? " and is parked" : "", ev->error);
out:
    PQclear(res);
    return rc;
}

/* A text[] literal of column col of every row of res (cast by the query to the column's type). */
static void column_array(const PGresult *res, int col, wp_buf_t *out)
{
    int n = PQntuples(res);
    const char **items = wp_calloc((size_t)n + 1, sizeof *items);
    for (int r = 0; r < n; r++)
        items[r] = PQgetvalue(res, r, col);
    wp_pg_text_array(out, items, (size_t)n);
    free(items);
}

/*
 * Applies the events of the dead letters in dl (columns: id, event_id,
 * event_received_at) inside the open transaction, then deletes the dead
 * letters that applied and records another attempt for the others.
 * Returns how many applied (>= 0), or -1 (transient: roll back).  verbose
 * prints each outcome to stdout.
 */
static int retry_rows(wp_applier_t *a, PGconn *conn, const wp_config_t *config, const PGresult *dl, bool verbose,
                      int *still_failing)
{
    wp_buf_t ids = WP_BUF_INIT, ats = WP_BUF_INIT;
    int rc = -1, applied = 0;
    wp_event_t *events = wp_calloc((size_t)PQntuples(dl) + 1, sizeof *events);
    column_array(dl, 1, &ids);
    column_array(dl, 2, &ats);
    const char *params[] = {ids.data, ats.data};
    PGresult *res = PQexecParams(conn,
                                 "SELECT " WP_EVENT_COLUMNS " FROM walpipe.raw_events "
                                 "WHERE (id, received_at) IN (SELECT * FROM unnest($1::bigint[], $2::timestamptz[]))",
                                 2, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_warn("staging: could not read the events of dead letters: %s", PQerrorMessage(conn));
        goto out;
    }
    size_t n = wp_events_from_result(res, events);
    /* a retry never waits for a key: a table still without one stays deferred, and is asked for at commit */
    bool could_wait = wp_applier_may_wait_keys(a, false);
    int arc = wp_applier_apply(a, events, n);
    wp_applier_may_wait_keys(a, could_wait);
    if (arc != 0 || wp_applier_request_keys(a) != 0)
        goto out;
    for (int r = 0; r < PQntuples(dl); r++) {
        long long event_id = strtoll(PQgetvalue(dl, r, 1), NULL, 10);
        const char *dlid = PQgetvalue(dl, r, 0);
        wp_event_t *ev = NULL;
        for (size_t i = 0; i < n && ev == NULL; i++)
            if (events[i].id == event_id)
                ev = &events[i];
        const char *p1[] = {dlid};
        PGresult *u;
        if (ev == NULL) {
            u = PQexecParams(conn,
                             "UPDATE walpipe.dead_letters SET attempt_count = attempt_count + 1, last_failed_at = "
                             "now(), next_attempt_at = NULL, reason = 'its raw event is gone from walpipe.raw_events "
                             "(partition dropped?); hint: re-snapshot the table, then drop this dead letter' "
                             "WHERE id = $1",
                             1, NULL, p1, NULL, NULL, 0);
            if (verbose)
                printf("dead letter %s (event %lld): its raw event is gone from walpipe.raw_events; parked\n", dlid,
                       event_id);
            ++*still_failing;
        } else if (ev->fail == WP_FAIL_NONE) {
            /*
             * Applied: the dead letter goes, and so does the divergence its
             * parking recorded, unless another parked event of the table at
             * that position still holds it.
             */
            u = PQexecParams(conn,
                             "WITH gone AS (DELETE FROM walpipe.dead_letters WHERE id = $1 RETURNING id, source, "
                             "schema_name, table_name, lsn) "
                             "UPDATE walpipe.divergences v SET resolved_at = now(), resolved_by = 'walpipe dlq retry "
                             "applied the parked event' FROM gone g WHERE v.resolved_at IS NULL AND v.kind IN ('parked', 'apply_failed') "
                             "AND (v.source, v.schema_name, v.table_name, v.lsn) = (g.source, g.schema_name, "
                             "g.table_name, g.lsn) AND NOT EXISTS (SELECT 1 FROM walpipe.dead_letters d WHERE d.kind = "
                             "'apply' AND d.next_attempt_at IS NULL AND d.id <> g.id AND (d.source, d.schema_name, "
                             "d.table_name, d.lsn) = (g.source, g.schema_name, g.table_name, g.lsn))",
                             1, NULL, p1, NULL, NULL, 0);
            wp_info("dead letter %s: event %lld applied on retry", dlid, event_id);
            if (verbose)
                printf("dead letter %s (event %lld): applied\n", dlid, event_id);
            applied++;
        } else {
            if (wp_dlq_record(conn, config, ev) != 0)
                goto out;
            u = NULL;
            if (verbose)
                printf("dead letter %s (event %lld): still failing: %s\n", dlid, event_id, ev->error);
            ++*still_failing;
        }
        if (u != NULL) {
            bool ok = PQresultStatus(u) == PGRES_COMMAND_OK;
            if (!ok)
                wp_warn("staging: could not update dead letter %s: %s", dlid, PQerrorMessage(conn));
            PQclear(u);
            if (!ok)
                goto out;
        }
    }
    rc = applied;
out:
    PQclear(res);
    free(events);
    wp_buf_free(&ids);
    wp_buf_free(&ats);
    return rc;
}

int wp_dlq_retry_due(wp_applier_t *a, PGconn *conn, const wp_config_t *config)
{
    int rc = -1, failing = 0;
    if (wp_pg_exec(conn, "staging", "BEGIN", "begin a retry") != 0)
        return -1;
    PGresult *dl = PQexec(conn, "SELECT id, event_id, event_received_at::text FROM walpipe.dead_letters "
                                "WHERE next_attempt_at <= now() ORDER BY next_attempt_at LIMIT 100 "
                                "FOR UPDATE SKIP LOCKED");
    if (PQresultStatus(dl) != PGRES_TUPLES_OK) {
        wp_warn("staging: could not read due dead letters: %s", PQerrorMessage(conn));
        goto out;
    }
    if (PQntuples(dl) == 0) {
        rc = 0;
        goto out;
    }
    int r = retry_rows(a, conn, config, dl, false, &failing);
    if (r < 0)
        goto out;
    rc = PQntuples(dl);
out:
    PQclear(dl);
    if (rc < 0 || wp_pg_exec(conn, "staging", "COMMIT", "commit a retry") != 0) {
        if (PQstatus(conn) == CONNECTION_OK)
            PQclear(PQexec(conn, "ROLLBACK"));
        wp_applier_reset(a);
        return -1;
    }
    if (rc > 0)
        wp_metric_add(wp_metric(WP_METRIC_COUNTER, "walpipe_dead_letter_retries_total",
                                "Automatic retries of dead letters (each due one retried once)", NULL),
                      rc);
    return rc;
}

int wp_dlq_counts(PGconn *conn, long long *waiting, long long *parked, long long *undecodable)
{
    PGresult *res = PQexec(conn, "SELECT count(*) FILTER (WHERE kind = 'apply' AND next_attempt_at IS NOT NULL), "
                                 "count(*) FILTER (WHERE kind = 'apply' AND next_attempt_at IS NULL), "
                                 "count(*) FILTER (WHERE kind = 'decode') FROM walpipe.dead_letters");
    int rc = -1;
    if (PQresultStatus(res) == PGRES_TUPLES_OK) {
        *waiting = atoll(PQgetvalue(res, 0, 0));
        *parked = atoll(PQgetvalue(res, 0, 1));
        *undecodable = atoll(PQgetvalue(res, 0, 2));
        rc = 0;
    }
    PQclear(res);
    return rc;
}

/* ---------------------------------------------------------------- commands */

static PGconn *command_connect(const wp_config_t *config)
{
    PGconn *conn = NULL;
    if (wp_pg_connect_staging(config, "walpipe_dlq", NULL, true, &conn) != WP_STAGING_OK)
        return NULL;
    if (wp_applier_session(conn) != 0) {
        PQfinish(conn);
        return NULL;
    }
    return conn;
}

/* Reports the ids given with --id that match no dead letter; returns how many. */
static int report_unknown(PGconn *conn, const char *idlit)
{
    const char *params[] = {idlit};
    PGresult *res = PQexecParams(conn,
                                 "SELECT i FROM unnest($1::bigint[]) i WHERE NOT EXISTS "
                                 "(SELECT 1 FROM walpipe.dead_letters d WHERE d.id = i) ORDER BY i",
                                 1, NULL, params, NULL, NULL, 0);
    int n = 0;
    if (PQresultStatus(res) == PGRES_TUPLES_OK) {
        n = PQntuples(res);
        for (int r = 0; r < n; r++)
            fprintf(stderr, "walpipe: dead letter %s does not exist; see `walpipe dlq list`\n", PQgetvalue(res, r, 0));
    }
    PQclear(res);
    return n;
}

static int cmd_list(PGconn *conn, const char *idlit)
{
    const char *params[] = {idlit};
    PGresult *res = PQexecParams(
        conn,
        "SELECT id, kind, source, coalesce(quote_ident(schema_name) || '.' || quote_ident(table_name), '-'), "
        "coalesce(event_id::text, '-'), coalesce(event_type, '-'), coalesce(lsn::text, '-'), coalesce(seq::text, '-'), "
        "attempt_count, to_char(first_failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "
        "to_char(last_failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "
        "CASE WHEN kind = 'decode' THEN 'never' WHEN next_attempt_at IS NULL THEN 'parked' "
        "     ELSE to_char(next_attempt_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') END, "
        "replace(replace(reason, E'\\n', ' '), E'\\t', ' ') "
        "FROM walpipe.dead_letters WHERE $1::bigint[] IS NULL OR id = ANY ($1) ORDER BY id",
        1, NULL, params, NULL, NULL, 0);
    long long waiting = 0, parked = 0, undecodable = 0;
    if (PQresultStatus(res) != PGRES_TUPLES_OK || wp_dlq_counts(conn, &waiting, &parked, &undecodable) != 0) {
        wp_error("staging: could not list dead letters: %s", PQerrorMessage(conn));
        PQclear(res);
        return 1;
    }
    printf("id\tkind\tsource\ttable\tevent_id\tevent_type\tlsn\tseq\tattempts\tfirst_failed\tlast_failed\tnext_"
           "attempt\terror\n");
    for (int r = 0; r < PQntuples(res); r++) {
        for (int c = 0; c < PQnfields(res); c++)
            printf("%s%s", c ? "\t" : "", PQgetvalue(res, r, c));
        printf("\n");
    }
    PQclear(res);
    /*
     * The mirrors marked diverged (open rows of walpipe.divergences), one
     * line each, after the dead letters: what may be wrong beyond the queue.
     * Only when all dead letters are listed (no --id).
     */
    int ndiverged = 0;
    if (idlit == NULL) {
        res = PQexec(conn, "SELECT source, quote_ident(schema_name) || '.' || quote_ident(table_name), "
                           "string_agg(DISTINCT kind, ',' ORDER BY kind), min(lsn)::text, "
                           "replace(replace((array_agg(reason ORDER BY lsn, id))[1], E'\\n', ' '), E'\\t', ' ') "
                           "FROM walpipe.divergences WHERE resolved_at IS NULL "
                           "GROUP BY source, schema_name, table_name ORDER BY 1, 2");
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            wp_error("staging: could not list diverged mirrors: %s", PQerrorMessage(conn));
            PQclear(res);
            return 1;
        }
        ndiverged = PQntuples(res);
        if (ndiverged > 0)
            printf("diverged\tsource\ttable\tkinds\toldest_lsn\treason\n");
        for (int r = 0; r < ndiverged; r++)
            printf("diverged\t%s\t%s\t%s\t%s\t%s\n", PQgetvalue(res, r, 0), PQgetvalue(res, r, 1),
                   PQgetvalue(res, r, 2), PQgetvalue(res, r, 3), PQgetvalue(res, r, 4));
        PQclear(res);
    }
    printf("-- %lld dead letters: %lld waiting for retry, %lld parked, %lld undecodable",
           waiting + parked + undecodable, waiting, parked, undecodable);
    if (idlit == NULL)
        printf("; %d diverged mirror%s", ndiverged, ndiverged == 1 ? "" : "s");
    printf("\n");
    return 0;
}

static int cmd_retry(const wp_config_t *config, PGconn *conn, const char *idlit)
{
    wp_applier_t *a = wp_applier_create(config, conn);
    int total_applied = 0, failing = 0, rc = 1;
    long long last = 0;
    const char *params[2];
    char lastbuf[24];

    if (idlit) {
        /* undecodable messages cannot be retried: say so for each one named */
        params[0] = idlit;
        PGresult *res = PQexecParams(conn, "SELECT id FROM walpipe.dead_letters WHERE kind = 'decode' AND id = ANY ($1)",
                                     1, NULL, params, NULL, NULL, 0);
        for (int r = 0; PQresultStatus(res) == PGRES_TUPLES_OK && r < PQntuples(res); r++) {
            fprintf(stderr,
                    "walpipe: dead letter %s is a stream message walpipe could not decode: it never became an event, "
                    "so there is nothing to retry; inspect its raw column, then `walpipe dlq drop --id %s`\n",
                    PQgetvalue(res, r, 0), PQgetvalue(res, r, 0));
            failing++;
        }
        PQclear(res);
    }
    for (;;) {
        snprintf(lastbuf, sizeof lastbuf, "%lld", last);
        params[0] = idlit;
        params[1] = lastbuf;
        if (wp_pg_exec(conn, "staging", "BEGIN", "begin a retry") != 0)
            goto out;
        PGresult *dl = PQexecParams(conn,
                                    "SELECT id, event_id, event_received_at::text FROM walpipe.dead_letters "
                                    "WHERE kind = 'apply' AND id > $2 AND ($1::bigint[] IS NULL OR id = ANY ($1)) "
                                    "ORDER BY id LIMIT 100 FOR UPDATE",
                                    2, NULL, params, NULL, NULL, 0);
        if (PQresultStatus(dl) != PGRES_TUPLES_OK) {
            wp_error("staging: could not read dead letters: %s", PQerrorMessage(conn));
            PQclear(dl);
            goto out;
        }
        if (PQntuples(dl) == 0) {
            PQclear(dl);
            wp_pg_exec(conn, "staging", "COMMIT", "commit a retry");
            break;
        }
        long long chunk_last = atoll(PQgetvalue(dl, PQntuples(dl) - 1, 0));
        int chunk_failing = 0;
        int r = retry_rows(a, conn, config, dl, false, &chunk_failing);
        if (r < 0) {
            PQclear(dl);
            PQclear(PQexec(conn, "ROLLBACK"));
            wp_error("could not retry dead letters; nothing in this chunk was changed");
            goto out;
        }
        PQclear(dl);
        if (wp_pg_exec(conn, "staging", "COMMIT", "commit a retry") != 0)
            goto out;
        /* report after the commit, so that what is printed is what happened */
        total_applied += r;
        failing += chunk_failing;
        last = chunk_last;
    }
    printf("-- retried: %d applied, %d still failing (see `walpipe dlq list`)\n", total_applied, failing);
    rc = failing == 0 ? 0 : 1;
out:
    wp_applier_destroy(a);
    return rc;
}

static int cmd_drop(PGconn *conn, const char *idlit)
{
    const char *params[] = {idlit};
    PGresult *res = PQexecParams(conn,
                                 "DELETE FROM walpipe.dead_letters WHERE $1::bigint[] IS NULL OR id = ANY ($1) "
                                 "RETURNING id, kind, coalesce(event_id::text, '-')",
                                 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_error("staging: could not drop dead letters: %s", PQerrorMessage(conn));
        PQclear(res);
        return 1;
    }
    for (int r = 0; r < PQntuples(res); r++)
        printf("dropped dead letter %s (%s, event %s)\n", PQgetvalue(res, r, 0), PQgetvalue(res, r, 1),
               PQgetvalue(res, r, 2));
    printf("-- dropped %d dead letters; a dropped event stays unapplied (its raw event is marked processed)\n",
           PQntuples(res));
    PQclear(res);
    return 0;
}

int wp_dlq_command(const wp_config_t *config, const char *action, const int64_t *ids, size_t nids, bool all)
{
    int rc = 2;
    wp_buf_t idlit = WP_BUF_INIT;
    PGconn *conn = NULL;
    if (action == NULL || (strcmp(action, "list") != 0 && strcmp(action, "retry") != 0 && strcmp(action, "drop") != 0)) {
        fprintf(stderr, "walpipe: dlq needs list, retry or drop, e.g. `walpipe dlq list --config FILE`\n");
        goto out;
    }
    if (strcmp(action, "drop") == 0 && nids == 0 && !all) {
        fprintf(stderr, "walpipe: dlq drop needs --id N (repeatable) or --all\n");
        goto out;
    }
    if (nids > 0 && all) {
        fprintf(stderr, "walpipe: give either --id or --all, not both\n");
        goto out;
    }
    rc = 1;
    conn = command_connect(config);
    if (conn == NULL)
        goto out;
    if (nids > 0)
        wp_pg_int8_array(&idlit, ids, nids);
    int unknown = nids > 0 ? report_unknown(conn, idlit.data) : 0;
    if (strcmp(action, "list") == 0)
        rc = cmd_list(conn, nids ? idlit.data : NULL);
    else if (strcmp(action, "retry") == 0)
        rc = cmd_retry(config, conn, nids ? idlit.data : NULL);
    else
        rc = cmd_drop(conn, nids ? idlit.data : NULL);
    if (unknown > 0 && rc == 0)
        rc = 1;
out:
    if (conn)
        PQfinish(conn);
    wp_buf_free(&idlit);
    return rc;
}

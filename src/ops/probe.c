/*
 * probe.c: reads a source's slot and staging's tables for status, metrics
 * and the lag guard (see probe.h for what each number means).
 *
 * Invariant: read only, and every value is a statement parameter.  A
 * failing query leaves its fields at "unknown" and says why in error; it
 * never stops the other look-ups.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "diverge.h"
#include "log.h"
#include "probe.h"

/* Copies libpq's message's first line into err. */
static void first_line(char *err, size_t errlen, const char *msg)
{
    size_t n = strcspn(msg, "\n");
    snprintf(err, errlen, "%.*s", (int)n, msg);
    wp_log_sanitize(err);
}

PGconn *wp_probe_connect(const char *conninfo, const char *appname, char *err, size_t errlen)
{
    /* later keys win: conninfo's own connect_timeout and application_name override these */
    const char *keys[] = {"connect_timeout", "application_name", "dbname", NULL};
    const char *vals[] = {"5", appname, conninfo, NULL};
    PGconn *conn = PQconnectdbParams(keys, vals, 1);
    if (conn && PQstatus(conn) == CONNECTION_OK) {
        /* a look never waits long behind a lock (a locked raw_events must not freeze the lag guard) */
        PGresult *res = PQexec(conn, "SET lock_timeout = '500ms'; SET statement_timeout = '5s'; "
                                     "SET default_transaction_read_only = on");
        bool ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        PQclear(res);
        if (ok)
            return conn;
    }
    first_line(err, errlen, conn ? PQerrorMessage(conn) : "out of memory");
    PQfinish(conn);
    return NULL;
}

static double now_unix(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static PGresult *query(PGconn *conn, const char *sql, int n, const char *const *params, char *err, size_t errlen)
{
    PGresult *res = PQexecParams(conn, sql, n, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) == PGRES_TUPLES_OK)
        return res;
    first_line(err, errlen, PQerrorMessage(conn));
    PQclear(res);
    return NULL;
}

static wp_lsn_t lsn_of(const PGresult *res, int col)
{
    wp_lsn_t lsn = WP_LSN_INVALID;
    if (!PQgetisnull(res, 0, col))
        wp_lsn_parse(PQgetvalue(res, 0, col), strlen(PQgetvalue(res, 0, col)), &lsn);
    return lsn;
}

static void probe_slot(const wp_source_config_t *source, PGconn **src, wp_probe_source_t *out)
{
    if (*src && PQstatus(*src) != CONNECTION_OK) {
        PQfinish(*src);
        *src = NULL;
    }
    if (*src == NULL)
        *src = wp_probe_connect(source->conninfo, "walpipe probe", out->error, sizeof out->error);
    if (*src == NULL)
        return;
    const char *params[] = {source->slot};
    PGresult *res = query(*src,
                          "SELECT pg_current_wal_lsn(), s.slot_name IS NOT NULL, s.active, s.wal_status, "
                          "s.safe_wal_size, s.confirmed_flush_lsn, s.restart_lsn "
                          "FROM (SELECT 1) one LEFT JOIN pg_replication_slots s ON s.slot_name = $1",
                          1, params, out->error, sizeof out->error);
    if (res == NULL) {
        PQfinish(*src);
        *src = NULL;
        return;
    }
    out->reachable = true;
    out->current_lsn = lsn_of(res, 0);
    out->slot_exists = PQgetvalue(res, 0, 1)[0] == 't';
    out->active = PQgetvalue(res, 0, 2)[0] == 't';
    snprintf(out->wal_status, sizeof out->wal_status, "%s", PQgetvalue(res, 0, 3));
    out->has_safe_wal_size = !PQgetisnull(res, 0, 4);
    out->safe_wal_size = out->has_safe_wal_size ? strtoll(PQgetvalue(res, 0, 4), NULL, 10) : 0;
    out->confirmed_flush = lsn_of(res, 5);
    out->restart_lsn = lsn_of(res, 6);
    if (out->slot_exists && out->confirmed_flush != WP_LSN_INVALID)
        out->lag_bytes = out->current_lsn > out->confirmed_flush ? (int64_t)(out->current_lsn - out->confirmed_flush)
                                                                 : 0;
    if (out->slot_exists && out->restart_lsn != WP_LSN_INVALID)
        out->retained_bytes = out->current_lsn > out->restart_lsn ? (int64_t)(out->current_lsn - out->restart_lsn)
                                                                  : 0;
    PQclear(res);
}

static void probe_source_staging(const wp_source_config_t *source, PGconn *staging, wp_probe_source_t *out)
{
    char err[256];
    const char *params[] = {source->name};
    PGresult *res = query(staging,
                          "SELECT lsn, staged_events, extract(epoch FROM last_commit_ts), snapshot_state "
                          "FROM (SELECT 1) one LEFT JOIN walpipe.checkpoints c ON c.source = $1",
                          1, params, err, sizeof err);
    if (res) {
        out->has_checkpoint = !PQgetisnull(res, 0, 0);
        out->checkpoint_lsn = lsn_of(res, 0);
        out->staged_events = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
        out->last_commit_unix = PQgetisnull(res, 0, 2) ? 0 : strtod(PQgetvalue(res, 0, 2), NULL);
        snprintf(out->checkpoint_snapshot, sizeof out->checkpoint_snapshot, "%s", PQgetvalue(res, 0, 3));
        PQclear(res);
    }
    /* apart: raw_events may be locked (then the rate stays 0) */
    res = query(staging,
                "SELECT count(*) FROM walpipe.raw_events WHERE source = $1 AND event_type <> 'snapshot' "
                "AND received_at > now() - interval '60 seconds'",
                1, params, err, sizeof err);
    if (res) {
        out->rate_per_s = (double)strtoll(PQgetvalue(res, 0, 0), NULL, 10) / 60.0;
        PQclear(res);
    }
    res = query(staging,
                "SELECT s.id, s.kind, s.state, CASE WHEN s.state = 'running' THEN coalesce((SELECT sum(c.rows) "
                "FROM walpipe.snapshot_chunks c WHERE c.snapshot_id = s.id), 0) ELSE s.rows END, s.estimated_rows, "
                "extract(epoch FROM coalesce(s.finished_at, now()) - s.started_at) "
                "FROM walpipe.snapshots s WHERE s.source = $1 ORDER BY s.id DESC LIMIT 1",
                1, params, err, sizeof err);
    if (res && PQntuples(res) == 1) {
        out->has_snapshot = true;
        out->snapshot_id = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        snprintf(out->snapshot_kind, sizeof out->snapshot_kind, "%s", PQgetvalue(res, 0, 1));
        snprintf(out->snapshot_state, sizeof out->snapshot_state, "%s", PQgetvalue(res, 0, 2));
        out->snapshot_rows = strtoll(PQgetvalue(res, 0, 3), NULL, 10);
        out->snapshot_estimated = PQgetisnull(res, 0, 4) ? -1 : strtoll(PQgetvalue(res, 0, 4), NULL, 10);
        out->snapshot_seconds = strtod(PQgetvalue(res, 0, 5), NULL);
    }
    PQclear(res);
}

int wp_probe_source(const wp_source_config_t *source, PGconn **src, PGconn *staging, wp_probe_source_t *out)
{
    memset(out, 0, sizeof *out);
    out->lag_bytes = out->retained_bytes = -1;
    out->lag_seconds = -1;
    out->snapshot_estimated = -1;
    probe_slot(source, src, out);
    if (staging && PQstatus(staging) == CONNECTION_OK)
        probe_source_staging(source, staging, out);
    if (out->lag_bytes == 0)
        out->lag_seconds = 0;
    else if (out->lag_bytes > 0 && out->last_commit_unix > 0) {
        double lag = now_unix() - out->last_commit_unix;
        out->lag_seconds = lag > 0 ? lag : 0;
    }
    return out->reachable ? 0 : -1;
}

int wp_probe_staging(PGconn *staging, wp_probe_staging_t *out)
{
    memset(out, 0, sizeof *out);
    out->oldest_unprocessed = -1;
    out->cache_hit_ratio = -1;
    if (staging == NULL || PQstatus(staging) != CONNECTION_OK) {
        snprintf(out->error, sizeof out->error, "%s", "no connection to staging");
        return -1;
    }
    PGresult *res = query(staging,
                          "SELECT count(*), min(id), coalesce(extract(epoch FROM now() - min(received_at)), 0) "
                          "FROM walpipe.raw_events WHERE NOT processed",
                          0, NULL, out->error, sizeof out->error);
    if (res == NULL)
        return -1;
    out->reachable = true;
    out->backlog_events = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    out->oldest_unprocessed = PQgetisnull(res, 0, 1) ? -1 : strtoll(PQgetvalue(res, 0, 1), NULL, 10);
    out->consumer_lag_seconds = strtod(PQgetvalue(res, 0, 2), NULL);
    if (out->consumer_lag_seconds < 0)
        out->consumer_lag_seconds = 0;
    PQclear(res);
    res = query(staging,
                "SELECT count(*) FILTER (WHERE kind = 'apply' AND next_attempt_at IS NOT NULL), "
                "count(*) FILTER (WHERE kind = 'apply' AND next_attempt_at IS NULL), "
                "count(*) FILTER (WHERE kind = 'decode') FROM walpipe.dead_letters",
                0, NULL, out->error, sizeof out->error);
    if (res) {
        out->dead_waiting = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        out->dead_parked = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
        out->dead_undecodable = strtoll(PQgetvalue(res, 0, 2), NULL, 10);
        PQclear(res);
    }
    res = query(staging,
                "SELECT reason, extract(epoch FROM last_failed_at) FROM walpipe.dead_letters WHERE kind = 'apply' "
                "ORDER BY last_failed_at DESC, id DESC LIMIT 1",
                0, NULL, out->error, sizeof out->error);
    if (res && PQntuples(res) == 1) {
        snprintf(out->last_error, sizeof out->last_error, "%s", PQgetvalue(res, 0, 0));
        wp_log_sanitize(out->last_error);
        out->last_error_unix = strtod(PQgetvalue(res, 0, 1), NULL);
    }
    PQclear(res);
    if (wp_diverge_count_open(staging, &out->diverged_mirrors) != 0)
        out->diverged_mirrors = -1;
    res = query(staging, "SELECT count(*) FROM walpipe.divergences WHERE resolved_at IS NULL", 0, NULL, out->error,
                sizeof out->error);
    if (res) {
        out->divergences_open = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        PQclear(res);
    }
    res = query(staging,
                "SELECT count(*), coalesce(sum(pg_total_relation_size(relid)), 0) "
                "FROM pg_partition_tree('walpipe.raw_events') WHERE isleaf",
                0, NULL, out->error, sizeof out->error);
    if (res) {
        out->partitions = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        out->raw_events_bytes = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
        PQclear(res);
    }
    res = query(staging,
                "SELECT blks_hit::float8 / nullif(blks_hit + blks_read, 0) FROM pg_stat_database "
                "WHERE datname = current_database()",
                0, NULL, out->error, sizeof out->error);
    if (res) {
        out->cache_hit_ratio = PQgetisnull(res, 0, 0) ? -1 : strtod(PQgetvalue(res, 0, 0), NULL);
        PQclear(res);
    }
    return 0;
}

/*
 * stager.c: segments -> walpipe.raw_events, with the checkpoint in the same
 * staging transaction.
 *
 * Job: pop segments in order, stream their rows into one COPY per batch,
 * record new table shapes and dead letters, update the source's checkpoint
 * row, commit, and only then publish the new durable position (which the
 * reader acknowledges to the source as flush LSN).
 *
 * Invariant: a checkpoint row never covers a change that is not committed in
 * staging, and every committed row is covered by the checkpoint committed
 * with it.  So after any crash, restarting from the checkpoint neither skips
 * nor repeats a change.
 *
 * A batch ends when it holds batch_rows rows or batch_bytes bytes, when it is
 * batch_ms old, or when the queue runs dry while the reader is caught up with
 * the source (nothing more to wait for) -- but never inside a source
 * transaction whose rows are keyed by a predicted commit end LSN (pgoutput,
 * segment->txn_open): those wait for the transaction's Commit, which may
 * relabel them (segment->relabels) in the batch before the checkpoint passes
 * them, so no committed row ever carries a wrong lsn.  A reader that stops
 * inside such a transaction has the batch rolled back.  Any
 * staging error rolls the batch back and fails the session; the source then
 * reconnects and resumes from the last committed checkpoint.
 *
 * Every value travels as a statement parameter, text from the source server
 * (its systemid, table names) included; only constants are spliced into SQL.
 *
 * Threading: runs in its own thread; touches only its connection and the queue.
 */
#include "wp_setup.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include <libpq-fe.h>

#include "diverge.h"
#include "encoder.h"
#include "log.h"
#include "metrics.h"
#include "pg.h"
#include "shapes.h"
#include "stager.h"

#define STAGER_IDLE_WAIT_MS 200
#define PROGRESS_LOG_MS 10000
#define PARTITION_CHECK_MS (3600 * 1000)
#define COPY_PIECE (1024 * 1024)

struct wp_stager {
    const wp_config_t *config;
    const wp_source_config_t *source;
    PGconn *conn;
    char systemid[32];
    wp_shapes_t *shapes; /* shapes staging holds, and under which id */
    /* batch in progress */
    bool in_txn;
    bool in_copy;
    size_t batch_rows;
    size_t batch_bytes;
    int64_t batch_started_ms;
    wp_position_t batch_pos;
    bool batch_has_pos;
    bool batch_open;      /* the last segment staged ended inside a predicted-key transaction: no commit now */
    int64_t batch_min_id; /* pgoutput: every raw_events row of the batch has id >= this (relabelling finds them by it) */
    /* progress */
    uint64_t total_rows;
    uint64_t total_dead;
    int64_t last_progress_ms;
    uint64_t last_progress_rows;
    int64_t last_partition_ms;
    /* metrics of the batch in progress, published when it commits */
    uint64_t batch_type_rows[WP_EVENT_TYPES];
    wp_commit_run_t *runs; /* owned */
    size_t nruns, runs_cap;
    int64_t batch_newest_commit; /* PostgreSQL µs, 0 = none */
    /* this source's series (metrics.h), looked up once */
    wp_metric_t *m_events[WP_EVENT_TYPES], *m_bytes, *m_commits, *m_latency, *m_last_commit, *m_queue;
};

/* Unix seconds of a PostgreSQL timestamp (µs since 2000-01-01 UTC). */
static double unix_seconds(int64_t pg_us)
{
    return (double)pg_us / 1e6 + 946684800.0;
}

wp_stager_t *wp_stager_create(const wp_config_t *config, const wp_source_config_t *source)
{
    wp_stager_t *stager = wp_calloc(1, sizeof *stager);
    stager->config = config;
    stager->source = source;
    stager->shapes = wp_shapes_create();
    const char *name = source->name;
    for (int i = 0; i < WP_EVENT_TYPES; i++)
        stager->m_events[i] = wp_metric(WP_METRIC_COUNTER, "walpipe_events_staged_total",
                                        "Events committed to walpipe.raw_events", "source", name, "type",
                                        wp_event_type_names[i], NULL);
    stager->m_bytes = wp_metric(WP_METRIC_COUNTER, "walpipe_staged_bytes_total",
                                "Bytes of raw_events rows committed (binary COPY format)", "source", name, NULL);
    stager->m_commits = wp_metric(WP_METRIC_COUNTER, "walpipe_staging_commits_total",
                                  "Staging transactions committed (batches and snapshot chunks)", "source", name, NULL);
    stager->m_latency = wp_metric(WP_METRIC_HISTOGRAM, "walpipe_commit_to_staged_seconds",
                                  "Time from a change's commit on the source to its commit in staging", "source",
                                  name, NULL);
    stager->m_last_commit = wp_metric(WP_METRIC_GAUGE, "walpipe_last_staged_commit_timestamp_seconds",
                                      "Source commit time (Unix seconds) of the newest staged change", "source", name,
                                      NULL);
    stager->m_queue = wp_metric(WP_METRIC_GAUGE, "walpipe_queue_segments",
                                "Segments waiting in the reader -> stager queue", "source", name, NULL);
    return stager;
}

void wp_stager_close(wp_stager_t *stager)
{
    if (stager->conn)
        PQfinish(stager->conn);
    stager->conn = NULL;
    /* whatever the open transaction recorded is gone with the connection */
    wp_shapes_rollback(stager->shapes);
    stager->in_txn = stager->in_copy = false;
}

bool wp_stager_is_open(const wp_stager_t *stager)
{
    return stager->conn != NULL && PQstatus(stager->conn) == CONNECTION_OK;
}

const char *wp_stager_source_name(const wp_stager_t *stager)
{
    return stager->source->name;
}

void wp_stager_destroy(wp_stager_t *stager)
{
    if (stager == NULL)
        return;
    wp_stager_close(stager);
    wp_shapes_destroy(stager->shapes);
    free(stager->runs);
    free(stager);
}

/* Runs constant sql (no values in it); logs and returns -1 on failure. */
static int exec_sql(wp_stager_t *stager, const char *sql, const char *what)
{
    return wp_pg_exec(stager->conn, "staging", sql, what);
}

/*
 * Runs one parameterized statement (text parameters unless formats says
 * otherwise).  Returns its result when it returned commands or tuples (the
 * caller clears it), else NULL after logging why.
 */
static PGresult *query_params(wp_stager_t *stager, const char *sql, int n, const char *const *params,
                              const int *lengths, const int *formats, const char *what)
{
    PGresult *res = PQexecParams(stager->conn, sql, n, NULL, params, lengths, formats, 0);
    ExecStatusType st = PQresultStatus(res);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        wp_error("staging: could not %s: %s", what, PQerrorMessage(stager->conn));
        PQclear(res);
        return NULL;
    }
    return res;
}

/* query_params for a statement whose result is not needed: returns 0, or -1 (logged). */
static int exec_params(wp_stager_t *stager, const char *sql, int n, const char *const *params, const int *lengths,
                       const int *formats, const char *what)
{
    PGresult *res = query_params(stager, sql, n, params, lengths, formats, what);
    PQclear(res);
    return res ? 0 : -1;
}

static int ensure_partitions(wp_stager_t *stager)
{
    char ahead[16];
    snprintf(ahead, sizeof ahead, "%d", stager->config->partitions_ahead);
    const char *params[] = {ahead};
    int rc = exec_params(stager, "SELECT walpipe.ensure_partitions($1)", 1, params, NULL, NULL,
                         "create raw_events partitions");
    if (rc == 0)
        stager->last_partition_ms = wp_now_ms();
    return rc;
}

int wp_stager_open(wp_stager_t *stager, bool *fatal)
{
    char appname[96];
    *fatal = false;
    wp_stager_close(stager);

    snprintf(appname, sizeof appname, "walpipe_stager_%s", stager->source->name);
    wp_staging_check_t check =
        wp_pg_connect_staging(stager->config, appname, "-c synchronous_commit=on", true, &stager->conn);
    if (check != WP_STAGING_OK) {
        *fatal = check == WP_STAGING_OLD_SCHEMA;
        return -1;
    }
    if (ensure_partitions(stager) != 0) {
        wp_stager_close(stager);
        return -1;
    }
    return 0;
}

static bool parse_lsn_value(const char *s, wp_lsn_t *out)
{
    return wp_lsn_parse(s, strlen(s), out);
}

int wp_stager_checkpoint_read(wp_stager_t *stager, wp_checkpoint_t *out)
{
    int rc = -1;
    const char *params[] = {stager->source->name};
    PGresult *res = query_params(stager,
                                 "SELECT slot, systemid, lsn, txn_end, coalesce(txn_seq, 0), snapshot_state "
                                 "FROM walpipe.checkpoints WHERE source = $1",
                                 1, params, NULL, NULL, "read checkpoint");
    if (res == NULL)
        goto out;
    if (PQntuples(res) == 0) {
        rc = 0;
        goto out;
    }
    memset(out, 0, sizeof *out);
    snprintf(out->slot, sizeof out->slot, "%s", PQgetvalue(res, 0, 0));
    snprintf(out->systemid, sizeof out->systemid, "%s", PQgetvalue(res, 0, 1));
    if (!parse_lsn_value(PQgetvalue(res, 0, 2), &out->pos.lsn) ||
        (!PQgetisnull(res, 0, 3) && !parse_lsn_value(PQgetvalue(res, 0, 3), &out->pos.txn_end))) {
        wp_error("staging: checkpoint of source \"%s\" holds an unreadable LSN", stager->source->name);
        goto out;
    }
    out->pos.txn_seq = atoi(PQgetvalue(res, 0, 4));
    snprintf(out->snapshot_state, sizeof out->snapshot_state, "%s", PQgetvalue(res, 0, 5));
    snprintf(stager->systemid, sizeof stager->systemid, "%s", out->systemid);
    rc = 1;
out:
    PQclear(res);
    return rc;
}

/*
 * Upserts the source's checkpoint row at pos.  With snapshot_state, also sets
 * the snapshot state (and snapshot_lsn = pos->lsn unless the state is "none").
 */
static int write_checkpoint(wp_stager_t *stager, const wp_position_t *pos, const char *snapshot_state,
                            bool with_batch, const char *what)
{
    char lsn[WP_LSN_STRLEN], end[WP_LSN_STRLEN], seq[16];
    bool partial = pos->txn_end != WP_LSN_INVALID;
    snprintf(seq, sizeof seq, "%d", pos->txn_seq);
    const char *params[] = {stager->source->name,
                            stager->source->slot,
                            stager->systemid,
                            wp_lsn_format(pos->lsn, lsn),
                            partial ? wp_lsn_format(pos->txn_end, end) : NULL,
                            partial ? seq : NULL,
                            snapshot_state};
    if (snapshot_state == NULL) {
        /* with the batch's count and newest commit time, which `walpipe status` reads */
        char staged[32], commit_ts[48];
        snprintf(staged, sizeof staged, "%zu", with_batch ? stager->batch_rows : 0);
        snprintf(commit_ts, sizeof commit_ts, "%.6f", unix_seconds(stager->batch_newest_commit));
        const char *cparams[] = {params[0], params[1], params[2], params[3], params[4], params[5], staged,
                                 with_batch && stager->batch_newest_commit ? commit_ts : NULL};
        return exec_params(stager,
                           "INSERT INTO walpipe.checkpoints AS c (source, slot, systemid, lsn, txn_end, txn_seq, "
                           "updated_at, staged_events, last_commit_ts) VALUES ($1, $2, $3, $4, $5, $6, now(), $7, "
                           "to_timestamp($8::float8)) ON CONFLICT (source) DO UPDATE SET "
                           "slot = excluded.slot, systemid = excluded.systemid, lsn = excluded.lsn, "
                           "txn_end = excluded.txn_end, txn_seq = excluded.txn_seq, updated_at = excluded.updated_at, "
                           "staged_events = c.staged_events + excluded.staged_events, "
                           "last_commit_ts = coalesce(excluded.last_commit_ts, c.last_commit_ts)",
                           8, cparams, NULL, NULL, what);
    }
    return exec_params(stager,
                       "INSERT INTO walpipe.checkpoints (source, slot, systemid, lsn, txn_end, txn_seq, snapshot_state, "
                       "snapshot_lsn, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, "
                       "CASE WHEN $7 = 'none' THEN NULL ELSE $4::pg_lsn END, now()) ON CONFLICT (source) DO UPDATE SET "
                       "slot = excluded.slot, systemid = excluded.systemid, lsn = excluded.lsn, "
                       "txn_end = excluded.txn_end, txn_seq = excluded.txn_seq, snapshot_state = excluded.snapshot_state, "
                       "snapshot_lsn = excluded.snapshot_lsn, updated_at = excluded.updated_at",
                       7, params, NULL, NULL, what);
}

int wp_stager_checkpoint_init(wp_stager_t *stager, const char *systemid, wp_lsn_t lsn, const char *snapshot_state)
{
    wp_position_t pos = {.lsn = lsn};
    snprintf(stager->systemid, sizeof stager->systemid, "%s", systemid);
    return write_checkpoint(stager, &pos, snapshot_state, false, "write the first checkpoint");
}

int wp_stager_snapshot_done(wp_stager_t *stager)
{
    const char *params[] = {stager->source->name};
    return exec_params(stager,
                       "UPDATE walpipe.checkpoints SET snapshot_state = 'done', updated_at = now() WHERE source = $1", 1,
                       params, NULL, NULL, "mark the initial snapshot done");
}

int wp_stager_snapshot_discard(wp_stager_t *stager)
{
    const char *params[] = {stager->source->name};
    int rc = -1;
    if (exec_sql(stager, "BEGIN", "begin discarding the unfinished snapshot") != 0)
        return -1;
    if (exec_params(stager,
                    "DELETE FROM walpipe.raw_events WHERE source = $1 AND event_type = 'snapshot' AND lsn IN "
                    "(SELECT lsn FROM walpipe.snapshots WHERE source = $1 AND kind = 'initial' AND state <> 'done')",
                    1, params, NULL, NULL, "discard the unfinished snapshot's rows") != 0 ||
        exec_params(stager,
                    "UPDATE walpipe.snapshots SET state = 'superseded', finished_at = now() WHERE source = $1 "
                    "AND kind = 'initial' AND state <> 'done'",
                    1, params, NULL, NULL, "mark the unfinished snapshot superseded") != 0 ||
        exec_sql(stager, "COMMIT", "commit discarding the unfinished snapshot") != 0)
        goto out;
    rc = 0;
out:
    if (rc != 0)
        PQclear(PQexec(stager->conn, "ROLLBACK"));
    return rc;
}

int wp_stager_snapshot_begin(wp_stager_t *stager, const char *kind, wp_lsn_t lsn, int64_t *id)
{
    char l[WP_LSN_STRLEN];
    const char *params[] = {stager->source->name, kind, wp_lsn_format(lsn, l)};
    PGresult *res = query_params(stager, "INSERT INTO walpipe.snapshots (source, kind, lsn) VALUES ($1, $2, $3) "
                                         "RETURNING id",
                                 3, params, NULL, NULL, "record a snapshot");
    if (res == NULL)
        return -1;
    *id = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    return 0;
}

int wp_stager_snapshot_estimate(wp_stager_t *stager, int64_t id, int64_t rows)
{
    char i[32], n[32];
    snprintf(i, sizeof i, "%lld", (long long)id);
    snprintf(n, sizeof n, "%lld", (long long)rows);
    const char *params[] = {i, rows > 0 ? n : NULL};
    return exec_params(stager, "UPDATE walpipe.snapshots SET estimated_rows = $2 WHERE id = $1", 2, params, NULL, NULL,
                       "record a snapshot's estimated rows");
}

int wp_stager_snapshot_finish(wp_stager_t *stager, int64_t id, const char *state, const char *tables_literal,
                              uint64_t rows)
{
    char n[32], i[32];
    snprintf(n, sizeof n, "%llu", (unsigned long long)rows);
    snprintf(i, sizeof i, "%lld", (long long)id);
    const char *params[] = {state, n, tables_literal, i};
    return exec_params(stager,
                       "UPDATE walpipe.snapshots SET state = $1, rows = $2, tables = $3::text[], finished_at = now() "
                       "WHERE id = $4",
                       4, params, NULL, NULL, "record the end of a snapshot");
}

int wp_stager_resync_finish(wp_stager_t *stager, int64_t id, bool done, const char *tables_literal, uint64_t rows,
                            const char *const *schemas, const char *const *tables, const bool *truncated, size_t n,
                            wp_lsn_t cp)
{
    int rc = -1;
    char at[WP_LSN_STRLEN];
    wp_buf_t by = WP_BUF_INIT, why = WP_BUF_INIT;
    wp_lsn_format(cp, at);
    wp_buf_printf(&by, "resync snapshot %lld at %s", (long long)id, at);
    wp_buf_printf(&why,
                  "resync snapshot %lld failed after it staged a truncate of the table at %s: the mirror misses rows "
                  "until a resync of the table completes",
                  (long long)id, at);
    if (exec_sql(stager, "BEGIN", "begin recording the end of a resync") != 0)
        goto out;
    if (wp_stager_snapshot_finish(stager, id, done ? "done" : "failed", tables_literal, rows) != 0)
        goto fail;
    for (size_t i = 0; i < n; i++) {
        if (done && wp_diverge_resolve(stager->conn, stager->source->name, schemas[i], tables[i], cp, by.data) < 0)
            goto fail;
        if (!done && truncated[i] &&
            wp_diverge_record(stager->conn, stager->source->name, schemas[i], tables[i], WP_DIVERGE_MANUAL, cp,
                              why.data) < 0)
            goto fail;
    }
    if (exec_sql(stager, "COMMIT", "commit the end of a resync") != 0)
        goto fail;
    rc = 0;
    goto out;
fail:
    PQclear(PQexec(stager->conn, "ROLLBACK"));
out:
    wp_buf_free(&by);
    wp_buf_free(&why);
    return rc;
}

int wp_stager_accept_gap(wp_stager_t *stager, wp_lsn_t from, wp_lsn_t to, const char *reason)
{
    int rc = -1;
    wp_position_t pos = {.lsn = to};
    char a[WP_LSN_STRLEN], b[WP_LSN_STRLEN];
    const char *params[] = {stager->source->name, stager->source->slot, wp_lsn_format(from, a), wp_lsn_format(to, b),
                            reason};
    if (exec_sql(stager, "BEGIN", "begin recording the accepted gap") != 0)
        return -1;
    if (exec_params(stager,
                    "INSERT INTO walpipe.accepted_gaps (source, slot, from_lsn, to_lsn, reason) "
                    "VALUES ($1, $2, $3, $4, $5)",
                    5, params, NULL, NULL, "record the accepted gap") != 0 ||
        write_checkpoint(stager, &pos, NULL, false, "move the checkpoint over the accepted gap") != 0 ||
        exec_sql(stager, "COMMIT", "commit the accepted gap") != 0) {
        PQclear(PQexec(stager->conn, "ROLLBACK"));
        goto out;
    }
    wp_warn("accepted a gap from %s to %s (%s): changes in between may be missing from staging; recorded in "
            "walpipe.accepted_gaps",
            a, b, reason);
    rc = 0;
out:
    return rc;
}

/* Generates a random (version 4) UUID for batch_id from getrandom(2).  Returns 0, or -1 (logged). */
static int make_uuid(char out[37])
{
    unsigned char b[16];
    size_t got = 0;
    while (got < sizeof b) {
        ssize_t n = getrandom(b + got, sizeof b - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            wp_error("could not get random bytes for a batch id: %m");
            return -1;
        }
        got += (size_t)n;
    }
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
    snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2], b[3],
             b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
    return 0;
}

static int batch_begin(wp_stager_t *stager)
{
    char uuid[37], sql[192];
    if (make_uuid(uuid) != 0)
        return -1;
    /*
     * The uuid is walpipe's own hex text, so it may stand in the SQL.  READ
     * COMMITTED whatever the database's default: recording a shape relies on
     * each statement seeing what other transactions committed.
     */
    snprintf(sql, sizeof sql, "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL walpipe.batch_id = '%s'", uuid);
    if (stager->source->plugin != WP_PLUGIN_PGOUTPUT) {
        if (exec_sql(stager, sql, "begin a staging transaction") != 0)
            return -1;
    } else {
        /*
         * And the id sequence's position, in the same round trip: the rows
         * this batch COPYs take ids from it after this (raw_events_id_seq
         * has CACHE 1, as BIGSERIAL made it), so a relabel finds them by
         * the primary key (id, received_at) instead of scanning.
         */
        snprintf(sql + strlen(sql), sizeof sql - strlen(sql), "; SELECT last_value FROM walpipe.raw_events_id_seq");
        PGresult *res = PQexec(stager->conn, sql);
        if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
            wp_error("staging: could not begin a staging transaction: %s", PQerrorMessage(stager->conn));
            PQclear(res);
            return -1;
        }
        stager->batch_min_id = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        PQclear(res);
    }
    stager->in_txn = true;
    stager->batch_rows = stager->batch_bytes = 0;
    memset(stager->batch_type_rows, 0, sizeof stager->batch_type_rows);
    stager->nruns = 0;
    stager->batch_newest_commit = 0;
    stager->batch_started_ms = wp_now_ms();
    stager->batch_has_pos = false;
    stager->batch_open = false;
    return 0;
}

/* The binary COPY stream around the encoder's rows (encoder.c): header, and the trailer (field count -1). */
static const char copy_header[19] = {'P', 'G', 'C', 'O', 'P', 'Y', '\n', '\377', '\r', '\n', '\0', /* signature */
                                     0,   0,   0,   0,                                             /* flags */
                                     0,   0,   0,   0};                                            /* no extension */
static const char copy_trailer[2] = {'\377', '\377'};

/*
 * Sends len bytes of COPY data, in pieces: PQputCopyData takes an int length,
 * and a piece at a time keeps libpq's output buffer small when a row is huge.
 */
static int put_copy_data(wp_stager_t *stager, const char *data, size_t len)
{
    while (len > 0) {
        size_t n = len < COPY_PIECE ? len : COPY_PIECE;
        if (PQputCopyData(stager->conn, data, (int)n) != 1) {
            wp_error("staging: could not send COPY data: %s", PQerrorMessage(stager->conn));
            return -1;
        }
        data += n;
        len -= n;
    }
    return 0;
}

static int copy_begin(wp_stager_t *stager)
{
    PGresult *res = PQexec(stager->conn, "COPY walpipe.raw_events (source, event_type, payload, lsn, xid, commit_ts, "
                                         "seq, schema_name, table_name, shape_id) FROM STDIN (FORMAT binary)");
    int rc = 0;
    if (PQresultStatus(res) != PGRES_COPY_IN) {
        wp_error("staging: could not start COPY into raw_events: %s", PQerrorMessage(stager->conn));
        rc = -1;
    } else if (put_copy_data(stager, copy_header, sizeof copy_header) != 0) {
        rc = -1;
    } else {
        stager->in_copy = true;
    }
    PQclear(res);
    return rc;
}

static int copy_end(wp_stager_t *stager)
{
    int rc = 0;
    if (!stager->in_copy)
        return 0;
    stager->in_copy = false;
    if (put_copy_data(stager, copy_trailer, sizeof copy_trailer) != 0)
        return -1;
    if (PQputCopyEnd(stager->conn, NULL) != 1) {
        wp_error("staging: could not end COPY: %s", PQerrorMessage(stager->conn));
        return -1;
    }
    PGresult *res;
    while ((res = PQgetResult(stager->conn)) != NULL) {
        if (PQresultStatus(res) != PGRES_COMMAND_OK && rc == 0) {
            wp_error("staging: COPY into raw_events failed: %s", PQerrorMessage(stager->conn));
            rc = -1;
        }
        PQclear(res);
    }
    return rc;
}

/* Records shape in staging (walpipe.record_shape, sql/006_shape_ids.sql); *id is the id it holds it under. */
static int record_shape(wp_stager_t *stager, const wp_shape_t *shape, int64_t *id)
{
    char proposed[32], lsn[WP_LSN_STRLEN], what[256];
    snprintf(proposed, sizeof proposed, "%lld", (long long)shape->id);
    wp_lsn_format(shape->first_lsn, lsn);
    snprintf(what, sizeof what, "record the shape of table \"%s\".\"%s\"", shape->schema, shape->table);
    const char *params[] = {stager->source->name, proposed, shape->schema, shape->table, shape->columns, lsn};
    PGresult *res = query_params(stager, "SELECT walpipe.record_shape($1, $2, $3, $4, $5, $6)", 6, params, NULL, NULL,
                                 what);
    if (res == NULL)
        return -1;
    *id = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    if (*id != shape->id)
        wp_warn("the shape of table \"%s\".\"%s\" hashes to id %s, which staging holds for another shape (a "
                "collision, perhaps crafted by whoever named the tables); recorded it as %lld instead",
                shape->schema, shape->table, proposed, (long long)*id);
    return 0;
}

/*
 * Resolves the id of each shape the segment's rows use: known to this
 * stager, or recorded now (outside the COPY).  Rows of a shape that staging
 * holds under another id than the proposed one are rewritten to it.
 */
static int stage_shapes(wp_stager_t *stager, wp_segment_t *segment)
{
    for (wp_shape_t *shape = segment->shapes; shape; shape = shape->next) {
        int64_t id = wp_shapes_lookup(stager->shapes, shape);
        if (id == 0) {
            if (copy_end(stager) != 0 || record_shape(stager, shape, &id) != 0)
                return -1;
            wp_shapes_add_pending(stager->shapes, shape, id);
        }
        if (id != shape->id)
            wp_encoder_set_shape_id(segment, shape, id);
    }
    return 0;
}

static int stage_dead_letters(wp_stager_t *stager, const wp_dead_letter_t *dead)
{
    for (; dead; dead = dead->next) {
        char lsn[WP_LSN_STRLEN], seq[16];
        wp_lsn_format(dead->lsn, lsn);
        snprintf(seq, sizeof seq, "%d", dead->seq);
        /* raw_len <= WP_DEAD_RAW_MAX (wp_segment_add_dead), so the int length holds it */
        const char *params[] = {stager->source->name, lsn, seq, dead->schema, dead->table, dead->raw, dead->reason};
        int lengths[] = {0, 0, 0, 0, 0, (int)dead->raw_len, 0};
        int formats[] = {0, 0, 0, 0, 0, 1, 0};
        if (exec_params(stager,
                        "INSERT INTO walpipe.dead_letters (kind, source, lsn, seq, schema_name, table_name, raw, reason) "
                        "VALUES ('decode', $1, $2, $3, $4, $5, $6, $7)",
                        7, params, lengths, formats, "record a dead letter") != 0)
            return -1;
        if (dead->table)
            wp_warn("dead letter at %s seq %d (table \"%s\".\"%s\"): %s", lsn, dead->seq,
                    dead->schema ? dead->schema : "", dead->table, dead->reason);
        else
            wp_warn("dead letter at %s seq %d: %s", lsn, dead->seq, dead->reason);
        stager->total_dead++;
    }
    return 0;
}

/*
 * Names the table of a dropped-change notice whose names did not split one
 * way only: the table staging knows (from key discovery or a recorded shape)
 * whose quoted names equal the notice's.  Returns 1 and sets *schema and
 * *table (owned by the caller), 0 when none or several match, -1 on error.
 */
static int resolve_names(wp_stager_t *stager, const char *names, char **schema, char **table)
{
    const char *params[] = {stager->source->name, names};
    PGresult *res = query_params(stager,
                                 "SELECT schema_name, table_name FROM walpipe.source_tables WHERE source = $1 "
                                 "AND '\"' || schema_name || '\".\"' || table_name || '\"' = $2 UNION "
                                 "SELECT schema_name, table_name FROM walpipe.table_schemas WHERE source = $1 "
                                 "AND '\"' || schema_name || '\".\"' || table_name || '\"' = $2",
                                 2, params, NULL, NULL, "look up the table of a dropped change");
    if (res == NULL)
        return -1;
    int rc = 0;
    if (PQntuples(res) == 1) {
        *schema = wp_strdup(PQgetvalue(res, 0, 0));
        *table = wp_strdup(PQgetvalue(res, 0, 1));
        rc = 1;
    }
    PQclear(res);
    return rc;
}

/*
 * True (1) when a resync of schema.table finished at a consistent point past
 * lsn: its copy already holds what the dropped change did (the stream may
 * reach a transaction after a resync that started later).
 */
static int resynced_past(wp_stager_t *stager, const char *schema, const char *table, wp_lsn_t lsn)
{
    char l[WP_LSN_STRLEN];
    wp_buf_t name = WP_BUF_INIT;
    wp_buf_printf(&name, "%s.%s", schema, table);
    const char *params[] = {stager->source->name, wp_lsn_format(lsn, l), name.data};
    PGresult *res = query_params(stager,
                                 "SELECT EXISTS (SELECT FROM walpipe.snapshots WHERE source = $1 AND kind = 'requested' "
                                 "AND state = 'done' AND lsn > $2::pg_lsn AND $3 = ANY (tables))",
                                 3, params, NULL, NULL, "look for a resync past a dropped change");
    wp_buf_free(&name);
    if (res == NULL)
        return -1;
    int rc = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    PQclear(res);
    return rc;
}

/*
 * Records each change wal2json dropped as an open "dropped_change"
 * divergence, in the batch (so with the checkpoint that passes its
 * transaction: never lost once the slot is acknowledged; a transaction
 * decoded again after a restart finds its divergence open and adds nothing).
 */
static int stage_dropped(wp_stager_t *stager, const wp_dropped_t *dropped)
{
    for (; dropped; dropped = dropped->next) {
        int rc = -1;
        char *schema = NULL, *table = NULL;
        wp_buf_t reason = WP_BUF_INIT;
        const char *what = dropped->updates && dropped->deletes ? "UPDATEs and DELETEs"
                           : dropped->updates                   ? "UPDATEs"
                                                                : "DELETEs";
        if (dropped->schema) {
            schema = wp_strdup(dropped->schema);
            table = wp_strdup(dropped->table);
        } else {
            int found = resolve_names(stager, dropped->names, &schema, &table);
            if (found < 0)
                goto next;
            if (found == 0) {
                /* kept as the notice gave it: the record is still there to be seen */
                schema = wp_strdup("");
                table = wp_strdup(dropped->names);
                wp_buf_printf(&reason, "(wal2json named the table %s, which walpipe cannot split into schema and "
                                       "table) ",
                              dropped->names);
            }
        }
        int past = dropped->lsn == WP_LSN_INVALID ? 0 : resynced_past(stager, schema, table, dropped->lsn);
        if (past < 0)
            goto next;
        if (past) {
            rc = 0;
            goto next;
        }
        wp_buf_printf(&reason,
                      "wal2json dropped %s of this table in this transaction (it sends only a warning): the table "
                      "has REPLICA IDENTITY NOTHING, or no primary key under REPLICA IDENTITY DEFAULT, so these "
                      "changes carry no key and the mirror missed them; hint: give the table a primary key and "
                      "ALTER TABLE ... REPLICA IDENTITY DEFAULT (or USING INDEX, or FULL); a resync (`walpipe "
                      "snapshot --table`, or [workers] resync = auto) repairs the mirror",
                      what);
        rc = wp_diverge_record(stager->conn, stager->source->name, schema, table, WP_DIVERGE_DROPPED_CHANGE,
                               dropped->lsn, reason.data) < 0
                 ? -1
                 : 0;
    next:
        free(schema);
        free(table);
        wp_buf_free(&reason);
        if (rc != 0)
            return -1;
    }
    return 0;
}

/*
 * Rewrites the key of a transaction whose commit end LSN was predicted
 * wrong (reader.c, pgoutput): everything this batch wrote keyed by the
 * prediction -- its raw_events rows, decode dead letters, the first_lsn of
 * shapes it recorded first, open divergences -- gets the real end.  Nothing
 * else can hold the prediction: it lies inside the transaction's commit
 * record (a commit record is never shorter than predicted), where no other
 * row's key can point.  lsn is no partition key of raw_events (received_at
 * is) and in no unique key, so the UPDATE moves no row and cannot conflict.
 */
static int stage_relabel(wp_stager_t *stager, const wp_relabel_t *relabel)
{
    char from[WP_LSN_STRLEN], to[WP_LSN_STRLEN], min_id[32];
    wp_lsn_format(relabel->from, from);
    wp_lsn_format(relabel->to, to);
    snprintf(min_id, sizeof min_id, "%lld", (long long)stager->batch_min_id);
    const char *params[] = {stager->source->name, from, to, min_id};
    PGresult *res = query_params(
        stager,
        "WITH r AS (UPDATE walpipe.raw_events SET lsn = $3 WHERE source = $1 AND lsn = $2 AND id >= $4::bigint "
        "RETURNING 1), "
        "d AS (UPDATE walpipe.dead_letters SET lsn = $3 WHERE source = $1 AND lsn = $2 AND kind = 'decode' "
        "RETURNING 1), "
        "s AS (UPDATE walpipe.table_schemas SET first_lsn = $3 WHERE source = $1 AND first_lsn = $2 RETURNING 1), "
        "v AS (UPDATE walpipe.divergences SET lsn = $3 WHERE source = $1 AND lsn = $2 AND resolved_at IS NULL "
        "RETURNING 1) "
        "SELECT (SELECT count(*) FROM r), (SELECT count(*) FROM d), (SELECT count(*) FROM s), "
        "(SELECT count(*) FROM v)",
        4, params, NULL, NULL, "relabel a mispredicted transaction");
    if (res == NULL)
        return -1;
    long long rows = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    wp_debug("relabelled the transaction keyed %s to its commit end %s: %lld rows, %s dead letters, %s shapes, %s "
             "divergences",
             from, to, rows, PQgetvalue(res, 0, 1), PQgetvalue(res, 0, 2), PQgetvalue(res, 0, 3));
    PQclear(res);
    return 0;
}

/* After a commit: adds the batch to this source's metrics. */
static void publish_batch(wp_stager_t *stager)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    double t = (double)now.tv_sec + (double)now.tv_nsec / 1e9;
    for (int i = 0; i < WP_EVENT_TYPES; i++)
        if (stager->batch_type_rows[i])
            wp_metric_add(stager->m_events[i], (double)stager->batch_type_rows[i]);
    for (size_t i = 0; i < stager->nruns; i++) {
        double latency = t - unix_seconds(stager->runs[i].commit_time);
        wp_metric_observe(stager->m_latency, latency > 0 ? latency : 0, stager->runs[i].rows);
    }
    wp_metric_add(stager->m_bytes, (double)stager->batch_bytes);
    wp_metric_add(stager->m_commits, 1);
    if (stager->batch_newest_commit)
        wp_metric_set(stager->m_last_commit, unix_seconds(stager->batch_newest_commit));
}

static int batch_commit(wp_stager_t *stager, wp_queue_t *queue)
{
    if (copy_end(stager) != 0)
        return -1;
    if (stager->batch_has_pos && write_checkpoint(stager, &stager->batch_pos, NULL, true, "write the checkpoint") != 0)
        return -1;
    /* NOTIFY wakes idle transform workers at commit */
    if (exec_sql(stager, stager->batch_rows ? "NOTIFY walpipe_raw_events; COMMIT" : "COMMIT", "commit a batch") != 0)
        return -1;
    stager->in_txn = false;
    wp_shapes_commit(stager->shapes);
    publish_batch(stager);
    stager->total_rows += stager->batch_rows;
    if (stager->batch_has_pos)
        wp_queue_set_durable(queue, &stager->batch_pos, stager->batch_rows);
    return 0;
}

/* Adds one segment to the open batch. */
static int stage_segment(wp_stager_t *stager, wp_segment_t *segment)
{
    if (!stager->in_txn && batch_begin(stager) != 0)
        return -1;
    if (stage_shapes(stager, segment) != 0)
        return -1;
    if (segment->dead && (copy_end(stager) != 0 || stage_dead_letters(stager, segment->dead) != 0))
        return -1;
    if (segment->dropped && (copy_end(stager) != 0 || stage_dropped(stager, segment->dropped) != 0))
        return -1;
    if (segment->rows) {
        if (!stager->in_copy && copy_begin(stager) != 0)
            return -1;
        if (put_copy_data(stager, segment->copy.data, segment->copy.len) != 0)
            return -1;
    }
    /* after the rows: a relabel covers this segment's rows of the transaction too */
    for (size_t i = 0; i < segment->nrelabels; i++)
        if (copy_end(stager) != 0 || stage_relabel(stager, &segment->relabels[i]) != 0)
            return -1;
    stager->batch_rows += segment->rows;
    stager->batch_bytes += segment->copy.len;
    for (int i = 0; i < WP_EVENT_TYPES; i++)
        stager->batch_type_rows[i] += segment->type_rows[i];
    if (stager->nruns + segment->ncommit_runs > stager->runs_cap) {
        stager->runs_cap = (stager->nruns + segment->ncommit_runs) * 2;
        stager->runs = wp_realloc(stager->runs, stager->runs_cap * sizeof *stager->runs);
    }
    for (size_t i = 0; i < segment->ncommit_runs; i++) {
        stager->runs[stager->nruns++] = segment->commit_runs[i];
        if (segment->commit_runs[i].commit_time > stager->batch_newest_commit)
            stager->batch_newest_commit = segment->commit_runs[i].commit_time;
    }
    stager->batch_pos = segment->pos;
    stager->batch_has_pos = true;
    stager->batch_open = segment->txn_open;
    return 0;
}

int wp_stager_add_segment(wp_stager_t *stager, wp_segment_t *segment)
{
    return stage_segment(stager, segment);
}

int wp_stager_commit_chunk(wp_stager_t *stager, int64_t snapshot_id, const char *schema, const char *table, int chunk,
                           uint64_t rows)
{
    int rc = -1;
    char id[32], ch[16], n[32];
    if (!stager->in_txn && batch_begin(stager) != 0)
        return -1;
    if (copy_end(stager) != 0)
        goto out;
    snprintf(id, sizeof id, "%lld", (long long)snapshot_id);
    snprintf(ch, sizeof ch, "%d", chunk);
    snprintf(n, sizeof n, "%llu", (unsigned long long)rows);
    const char *params[] = {id, schema, table, ch, n};
    if (exec_params(stager,
                    "INSERT INTO walpipe.snapshot_chunks (snapshot_id, schema_name, table_name, chunk, rows) "
                    "VALUES ($1, $2, $3, $4, $5)",
                    5, params, NULL, NULL, "record a snapshot chunk") != 0 ||
        exec_sql(stager, "COMMIT", "commit a snapshot chunk") != 0)
        goto out;
    stager->in_txn = false;
    wp_shapes_commit(stager->shapes);
    publish_batch(stager);
    rc = 0;
out:
    if (rc != 0)
        wp_stager_close(stager); /* rolls back; the caller reopens and retries the chunk */
    return rc;
}

static void log_progress(wp_stager_t *stager, wp_queue_t *queue)
{
    int64_t now = wp_now_ms();
    if (now - stager->last_progress_ms < PROGRESS_LOG_MS)
        return;
    if (stager->last_progress_ms != 0 && stager->total_rows != stager->last_progress_rows) {
        wp_position_t pos = wp_queue_durable(queue);
        char lsn[WP_LSN_STRLEN];
        double secs = (double)(now - stager->last_progress_ms) / 1000.0;
        wp_info("staged %llu events (%.0f/s), %llu dead letters, checkpoint %s",
                (unsigned long long)stager->total_rows,
                (double)(stager->total_rows - stager->last_progress_rows) / secs,
                (unsigned long long)stager->total_dead, wp_lsn_format(pos.lsn, lsn));
    }
    stager->last_progress_ms = now;
    stager->last_progress_rows = stager->total_rows;
}

int wp_stager_run(wp_stager_t *stager, wp_queue_t *queue)
{
    int rc = -1;
    bool failed = false;
    for (;;) {
        int wait = STAGER_IDLE_WAIT_MS;
        if (stager->in_txn && !stager->batch_open) {
            int64_t left = stager->batch_started_ms + stager->config->batch_ms - wp_now_ms();
            wait = left > 0 ? (int)left : 0;
        }
        wp_segment_t *segment = wp_queue_pop(queue, wait, &failed);
        if (failed)
            goto out;
        wp_metric_set(stager->m_queue, (double)wp_queue_length(queue));
        if (segment) {
            bool final = segment->final;
            bool more_coming = segment->more_coming;
            int src = stage_segment(stager, segment);
            wp_segment_destroy(segment);
            if (src != 0)
                goto out;
            bool full = stager->batch_rows >= (size_t)stager->config->batch_rows ||
                        stager->batch_bytes >= stager->config->batch_bytes;
            bool old = wp_now_ms() - stager->batch_started_ms >= stager->config->batch_ms;
            /*
             * An empty queue means "commit now" only when the reader has caught
             * up with the source (it pushed because its socket ran dry); while
             * it works through a backlog the batch grows to its limits instead.
             */
            bool dry = wp_queue_length(queue) == 0 && !more_coming;
            if (final && stager->batch_open) {
                /* the reader stopped inside a transaction it had not all: none of the batch is checkpointed */
                wp_info("stopped inside a source transaction whose commit had not arrived: rolled back the "
                        "staging batch holding its first rows (the source sends them again)");
                if (copy_end(stager) != 0 || exec_sql(stager, "ROLLBACK", "roll back the unfinished batch") != 0)
                    goto out;
                stager->in_txn = false;
                wp_shapes_rollback(stager->shapes);
            } else if ((final || full || old || dry) && !stager->batch_open && batch_commit(stager, queue) != 0) {
                goto out;
            }
            if (final) {
                wp_queue_set_finished(queue);
                rc = 0;
                goto out;
            }
        } else if (stager->in_txn && !stager->batch_open && batch_commit(stager, queue) != 0) {
            goto out;
        }
        if (!stager->in_txn) {
            log_progress(stager, queue);
            if (wp_now_ms() - stager->last_partition_ms >= PARTITION_CHECK_MS && ensure_partitions(stager) != 0)
                goto out;
        }
    }
out:
    if (rc != 0) {
        if (!failed)
            wp_queue_fail(queue);
        /* Dropping the connection rolls back whatever the batch had in flight. */
        wp_stager_close(stager);
    }
    return rc;
}

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
 * the source (nothing more to wait for).  Any
 * staging error rolls the batch back and fails the session; the source then
 * reconnects and resumes from the last committed checkpoint.
 *
 * Threading: runs in its own thread; touches only its connection and the queue.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "log.h"
#include "migrate.h"
#include "stager.h"

#define STAGER_IDLE_WAIT_MS 200
#define PROGRESS_LOG_MS 10000
#define PARTITION_CHECK_MS (3600 * 1000)

struct wp_stager {
    const wp_config_t *config;
    const wp_source_config_t *source;
    PGconn *conn;
    char *source_lit; /* source name as a quoted SQL literal */
    char *slot_lit;
    char systemid[32];
    /* batch in progress */
    bool in_txn;
    bool in_copy;
    size_t batch_rows;
    size_t batch_bytes;
    int64_t batch_started_ms;
    wp_position_t batch_pos;
    bool batch_has_pos;
    /* progress */
    uint64_t total_rows;
    uint64_t total_dead;
    int64_t last_progress_ms;
    uint64_t last_progress_rows;
    int64_t last_partition_ms;
};

wp_stager_t *wp_stager_create(const wp_config_t *config, const wp_source_config_t *source)
{
    wp_stager_t *stager = wp_calloc(1, sizeof *stager);
    stager->config = config;
    stager->source = source;
    return stager;
}

void wp_stager_close(wp_stager_t *stager)
{
    if (stager->conn)
        PQfinish(stager->conn);
    stager->conn = NULL;
    if (stager->source_lit)
        PQfreemem(stager->source_lit);
    if (stager->slot_lit)
        PQfreemem(stager->slot_lit);
    stager->source_lit = stager->slot_lit = NULL;
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
    free(stager);
}

/* Runs sql expecting status; logs and returns -1 otherwise.  Frees the result. */
static int exec_expect(wp_stager_t *stager, const char *sql, ExecStatusType status, const char *what)
{
    PGresult *res = PQexec(stager->conn, sql);
    int rc = 0;
    if (PQresultStatus(res) != status) {
        wp_error("staging: could not %s: %s", what, PQerrorMessage(stager->conn));
        rc = -1;
    }
    PQclear(res);
    return rc;
}

/* Runs one parameterized command (text parameters unless formats says otherwise); logs and returns -1 on failure. */
static int exec_params(wp_stager_t *stager, const char *sql, int n, const char *const *params, const int *lengths,
                       const int *formats, const char *what)
{
    PGresult *res = PQexecParams(stager->conn, sql, n, NULL, params, lengths, formats, 0);
    int rc = 0;
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        wp_error("staging: could not %s: %s", what, PQerrorMessage(stager->conn));
        rc = -1;
    }
    PQclear(res);
    return rc;
}

static int ensure_partitions(wp_stager_t *stager)
{
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT walpipe.ensure_partitions(%d)", stager->config->partitions_ahead);
    int rc = exec_expect(stager, sql, PGRES_TUPLES_OK, "create raw_events partitions");
    if (rc == 0)
        stager->last_partition_ms = wp_now_ms();
    return rc;
}

int wp_stager_open(wp_stager_t *stager, bool *fatal)
{
    int rc = -1;
    PGresult *res = NULL;
    char appname[96];
    *fatal = false;
    wp_stager_close(stager);

    snprintf(appname, sizeof appname, "walpipe_stager_%s", stager->source->name);
    const char *keys[] = {"dbname", "application_name", "options", NULL};
    const char *vals[] = {stager->config->staging_conninfo, appname, "-c synchronous_commit=on", NULL};
    stager->conn = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(stager->conn) != CONNECTION_OK) {
        wp_error("could not connect to staging: %s", PQerrorMessage(stager->conn));
        goto out;
    }
    stager->source_lit = PQescapeLiteral(stager->conn, stager->source->name, strlen(stager->source->name));
    stager->slot_lit = PQescapeLiteral(stager->conn, stager->source->slot, strlen(stager->source->slot));
    if (!stager->source_lit || !stager->slot_lit) {
        wp_error("staging: could not quote names: %s", PQerrorMessage(stager->conn));
        goto out;
    }
    res = PQexec(stager->conn, "SELECT to_regclass('walpipe.schema_migrations') IS NOT NULL");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_error("staging: could not check the walpipe schema: %s", PQerrorMessage(stager->conn));
        goto out;
    }
    int version = 0;
    if (strcmp(PQgetvalue(res, 0, 0), "t") == 0) {
        PQclear(res);
        res = PQexec(stager->conn, "SELECT coalesce(max(version), 0) FROM walpipe.schema_migrations");
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            wp_error("staging: could not read the schema version: %s", PQerrorMessage(stager->conn));
            goto out;
        }
        version = atoi(PQgetvalue(res, 0, 0));
    }
    if (version < wp_migrate_latest_version()) {
        wp_error("staging schema is at version %d but this walpipe needs %d; hint: run `walpipe init --config %s`",
                 version, wp_migrate_latest_version(), stager->config->path ? stager->config->path : "FILE");
        *fatal = true;
        goto out;
    }
    if (ensure_partitions(stager) != 0)
        goto out;
    rc = 0;
out:
    PQclear(res);
    if (rc != 0 && stager->conn) {
        PQfinish(stager->conn);
        stager->conn = NULL;
    }
    return rc;
}

static bool parse_lsn_value(const char *s, wp_lsn_t *out)
{
    return wp_lsn_parse(s, strlen(s), out);
}

int wp_stager_checkpoint_read(wp_stager_t *stager, wp_checkpoint_t *out)
{
    int rc = -1;
    wp_buf_t sql = WP_BUF_INIT;
    wp_buf_printf(&sql,
                  "SELECT slot, systemid, lsn, txn_end, coalesce(txn_seq, 0), snapshot_state FROM walpipe.checkpoints "
                  "WHERE source = %s",
                  stager->source_lit);
    PGresult *res = PQexec(stager->conn, sql.data);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_error("staging: could not read checkpoint: %s", PQerrorMessage(stager->conn));
        goto out;
    }
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
    wp_buf_free(&sql);
    return rc;
}

/* Appends the upsert of the checkpoint row at pos. */
static void append_checkpoint_sql(wp_stager_t *stager, wp_buf_t *sql, const wp_position_t *pos)
{
    char lsn[WP_LSN_STRLEN], end[WP_LSN_STRLEN];
    wp_lsn_format(pos->lsn, lsn);
    wp_buf_printf(sql,
                  "INSERT INTO walpipe.checkpoints AS c (source, slot, systemid, lsn, txn_end, txn_seq, updated_at) "
                  "VALUES (%s, %s, '%s', '%s', ",
                  stager->source_lit, stager->slot_lit, stager->systemid, lsn);
    if (pos->txn_end != WP_LSN_INVALID)
        wp_buf_printf(sql, "'%s', %d", wp_lsn_format(pos->txn_end, end), pos->txn_seq);
    else
        wp_buf_puts(sql, "NULL, NULL");
    wp_buf_puts(sql, ", now()) ON CONFLICT (source) DO UPDATE SET slot = excluded.slot, systemid = excluded.systemid, "
                     "lsn = excluded.lsn, txn_end = excluded.txn_end, txn_seq = excluded.txn_seq, "
                     "updated_at = excluded.updated_at");
}

int wp_stager_checkpoint_init(wp_stager_t *stager, const char *systemid, wp_lsn_t lsn, const char *snapshot_state)
{
    wp_buf_t sql = WP_BUF_INIT;
    wp_position_t pos = {.lsn = lsn};
    char l[WP_LSN_STRLEN];
    snprintf(stager->systemid, sizeof stager->systemid, "%s", systemid);
    append_checkpoint_sql(stager, &sql, &pos);
    wp_buf_printf(&sql, "; UPDATE walpipe.checkpoints SET snapshot_state = '%s', snapshot_lsn = %s%s%s WHERE source = %s",
                  snapshot_state, strcmp(snapshot_state, "none") == 0 ? "NULL" : "'",
                  strcmp(snapshot_state, "none") == 0 ? "" : wp_lsn_format(lsn, l),
                  strcmp(snapshot_state, "none") == 0 ? "" : "'", stager->source_lit);
    int rc = exec_expect(stager, sql.data, PGRES_COMMAND_OK, "write the first checkpoint");
    wp_buf_free(&sql);
    return rc;
}

int wp_stager_snapshot_done(wp_stager_t *stager)
{
    wp_buf_t sql = WP_BUF_INIT;
    wp_buf_printf(&sql, "UPDATE walpipe.checkpoints SET snapshot_state = 'done', updated_at = now() WHERE source = %s",
                  stager->source_lit);
    int rc = exec_expect(stager, sql.data, PGRES_COMMAND_OK, "mark the initial snapshot done");
    wp_buf_free(&sql);
    return rc;
}

int wp_stager_snapshot_discard(wp_stager_t *stager)
{
    wp_buf_t sql = WP_BUF_INIT;
    wp_buf_printf(&sql,
                  "BEGIN; DELETE FROM walpipe.raw_events WHERE source = %s AND event_type = 'snapshot' AND lsn IN "
                  "(SELECT lsn FROM walpipe.snapshots WHERE source = %s AND kind = 'initial' AND state <> 'done'); "
                  "UPDATE walpipe.snapshots SET state = 'superseded', finished_at = now() WHERE source = %s "
                  "AND kind = 'initial' AND state <> 'done'; COMMIT",
                  stager->source_lit, stager->source_lit, stager->source_lit);
    int rc = exec_expect(stager, sql.data, PGRES_COMMAND_OK, "discard the unfinished snapshot");
    if (rc != 0)
        PQclear(PQexec(stager->conn, "ROLLBACK"));
    wp_buf_free(&sql);
    return rc;
}

int wp_stager_snapshot_begin(wp_stager_t *stager, const char *kind, wp_lsn_t lsn, int64_t *id)
{
    int rc = -1;
    wp_buf_t sql = WP_BUF_INIT;
    char l[WP_LSN_STRLEN];
    wp_buf_printf(&sql, "INSERT INTO walpipe.snapshots (source, kind, lsn) VALUES (%s, '%s', '%s') RETURNING id",
                  stager->source_lit, kind, wp_lsn_format(lsn, l));
    PGresult *res = PQexec(stager->conn, sql.data);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_error("staging: could not record a snapshot: %s", PQerrorMessage(stager->conn));
        goto out;
    }
    *id = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    rc = 0;
out:
    PQclear(res);
    wp_buf_free(&sql);
    return rc;
}

int wp_stager_snapshot_finish(wp_stager_t *stager, int64_t id, const char *state, const char *tables_literal,
                              uint64_t rows)
{
    wp_buf_t sql = WP_BUF_INIT;
    char *tables = PQescapeLiteral(stager->conn, tables_literal, strlen(tables_literal));
    wp_buf_printf(&sql,
                  "UPDATE walpipe.snapshots SET state = '%s', rows = %llu, tables = %s::text[], finished_at = now() "
                  "WHERE id = %lld",
                  state, (unsigned long long)rows, tables ? tables : "'{}'", (long long)id);
    if (tables)
        PQfreemem(tables);
    int rc = exec_expect(stager, sql.data, PGRES_COMMAND_OK, "record the end of a snapshot");
    wp_buf_free(&sql);
    return rc;
}

int wp_stager_accept_gap(wp_stager_t *stager, wp_lsn_t from, wp_lsn_t to, const char *reason)
{
    int rc = -1;
    wp_buf_t sql = WP_BUF_INIT;
    wp_position_t pos = {.lsn = to};
    char a[WP_LSN_STRLEN], b[WP_LSN_STRLEN];
    char *reason_lit = PQescapeLiteral(stager->conn, reason, strlen(reason));
    if (reason_lit == NULL) {
        wp_error("staging: could not quote a gap reason: %s", PQerrorMessage(stager->conn));
        goto out;
    }
    wp_buf_printf(&sql,
                  "BEGIN; INSERT INTO walpipe.accepted_gaps (source, slot, from_lsn, to_lsn, reason) "
                  "VALUES (%s, %s, '%s', '%s', %s); ",
                  stager->source_lit, stager->slot_lit, wp_lsn_format(from, a), wp_lsn_format(to, b), reason_lit);
    append_checkpoint_sql(stager, &sql, &pos);
    wp_buf_puts(&sql, "; COMMIT");
    if (exec_expect(stager, sql.data, PGRES_COMMAND_OK, "record the accepted gap") != 0) {
        PQclear(PQexec(stager->conn, "ROLLBACK"));
        goto out;
    }
    wp_warn("accepted a gap from %s to %s (%s): changes in between may be missing from staging; recorded in "
            "walpipe.accepted_gaps",
            a, b, reason);
    rc = 0;
out:
    if (reason_lit)
        PQfreemem(reason_lit);
    wp_buf_free(&sql);
    return rc;
}

/* Generates a random (version 4) UUID for batch_id. */
static void make_uuid(char out[37])
{
    unsigned char b[16];
    FILE *f = fopen("/dev/urandom", "rb");
    size_t got = f ? fread(b, 1, sizeof b, f) : 0;
    if (f)
        fclose(f);
    if (got != sizeof b) {
        for (size_t i = 0; i < sizeof b; i++)
            b[i] = (unsigned char)(rand() & 0xff);
    }
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
    snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2], b[3],
             b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

static int batch_begin(wp_stager_t *stager)
{
    char uuid[37], sql[128];
    make_uuid(uuid);
    snprintf(sql, sizeof sql, "BEGIN; SET LOCAL walpipe.batch_id = '%s'", uuid);
    if (exec_expect(stager, sql, PGRES_COMMAND_OK, "begin a staging transaction") != 0)
        return -1;
    stager->in_txn = true;
    stager->batch_rows = stager->batch_bytes = 0;
    stager->batch_started_ms = wp_now_ms();
    stager->batch_has_pos = false;
    return 0;
}

/* The binary COPY stream around the encoder's rows (encoder.c): header, and the trailer (field count -1). */
static const char copy_header[19] = {'P', 'G', 'C', 'O', 'P', 'Y', '\n', '\377', '\r', '\n', '\0', /* signature */
                                     0,   0,   0,   0,                                             /* flags */
                                     0,   0,   0,   0};                                            /* no extension */
static const char copy_trailer[2] = {'\377', '\377'};

static int copy_begin(wp_stager_t *stager)
{
    PGresult *res = PQexec(stager->conn, "COPY walpipe.raw_events (source, event_type, payload, lsn, xid, commit_ts, "
                                         "seq, schema_name, table_name, shape_id) FROM STDIN (FORMAT binary)");
    int rc = 0;
    if (PQresultStatus(res) != PGRES_COPY_IN) {
        wp_error("staging: could not start COPY into raw_events: %s", PQerrorMessage(stager->conn));
        rc = -1;
    } else if (PQputCopyData(stager->conn, copy_header, sizeof copy_header) != 1) {
        wp_error("staging: could not send COPY data: %s", PQerrorMessage(stager->conn));
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
    if (PQputCopyData(stager->conn, copy_trailer, sizeof copy_trailer) != 1 ||
        PQputCopyEnd(stager->conn, NULL) != 1) {
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

static int stage_shapes(wp_stager_t *stager, const wp_shape_t *shape)
{
    for (; shape; shape = shape->next) {
        char id[32], lsn[WP_LSN_STRLEN];
        snprintf(id, sizeof id, "%lld", (long long)shape->id);
        wp_lsn_format(shape->first_lsn, lsn);
        const char *params[] = {stager->source->name, id, shape->schema, shape->table, shape->columns, lsn};
        char what[256];
        snprintf(what, sizeof what, "record the shape of table \"%s\".\"%s\"", shape->schema, shape->table);
        if (exec_params(stager,
                        "INSERT INTO walpipe.table_schemas (source, shape_id, schema_name, table_name, columns, "
                        "first_lsn) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                        6, params, NULL, NULL, what) != 0)
            return -1;
    }
    return 0;
}

static int stage_dead_letters(wp_stager_t *stager, const wp_dead_letter_t *dead)
{
    for (; dead; dead = dead->next) {
        char lsn[WP_LSN_STRLEN], seq[16];
        wp_lsn_format(dead->lsn, lsn);
        snprintf(seq, sizeof seq, "%d", dead->seq);
        const char *params[] = {stager->source->name, lsn, seq, dead->raw, dead->reason};
        int lengths[] = {0, 0, 0, (int)dead->raw_len, 0};
        int formats[] = {0, 0, 0, 1, 0};
        if (exec_params(stager,
                        "INSERT INTO walpipe.dead_letters (source, lsn, seq, raw, reason) VALUES ($1, $2, $3, $4, $5)",
                        5, params, lengths, formats, "record a dead letter") != 0)
            return -1;
        wp_warn("dead letter at %s seq %d: %s", lsn, dead->seq, dead->reason);
        stager->total_dead++;
    }
    return 0;
}

static int batch_commit(wp_stager_t *stager, wp_queue_t *queue)
{
    wp_buf_t sql = WP_BUF_INIT;
    int rc = -1;
    if (copy_end(stager) != 0)
        goto out;
    if (stager->batch_has_pos)
        append_checkpoint_sql(stager, &sql, &stager->batch_pos);
    if (sql.len)
        wp_buf_puts(&sql, "; ");
    if (stager->batch_rows)
        wp_buf_puts(&sql, "NOTIFY walpipe_raw_events; "); /* wakes idle transform workers at commit */
    wp_buf_puts(&sql, "COMMIT");
    if (exec_expect(stager, sql.data, PGRES_COMMAND_OK, "commit a batch") != 0)
        goto out;
    stager->in_txn = false;
    stager->total_rows += stager->batch_rows;
    if (stager->batch_has_pos)
        wp_queue_set_durable(queue, &stager->batch_pos, stager->batch_rows);
    rc = 0;
out:
    wp_buf_free(&sql);
    return rc;
}

/* Adds one segment to the open batch. */
static int stage_segment(wp_stager_t *stager, wp_segment_t *segment)
{
    if (!stager->in_txn && batch_begin(stager) != 0)
        return -1;
    if ((segment->shapes || segment->dead) && copy_end(stager) != 0)
        return -1;
    if (stage_shapes(stager, segment->shapes) != 0 || stage_dead_letters(stager, segment->dead) != 0)
        return -1;
    if (segment->rows) {
        if (!stager->in_copy && copy_begin(stager) != 0)
            return -1;
        if (PQputCopyData(stager->conn, segment->copy.data, (int)segment->copy.len) != 1) {
            wp_error("staging: could not send COPY data: %s", PQerrorMessage(stager->conn));
            return -1;
        }
    }
    stager->batch_rows += segment->rows;
    stager->batch_bytes += segment->copy.len;
    stager->batch_pos = segment->pos;
    stager->batch_has_pos = true;
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
        exec_expect(stager, "COMMIT", PGRES_COMMAND_OK, "commit a snapshot chunk") != 0)
        goto out;
    stager->in_txn = false;
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
        if (stager->in_txn) {
            int64_t left = stager->batch_started_ms + stager->config->batch_ms - wp_now_ms();
            wait = left > 0 ? (int)left : 0;
        }
        wp_segment_t *segment = wp_queue_pop(queue, wait, &failed);
        if (failed)
            goto out;
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
            if ((final || full || old || dry) && batch_commit(stager, queue) != 0)
                goto out;
            if (final) {
                rc = 0;
                goto out;
            }
        } else if (stager->in_txn && batch_commit(stager, queue) != 0) {
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

/*
 * snapshot.c: existing rows -> raw_events, under a slot's exported snapshot.
 *
 * Job: list the tables to copy, split each into ctid ranges (chunks), and
 * copy the chunks with snapshot_workers threads.  Each worker has its own
 * source connection, which imports the exported snapshot
 * (SET TRANSACTION SNAPSHOT) inside a REPEATABLE READ transaction, and its own
 * staging connection.  A chunk's rows and its walpipe.snapshot_chunks row
 * commit in one staging transaction.
 *
 * Invariant: every snapshot row was read under the snapshot whose slot's
 * consistent point it carries as lsn.  Transactions that committed before that
 * point are in the snapshot and never streamed; those that commit after it are
 * streamed and not in the snapshot; so snapshot + stream hold every change
 * once.  A copy that cannot finish under one snapshot is never completed under
 * another: the initial snapshot starts over (source.c deletes the unfinished
 * attempt's rows first), and every attempt is recorded in walpipe.snapshots.
 * A resync's truncate of a table, at (consistent point, -1), commits with the
 * table's first chunk, so it is never staged without rows after it, and it
 * orders before them by version and by id.
 *
 * Rows are built as wal2json-shaped jansson objects, printed, and read by the
 * same decoder as the stream (wp_decoder_parse), so their payloads follow
 * exactly the value rules of streamed changes.  The source connections pin the same session settings as
 * the walsender (DateStyle, TimeZone, ...) so values render the same way.
 *
 * Threading: the leader lists tables and chunks, then workers pull chunks
 * from a shared list under a mutex; each worker owns its connections,
 * decoder, encoder and stager.
 */
#include "wp_setup.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <libpq-fe.h>

#include "decoder.h"
#include "encoder.h"
#include "log.h"
#include "pg.h"
#include "pipeline.h"
#include "reader.h"
#include "resync.h"
#include "runtime.h"
#include "snapshot.h"
#include "stager.h"

#define CHUNK_PAGES 2048 /* 16 MB of heap per chunk */
#define CHUNK_RETRIES 5
#define PROGRESS_LOG_MS 5000 /* a running snapshot logs its progress at most this often */
#define SEGMENT_BYTES (256 * 1024)
#define SOURCE_OPTIONS \
    "-c datestyle=ISO,MDY -c timezone=UTC -c intervalstyle=postgres -c bytea_output=hex -c extra_float_digits=3"

typedef struct column {
    char *name;
    char *type;
    int64_t typeoid;
    int64_t attnum; /* its position, as wal2json's include-column-positions gives it */
} column_t;

typedef struct table {
    char *schema;
    char *name;
    char *qualified; /* quoted schema.table for SQL */
    column_t *columns;
    size_t ncolumns;
    int64_t pages;
    int64_t estimated; /* pg_class.reltuples when listed; -1 never analyzed */
    uint64_t rows; /* copied so far (all chunks), under mu */
    int chunks_left;
    bool truncated; /* a resync's truncate of the table committed (with its first chunk), under mu */
} table_t;

typedef struct chunk {
    table_t *table;
    int index;
    int64_t first_page, end_page; /* end_page < 0: no upper bound */
} chunk_t;

typedef struct copy_state {
    const wp_snapshot_job_t *job;
    int64_t snapshot_id;
    table_t *tables;
    size_t ntables;
    chunk_t *chunks;
    size_t nchunks;
    pthread_mutex_t mu;
    size_t next_chunk;
    uint64_t rows;
    bool failed;
    int64_t estimated;        /* rows expected in all (sum of known estimates); 0 unknown */
    int64_t started_ms, progress_ms; /* for the progress log, under mu */
    int progress_quarter;            /* quarters of the estimate already logged, under mu */
} copy_state_t;

static void free_tables(table_t *tables, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        for (size_t k = 0; k < tables[i].ncolumns; k++) {
            free(tables[i].columns[k].name);
            free(tables[i].columns[k].type);
        }
        free(tables[i].columns);
        free(tables[i].schema);
        free(tables[i].name);
        free(tables[i].qualified);
    }
    free(tables);
}

/*
 * Opens a source connection whose transaction sees exactly the exported
 * snapshot.  SET TRANSACTION SNAPSHOT takes no parameter, so the name (text
 * from the source server) must have the exported-snapshot form and is quoted.
 */
static PGconn *open_snapshot_conn(const wp_snapshot_job_t *job)
{
    char appname[96];
    char *lit = NULL;
    wp_buf_t sql = WP_BUF_INIT;
    bool ok = false;
    snprintf(appname, sizeof appname, "walpipe_snapshot_%s", job->source->name);
    if (!wp_reader_snapshot_name_valid(job->snapshot_name)) {
        wp_error("snapshot: the source exported a snapshot name of an unknown form; refusing to import it");
        return NULL;
    }
    PGconn *conn = wp_pg_connect(job->source->conninfo, appname, SOURCE_OPTIONS, "source");
    if (conn == NULL)
        return NULL;
    lit = PQescapeLiteral(conn, job->snapshot_name, strlen(job->snapshot_name));
    if (lit == NULL) {
        wp_error("snapshot: could not quote the snapshot name: %s", PQerrorMessage(conn));
        goto out;
    }
    wp_buf_printf(&sql, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT %s", lit);
    char what[WP_SNAPSHOT_NAME_LEN + 32];
    snprintf(what, sizeof what, "import snapshot %s", job->snapshot_name);
    ok = wp_pg_exec(conn, "snapshot", sql.data, what) == 0;
out:
    if (lit)
        PQfreemem(lit);
    wp_buf_free(&sql);
    if (!ok) {
        PQfinish(conn);
        conn = NULL;
    }
    return conn;
}

/* Appends s as a quoted literal to sql.  Returns 0, or -1 (logged) when libpq cannot quote it. */
static int append_literal(PGconn *conn, wp_buf_t *sql, const char *s)
{
    char *lit = PQescapeLiteral(conn, s, strlen(s));
    if (lit == NULL) {
        wp_error("snapshot: could not quote a table name: %s", PQerrorMessage(conn));
        return -1;
    }
    wp_buf_puts(sql, lit);
    PQfreemem(lit);
    return 0;
}

/*
 * Lists the leaf tables to copy with their columns and sizes.  Named tables
 * that are partitioned expand to their partitions (wal2json reports changes
 * under the leaf names too).  Returns 0, or -1 (logged).
 */
static int list_tables(PGconn *conn, const wp_snapshot_job_t *job, table_t **out, size_t *nout)
{
    int rc = -1;
    wp_buf_t sql = WP_BUF_INIT;
    PGresult *res = NULL;
    table_t *tables = NULL;
    size_t n = 0;
    const wp_table_ref_t *refs = job->tables ? job->tables : job->source->tables;
    size_t nrefs = job->tables ? job->ntables : job->source->ntables;

    wp_buf_puts(&sql, "SELECT c.oid, n.nspname, c.relname, pg_relation_size(c.oid) / current_setting('block_size')::int, "
                      "c.reltuples::bigint "
                      "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
                      "AND c.relpersistence = 'p' ");
    if (refs) {
        wp_buf_puts(&sql, "AND EXISTS (SELECT 1 FROM (VALUES ");
        for (size_t i = 0; i < nrefs; i++) {
            wp_buf_puts(&sql, i ? ", (" : "(");
            if (append_literal(conn, &sql, refs[i].schema) != 0)
                goto out;
            wp_buf_puts(&sql, ", ");
            if (append_literal(conn, &sql, refs[i].table) != 0)
                goto out;
            wp_buf_puts(&sql, ")");
        }
        /* a named partitioned table stands for its leaf partitions */
        wp_buf_puts(&sql, ") AS w(s, t) JOIN pg_namespace wn ON wn.nspname = w.s JOIN pg_class wc ON "
                          "wc.relnamespace = wn.oid AND wc.relname = w.t WHERE wc.oid = c.oid OR c.oid IN "
                          "(SELECT relid FROM pg_partition_tree(wc.oid) WHERE isleaf)) ");
    } else {
        wp_buf_puts(&sql, "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%' ");
    }
    /* exclude_tables: wal2json's filter-tables keeps them out of the stream, this out of the copy */
    for (size_t i = 0; i < job->source->nexclude_tables; i++) {
        wp_buf_puts(&sql, "AND (n.nspname, c.relname) <> (");
        if (append_literal(conn, &sql, job->source->exclude_tables[i].schema) != 0)
            goto out;
        wp_buf_puts(&sql, ", ");
        if (append_literal(conn, &sql, job->source->exclude_tables[i].table) != 0)
            goto out;
        wp_buf_puts(&sql, ") ");
    }
    wp_buf_puts(&sql, "ORDER BY n.nspname, c.relname");
    res = PQexec(conn, sql.data);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_error("snapshot: could not list tables: %s", PQerrorMessage(conn));
        goto out;
    }
    n = (size_t)PQntuples(res);
    if (refs && n == 0 && strcmp(job->kind, "initial") != 0) {
        wp_error("snapshot: none of the tables named exists on the source, or all are in exclude_tables; hint: check "
                 "schema and table names (case matters)");
        goto out;
    }
    if (refs && n == 0)
        /* the source's `tables` may name tables created later: they are streamed once they exist */
        wp_warn("snapshot: none of the tables in `tables` exists on the source yet, so the initial snapshot has "
                "nothing to copy; their changes are captured once they exist; hint: check schema and table names "
                "(case matters)");
    tables = wp_calloc(n ? n : 1, sizeof *tables);
    for (size_t i = 0; i < n; i++) {
        tables[i].schema = wp_strdup(PQgetvalue(res, (int)i, 1));
        tables[i].name = wp_strdup(PQgetvalue(res, (int)i, 2));
        tables[i].pages = strtoll(PQgetvalue(res, (int)i, 3), NULL, 10);
        tables[i].estimated = strtoll(PQgetvalue(res, (int)i, 4), NULL, 10);
        char *qs = PQescapeIdentifier(conn, tables[i].schema, strlen(tables[i].schema));
        char *qt = PQescapeIdentifier(conn, tables[i].name, strlen(tables[i].name));
        if (qs == NULL || qt == NULL) {
            wp_error("snapshot: could not quote the name of table \"%s\".\"%s\": %s", tables[i].schema,
                     tables[i].name, PQerrorMessage(conn));
            PQfreemem(qs);
            PQfreemem(qt);
            *nout = i + 1;
            goto out;
        }
        wp_buf_t q = WP_BUF_INIT;
        wp_buf_printf(&q, "%s.%s", qs, qt);
        tables[i].qualified = q.data;
        PQfreemem(qs);
        PQfreemem(qt);

        const char *oid = PQgetvalue(res, (int)i, 0);
        const char *params[] = {oid};
        PGresult *cols = PQexecParams(conn,
                                      "SELECT attname, format_type(atttypid, atttypmod), atttypid, attnum FROM pg_attribute "
                                      "WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                                      1, NULL, params, NULL, NULL, 0);
        if (PQresultStatus(cols) != PGRES_TUPLES_OK) {
            wp_error("snapshot: could not read the columns of %s: %s", tables[i].qualified, PQerrorMessage(conn));
            PQclear(cols);
            *nout = i + 1;
            goto out;
        }
        tables[i].ncolumns = (size_t)PQntuples(cols);
        tables[i].columns = wp_calloc(tables[i].ncolumns ? tables[i].ncolumns : 1, sizeof(column_t));
        for (size_t k = 0; k < tables[i].ncolumns; k++) {
            tables[i].columns[k].name = wp_strdup(PQgetvalue(cols, (int)k, 0));
            tables[i].columns[k].type = wp_strdup(PQgetvalue(cols, (int)k, 1));
            tables[i].columns[k].typeoid = strtoll(PQgetvalue(cols, (int)k, 2), NULL, 10);
            tables[i].columns[k].attnum = strtoll(PQgetvalue(cols, (int)k, 3), NULL, 10);
        }
        PQclear(cols);
    }
    rc = 0;
out:
    PQclear(res);
    wp_buf_free(&sql);
    if (rc != 0) {
        free_tables(tables, *nout);
        tables = NULL;
        n = 0;
    }
    *out = tables;
    *nout = n;
    return rc;
}

static bool is_json_number(const char *s)
{
    const char *p = s;
    if (*p == '-')
        p++;
    if (*p == '0')
        p++;
    else if (*p >= '1' && *p <= '9')
        while (*p >= '0' && *p <= '9')
            p++;
    else
        return false;
    if (*p == '.') {
        p++;
        if (!(*p >= '0' && *p <= '9'))
            return false;
        while (*p >= '0' && *p <= '9')
            p++;
    }
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '+' || *p == '-')
            p++;
        if (!(*p >= '0' && *p <= '9'))
            return false;
        while (*p >= '0' && *p <= '9')
            p++;
    }
    return *p == '\0';
}

/*
 * The jansson value wal2json would have printed for text (the type's output)
 * after the decoder's pre-pass: numbers of numeric types as integers when they
 * fit int64, else as strings of their exact text; bool as true/false; bytea
 * as hex digits without \x; everything else as a string.
 */
static json_t *column_value(const column_t *col, const char *text, bool isnull)
{
    if (isnull)
        return json_null();
    switch (col->typeoid) {
    case 16: /* bool */
        return json_boolean(text[0] == 't');
    case 17: /* bytea, hex output */
        return json_string(strncmp(text, "\\x", 2) == 0 ? text + 2 : text);
    case 20: case 21: case 23: case 26: case 700: case 701: case 1700: {
        if (is_json_number(text) && strchr(text, '.') == NULL && strchr(text, 'e') == NULL &&
            strchr(text, 'E') == NULL && strlen(text) < 19 && strcmp(text, "-0") != 0)
            return json_integer(strtoll(text, NULL, 10));
        return json_string(text); /* exact text; NaN and Infinity stay strings */
    }
    default:
        return json_string(text);
    }
}

static json_t *row_message(const table_t *t, PGresult *res)
{
    json_t *columns = json_array();
    for (size_t k = 0; k < t->ncolumns; k++) {
        const column_t *col = &t->columns[k];
        json_t *c = json_object();
        json_object_set_new(c, "name", json_string(col->name));
        json_object_set_new(c, "type", json_string(col->type));
        json_object_set_new(c, "typeoid", json_integer(col->typeoid));
        json_object_set_new(c, "position", json_integer(col->attnum));
        json_t *v = column_value(col, PQgetvalue(res, 0, (int)k), PQgetisnull(res, 0, (int)k));
        json_object_set_new(c, "value", v ? v : json_null());
        json_array_append_new(columns, c);
    }
    json_t *root = json_object();
    json_object_set_new(root, "action", json_string("I"));
    json_object_set_new(root, "schema", json_string(t->schema));
    json_object_set_new(root, "table", json_string(t->name));
    json_object_set_new(root, "columns", columns);
    return root;
}

typedef struct worker {
    copy_state_t *state;
    PGconn *source;
    wp_stager_t *stager;
    wp_decoder_t *decoder;
    wp_encoder_t *encoder;
    int rc;
} worker_t;

/* Copies one chunk in one staging transaction.  Returns 0, or -1 (logged; the transaction rolled back). */
static int copy_chunk(worker_t *w, const chunk_t *chunk, uint64_t *rows_out)
{
    int rc = -1;
    const wp_snapshot_job_t *job = w->state->job;
    const table_t *t = chunk->table;
    wp_buf_t sql = WP_BUF_INIT;
    wp_segment_t *segment = wp_segment_create();
    PGresult *res = NULL;
    uint64_t rows = 0;
    char err[WP_ERRLEN];
    bool draining = false;

    if (job->resync && chunk->index == 0) {
        /* the resync's truncate commits with the table's first rows, ordered before all of them */
        char payload[64];
        snprintf(payload, sizeof payload, "{\"snapshot\": %lld}", (long long)w->state->snapshot_id);
        wp_encoder_add_event(w->encoder, segment, "truncate", payload, job->lsn, -1, t->schema, t->name);
    }
    wp_buf_printf(&sql, "SELECT * FROM ONLY %s", t->qualified);
    if (chunk->first_page > 0 || chunk->end_page >= 0) {
        wp_buf_printf(&sql, " WHERE ctid >= '(%lld,0)'::tid", (long long)chunk->first_page);
        if (chunk->end_page >= 0)
            wp_buf_printf(&sql, " AND ctid < '(%lld,0)'::tid", (long long)chunk->end_page);
    }
    if (!PQsendQuery(w->source, sql.data) || !PQsetSingleRowMode(w->source)) {
        wp_error("snapshot: could not read %s: %s", t->qualified, PQerrorMessage(w->source));
        goto out;
    }
    draining = true;
    while ((res = PQgetResult(w->source)) != NULL) {
        ExecStatusType st = PQresultStatus(res);
        if (st == PGRES_SINGLE_TUPLE && job->resync && wp_stop_requested()) {
            wp_error("snapshot: stopping the resync of %s on request", t->qualified);
            PQclear(res);
            goto out;
        }
        if (st == PGRES_SINGLE_TUPLE) {
            /* the row as the wal2json text the stream would carry, read by the same decoder */
            json_t *root = row_message(t, res);
            char *text = json_dumps(root, JSON_COMPACT);
            wp_change_t change;
            json_decref(root);
            if (text == NULL) /* jansson could not allocate: the row goes to dead_letters below */
                text = wp_strdup("{}");
            if (wp_decoder_parse(w->decoder, text, strlen(text), &change, err, sizeof err) == 0) {
                wp_encoder_add(w->encoder, segment, w->decoder, &change, "snapshot", job->lsn, 0);
            } else {
                /* kept whole with the reason, never dropped */
                wp_segment_add_dead(segment, job->lsn, 0, t->schema, t->name, text, strlen(text), err);
            }
            free(text);
            rows++;
            if (segment->copy.len >= SEGMENT_BYTES || segment->dead) {
                if (wp_stager_add_segment(w->stager, segment) != 0) {
                    PQclear(res);
                    goto out;
                }
                wp_segment_destroy(segment);
                segment = wp_segment_create();
            }
        } else if (st != PGRES_TUPLES_OK) {
            wp_error("snapshot: could not read %s: %s", t->qualified, PQerrorMessage(w->source));
            PQclear(res);
            goto out;
        }
        PQclear(res);
    }
    draining = false;
    if (wp_stager_add_segment(w->stager, segment) != 0 ||
        wp_stager_commit_chunk(w->stager, w->state->snapshot_id, t->schema, t->name, chunk->index, rows) != 0)
        goto out;
    *rows_out = rows;
    rc = 0;
out:
    if (draining) {
        while ((res = PQgetResult(w->source)) != NULL)
            PQclear(res);
    }
    if (rc != 0)
        wp_stager_close(w->stager);
    wp_segment_destroy(segment);
    wp_buf_free(&sql);
    return rc;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/*
 * Logs a running snapshot's progress: rows copied, rows/s, the share of the
 * estimated rows (planner statistics: approximate) and the time left at this pace.
 */
static void log_progress(const copy_state_t *state, uint64_t copied, int64_t now)
{
    double secs = (double)(now - state->started_ms) / 1000.0;
    double rate = secs > 0 ? (double)copied / secs : 0;
    if (state->estimated <= 0) {
        wp_info("snapshot progress: %llu rows copied, %.0f rows/s (no row estimate: tables never analyzed)",
                (unsigned long long)copied, rate);
        return;
    }
    double share = (double)copied / (double)state->estimated;
    double left = rate > 0 && share < 1 ? ((double)state->estimated - (double)copied) / rate : 0;
    wp_info("snapshot progress: %llu of ~%lld rows copied (%.0f %%), %.0f rows/s, about %.0f s left",
            (unsigned long long)copied, (long long)state->estimated, share > 1 ? 100 : share * 100, rate, left);
}

static void *worker_main(void *p)
{
    worker_t *w = p;
    copy_state_t *state = w->state;
    char name[96];
    snprintf(name, sizeof name, "snapshot %s", state->job->source->name);
    wp_log_set_component(name);
    w->rc = -1;
    for (;;) {
        pthread_mutex_lock(&state->mu);
        chunk_t *chunk = (!state->failed && state->next_chunk < state->nchunks) ? &state->chunks[state->next_chunk++]
                                                                              : NULL;
        pthread_mutex_unlock(&state->mu);
        if (chunk == NULL)
            break;
        uint64_t rows = 0;
        int tries = 0;
        for (;;) {
            bool fatal = false;
            if (w->source == NULL)
                w->source = open_snapshot_conn(state->job);
            if (w->source && (wp_stager_is_open(w->stager) || wp_stager_open(w->stager, &fatal) == 0) &&
                copy_chunk(w, chunk, &rows) == 0)
                break;
            if (w->source && PQstatus(w->source) != CONNECTION_OK) {
                PQfinish(w->source);
                w->source = NULL;
            }
            if (fatal || ++tries >= CHUNK_RETRIES || wp_stop_requested()) {
                wp_error("snapshot: giving up on %s after %d attempts", chunk->table->qualified, tries);
                pthread_mutex_lock(&state->mu);
                state->failed = true;
                pthread_mutex_unlock(&state->mu);
                goto out;
            }
            sleep_ms(500 * tries);
        }
        pthread_mutex_lock(&state->mu);
        state->rows += rows;
        chunk->table->rows += rows;
        if (chunk->index == 0 && state->job->resync)
            chunk->table->truncated = true;
        bool table_done = --chunk->table->chunks_left == 0;
        uint64_t table_rows = chunk->table->rows;
        int64_t now = wp_now_ms();
        uint64_t copied = state->rows;
        /* every PROGRESS_LOG_MS, and each time a quarter of the estimate is passed (short of the end) */
        int quarter = state->estimated > 0 ? (int)(4 * copied / (uint64_t)state->estimated) : 0;
        bool report = now - state->progress_ms >= PROGRESS_LOG_MS || (quarter > state->progress_quarter && quarter < 4);
        if (quarter > state->progress_quarter)
            state->progress_quarter = quarter;
        if (report)
            state->progress_ms = now;
        pthread_mutex_unlock(&state->mu);
        if (report)
            log_progress(state, copied, now);
        if (table_done)
            wp_info("copied %s: %llu rows", chunk->table->qualified, (unsigned long long)table_rows);
    }
    w->rc = 0;
out:
    return NULL;
}

/* Splits the tables into chunks of CHUNK_PAGES heap pages. */
static void plan_chunks(copy_state_t *state)
{
    size_t n = 0;
    for (size_t i = 0; i < state->ntables; i++) {
        int64_t pages = state->tables[i].pages;
        n += pages <= CHUNK_PAGES ? 1 : (size_t)((pages + CHUNK_PAGES - 1) / CHUNK_PAGES);
    }
    state->chunks = wp_calloc(n ? n : 1, sizeof *state->chunks);
    for (size_t i = 0; i < state->ntables; i++) {
        table_t *t = &state->tables[i];
        int64_t first = 0;
        int index = 0;
        do {
            chunk_t *c = &state->chunks[state->nchunks++];
            c->table = t;
            c->index = index++;
            c->first_page = first;
            first += CHUNK_PAGES;
            /* the last chunk has no upper bound: pages counted before the snapshot may have grown since */
            c->end_page = first < t->pages ? first : -1;
        } while (first < t->pages);
        t->chunks_left = index;
    }
}

int wp_snapshot_copy(const wp_snapshot_job_t *job, uint64_t *rows)
{
    int rc = -1;
    copy_state_t state;
    memset(&state, 0, sizeof state);
    state.job = job;
    pthread_mutex_init(&state.mu, NULL);
    int nworkers = job->source->snapshot_workers > 0 ? job->source->snapshot_workers : 1;
    worker_t *workers = wp_calloc((size_t)nworkers, sizeof *workers);
    pthread_t *threads = wp_calloc((size_t)nworkers, sizeof *threads);
    int started = 0;
    wp_stager_t *leader = wp_stager_create(job->config, job->source);
    wp_buf_t names = WP_BUF_INIT;
    bool fatal = false;
    /* the same column filters and masks as the stream, applied by each worker's decoder */
    wp_filter_t *filter = wp_filter_create(job->source);
    *rows = 0;

    /* import first: the exported snapshot must be taken before anything else happens */
    PGconn *conn = open_snapshot_conn(job);
    if (conn == NULL)
        goto out;
    if (list_tables(conn, job, &state.tables, &state.ntables) != 0)
        goto out;
    for (int i = 0; i < nworkers; i++) {
        workers[i].source = i == 0 ? conn : open_snapshot_conn(job);
        if (workers[i].source == NULL)
            goto out;
        if (i == 0)
            conn = NULL;
    }
    if (wp_stager_open(leader, &fatal) != 0 || wp_stager_snapshot_begin(leader, job->kind, job->lsn,
                                                                          &state.snapshot_id) != 0)
        goto out;
    if (job->snapshot_id)
        *job->snapshot_id = state.snapshot_id;
    plan_chunks(&state);
    for (size_t i = 0; i < state.ntables; i++)
        state.estimated += state.tables[i].estimated > 0 ? state.tables[i].estimated : 0;
    state.started_ms = state.progress_ms = wp_now_ms();
    if (wp_stager_snapshot_estimate(leader, state.snapshot_id, state.estimated) != 0)
        goto out;
    char lsn[WP_LSN_STRLEN];
    wp_info("%s snapshot at %s: %zu tables in %zu chunks, %d workers", job->kind, wp_lsn_format(job->lsn, lsn),
            state.ntables, state.nchunks, nworkers);

    for (int i = 0; i < nworkers; i++) {
        workers[i].state = &state;
        workers[i].stager = wp_stager_create(job->config, job->source);
        workers[i].decoder = wp_decoder_create();
        wp_decoder_set_filter(workers[i].decoder, filter);
        workers[i].encoder = wp_encoder_create(job->source->name);
        if (pthread_create(&threads[i], NULL, worker_main, &workers[i]) != 0) {
            wp_error("snapshot: could not start a worker thread");
            state.failed = true;
            break;
        }
        started++;
    }
    for (int i = 0; i < started; i++)
        pthread_join(threads[i], NULL);
    bool ok = !state.failed && started == nworkers;
    for (int i = 0; i < started; i++)
        ok = ok && workers[i].rc == 0;

    /* the tables copied, as a text[] literal: {"s.t",...} */
    char **qualified = wp_calloc(state.ntables ? state.ntables : 1, sizeof *qualified);
    for (size_t i = 0; i < state.ntables; i++) {
        wp_buf_t q = WP_BUF_INIT;
        wp_buf_printf(&q, "%s.%s", state.tables[i].schema, state.tables[i].name);
        qualified[i] = q.data;
    }
    wp_pg_text_array(&names, (const char *const *)qualified, state.ntables);
    for (size_t i = 0; i < state.ntables; i++)
        free(qualified[i]);
    free(qualified);
    if (job->resync) {
        const char **schemas = wp_calloc(state.ntables ? state.ntables : 1, sizeof *schemas);
        const char **tnames = wp_calloc(state.ntables ? state.ntables : 1, sizeof *tnames);
        bool *truncated = wp_calloc(state.ntables ? state.ntables : 1, sizeof *truncated);
        for (size_t i = 0; i < state.ntables; i++) {
            schemas[i] = state.tables[i].schema;
            tnames[i] = state.tables[i].name;
            truncated[i] = state.tables[i].truncated;
        }
        if (wp_stager_open(leader, &fatal) != 0 ||
            wp_stager_resync_finish(leader, state.snapshot_id, ok, names.data, state.rows, schemas, tnames, truncated,
                                    state.ntables, job->lsn) != 0)
            ok = false;
        free(schemas);
        free(tnames);
        free(truncated);
    } else if (wp_stager_open(leader, &fatal) != 0 ||
               wp_stager_snapshot_finish(leader, state.snapshot_id, ok ? "done" : "failed", names.data, state.rows) !=
                   0) {
        ok = false;
    }
    if (!ok)
        goto out;
    wp_info("%s snapshot done: %llu rows from %zu tables", job->kind, (unsigned long long)state.rows, state.ntables);
    *rows = state.rows;
    rc = 0;
out:
    if (conn)
        PQfinish(conn);
    for (int i = 0; i < nworkers; i++) {
        if (workers[i].source)
            PQfinish(workers[i].source);
        wp_stager_destroy(workers[i].stager);
        wp_decoder_destroy(workers[i].decoder);
        wp_encoder_destroy(workers[i].encoder);
    }
    free(workers);
    wp_filter_destroy(filter);
    free(threads);
    wp_stager_destroy(leader);
    free_tables(state.tables, state.ntables);
    free(state.chunks);
    wp_buf_free(&names);
    pthread_mutex_destroy(&state.mu);
    return rc;
}

int wp_snapshot_command(const wp_config_t *config, const char *source_name, const char *const *tables, int ntables)
{
    int rc = 1;
    const wp_source_config_t *source = NULL;
    wp_table_ref_t *refs = NULL;
    size_t nrefs = 0;
    char err[WP_ERRLEN];
    wp_buf_t list = WP_BUF_INIT;
    char **schemas = NULL, **names = NULL;

    for (size_t i = 0; i < config->nsources; i++)
        if (strcmp(config->sources[i].name, source_name) == 0)
            source = &config->sources[i];
    if (source == NULL) {
        fprintf(stderr, "walpipe: snapshot: %s configures no source \"%s\"\n", config->path, source_name);
        rc = 2;
        goto out;
    }
    for (int i = 0; i < ntables; i++) {
        if (i)
            wp_buf_puts(&list, ", ");
        wp_buf_puts(&list, tables[i]);
    }
    if (ntables > 0 && wp_config_parse_tables(list.data, &refs, &nrefs, err, sizeof err) != 0) {
        fprintf(stderr, "walpipe: snapshot: %s\n", err);
        rc = 2;
        goto out;
    }
    wp_log_set_component("snapshot");
    schemas = wp_calloc(nrefs + 1, sizeof *schemas);
    names = wp_calloc(nrefs + 1, sizeof *names);
    for (size_t i = 0; i < nrefs; i++) {
        schemas[i] = refs[i].schema;
        names[i] = refs[i].table;
    }
    if (wp_resync_tables(config, source, schemas, names, nrefs, NULL) != 0)
        goto out;
    rc = 0;
out:
    free(schemas);
    free(names);
    wp_config_free_tables(refs, nrefs);
    wp_buf_free(&list);
    return rc;
}

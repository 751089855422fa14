/*
 * resync.c: re-snapshot diverged mirror tables, on request or by itself.
 *
 * Job: wp_resync_tables copies tables of a source through a temporary slot's
 * exported snapshot, staging a truncate at the consistent point before each
 * table's rows (snapshot.c), beside the source's own reader and stager.  The
 * resyncer thread of `walpipe run` picks the tables with open divergences
 * (walpipe.divergences) and resyncs them, several tables of one source in
 * one snapshot.
 *
 * Invariant: a resync never touches the source's slot or checkpoint, so it
 * never blocks or reorders streaming; the mirror's max-merge orders its
 * truncate and rows against streamed changes by version alone.  The resyncer
 * leaves alone tables that cannot be mirrored (walpipe.source_tables.problem,
 * logged once) and divergences of kind apply_failed (an error of the
 * mirror's own SQL, which the resync's rows would meet again), and resyncs a table at most once per backoff window (1 min,
 * doubling up to 1 h while the table keeps diverging), so a divergence that
 * a resync cannot cure does not loop.
 *
 * Threading: the resyncer owns its staging connection and the per-table
 * state; wp_resync_tables runs in the caller's thread (and starts the
 * snapshot's worker threads).
 */
#include "wp_setup.h"

#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "log.h"
#include "pg.h"
#include "reader.h"
#include "resync.h"
#include "snapshot.h"

#define POLL_EVERY_MS 5000
#define BACKOFF_FIRST_MS (60 * 1000)
#define BACKOFF_MAX_MS (3600 * 1000)
#define RECONNECT_MS 5000

static atomic_uint slot_counter;

int wp_resync_tables(const wp_config_t *config, const wp_source_config_t *source, char *const *schemas,
                     char *const *tables, size_t n, wp_lsn_t *cp_out)
{
    int rc = -1;
    wp_table_ref_t *refs = n ? wp_calloc(n, sizeof *refs) : NULL;
    wp_reader_t *reader = wp_reader_create(config, source);
    int64_t started = wp_now_ms(), snapshot_id = 0;
    char at[WP_LSN_STRLEN] = "";
    for (size_t i = 0; i < n; i++) {
        refs[i].schema = schemas[i];
        refs[i].table = tables[i];
    }

    wp_slot_info_t info;
    bool fatal;
    if (wp_reader_open(reader, &info, &fatal) != 0)
        goto out;
    /* a temporary slot: its exported snapshot and consistent point order the copy against the stream */
    char slot[64], snapshot_name[WP_SNAPSHOT_NAME_LEN];
    snprintf(slot, sizeof slot, "walpipe_snap_%ld_%u", (long)getpid(), atomic_fetch_add(&slot_counter, 1));
    wp_slot_spec_t spec = {.name = slot, .temporary = true, .export_snapshot = true};
    wp_lsn_t cp;
    if (wp_reader_create_slot(reader, &spec, &cp, snapshot_name, &fatal) != 0)
        goto out;
    wp_lsn_format(cp, at);
    if (cp_out)
        *cp_out = cp;
    if (n)
        wp_info("resync of %zu table(s) of source \"%s\" at %s: starting (first: \"%s\".\"%s\")", n, source->name, at,
                schemas[0], tables[0]);
    else
        wp_info("resync of the tables of source \"%s\" at %s: starting", source->name, at);
    wp_snapshot_job_t job = {.config = config,
                             .source = source,
                             .snapshot_name = snapshot_name,
                             .lsn = cp,
                             .kind = "requested",
                             .tables = refs,
                             .ntables = n,
                             .resync = true,
                             .snapshot_id = &snapshot_id};
    uint64_t rows = 0;
    if (wp_snapshot_copy(&job, &rows) != 0)
        goto out;
    wp_info("resync snapshot %lld of source \"%s\" at %s: done, %llu rows in %.1f s", (long long)snapshot_id,
            source->name, at, (unsigned long long)rows, (double)(wp_now_ms() - started) / 1000.0);
    rc = 0;
out:
    if (rc != 0)
        wp_error("resync of source \"%s\"%s%s failed after %.1f s; the mirrors it covers stay marked diverged",
                 source->name, at[0] ? " at " : "", at, (double)(wp_now_ms() - started) / 1000.0);
    wp_reader_destroy(reader); /* the temporary slot goes with its connection */
    free(refs);
    return rc;
}

/* ---- the resyncer ------------------------------------------------------------------------- */

typedef struct tstate {
    char *source, *schema, *table;
    int64_t last_ms;  /* when the last resync of the table ended; 0: never */
    int64_t delay_ms; /* backoff window after last_ms; 0: none */
    bool told;        /* logged why it is left alone */
    bool open;        /* has open divergences in the last poll */
    char *problem;    /* why it cannot be resynced, or NULL */
} tstate_t;

struct wp_resyncer {
    const wp_config_t *config;
    pthread_t thread;
    PGconn *conn;
    tstate_t *tables;
    size_t ntables, cap;
};

static void free_tstate(tstate_t *t)
{
    free(t->source);
    free(t->schema);
    free(t->table);
    free(t->problem);
}

static tstate_t *find_or_add(wp_resyncer_t *r, const char *source, const char *schema, const char *table)
{
    for (size_t i = 0; i < r->ntables; i++) {
        tstate_t *t = &r->tables[i];
        if (strcmp(t->source, source) == 0 && strcmp(t->schema, schema) == 0 && strcmp(t->table, table) == 0)
            return t;
    }
    if (r->ntables == r->cap) {
        r->cap = r->cap ? r->cap * 2 : 16;
        r->tables = wp_realloc(r->tables, r->cap * sizeof *r->tables);
    }
    tstate_t *t = &r->tables[r->ntables++];
    memset(t, 0, sizeof *t);
    t->source = wp_strdup(source);
    t->schema = wp_strdup(schema);
    t->table = wp_strdup(table);
    return t;
}

/* Sleeps up to ms, waking early on a stop request or a notification; returns when either or time is up. */
static void wait_for_news(wp_resyncer_t *r, int ms)
{
    int64_t until = wp_now_ms() + ms;
    while (!wp_stop_requested()) {
        int64_t left = until - wp_now_ms();
        if (left <= 0)
            return;
        if (r->conn == NULL) {
            struct timespec ts = {0, 250 * 1000000L};
            nanosleep(&ts, NULL);
            continue;
        }
        struct pollfd pfd = {.fd = PQsocket(r->conn), .events = POLLIN};
        poll(&pfd, 1, left < 250 ? (int)left : 250);
        if (!PQconsumeInput(r->conn)) {
            wp_warn("lost the staging connection: %s; reconnecting", PQerrorMessage(r->conn));
            PQfinish(r->conn);
            r->conn = NULL;
            continue;
        }
        bool woke = false;
        PGnotify *note;
        while ((note = PQnotifies(r->conn)) != NULL) {
            woke = true;
            PQfreemem(note);
        }
        if (woke)
            return;
    }
}

static int connect_staging(wp_resyncer_t *r)
{
    if (wp_pg_connect_staging(r->config, "walpipe_resync", NULL, false, &r->conn) != WP_STAGING_OK)
        return -1;
    if (wp_pg_exec(r->conn, "staging", "LISTEN walpipe_diverged", "listen for divergences") != 0) {
        PQfinish(r->conn);
        r->conn = NULL;
        return -1;
    }
    return 0;
}

/* Reads the tables with open divergences into r->tables (open, problem).  Returns 0, or -1 (logged). */
static int poll_divergences(wp_resyncer_t *r)
{
    wp_buf_t names = WP_BUF_INIT;
    const char **items = wp_calloc(r->config->nsources + 1, sizeof *items);
    for (size_t i = 0; i < r->config->nsources; i++)
        items[i] = r->config->sources[i].name;
    wp_pg_text_array(&names, items, r->config->nsources);
    free(items);
    const char *params[] = {names.data};
    PGresult *res = PQexecParams(r->conn,
                                 "SELECT d.source, d.schema_name, d.table_name, s.problem, s.source IS NOT NULL "
                                 "FROM (SELECT DISTINCT source, schema_name, table_name FROM walpipe.divergences "
                                 "      WHERE resolved_at IS NULL AND source = ANY ($1::text[]) AND kind <> 'apply_failed') d "
                                 "LEFT JOIN walpipe.source_tables s USING (source, schema_name, table_name) "
                                 "ORDER BY 1, 2, 3",
                                 1, NULL, params, NULL, NULL, 0);
    wp_buf_free(&names);
    int rc = -1;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_warn("could not read the open divergences from staging: %s", PQerrorMessage(r->conn));
        goto out;
    }
    for (size_t i = 0; i < r->ntables; i++)
        r->tables[i].open = false;
    for (int row = 0; row < PQntuples(res); row++) {
        tstate_t *t = find_or_add(r, PQgetvalue(res, row, 0), PQgetvalue(res, row, 1), PQgetvalue(res, row, 2));
        /* not discovered yet (the workers read keys at start and on demand): whether it can be mirrored is unknown */
        t->open = strcmp(PQgetvalue(res, row, 4), "t") == 0 || t->schema[0] == '\0';
        free(t->problem);
        t->problem = NULL;
        if (t->schema[0] == '\0')
            t->problem = wp_strdup("walpipe could not tell its schema from its name (see the divergence's reason)");
        else if (!PQgetisnull(res, row, 3))
            t->problem = wp_strdup(PQgetvalue(res, row, 3));
    }
    rc = 0;
out:
    PQclear(res);
    return rc;
}

/* Forgets the tables without open divergences whose backoff window has passed. */
static void forget_settled(wp_resyncer_t *r, int64_t now)
{
    size_t k = 0;
    for (size_t i = 0; i < r->ntables; i++) {
        tstate_t *t = &r->tables[i];
        if (!t->open && now >= t->last_ms + t->delay_ms) {
            free_tstate(t);
            continue;
        }
        r->tables[k++] = *t;
    }
    r->ntables = k;
}

/* Resyncs, in one snapshot per source, the open tables that are due.  Returns when done. */
static void resync_due(wp_resyncer_t *r)
{
    int64_t now = wp_now_ms();
    char **schemas = wp_calloc(r->ntables + 1, sizeof *schemas);
    char **tables = wp_calloc(r->ntables + 1, sizeof *tables);
    size_t *which = wp_calloc(r->ntables + 1, sizeof *which);
    for (size_t s = 0; s < r->config->nsources && !wp_stop_requested(); s++) {
        const wp_source_config_t *source = &r->config->sources[s];
        size_t n = 0;
        for (size_t i = 0; i < r->ntables; i++) {
            tstate_t *t = &r->tables[i];
            if (!t->open || strcmp(t->source, source->name) != 0)
                continue;
            if (t->problem) {
                if (!t->told)
                    wp_warn("not resyncing the diverged mirror of \"%s\".\"%s\" of source \"%s\": %s", t->schema,
                            t->table, t->source, t->problem);
                t->told = true;
                continue;
            }
            t->told = false;
            if (t->last_ms != 0 && now < t->last_ms + t->delay_ms)
                continue;
            schemas[n] = t->schema;
            tables[n] = t->table;
            which[n++] = i;
        }
        if (n == 0)
            continue;
        wp_lsn_t cp = WP_LSN_INVALID;
        wp_resync_tables(r->config, source, schemas, tables, n, &cp);
        int64_t end = wp_now_ms();
        for (size_t k = 0; k < n; k++) {
            tstate_t *t = &r->tables[which[k]];
            t->delay_ms = t->delay_ms ? (t->delay_ms * 2 < BACKOFF_MAX_MS ? t->delay_ms * 2 : BACKOFF_MAX_MS)
                                      : BACKOFF_FIRST_MS;
            t->last_ms = end;
        }
    }
    free(schemas);
    free(tables);
    free(which);
}

static void *resyncer_main(void *arg)
{
    wp_resyncer_t *r = arg;
    wp_log_set_component("resync");
    while (!wp_stop_requested()) {
        if (r->conn == NULL && connect_staging(r) != 0) {
            wait_for_news(r, RECONNECT_MS);
            continue;
        }
        if (poll_divergences(r) == 0) {
            forget_settled(r, wp_now_ms());
            resync_due(r);
        } else if (PQstatus(r->conn) != CONNECTION_OK) {
            PQfinish(r->conn);
            r->conn = NULL;
        }
        wait_for_news(r, POLL_EVERY_MS);
    }
    return NULL;
}

wp_resyncer_t *wp_resyncer_start(const wp_config_t *config)
{
    if (!config->resync_auto) {
        wp_info("resync = off: diverged mirrors are recorded in walpipe.divergences and logged, not resynced");
        return NULL;
    }
    wp_resyncer_t *r = wp_calloc(1, sizeof *r);
    r->config = config;
    if (pthread_create(&r->thread, NULL, resyncer_main, r) != 0) {
        wp_error("could not start the resync thread; diverged mirrors are only recorded");
        free(r);
        return NULL;
    }
    return r;
}

void wp_resyncer_stop(wp_resyncer_t *r)
{
    if (r == NULL)
        return;
    pthread_join(r->thread, NULL);
    if (r->conn)
        PQfinish(r->conn);
    for (size_t i = 0; i < r->ntables; i++)
        free_tstate(&r->tables[i]);
    free(r->tables);
    free(r);
}

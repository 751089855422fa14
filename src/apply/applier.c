/*
 * applier.c: apply a set of staged events to their mirrors, inside the
 * caller's open staging transaction.
 *
 * Job: parse each event, open (create, alter) its mirror, order the set by
 * mirror, key and version, skip changes a later one of the same key
 * supersedes, and run the statements mirror.c writes.  The worker pool
 * (worker.c) and the dead-letter retries (dlq.c) both call it, so a retried
 * event goes through exactly the code a worker runs.
 *
 * Invariant: when wp_applier_apply returns 0, every event ended applied or
 * with its failure and reason set (valid UTF-8, see wp_event_fail), and the
 * caller's transaction is usable; anything else leaves the caller to roll
 * back.  Applying is idempotent and order-safe (mirror.c), so any order and
 * any number of times converge to the source.
 *
 * Applying a set: the rows' statements are pipelined (libpq pipeline mode,
 * one round trip per PIPE_CHUNK statements) inside SAVEPOINT wp_apply.  The
 * few steps that must see results first (creating or altering a mirror, a
 * TRUNCATE, the old row of a key change) leave the pipeline, run, and
 * re-enter it.  If any statement fails, the set rolls back to the savepoint
 * and is applied again one event at a time, each in its own savepoint: the
 * events that fail then are the ones that go to the dead-letter queue, and
 * the others still apply.
 *
 * Ownership: an applier borrows its connection and config; it owns its
 * caches (mirrors, shapes, prepared statements), which belong to one thread.
 */
#include "wp_setup.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "applier.h"
#include "keys.h"
#include "log.h"
#include "rewrites.h"
#include "runtime.h"
#include "utf8.h"

#define PIPE_CHUNK 256
#define KEY_WAIT_MEMORY_MS 60000
/* After a wait for the source's column catalog, columns it still lacks are added without it for this long. */
#define COLUMNS_WAIT_MEMORY_MS 60000
#define OID_FLOAT4 700
#define OID_FLOAT8 701
#define OID_NUMERIC 1700

/* Statement results of one applied event, or why the pass must stop. */
enum {
    AP_OK = 0,         /* applied, or failed on its own (ev->fail set) with the transaction intact */
    AP_SQL = -1,       /* a statement failed: the transaction is aborted */
    AP_TRANSIENT = -2, /* deadlock, lost connection, ...: roll back and claim again */
};

typedef enum ev_kind { K_OTHER, K_INSERT, K_UPDATE, K_DELETE, K_TRUNCATE } ev_kind_t;

typedef struct stmt {
    char kind;   /* 'U' upsert, '1' and '2' delete, 'R' read, 'S' sweep */
    bool *absent; /* U and R: which columns the statement leaves out (ncols entries) */
    size_t ncols;
    char name[24];
    int ntypes;
    unsigned *types;
    bool prepared;
    struct stmt *next;
} stmt_t;

/* A table's shapes recorded with positions, oldest first: the names its columns had over time. */
typedef struct history {
    wp_tshape_t *shapes;
    size_t n;
    bool loaded;
    wp_lsn_t upto; /* every shape first seen at or before this LSN is here */
} history_t;

typedef struct mentry {
    wp_mirror_t *m;
    history_t hist;
    unsigned pinned; /* the applier's txn in which the mirror was locked and its generation checked (pin_mirror) */
    stmt_t *stmts;
    wp_buf_t *sweep; /* per key column: "{...}" literal of the keys this pass wrote */
    size_t nsweepbufs;
    size_t nsweep; /* keys in them */
} mentry_t;

typedef struct shape_entry {
    char *source;
    char *id;
    wp_tshape_t shape;
    bool ok;
    char error[256];
    int followed_mirror; /* wp_mirror_follow already ran for this mirror at this generation */
    int followed_gen;
    ssize_t *src;        /* per mirror column: the shape column it is (by attnum, else name), or -1 */
    size_t src_n;        /* ... for the mirror src_mirror at generation src_gen with src_n columns */
    int src_mirror, src_gen;
} shape_entry_t;

/* One event of a claim: what orders and groups it (see plan_cmp and coalesce). */
typedef struct plan {
    size_t ev; /* index into the claim's events */
    int kind;  /* ev_kind_t */
    int mirror; /* mirror id; 0 when none */
    char *key;  /* owned: the key it changes (the old key of an update), NULL for TRUNCATE */
    bool full;  /* writes the whole row, key unchanged */
    bool deletes; /* removes the key: a delete, or an update that moves the row away */
    bool late;    /* a key change that carries TOAST values: after everything else */
    bool skip;    /* superseded by a later change of the key in this claim */
    shape_entry_t *se; /* its shape (I/U), or NULL */
} plan_t;

/* A table whose key this applier asked `walpipe run` for and waited for, and when. */
typedef struct waited {
    char *key; /* table_key() */
    int64_t at_ms;
} waited_t;

/*
 * A table whose mirror could not be opened in this wp_applier_apply, and
 * why: every other event of it fails the same way without asking staging
 * again.  NO_KEY: no key recorded yet, and this claim will wait for it
 * (wp_applier_wait_keys); DEFER: no key recorded, and waiting again would not
 * help; PARK: the table cannot be mirrored (source_tables.problem).
 */
typedef struct table_fail {
    char *key; /* table_key() */
    char *source, *schema, *table;
    wp_fail_t fail;
    char error[400];
} table_fail_t;

/* A table whose column catalog this claim waits for (with the keys, wp_applier_wait_keys). */
typedef struct col_need {
    char *key; /* table_key() */
    char *source, *schema, *table;
    wp_lsn_t lsn; /* a read at or past it counts */
    bool read;
} col_need_t;

struct wp_applier {
    const wp_config_t *config;
    PGconn *conn;
    mentry_t **mirrors;
    size_t nmirrors, mirrors_cap;
    mentry_t *last_mirror;
    shape_entry_t **shapes;
    size_t nshapes, shapes_cap;
    waited_t *waited;
    size_t nwaited, waited_cap;
    table_fail_t *tfails; /* tables of the last wp_applier_apply whose mirror could not be opened */
    size_t ntfails, tfails_cap;
    col_need_t *need_cols; /* column catalogs the last wp_applier_apply wants read (see need_columns) */
    size_t nneed_cols, need_cols_cap;
    waited_t *cwaited; /* tables whose column catalog this applier waited for, and when */
    size_t ncwaited, cwaited_cap;
    bool may_wait;  /* wp_applier_may_wait_keys */
    bool want_wait; /* the last apply met a table whose key or column catalog it should wait for */
    bool alive_known, alive; /* discovery_alive(), asked in this apply */
    const wp_event_t *events; /* the claim being applied */
    size_t nevents;
    wp_payload_t payload;
    unsigned next_stmt;
    bool careful;
    bool in_pipeline;
    int pending;
    bool pipe_failed;
    wp_fail_t pipe_fail;
    char pipe_error[512];
    const char **params;
    size_t params_cap;
    bool *absent;
    char **owned; /* values read back for a key change */
    size_t nowned;
    size_t cap_cols;
    unsigned changes; /* bumped when the cache learns of a mirror created or altered in this transaction */
    unsigned txn;     /* bumped per claim and per rollback to a savepoint: the locks pin_mirror took are gone */
    plan_t *plans;
    size_t plans_cap;
};

static void needs_clear(wp_applier_t *a)
{
    for (size_t i = 0; i < a->nneed_cols; i++) {
        free(a->need_cols[i].key);
        free(a->need_cols[i].source);
        free(a->need_cols[i].schema);
        free(a->need_cols[i].table);
    }
    a->nneed_cols = 0;
}

static void tfails_clear(wp_applier_t *a)
{
    for (size_t i = 0; i < a->ntfails; i++) {
        free(a->tfails[i].key);
        free(a->tfails[i].source);
        free(a->tfails[i].schema);
        free(a->tfails[i].table);
    }
    a->ntfails = 0;
}

/* ---------------------------------------------------------------- events */

static int cmp_event(const void *a, const void *b)
{
    const wp_event_t *x = a, *y = b;
    return x->id < y->id ? -1 : x->id > y->id;
}

size_t wp_events_from_result(const PGresult *res, wp_event_t *events)
{
    size_t n = (size_t)PQntuples(res);
    for (size_t i = 0; i < n; i++) {
        wp_event_t *e = &events[i];
        int r = (int)i;
        memset(e, 0, sizeof *e);
        e->id = strtoll(PQgetvalue(res, r, 0), NULL, 10);
        e->received_at = PQgetvalue(res, r, 1);
        e->source = PQgetvalue(res, r, 2);
        e->type = PQgetvalue(res, r, 3);
        e->payload = PQgetvalue(res, r, 4);
        e->lsn_text = PQgetisnull(res, r, 5) ? "0/0" : PQgetvalue(res, r, 5);
        wp_lsn_parse(e->lsn_text, strlen(e->lsn_text), &e->lsn);
        e->seq_text = PQgetisnull(res, r, 6) ? "0" : PQgetvalue(res, r, 6);
        e->seq = atoi(e->seq_text);
        e->schema = PQgetisnull(res, r, 7) ? NULL : PQgetvalue(res, r, 7);
        e->table = PQgetisnull(res, r, 8) ? NULL : PQgetvalue(res, r, 8);
        e->shape_text = PQgetisnull(res, r, 9) ? NULL : PQgetvalue(res, r, 9);
    }
    qsort(events, n, sizeof *events, cmp_event);
    return n;
}

static ev_kind_t kind_of(const char *type)
{
    if (strcmp(type, "insert") == 0 || strcmp(type, "snapshot") == 0)
        return K_INSERT;
    if (strcmp(type, "update") == 0)
        return K_UPDATE;
    if (strcmp(type, "delete") == 0)
        return K_DELETE;
    if (strcmp(type, "truncate") == 0)
        return K_TRUNCATE;
    return K_OTHER;
}

/*
 * The reason goes into walpipe.dead_letters: the
 * text is made valid UTF-8 and then cut on a character boundary, never inside
 * one (PostgreSQL's DETAIL quotes row values, so a cut at a byte count could
 * split a character, and staging would refuse the dead letter).
 */
void wp_event_fail(wp_event_t *ev, wp_fail_t fail, const char *fmt, ...)
{
    va_list ap;
    ev->fail = fail;
    va_start(ap, fmt);
    int len = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (len < 0) {
        snprintf(ev->error, sizeof ev->error, "(the reason could not be formatted)");
        return;
    }
    char *text = wp_malloc((size_t)len + 1);
    va_start(ap, fmt);
    vsnprintf(text, (size_t)len + 1, fmt, ap);
    va_end(ap);
    wp_utf8_scrub(text, false);
    size_t n = wp_utf8_clip(text, (size_t)len, sizeof ev->error - 1);
    memcpy(ev->error, text, n);
    ev->error[n] = '\0';
    free(text);
}

/* ---------------------------------------------------------------- applier state */

wp_applier_t *wp_applier_create(const wp_config_t *config, PGconn *conn)
{
    wp_applier_t *a = wp_calloc(1, sizeof *a);
    a->config = config;
    a->conn = conn;
    return a;
}

int wp_applier_session(PGconn *conn)
{
    PGresult *res = PQexec(conn, "SET client_min_messages = warning; SET TimeZone = 'UTC'; "
                                 "SET DateStyle = 'ISO, MDY'; SET IntervalStyle = postgres; "
                                 "SET extra_float_digits = 3; SET bytea_output = hex; "
                                 "SET search_path = pg_catalog, pg_temp; SET lock_timeout = '60s'");
    int rc = PQresultStatus(res) == PGRES_COMMAND_OK ? 0 : -1;
    if (rc != 0)
        wp_error("staging: could not set up the worker session: %s", PQerrorMessage(conn));
    PQclear(res);
    return rc;
}

static void free_stmts(stmt_t *s)
{
    while (s) {
        stmt_t *next = s->next;
        free(s->absent);
        free(s->types);
        free(s);
        s = next;
    }
}


static void history_clear(history_t *h)
{
    for (size_t i = 0; i < h->n; i++)
        wp_tshape_clear(&h->shapes[i]);
    free(h->shapes);
    memset(h, 0, sizeof *h);
}

static void free_mentry(mentry_t *me)
{
    if (me == NULL)
        return;
    history_clear(&me->hist);
    wp_mirror_destroy(me->m);
    free_stmts(me->stmts);
    for (size_t k = 0; k < me->nsweepbufs; k++)
        wp_buf_free(&me->sweep[k]);
    free(me->sweep);
    free(me);
}

static void free_owned(wp_applier_t *a)
{
    for (size_t i = 0; i < a->nowned; i++)
        free(a->owned[i]);
    a->nowned = 0;
}

void wp_applier_reset(wp_applier_t *a)
{
    for (size_t i = 0; i < a->nmirrors; i++)
        free_mentry(a->mirrors[i]);
    a->nmirrors = 0;
    a->last_mirror = NULL;
    for (size_t i = 0; i < a->nshapes; i++)
        a->shapes[i]->followed_mirror = 0;
    if (a->conn && PQstatus(a->conn) == CONNECTION_OK && !a->in_pipeline)
        PQclear(PQexec(a->conn, "DEALLOCATE ALL"));
}

void wp_applier_destroy(wp_applier_t *a)
{
    if (a == NULL)
        return;
    for (size_t i = 0; i < a->nmirrors; i++)
        free_mentry(a->mirrors[i]);
    free(a->mirrors);
    for (size_t i = 0; i < a->nshapes; i++) {
        free(a->shapes[i]->source);
        free(a->shapes[i]->id);
        wp_tshape_clear(&a->shapes[i]->shape);
        free(a->shapes[i]->src);
        free(a->shapes[i]);
    }
    free(a->shapes);
    for (size_t i = 0; i < a->nwaited; i++)
        free(a->waited[i].key);
    free(a->waited);
    tfails_clear(a);
    free(a->tfails);
    needs_clear(a);
    free(a->need_cols);
    for (size_t i = 0; i < a->ncwaited; i++)
        free(a->cwaited[i].key);
    free(a->cwaited);
    free_owned(a);
    free(a->owned);
    wp_payload_free(&a->payload);
    free(a->params);
    free(a->absent);
    for (size_t i = 0; i < a->plans_cap; i++)
        free(a->plans[i].key);
    free(a->plans);
    free(a);
}

/* Room for the parameters and flags of a statement over ncols columns. */
static void reserve_cols(wp_applier_t *a, size_t ncols)
{
    size_t need = ncols + 4;
    if (need <= a->cap_cols)
        return;
    a->cap_cols = need * 2;
    a->params = wp_realloc(a->params, a->cap_cols * sizeof *a->params);
    a->absent = wp_realloc(a->absent, a->cap_cols * sizeof *a->absent);
    a->owned = wp_realloc(a->owned, a->cap_cols * sizeof *a->owned);
}

/* ---------------------------------------------------------------- pipeline */

/* Reads every result up to the pipeline's sync point, remembering the first error. */
static int pipe_sync(wp_applier_t *a)
{
    if (!a->in_pipeline || a->pending == 0)
        return a->pipe_failed ? -1 : 0;
    if (PQpipelineSync(a->conn) != 1) {
        a->pipe_failed = true;
        a->pipe_fail = WP_FAIL_TRANSIENT;
        snprintf(a->pipe_error, sizeof a->pipe_error, "could not send to staging: %s", PQerrorMessage(a->conn));
        return -1;
    }
    for (;;) {
        PGresult *res = PQgetResult(a->conn);
        if (res == NULL) {
            if (PQstatus(a->conn) != CONNECTION_OK) {
                a->pipe_failed = true;
                a->pipe_fail = WP_FAIL_TRANSIENT;
                snprintf(a->pipe_error, sizeof a->pipe_error, "lost the staging connection: %s",
                         PQerrorMessage(a->conn));
                break;
            }
            continue;
        }
        ExecStatusType st = PQresultStatus(res);
        if (st == PGRES_PIPELINE_SYNC) {
            PQclear(res);
            break;
        }
        if (st == PGRES_FATAL_ERROR && !a->pipe_failed) {
            const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
            a->pipe_failed = true;
            a->pipe_fail = wp_mirror_classify(res, a->conn);
            snprintf(a->pipe_error, sizeof a->pipe_error, "%s", msg ? msg : PQerrorMessage(a->conn));
        }
        PQclear(res);
    }
    a->pending = 0;
    return a->pipe_failed ? -1 : 0;
}

/* Leaves pipeline mode so that the next step can run synchronously. */
static int go_sync(wp_applier_t *a)
{
    if (!a->in_pipeline)
        return AP_OK;
    int rc = pipe_sync(a);
    if (PQexitPipelineMode(a->conn) != 1 && rc == 0) {
        a->pipe_failed = true;
        a->pipe_fail = WP_FAIL_TRANSIENT;
        snprintf(a->pipe_error, sizeof a->pipe_error, "could not leave pipeline mode: %s", PQerrorMessage(a->conn));
        rc = -1;
    }
    a->in_pipeline = false;
    if (rc != 0)
        return a->pipe_fail == WP_FAIL_TRANSIENT ? AP_TRANSIENT : AP_SQL;
    return AP_OK;
}

static int go_pipeline(wp_applier_t *a)
{
    if (a->careful || a->in_pipeline)
        return AP_OK;
    if (PQenterPipelineMode(a->conn) != 1) {
        a->pipe_failed = true;
        a->pipe_fail = WP_FAIL_TRANSIENT;
        snprintf(a->pipe_error, sizeof a->pipe_error, "could not enter pipeline mode: %s", PQerrorMessage(a->conn));
        return AP_TRANSIENT;
    }
    a->in_pipeline = true;
    return AP_OK;
}

/* After a synchronous step failed: was it the statement's fault (AP_SQL) or the connection's? */
static int sync_failure(wp_applier_t *a, wp_event_t *ev, wp_fail_t fail)
{
    if (fail == WP_FAIL_TRANSIENT || PQstatus(a->conn) != CONNECTION_OK)
        return AP_TRANSIENT;
    if (PQtransactionStatus(a->conn) == PQTRANS_INERROR)
        return AP_SQL;
    (void)ev;
    return AP_OK; /* the event failed on its own; ev->fail says how */
}

/* ---------------------------------------------------------------- statements */

static void build_sql(const mentry_t *me, const stmt_t *st, wp_buf_t *sql, unsigned *types, int *ntypes)
{
    switch (st->kind) {
    case 'U':
        wp_mirror_sql_upsert(me->m, st->absent, sql, types, ntypes);
        break;
    case '1':
    case '2':
        wp_mirror_sql_delete(me->m, st->kind - '0', sql, types, ntypes);
        break;
    case 'R':
        wp_mirror_sql_read(me->m, st->absent, sql, types, ntypes);
        break;
    default:
        wp_mirror_sql_sweep(me->m, sql, types, ntypes);
        break;
    }
}

/* The prepared statement of this kind (and absent set) for the mirror, created on first use. */
static stmt_t *get_stmt(wp_applier_t *a, mentry_t *me, char kind, const bool *absent)
{
    size_t ncols = me->m->ncols;
    for (stmt_t *s = me->stmts; s; s = s->next) {
        if (s->kind != kind)
            continue;
        if (absent == NULL || memcmp(s->absent, absent, ncols * sizeof *absent) == 0)
            return s;
    }
    stmt_t *s = wp_calloc(1, sizeof *s);
    s->kind = kind;
    s->ncols = ncols;
    if (absent) {
        s->absent = wp_malloc(ncols * sizeof *absent);
        memcpy(s->absent, absent, ncols * sizeof *absent);
    }
    snprintf(s->name, sizeof s->name, "wp_%u", ++a->next_stmt);
    s->next = me->stmts;
    me->stmts = s;
    return s;
}

/*
 * Runs statement st with params: sent into the pipeline, or (careful mode,
 * reads) executed now.  *res_out, when given, receives the result of a
 * synchronous run (caller clears).
 */
static int run_stmt(wp_applier_t *a, mentry_t *me, stmt_t *st, const char *const *params, wp_event_t *ev,
                    PGresult **res_out)
{
    bool sync = res_out != NULL || a->careful;
    int rc = sync ? go_sync(a) : go_pipeline(a);
    if (rc != AP_OK)
        return rc;
    if (!st->prepared) {
        wp_buf_t sql = WP_BUF_INIT;
        unsigned types[4096];
        int ntypes = 0;
        if (me->m->ncols + 4 > sizeof types / sizeof types[0]) {
            wp_event_fail(ev, WP_FAIL_PARK, "table \"%s\".\"%s\" has too many columns for the mirror", me->m->schema,
                    me->m->table);
            return AP_OK;
        }
        build_sql(me, st, &sql, types, &ntypes);
        st->ntypes = ntypes;
        if (sync) {
            PGresult *res = PQprepare(a->conn, st->name, sql.data, ntypes, (const Oid *)types);
            if (PQresultStatus(res) != PGRES_COMMAND_OK) {
                wp_fail_t fail = wp_mirror_classify(res, a->conn);
                wp_event_fail(ev, fail == WP_FAIL_TRANSIENT ? fail : WP_FAIL_RETRY,
                        "could not prepare a statement for mirror %s: %s", me->m->qmirror,
                        PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY)
                                                                        : PQerrorMessage(a->conn));
                PQclear(res);
                wp_buf_free(&sql);
                return sync_failure(a, ev, fail);
            }
            PQclear(res);
        } else if (PQsendPrepare(a->conn, st->name, sql.data, ntypes, (const Oid *)types) != 1) {
            wp_buf_free(&sql);
            a->pipe_failed = true;
            a->pipe_fail = WP_FAIL_TRANSIENT;
            snprintf(a->pipe_error, sizeof a->pipe_error, "could not send to staging: %s", PQerrorMessage(a->conn));
            return AP_TRANSIENT;
        } else {
            a->pending++;
        }
        st->prepared = true;
        wp_buf_free(&sql);
    }
    if (!sync) {
        if (PQsendQueryPrepared(a->conn, st->name, st->ntypes, params, NULL, NULL, 0) != 1) {
            a->pipe_failed = true;
            a->pipe_fail = WP_FAIL_TRANSIENT;
            snprintf(a->pipe_error, sizeof a->pipe_error, "could not send to staging: %s", PQerrorMessage(a->conn));
            return AP_TRANSIENT;
        }
        if (++a->pending >= PIPE_CHUNK && pipe_sync(a) != 0)
            return a->pipe_fail == WP_FAIL_TRANSIENT ? AP_TRANSIENT : AP_SQL;
        return AP_OK;
    }
    PGresult *res = PQexecPrepared(a->conn, st->name, st->ntypes, params, NULL, NULL, 0);
    ExecStatusType status = PQresultStatus(res);
    if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
        wp_fail_t fail = wp_mirror_classify(res, a->conn);
        const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
        const char *detail = PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL);
        wp_event_fail(ev, fail, "%s%s%s%s", msg ? msg : PQerrorMessage(a->conn), detail ? " (" : "", detail ? detail : "",
                detail ? ")" : "");
        PQclear(res);
        return sync_failure(a, ev, fail);
    }
    if (res_out)
        *res_out = res;
    else
        PQclear(res);
    return AP_OK;
}

/* Appends one key value to a "{...}" array literal. */
static void array_append(wp_buf_t *b, const char *v)
{
    wp_buf_puts(b, b->len ? ",\"" : "{\"");
    for (; *v; v++) {
        if (*v == '"' || *v == '\\')
            wp_buf_putc(b, '\\');
        wp_buf_putc(b, *v);
    }
    wp_buf_putc(b, '"');
}

static void sweep_reset(mentry_t *me)
{
    for (size_t k = 0; k < me->nsweepbufs; k++)
        wp_buf_reset(&me->sweep[k]);
    me->nsweep = 0;
}

/* Deletes the rows this pass wrote for me that a tombstone committed meanwhile makes dead. */
static int sweep(wp_applier_t *a, mentry_t *me, wp_event_t *ev)
{
    if (me->nsweep == 0)
        return AP_OK;
    const char *params[64];
    if (me->nsweepbufs > 64)
        return AP_OK;
    for (size_t k = 0; k < me->nsweepbufs; k++) {
        wp_buf_putc(&me->sweep[k], '}');
        params[k] = me->sweep[k].data;
    }
    /*
     * Not prepared: a cached generic plan made while the mirror was small would
     * keep scanning it whole as it grows; planned each time, it probes the keys.
     */
    wp_buf_t sql = WP_BUF_INIT;
    unsigned types[64];
    int ntypes = 0, rc = AP_OK;
    wp_mirror_sql_sweep(me->m, &sql, types, &ntypes);
    if (!a->careful) {
        rc = go_pipeline(a);
        if (rc == AP_OK && PQsendQueryParams(a->conn, sql.data, ntypes, (const Oid *)types, params, NULL, NULL, 0) != 1) {
            a->pipe_failed = true;
            a->pipe_fail = WP_FAIL_TRANSIENT;
            snprintf(a->pipe_error, sizeof a->pipe_error, "could not send to staging: %s", PQerrorMessage(a->conn));
            rc = AP_TRANSIENT;
        } else if (rc == AP_OK) {
            a->pending++; /* libpq copied the parameters: the literals may go */
        }
    } else {
        PGresult *res = PQexecParams(a->conn, sql.data, ntypes, (const Oid *)types, params, NULL, NULL, 0);
        if (PQresultStatus(res) != PGRES_COMMAND_OK) {
            wp_fail_t fail = wp_mirror_classify(res, a->conn);
            wp_event_fail(ev, fail, "could not sweep mirror %s: %s", me->m->qmirror, PQerrorMessage(a->conn));
            rc = sync_failure(a, ev, fail);
        }
        PQclear(res);
    }
    wp_buf_free(&sql);
    sweep_reset(me);
    return rc;
}

static void sweep_add(mentry_t *me, const char *const *keyvals)
{
    if (me->nsweepbufs != me->m->nkeys) {
        for (size_t k = 0; k < me->nsweepbufs; k++)
            wp_buf_free(&me->sweep[k]);
        free(me->sweep);
        me->nsweepbufs = me->m->nkeys;
        me->sweep = wp_calloc(me->nsweepbufs, sizeof *me->sweep);
        me->nsweep = 0;
    }
    for (size_t k = 0; k < me->nsweepbufs; k++)
        array_append(&me->sweep[k], keyvals[k]);
    me->nsweep++;
}

/* ---------------------------------------------------------------- mirrors and shapes */

/*
 * "<len>:source<len>:schema<len>:table": a table as one string, unambiguous
 * whatever bytes the names hold (see key_text).  Also the payload of a
 * NOTIFY walpipe_discover (worker.c reads it back).  Caller frees.
 */
static char *table_key(const char *source, const char *schema, const char *table)
{
    wp_buf_t b = WP_BUF_INIT;
    wp_buf_printf(&b, "%zu:%s%zu:%s%zu:%s", strlen(source), source, strlen(schema), schema, strlen(table), table);
    return b.data;
}

static bool waited_recently(wp_applier_t *a, const char *key)
{
    int64_t now = wp_now_ms();
    for (size_t i = 0; i < a->nwaited; i++)
        if (strcmp(a->waited[i].key, key) == 0 && now - a->waited[i].at_ms < KEY_WAIT_MEMORY_MS)
            return true;
    return false;
}

/*
 * Remembers in list that the applier waited for key now; forgets what it
 * waited for longer than memory_ms ago (it no longer matters).
 */
static void remember_waited(waited_t **list, size_t *n, size_t *cap, const char *key, int64_t memory_ms)
{
    int64_t now = wp_now_ms();
    size_t keep = 0;
    for (size_t i = 0; i < *n; i++) {
        if (now - (*list)[i].at_ms >= memory_ms || strcmp((*list)[i].key, key) == 0)
            free((*list)[i].key);
        else
            (*list)[keep++] = (*list)[i];
    }
    *n = keep;
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 8;
        *list = wp_realloc(*list, *cap * sizeof **list);
    }
    (*list)[*n].key = wp_strdup(key);
    (*list)[(*n)++].at_ms = now;
}

static table_fail_t *find_tfail(wp_applier_t *a, const wp_event_t *ev)
{
    for (size_t i = 0; i < a->ntfails; i++) {
        table_fail_t *tf = &a->tfails[i];
        if (strcmp(tf->table, ev->table) == 0 && strcmp(tf->schema, ev->schema) == 0 &&
            strcmp(tf->source, ev->source) == 0)
            return tf;
    }
    return NULL;
}

static void add_tfail(wp_applier_t *a, const wp_event_t *ev, char *key)
{
    if (a->ntfails == a->tfails_cap) {
        a->tfails_cap = a->tfails_cap ? a->tfails_cap * 2 : 8;
        a->tfails = wp_realloc(a->tfails, a->tfails_cap * sizeof *a->tfails);
    }
    table_fail_t *tf = &a->tfails[a->ntfails++];
    tf->key = key;
    tf->source = wp_strdup(ev->source);
    tf->schema = wp_strdup(ev->schema);
    tf->table = wp_strdup(ev->table);
    tf->fail = ev->fail;
    snprintf(tf->error, sizeof tf->error, "%s", ev->error); /* ev->error is as long, and valid UTF-8 */
}

/* Whether the column catalog of ev's table was waited for lately: then a column it lacks is added without it. */
static bool columns_waited(wp_applier_t *a, const wp_event_t *ev)
{
    char *key = table_key(ev->source, ev->schema, ev->table);
    int64_t now = wp_now_ms();
    bool waited = false;
    for (size_t i = 0; i < a->ncwaited && !waited; i++)
        waited = strcmp(a->cwaited[i].key, key) == 0 && now - a->cwaited[i].at_ms < COLUMNS_WAIT_MEMORY_MS;
    free(key);
    return waited;
}

/*
 * After WP_FAIL_NO_COLUMNS, when the claim waits: it rolls back and waits
 * (wp_applier_wait_keys, with the keys) until the catalog of ev's table was
 * read again, past lsn (a read that did not have what the mirror needs is not
 * enough, whatever its position).
 */
static void need_columns(wp_applier_t *a, const wp_event_t *ev, wp_lsn_t lsn)
{
    for (size_t i = 0; i < a->nneed_cols; i++) {
        col_need_t *cn = &a->need_cols[i];
        if (strcmp(cn->table, ev->table) == 0 && strcmp(cn->schema, ev->schema) == 0 &&
            strcmp(cn->source, ev->source) == 0) {
            if (lsn > cn->lsn)
                cn->lsn = lsn;
            return;
        }
    }
    if (a->nneed_cols == a->need_cols_cap) {
        a->need_cols_cap = a->need_cols_cap ? a->need_cols_cap * 2 : 4;
        a->need_cols = wp_realloc(a->need_cols, a->need_cols_cap * sizeof *a->need_cols);
    }
    col_need_t *cn = &a->need_cols[a->nneed_cols++];
    cn->key = table_key(ev->source, ev->schema, ev->table);
    cn->source = wp_strdup(ev->source);
    cn->schema = wp_strdup(ev->schema);
    cn->table = wp_strdup(ev->table);
    cn->lsn = lsn;
    cn->read = false;
}

static mentry_t *find_mirror(wp_applier_t *a, const wp_event_t *ev)
{
    mentry_t *me = a->last_mirror;
    if (me && strcmp(me->m->table, ev->table) == 0 && strcmp(me->m->schema, ev->schema) == 0 &&
        strcmp(me->m->source, ev->source) == 0)
        return me;
    for (size_t i = 0; i < a->nmirrors; i++) {
        me = a->mirrors[i];
        if (strcmp(me->m->table, ev->table) == 0 && strcmp(me->m->schema, ev->schema) == 0 &&
            strcmp(me->m->source, ev->source) == 0)
            return a->last_mirror = me;
    }
    return NULL;
}

/*
 * Pins the mirror's columns for the rest of the transaction, before its
 * first statement on the mirror: a ROW EXCLUSIVE lock on the mirror table
 * (which an ALTER of another worker's wp_mirror_follow waits for, and which
 * waits for an ALTER in progress), then the generation read under it.  When
 * another worker altered the mirror since this claim read its columns, the
 * claim is rolled back and claimed again: a statement made for the columns
 * of another generation could write into a column that has taken a name
 * since (DROP COLUMN x, ADD COLUMN x; two names swapped), so it never runs.
 * Taken when the claim writes, after every follow of its prepare step, so
 * a worker never waits for the registry row while holding the table.
 */
static int pin_mirror(wp_applier_t *a, mentry_t *me, wp_event_t *ev)
{
    char id[16];
    wp_buf_t sql = WP_BUF_INIT;
    if (me->pinned == a->txn)
        return AP_OK;
    int rc = go_sync(a);
    if (rc != AP_OK)
        return rc;
    wp_buf_printf(&sql, "LOCK TABLE %s IN ROW EXCLUSIVE MODE", me->m->qmirror);
    PGresult *res = PQexec(a->conn, sql.data);
    wp_buf_free(&sql);
    if (PQresultStatus(res) == PGRES_COMMAND_OK) {
        PQclear(res);
        snprintf(id, sizeof id, "%d", me->m->id);
        const char *params[] = {id};
        res = PQexecParams(a->conn, "SELECT generation FROM walpipe.mirrors WHERE id = $1", 1, NULL, params, NULL,
                           NULL, 0);
    }
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_fail_t fail = wp_mirror_classify(res, a->conn);
        wp_event_fail(ev, fail, "could not lock mirror %s: %s", me->m->qmirror, PQerrorMessage(a->conn));
        PQclear(res);
        return sync_failure(a, ev, fail);
    }
    bool same = PQntuples(res) == 1 && atoi(PQgetvalue(res, 0, 0)) == me->m->generation;
    PQclear(res);
    if (!same) {
        a->pipe_failed = true;
        a->pipe_fail = WP_FAIL_TRANSIENT;
        snprintf(a->pipe_error, sizeof a->pipe_error, "mirror %s was altered by another worker meanwhile",
                 me->m->qmirror);
        return AP_TRANSIENT;
    }
    me->pinned = a->txn;
    return AP_OK;
}

/*
 * Whether a `walpipe run` discovering keys is connected to staging (it holds
 * WP_KEYS_DISCOVERY_LOCK shared): if none is, waiting for a key is waiting
 * for nobody.  Asked once per wp_applier_apply.
 */
static bool discovery_alive(wp_applier_t *a)
{
    if (a->alive_known)
        return a->alive;
    PGresult *res = PQexec(a->conn, "SELECT EXISTS (SELECT 1 FROM pg_locks l, pg_database d "
                                    "WHERE l.locktype = 'advisory' AND l.database = d.oid AND "
                                    "d.datname = current_database() AND l.granted AND "
                                    "(l.classid, l.objid, l.objsubid) = (" WP_KEYS_DISCOVERY_LOCK ", 2))");
    a->alive = PQresultStatus(res) == PGRES_TUPLES_OK && PQgetvalue(res, 0, 0)[0] == 't';
    a->alive_known = true;
    PQclear(res);
    return a->alive;
}

/*
 * After WP_FAIL_NO_COLUMNS (the source's column catalog was not read since a
 * column the mirror adds appeared): whether this claim waits for a read.  It
 * does, in its one wait with the keys (need_columns), unless it may not wait,
 * waited for this table's columns lately, or no `walpipe run` discovers
 * (nobody would read the catalog): then the caller adds the columns without
 * the catalog at once, as after a wait that was not answered.
 */
static bool columns_wait(wp_applier_t *a, const wp_event_t *ev, wp_lsn_t lsn)
{
    if (!a->may_wait || columns_waited(a, ev) || !discovery_alive(a))
        return false;
    need_columns(a, ev, lsn);
    a->want_wait = true;
    return true;
}

/* The mirror of ev's table, opened (and created) on first use.  NULL with *rc set when it cannot be had. */
static mentry_t *get_mirror(wp_applier_t *a, wp_event_t *ev, const wp_tshape_t *shape, bool shape_full, int *rc)
{
    mentry_t *me = find_mirror(a, ev);
    *rc = AP_OK;
    if (me)
        return me;
    table_fail_t *tf = find_tfail(a, ev);
    if (tf) {
        wp_event_fail(ev, tf->fail, "%s", tf->error);
        return NULL;
    }
    if ((*rc = go_sync(a)) != AP_OK)
        return NULL;
    wp_fail_t fail = WP_FAIL_NONE;
    char err[512];
    wp_mirror_t *m = wp_mirror_open(a->conn, a->config, ev->source, ev->schema, ev->table, shape, shape_full,
                                    columns_waited(a, ev), &fail, err, sizeof err);
    if (m == NULL && fail == WP_FAIL_NO_COLUMNS && !columns_wait(a, ev, shape ? shape->first_lsn : ev->lsn)) {
        fail = WP_FAIL_NONE; /* the new columns get no default, and the mirror is recorded as diverged */
        m = wp_mirror_open(a->conn, a->config, ev->source, ev->schema, ev->table, shape, shape_full, true, &fail, err,
                           sizeof err);
    }
    if (m == NULL) {
        char *key = table_key(ev->source, ev->schema, ev->table);
        if (fail == WP_FAIL_NO_KEY) {
            /*
             * At most one wait per claim: this claim waits (the caller rolls
             * back, wp_applier_wait_keys) only for tables it has not waited
             * for lately; any other unknown table is dead-lettered as
             * deferred, retried until `walpipe run` records its key or why it
             * has none.
             */
            if (a->may_wait && !waited_recently(a, key) && discovery_alive(a))
                a->want_wait = true;
            else
                fail = WP_FAIL_DEFER;
        }
        wp_event_fail(ev, fail, "%s", err);
        *rc = sync_failure(a, ev, fail);
        if (*rc == AP_OK && (fail == WP_FAIL_NO_KEY || fail == WP_FAIL_NO_COLUMNS || fail == WP_FAIL_DEFER ||
                             fail == WP_FAIL_PARK))
            add_tfail(a, ev, key); /* a failure of the table, not of this event: the same for all its events */
        else
            free(key);
        return NULL;
    }
    me = wp_calloc(1, sizeof *me);
    me->m = m;
    a->changes++;
    if (a->nmirrors == a->mirrors_cap) {
        a->mirrors_cap = a->mirrors_cap ? a->mirrors_cap * 2 : 16;
        a->mirrors = wp_realloc(a->mirrors, a->mirrors_cap * sizeof *a->mirrors);
    }
    a->mirrors[a->nmirrors++] = me;
    return a->last_mirror = me;
}

/* Drops a mirror's statements after its columns changed (server side too, when possible). */
static void forget_stmts(wp_applier_t *a, mentry_t *me)
{
    for (stmt_t *s = me->stmts; s && !a->in_pipeline; s = s->next) {
        if (!s->prepared)
            continue;
        char sql[64];
        snprintf(sql, sizeof sql, "DEALLOCATE %s", s->name);
        PQclear(PQexec(a->conn, sql));
    }
    free_stmts(me->stmts);
    me->stmts = NULL;
}

static shape_entry_t *get_shape(wp_applier_t *a, wp_event_t *ev, int *rc)
{
    *rc = AP_OK;
    for (size_t i = a->nshapes; i-- > 0;) {
        shape_entry_t *se = a->shapes[i];
        if (strcmp(se->id, ev->shape_text) == 0 && strcmp(se->source, ev->source) == 0)
            return se;
    }
    if ((*rc = go_sync(a)) != AP_OK)
        return NULL;
    const char *params[] = {ev->source, ev->shape_text};
    PGresult *res = PQexecParams(a->conn,
                                 "SELECT columns::text, first_lsn::text FROM walpipe.table_schemas "
                                 "WHERE source = $1 AND shape_id = $2",
                                 2, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_fail_t fail = wp_mirror_classify(res, a->conn);
        wp_event_fail(ev, fail, "could not read the table shape: %s", PQerrorMessage(a->conn));
        PQclear(res);
        *rc = sync_failure(a, ev, fail);
        return NULL;
    }
    shape_entry_t *se = wp_calloc(1, sizeof *se);
    se->source = wp_strdup(ev->source);
    se->id = wp_strdup(ev->shape_text);
    if (PQntuples(res) == 0) {
        snprintf(se->error, sizeof se->error, "table shape %s of source \"%s\" is missing from walpipe.table_schemas",
                 ev->shape_text, ev->source);
    } else if (wp_tshape_parse(PQgetvalue(res, 0, 0), &se->shape, se->error, sizeof se->error) == 0) {
        const char *l = PQgetvalue(res, 0, 1);
        se->ok = PQgetisnull(res, 0, 1) || wp_lsn_parse(l, strlen(l), &se->shape.first_lsn);
        if (!se->ok)
            snprintf(se->error, sizeof se->error, "table shape %s has an unreadable first_lsn", ev->shape_text);
    }
    PQclear(res);
    if (a->nshapes == a->shapes_cap) {
        a->shapes_cap = a->shapes_cap ? a->shapes_cap * 2 : 16;
        a->shapes = wp_realloc(a->shapes, a->shapes_cap * sizeof *a->shapes);
    }
    a->shapes[a->nshapes++] = se;
    return se;
}

/* ---------------------------------------------------------------- column identity */

/*
 * Which shape column each mirror column is, for events of shape se: by
 * attnum where the shape has positions and the mirror knows the attnum (so
 * an event from before a rename finds its column under the old name), else
 * by name (shapes recorded by an older walpipe).
 */
static void map_shape(const wp_mirror_t *m, shape_entry_t *se)
{
    free(se->src);
    se->src = wp_calloc(m->ncols + 1, sizeof *se->src);
    se->src_n = m->ncols;
    se->src_mirror = m->id;
    se->src_gen = m->generation;
    for (size_t i = 0; i < m->ncols; i++) {
        if (se->shape.positioned && m->cols[i].attnum > 0)
            se->src[i] = wp_tshape_at(&se->shape, m->cols[i].attnum);
        else
            se->src[i] = wp_tshape_named(&se->shape, m->cols[i].name);
    }
}

static bool shape_mapped(const wp_mirror_t *m, const shape_entry_t *se)
{
    return se->src && se->src_mirror == m->id && se->src_gen == m->generation && se->src_n == m->ncols;
}

/* The name mirror column i has in an event of shape se (NULL: the shape lacks it); its own name without a shape. */
static const char *shape_name(const wp_mirror_t *m, const shape_entry_t *se, size_t i)
{
    if (se == NULL || !shape_mapped(m, se))
        return m->cols[i].name;
    return se->src[i] >= 0 ? se->shape.cols[se->src[i]].name : NULL;
}

/* The newest LSN among the claim's events of ev's source: every shape first seen at or before it is committed. */
static wp_lsn_t claim_upto(const wp_applier_t *a, const wp_event_t *ev)
{
    wp_lsn_t upto = ev->lsn;
    for (size_t i = 0; i < a->nevents; i++)
        if (a->events[i].lsn > upto && strcmp(a->events[i].source, ev->source) == 0)
            upto = a->events[i].lsn;
    return upto;
}

/* Loads the shapes with positions of me's table, unless those loaded already cover ev. */
static int history_load(wp_applier_t *a, mentry_t *me, wp_event_t *ev)
{
    history_t *h = &me->hist;
    if (h->loaded && ev->lsn <= h->upto)
        return AP_OK;
    int rc = go_sync(a);
    if (rc != AP_OK)
        return rc;
    wp_lsn_t upto = claim_upto(a, ev);
    const char *params[] = {ev->source, me->m->schema, me->m->table};
    PGresult *res = PQexecParams(a->conn,
                                 "SELECT columns::text, first_lsn::text FROM walpipe.table_schemas WHERE source = $1 "
                                 "AND schema_name = $2 AND table_name = $3 AND columns::text LIKE '%\"position\"%' "
                                 "ORDER BY first_lsn",
                                 3, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_fail_t fail = wp_mirror_classify(res, a->conn);
        wp_event_fail(ev, fail, "could not read the table's shapes: %s", PQerrorMessage(a->conn));
        PQclear(res);
        return sync_failure(a, ev, fail);
    }
    history_clear(h);
    h->shapes = wp_calloc((size_t)PQntuples(res) + 1, sizeof *h->shapes);
    for (int r = 0; r < PQntuples(res); r++) {
        char err[128];
        wp_tshape_t *t = &h->shapes[h->n];
        const char *l = PQgetvalue(res, r, 1);
        if (wp_tshape_parse(PQgetvalue(res, r, 0), t, err, sizeof err) == 0 && t->positioned &&
            wp_lsn_parse(l, strlen(l), &t->first_lsn))
            h->n++;
        else
            wp_tshape_clear(t);
    }
    PQclear(res);
    h->loaded = true;
    h->upto = upto;
    return AP_OK;
}

/*
 * The name mirror column i had in events at lsn (their key and before
 * images carry no positions): from the newest shape first seen at or before
 * lsn that has its attnum, else the oldest after it (a change between the
 * rename and the first insert or update that showed it); the mirror's name
 * when no shape says.
 */
static const char *name_at(const mentry_t *me, size_t i, wp_lsn_t lsn)
{
    const history_t *h = &me->hist;
    const char *best = NULL;
    for (size_t s = 0; s < h->n && me->m->cols[i].attnum > 0; s++) {
        ssize_t j = wp_tshape_at(&h->shapes[s], me->m->cols[i].attnum);
        if (j < 0)
            continue;
        if (h->shapes[s].first_lsn > lsn && best)
            break;
        best = h->shapes[s].cols[j].name;
        if (h->shapes[s].first_lsn > lsn)
            break;
    }
    return best ? best : me->m->cols[i].name;
}

/*
 * The names ev's key (or before) image gives the mirror's key columns: an
 * update's own shape names them as its identity does; otherwise the table's
 * shape history (a delete's identity has no positions).  The history is
 * loaded also when before_image asks (REPLICA IDENTITY FULL: any column).
 */
static int key_names(wp_applier_t *a, mentry_t *me, wp_event_t *ev, const shape_entry_t *se, bool before_image,
                     const char **out)
{
    const wp_mirror_t *m = me->m;
    bool hist = false, any_attnum = false;
    for (size_t i = 0; i < m->ncols; i++)
        any_attnum |= m->cols[i].attnum > 0;
    for (size_t k = 0; k < m->nkeys; k++) {
        out[k] = se ? shape_name(m, se, m->keys[k]) : NULL;
        hist |= out[k] == NULL && m->cols[m->keys[k]].attnum > 0;
    }
    if ((hist || before_image) && any_attnum) {
        int rc = history_load(a, me, ev);
        if (rc != AP_OK || ev->fail != WP_FAIL_NONE)
            return rc;
    }
    for (size_t k = 0; k < m->nkeys; k++)
        if (out[k] == NULL)
            out[k] = name_at(me, m->keys[k], ev->lsn);
    return AP_OK;
}

/* The name mirror column i has in the before image of a change at lsn (REPLICA IDENTITY FULL). */
static const char *before_name(const mentry_t *me, size_t i, wp_lsn_t lsn)
{
    return me->hist.loaded ? name_at(me, i, lsn) : me->m->cols[i].name;
}

/* ---------------------------------------------------------------- applying one event */

/* "a", "b" (the names in o, quoted, comma-separated) into b, for a reason. */
static void field_names(const wp_jobject_t *o, wp_buf_t *b)
{
    for (size_t i = 0; i < o->n; i++)
        wp_buf_printf(b, "%s\"%s\"", i ? ", " : "", o->fields[i].name);
}

static void key_list(const wp_mirror_t *m, wp_buf_t *b)
{
    for (size_t k = 0; k < m->nkeys; k++)
        wp_buf_printf(b, "%s\"%s\"", k ? ", " : "", m->cols[m->keys[k]].name);
}

/*
 * The key column at index i of the mirror in image o under another name it
 * had (newest first), or under its name now: a DELETE between a rename and
 * the first insert or update after it names the column anew before any
 * shape does.
 */
static const wp_jfield_t *key_other_name(const mentry_t *me, size_t i, const wp_jobject_t *o)
{
    const wp_mcol_t *c = &me->m->cols[i];
    for (size_t s = me->hist.n; s-- > 0 && c->attnum > 0;) {
        ssize_t j = wp_tshape_at(&me->hist.shapes[s], c->attnum);
        const wp_jfield_t *f = j >= 0 ? wp_jobject_get(o, me->hist.shapes[s].cols[j].name, NULL) : NULL;
        if (f)
            return f;
    }
    return wp_jobject_get(o, c->name, NULL);
}

/*
 * Fills out[0..nkeys) with the mirror's key values from the old-row identity
 * o (the payload's key, or before for REPLICA IDENTITY FULL) of an update or
 * delete (what), where they are named knames[k] (key_names) or another name
 * the column had (key_other_name).  When the event does not carry them,
 * fails it with a reason about this event alone: which columns it
 * identifies its row by (the table's replica identity when the change was
 * made, which may differ from the one the catalog shows now) and which key
 * column they lack.  Parked: nothing can tell which row it changed; the
 * dead-letter queue marks the mirror diverged, and a resync repairs it.
 */
static bool key_values(const mentry_t *me, const char *const *knames, const wp_jobject_t *o, const char **out,
                       wp_event_t *ev, const char *what)
{
    const wp_mirror_t *m = me->m;
    size_t hint = 0;
    for (size_t k = 0; k < m->nkeys; k++) {
        const wp_mcol_t *c = &m->cols[m->keys[k]];
        const wp_jfield_t *f = o && o->present ? wp_jobject_get(o, knames[k], &hint) : NULL;
        if (f == NULL && o && o->present)
            f = key_other_name(me, m->keys[k], o);
        if (f != NULL && f->value != NULL) {
            out[k] = f->value;
            continue;
        }
        wp_buf_t carried = WP_BUF_INIT, keys = WP_BUF_INIT;
        key_list(m, &keys);
        if (o == NULL || !o->present || o->n == 0)
            wp_event_fail(ev, WP_FAIL_PARK,
                          "this %s carries no old-row identity, so nothing tells which row of \"%s\".\"%s\" it "
                          "changed: the mirror's key is %s; the mirror missed this change and is marked diverged "
                          "until the table is resynced",
                          what, m->schema, m->table, keys.data);
        else if (f == NULL) {
            field_names(o, &carried);
            wp_event_fail(ev, WP_FAIL_PARK,
                          "this %s identifies its old row by %s (the replica identity of \"%s\".\"%s\" when the "
                          "change was made), without key column \"%s\" of the mirror's key %s (read from the "
                          "source's catalog later), so nothing tells which row it changed; the mirror missed this "
                          "change and is marked diverged until the table is resynced",
                          what, carried.data, m->schema, m->table, c->name, keys.data);
        } else
            wp_event_fail(ev, WP_FAIL_PARK,
                          "this %s carries null for key column \"%s\" in its old-row identity, so nothing tells "
                          "which row of \"%s\".\"%s\" it changed; the mirror missed this change and is marked "
                          "diverged until the table is resynced",
                          what, c->name, m->schema, m->table);
        wp_buf_free(&carried);
        wp_buf_free(&keys);
        return false;
    }
    return true;
}

/* wal2json 2.5 prints NaN and +-Infinity as null: in a NOT NULL column that is a lost value, not NULL. */
static bool lost_special(const wp_mirror_t *m, size_t i, wp_event_t *ev)
{
    const wp_mcol_t *c = &m->cols[i];
    if (!c->src_not_null || (c->typoid != OID_FLOAT4 && c->typoid != OID_FLOAT8 && c->typoid != OID_NUMERIC))
        return false;
    wp_event_fail(ev, WP_FAIL_PARK,
            "column \"%s\" of \"%s\".\"%s\" is NOT NULL on the source but the change carries null: the value was "
            "NaN or Infinity, which wal2json 2.5 prints as null, so it is lost; hint: correct the mirror row by "
            "hand or re-snapshot the table, then drop this dead letter",
            c->name, m->schema, m->table);
    return true;
}

/* Writes the row image params/absent at the event's version (and records its key for the sweep). */
static int write_row(wp_applier_t *a, mentry_t *me, wp_event_t *ev, const char **vals, const bool *absent)
{
    const wp_mirror_t *m = me->m;
    const char **params = a->params;
    const char *keyvals[64];
    int n = 0;
    if (m->nkeys > 64) {
        wp_event_fail(ev, WP_FAIL_PARK, "mirror %s has more than 64 key columns", m->qmirror);
        return AP_OK;
    }
    for (size_t i = 0; i < m->ncols; i++)
        if (!absent[i])
            params[n++] = vals[i];
    params[n++] = ev->lsn_text;
    params[n++] = ev->seq_text;
    for (size_t k = 0; k < m->nkeys; k++)
        keyvals[k] = vals[m->keys[k]];
    stmt_t *st = get_stmt(a, me, 'U', absent);
    int rc = run_stmt(a, me, st, params, ev, NULL);
    if (rc != AP_OK || ev->fail != WP_FAIL_NONE)
        return rc;
    sweep_add(me, keyvals);
    if (a->careful)
        rc = sweep(a, me, ev);
    return rc;
}

static int delete_key(wp_applier_t *a, mentry_t *me, wp_event_t *ev, const char *const *keyvals)
{
    const wp_mirror_t *m = me->m;
    size_t n = 0;
    for (size_t k = 0; k < m->nkeys; k++)
        a->params[n++] = keyvals[k];
    a->params[n++] = ev->lsn_text;
    a->params[n++] = ev->seq_text;
    int rc = run_stmt(a, me, get_stmt(a, me, '1', NULL), a->params, ev, NULL);
    if (rc == AP_OK && ev->fail == WP_FAIL_NONE)
        rc = run_stmt(a, me, get_stmt(a, me, '2', NULL), a->params, ev, NULL);
    return rc;
}

/*
 * A key-changing update that left columns out must carry their values from
 * the old key's row, so that row must first hold every older change of the
 * old key: defer the update (dead letter, retried with backoff) while an
 * older change of that key is unprocessed or dead-lettered.  Rare (it takes a
 * key change that leaves a TOASTed column unchanged), so the query may scan.
 */
static int older_pending(wp_applier_t *a, mentry_t *me, wp_event_t *ev, const char *const *oldkey)
{
    wp_buf_t sql = WP_BUF_INIT;
    const char *params[3 + 64];
    int rc = go_sync(a);
    if (rc != AP_OK)
        return rc;
    params[0] = ev->source;
    params[1] = ev->lsn_text;
    params[2] = ev->seq_text;
    for (size_t k = 0; k < me->m->nkeys; k++)
        params[3 + k] = oldkey[k];
    wp_mirror_sql_pending(me->m, &sql);
    PGresult *res = PQexecParams(a->conn, sql.data, 3 + (int)me->m->nkeys, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_fail_t fail = wp_mirror_classify(res, a->conn);
        wp_event_fail(ev, fail, "could not look for older changes of the old key: %s", PQerrorMessage(a->conn));
        rc = sync_failure(a, ev, fail);
    } else if (PQgetvalue(res, 0, 0)[0] == 't') {
        wp_event_fail(ev, WP_FAIL_DEFER,
                "this update moves a row to a new key and leaves unchanged TOAST columns out, but an older change of "
                "the old key is not applied yet; retried once it is");
    }
    PQclear(res);
    wp_buf_free(&sql);
    return rc;
}

/*
 * A key-changing update that left columns out: carry their values over from
 * the old key's row when that row is older than the change (it is the row the
 * update moved).  Clears absent[] for the columns it fills.
 */
static int carry_absent(wp_applier_t *a, mentry_t *me, wp_event_t *ev, const char *const *oldkey, const char **vals,
                        bool *absent)
{
    PGresult *res = NULL;
    stmt_t *st = get_stmt(a, me, 'R', absent);
    int rc = run_stmt(a, me, st, oldkey, ev, &res);
    if (rc != AP_OK || ev->fail != WP_FAIL_NONE)
        return rc;
    if (PQntuples(res) == 1) {
        wp_lsn_t lsn = 0;
        const char *l = PQgetvalue(res, 0, 0);
        wp_lsn_parse(l, strlen(l), &lsn);
        int seq = atoi(PQgetvalue(res, 0, 1));
        if (lsn < ev->lsn || (lsn == ev->lsn && seq < ev->seq)) {
            int col = 2;
            for (size_t i = 0; i < me->m->ncols; i++) {
                if (!absent[i])
                    continue;
                if (!PQgetisnull(res, 0, col)) {
                    a->owned[a->nowned] = wp_strdup(PQgetvalue(res, 0, col));
                    vals[i] = a->owned[a->nowned++];
                } else {
                    vals[i] = NULL;
                }
                absent[i] = false;
                col++;
            }
        }
    }
    PQclear(res);
    return AP_OK;
}

/*
 * The row image of an insert or update against the mirror's columns: vals[i]
 * (NULL for SQL NULL) and absent[i] (left out: keeps the mirror's value), the
 * old and new key values.  Returns false with ev failed when the event cannot
 * be applied (no key values, a lost NaN).
 */
static bool row_image(wp_applier_t *a, const mentry_t *me, const shape_entry_t *se, const char *const *knames,
                      ev_kind_t kind, wp_event_t *ev, const char **vals, bool *absent, const char **oldkey,
                      const char **newkey, bool *any_absent, bool *key_changed)
{
    const wp_mirror_t *m = me->m;
    const wp_jobject_t *after = &a->payload.after, *before = &a->payload.before;
    size_t hint = 0, bhint = 0;
    *any_absent = *key_changed = false;
    if (!after->present) {
        wp_event_fail(ev, WP_FAIL_PARK, "%s payload has no \"after\"", ev->type);
        return false;
    }
    if (kind == K_UPDATE &&
        !key_values(me, knames, a->payload.key.present ? &a->payload.key : before, oldkey, ev, "update"))
        return false;
    for (size_t i = 0; i < m->ncols; i++) {
        const char *name = shape_name(m, se, i);
        const wp_jfield_t *f = name ? wp_jobject_get(after, name, &hint) : NULL;
        if (f == NULL && kind == K_UPDATE && before->present) /* REPLICA IDENTITY FULL: the old row has it */
            f = wp_jobject_get(before, name ? name : before_name(me, i, ev->lsn), &bhint);
        /*
         * Left out, it keeps the mirror's value.  An update leaves out only
         * unchanged TOAST columns.  An insert lacks only columns its shape did
         * not have yet: that row existed before they were added and reads on
         * the source what such rows read, which the mirror column has as its
         * DEFAULT (the source's missing value, see mirror.c), so a new mirror
         * row gets it too.
         */
        absent[i] = f == NULL;
        *any_absent |= absent[i];
        vals[i] = f ? f->value : NULL;
        if (f && f->value == NULL && lost_special(m, i, ev))
            return false;
    }
    for (size_t k = 0; k < m->nkeys; k++) {
        size_t i = m->keys[k];
        if (absent[i]) { /* a TOASTed key column left out: unchanged */
            absent[i] = false;
            vals[i] = kind == K_UPDATE ? oldkey[k] : NULL;
        }
        if (vals[i] == NULL) {
            wp_event_fail(ev, WP_FAIL_PARK, "%s of \"%s\".\"%s\" has no value for key column \"%s\"", ev->type, m->schema,
                    m->table, m->cols[i].name);
            return false;
        }
        newkey[k] = vals[i];
        if (kind == K_UPDATE)
            *key_changed |= strcmp(newkey[k], oldkey[k]) != 0;
    }
    return true;
}

/*
 * "<len>:v1<len>:v2...": a key as one string, to sort and group changes by.
 * Each value is prefixed with its length, so two keys give the same string
 * only when they are equal value by value: a separator byte would let
 * ('a<sep>b','c') and ('a','b<sep>c') collapse into one key, and coalesce
 * would then skip a change of a different row.
 */
static char *key_text(const wp_mirror_t *m, const char *const *key)
{
    wp_buf_t b = WP_BUF_INIT;
    wp_buf_append(&b, "", 0);
    for (size_t k = 0; k < m->nkeys; k++) {
        wp_buf_printf(&b, "%zu:", strlen(key[k]));
        wp_buf_puts(&b, key[k]);
    }
    return b.data;
}

/*
 * Step 1 for an event: parse it, open its mirror (creating or altering it:
 * the synchronous steps), and fill pl with what orders and groups it.
 */
static int prepare_one(wp_applier_t *a, wp_event_t *ev, plan_t *pl)
{
    char err[512];
    int rc = AP_OK;
    pl->kind = kind_of(ev->type);
    pl->mirror = 0;
    free(pl->key);
    pl->key = NULL;
    pl->full = pl->deletes = pl->late = pl->skip = false;
    pl->se = NULL;
    if (pl->kind == K_OTHER)
        return AP_OK; /* messages are not rows */
    if (ev->schema == NULL || ev->table == NULL) {
        wp_event_fail(ev, WP_FAIL_PARK, "%s event has no schema_name/table_name", ev->type);
        return AP_OK;
    }
    if (pl->kind != K_TRUNCATE && wp_payload_parse(&a->payload, ev->payload, err, sizeof err) != 0) {
        wp_event_fail(ev, WP_FAIL_PARK, "%s", err);
        return AP_OK;
    }
    shape_entry_t *se = NULL;
    if ((pl->kind == K_INSERT || pl->kind == K_UPDATE) && ev->shape_text) {
        se = get_shape(a, ev, &rc);
        if (se == NULL)
            return rc;
        if (!se->ok) {
            wp_event_fail(ev, WP_FAIL_PARK, "%s", se->error);
            return AP_OK;
        }
    }
    mentry_t *me = get_mirror(a, ev, se ? &se->shape : NULL, pl->kind == K_INSERT, &rc);
    if (me == NULL)
        return rc;
    wp_mirror_t *m = me->m;
    if (se && !(se->followed_mirror == m->id && se->followed_gen == m->generation)) {
        bool changed = false;
        wp_fail_t fail = WP_FAIL_NONE;
        if ((rc = go_sync(a)) != AP_OK)
            return rc;
        /* an insert's shape lists every column; an update's may leave unchanged TOAST columns out */
        int frc = wp_mirror_follow(a->conn, m, &se->shape, pl->kind == K_INSERT, columns_waited(a, ev), &changed,
                                   &fail, err, sizeof err);
        if (frc != 0 && fail == WP_FAIL_NO_COLUMNS && !columns_wait(a, ev, se->shape.first_lsn)) {
            bool reloaded = changed; /* the first call may have read the mirror's columns anew */
            fail = WP_FAIL_NONE;     /* without the catalog (see get_mirror) */
            frc = wp_mirror_follow(a->conn, m, &se->shape, pl->kind == K_INSERT, true, &changed, &fail, err,
                                   sizeof err);
            changed |= reloaded;
        }
        if (frc != 0) {
            wp_event_fail(ev, fail, "%s", err);
            return sync_failure(a, ev, fail);
        }
        if (changed) {
            forget_stmts(a, me);
            a->changes++;
            /* a newer shape may come with a rewrite (ALTER COLUMN TYPE ... USING): `walpipe run` looks now */
            PQclear(PQexec(a->conn, "NOTIFY walpipe_discover, '" WP_REWRITES_POLL_NOW "'"));
        }
        se->followed_mirror = m->id;
        se->followed_gen = m->generation;
    }
    if (se && !shape_mapped(m, se))
        map_shape(m, se);
    pl->se = se;
    pl->mirror = m->id;
    if (pl->kind == K_TRUNCATE || m->nkeys > 64)
        return AP_OK;
    const char *knames[64];
    if (pl->kind != K_INSERT &&
        ((rc = key_names(a, me, ev, se, a->payload.before.present, knames)) != AP_OK || ev->fail != WP_FAIL_NONE))
        return rc;
    reserve_cols(a, m->ncols);
    const char **vals = wp_calloc(m->ncols ? m->ncols : 1, sizeof *vals);
    const char *oldkey[64], *newkey[64];
    bool any_absent = false, key_changed = false;
    wp_event_t probe = *ev; /* failures show up again, with their reason, when the event is applied */
    if (pl->kind == K_DELETE) {
        if (key_values(me, knames, a->payload.key.present ? &a->payload.key : &a->payload.before, oldkey, &probe,
                       "delete")) {
            pl->key = key_text(m, oldkey);
            pl->deletes = true;
        }
    } else if (row_image(a, me, se, knames, pl->kind, &probe, vals, a->absent, oldkey, newkey, &any_absent,
                         &key_changed)) {
        pl->key = key_text(m, pl->kind == K_UPDATE ? oldkey : newkey);
        pl->full = !key_changed && !any_absent;
        pl->deletes = key_changed; /* of the old key */
        pl->late = key_changed && any_absent;
    }
    free(vals);
    return AP_OK;
}

/* Step 2 for a prepared event: its statements. */
static int apply_one(wp_applier_t *a, wp_event_t *ev, const plan_t *pl)
{
    char err[512];
    int rc = AP_OK;
    if (pl->kind == K_OTHER || ev->fail != WP_FAIL_NONE)
        return AP_OK;
    if (pl->kind != K_TRUNCATE && wp_payload_parse(&a->payload, ev->payload, err, sizeof err) != 0) {
        wp_event_fail(ev, WP_FAIL_PARK, "%s", err);
        return AP_OK;
    }
    mentry_t *me = get_mirror(a, ev, NULL, false, &rc);
    if (me == NULL)
        return rc;
    if ((rc = pin_mirror(a, me, ev)) != AP_OK || ev->fail != WP_FAIL_NONE)
        return rc;
    wp_mirror_t *m = me->m;
    shape_entry_t *se = pl->se;
    if (se && !shape_mapped(m, se))
        map_shape(m, se); /* a later event of the claim altered the mirror after this one was prepared */
    reserve_cols(a, m->ncols);
    const char **vals = wp_calloc(m->ncols ? m->ncols : 1, sizeof *vals);
    bool *absent = a->absent;
    const char *oldkey[64], *newkey[64], *knames[64];
    bool any_absent = false, key_changed = false;
    if (m->nkeys > 64) {
        wp_event_fail(ev, WP_FAIL_PARK, "mirror %s has more than 64 key columns", m->qmirror);
        goto out;
    }
    if (pl->kind == K_UPDATE || pl->kind == K_DELETE) {
        rc = key_names(a, me, ev, se, a->payload.before.present, knames);
        if (rc != AP_OK || ev->fail != WP_FAIL_NONE)
            goto out;
    }

    switch (pl->kind) {
    case K_TRUNCATE: {
        wp_fail_t fail = WP_FAIL_NONE;
        if ((rc = go_sync(a)) != AP_OK)
            goto out;
        if (wp_mirror_truncate(a->conn, m, ev->lsn, ev->seq, &fail, err, sizeof err) != 0) {
            wp_event_fail(ev, fail, "%s", err);
            rc = sync_failure(a, ev, fail);
        }
        break;
    }
    case K_INSERT:
        if (row_image(a, me, se, knames, K_INSERT, ev, vals, absent, oldkey, newkey, &any_absent, &key_changed))
            rc = write_row(a, me, ev, vals, absent);
        break;
    case K_UPDATE:
        if (!row_image(a, me, se, knames, K_UPDATE, ev, vals, absent, oldkey, newkey, &any_absent, &key_changed))
            break;
        if (key_changed) {
            /* the old key's row goes (as a delete at this version); the new key gets the row */
            if (any_absent && (rc = older_pending(a, me, ev, oldkey)) != AP_OK)
                break;
            if (ev->fail != WP_FAIL_NONE)
                break;
            if (any_absent && (rc = carry_absent(a, me, ev, oldkey, vals, absent)) != AP_OK)
                break;
            if (ev->fail != WP_FAIL_NONE)
                break;
            if ((rc = delete_key(a, me, ev, oldkey)) != AP_OK || ev->fail != WP_FAIL_NONE)
                break;
        }
        rc = write_row(a, me, ev, vals, absent);
        break;
    case K_DELETE:
        if (key_values(me, knames, a->payload.key.present ? &a->payload.key : &a->payload.before, oldkey, ev,
                       "delete"))
            rc = delete_key(a, me, ev, oldkey);
        break;
    case K_OTHER:
        break;
    }
out:
    free(vals);
    free_owned(a);
    return rc;
}

static int exec_simple(wp_applier_t *a, const char *sql)
{
    PGresult *res = PQexec(a->conn, sql);
    int rc = PQresultStatus(res) == PGRES_COMMAND_OK ? AP_OK : AP_TRANSIENT;
    if (rc != AP_OK)
        wp_warn("staging: %s failed: %s", sql, PQerrorMessage(a->conn));
    PQclear(res);
    return rc;
}

static int version_cmp(const wp_event_t *x, const wp_event_t *y)
{
    if (x->lsn != y->lsn)
        return x->lsn < y->lsn ? -1 : 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/*
 * The order a claim is applied in, which any order allows (mirror.c): by
 * mirror, TRUNCATE first, then by key and version.  Every worker takes row
 * locks in this one order, so two claims that touch the same hot rows wait
 * for each other instead of deadlocking.  Key changes that must carry TOAST
 * values from the old key come last, in version order, after every older
 * change of the claim.
 */
static int plan_cmp(const void *pa, const void *pb, void *events)
{
    const plan_t *x = pa, *y = pb;
    const wp_event_t *ex = (const wp_event_t *)events + x->ev, *ey = (const wp_event_t *)events + y->ev;
    if (x->late != y->late)
        return x->late ? 1 : -1;
    if (x->late)
        return version_cmp(ex, ey);
    if (x->mirror != y->mirror)
        return x->mirror < y->mirror ? -1 : 1;
    if ((x->key == NULL) != (y->key == NULL))
        return x->key == NULL ? -1 : 1;
    int c = x->key && y->key ? strcmp(x->key, y->key) : 0;
    return c ? c : version_cmp(ex, ey);
}

/*
 * Within one key, a change followed (in this claim) by a write of the whole
 * row or by a delete of the key changes nothing the later one leaves: the
 * max-merge would overwrite or remove it.  Skipping it saves the statements;
 * a hot row updated 250 times in a claim is written once.
 */
static void coalesce(plan_t *plans, size_t n)
{
    for (size_t i = 0; i < n;) {
        size_t j = i + 1;
        while (j < n && !plans[j].late && plans[j].key && plans[i].key && plans[j].mirror == plans[i].mirror &&
               strcmp(plans[j].key, plans[i].key) == 0)
            j++;
        if (!plans[i].late && plans[i].key) {
            size_t last = j;
            for (size_t k = j; k-- > i;) {
                if (plans[k].full || plans[k].deletes) {
                    last = k;
                    break;
                }
            }
            for (size_t k = i; last < j && k < last; k++)
                plans[k].skip = true;
        }
        i = j;
    }
}

static void reserve_plans(wp_applier_t *a, size_t n)
{
    if (n <= a->plans_cap)
        return;
    a->plans = wp_realloc(a->plans, n * sizeof *a->plans);
    memset(a->plans + a->plans_cap, 0, (n - a->plans_cap) * sizeof *a->plans);
    a->plans_cap = n;
}

/* One pass over the events: pipelined (careful = false) or one savepoint per event. */
static int apply_pass(wp_applier_t *a, wp_event_t *events, size_t n)
{
    int rc = AP_OK;
    a->pipe_failed = false;
    a->pending = 0;
    reserve_plans(a, n);
    plan_t *plans = a->plans;
    for (size_t i = 0; i < n && rc == AP_OK; i++) {
        events[i].fail = WP_FAIL_NONE;
        events[i].error[0] = '\0';
        plans[i].ev = i;
        /* careful mode prepares each event inside its savepoint, below */
        rc = a->careful ? AP_OK : prepare_one(a, &events[i], &plans[i]);
        if (a->careful) {
            plans[i].kind = kind_of(events[i].type);
            plans[i].late = false;
        }
    }
    if (rc == AP_OK && !a->careful) {
        qsort_r(plans, n, sizeof *plans, plan_cmp, events);
        coalesce(plans, n);
    }
    for (size_t p = 0; p < n && rc == AP_OK; p++) {
        plan_t *pl = &plans[p];
        wp_event_t *ev = &events[pl->ev];
        if (!a->careful) {
            if (!pl->skip)
                rc = apply_one(a, ev, pl);
            continue;
        }
        if ((rc = exec_simple(a, "SAVEPOINT wp_event")) != AP_OK)
            break;
        unsigned changes = a->changes;
        rc = prepare_one(a, ev, pl);
        if (rc == AP_OK)
            rc = apply_one(a, ev, pl);
        if (rc == AP_SQL || (rc == AP_OK && ev->fail != WP_FAIL_NONE)) {
            /* this event failed: undo what it did (DDL included) and go on with the next */
            if (ev->fail == WP_FAIL_NONE)
                wp_event_fail(ev, WP_FAIL_RETRY, "statement failed");
            rc = exec_simple(a, "ROLLBACK TO SAVEPOINT wp_event");
            a->txn++; /* the rollback released the registry locks taken since the savepoint */
            if (a->changes != changes)
                wp_applier_reset(a); /* the cache may describe a mirror the rollback undid */
        } else if (rc == AP_OK) {
            rc = exec_simple(a, "RELEASE SAVEPOINT wp_event");
        }
    }
    if (rc == AP_OK && !a->careful) {
        for (size_t i = 0; i < a->nmirrors && rc == AP_OK; i++) {
            wp_event_t dummy = {0};
            rc = sweep(a, a->mirrors[i], &dummy);
        }
        if (rc == AP_OK)
            rc = go_sync(a);
    }
    if (rc != AP_OK && a->in_pipeline)
        go_sync(a);
    for (size_t i = 0; i < a->nmirrors; i++)
        sweep_reset(a->mirrors[i]);
    return rc;
}

int wp_applier_apply(wp_applier_t *a, wp_event_t *events, size_t n)
{
    int rc;
    tfails_clear(a);
    needs_clear(a);
    a->want_wait = false;
    a->alive_known = false;
    a->events = events;
    a->nevents = n;
    a->txn++;
    if (exec_simple(a, "SAVEPOINT wp_apply") != AP_OK)
        return -1;
    a->careful = false;
    rc = apply_pass(a, events, n);
    if (rc == AP_OK && a->want_wait)
        return 1;
    if (rc == AP_OK)
        return exec_simple(a, "RELEASE SAVEPOINT wp_apply") == AP_OK ? 0 : -1;
    if (rc == AP_TRANSIENT || PQstatus(a->conn) != CONNECTION_OK)
        return -1;
    if (a->want_wait)
        return 1;
    /* a statement failed: apply again one event at a time to find the ones that fail */
    wp_debug("claim of %zu events failed (%s); applying them one by one", n, a->pipe_failed ? a->pipe_error : "");
    if (exec_simple(a, "ROLLBACK TO SAVEPOINT wp_apply") != AP_OK)
        return -1;
    a->txn++;
    wp_applier_reset(a);
    a->careful = true;
    tfails_clear(a);
    needs_clear(a);
    rc = apply_pass(a, events, n);
    a->careful = false;
    if (rc == AP_OK && a->want_wait)
        return 1;
    if (rc != AP_OK)
        return -1;
    return exec_simple(a, "RELEASE SAVEPOINT wp_apply") == AP_OK ? 0 : -1;
}

/* Forgets cached mirrors that another worker altered since. */
int wp_applier_check_generations(wp_applier_t *a)
{
    PGresult *res = PQexec(a->conn, "SELECT id, generation FROM walpipe.mirrors");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_warn("staging: could not read the mirrors' generations: %s", PQerrorMessage(a->conn));
        PQclear(res);
        return -1;
    }
    bool stale = false;
    for (size_t i = 0; i < a->nmirrors && !stale; i++) {
        bool seen = false;
        for (int r = 0; r < PQntuples(res); r++) {
            if (atoi(PQgetvalue(res, r, 0)) == a->mirrors[i]->m->id) {
                seen = true;
                stale = atoi(PQgetvalue(res, r, 1)) != a->mirrors[i]->m->generation;
                break;
            }
        }
        stale |= !seen;
    }
    PQclear(res);
    if (stale)
        wp_applier_reset(a);
    return 0;
}

const char *wp_applier_last_error(const wp_applier_t *a)
{
    return a->pipe_failed ? a->pipe_error : PQstatus(a->conn) != CONNECTION_OK ? "lost the staging connection"
                                                                                 : PQerrorMessage(a->conn);
}

bool wp_applier_may_wait_keys(wp_applier_t *a, bool may_wait)
{
    bool was = a->may_wait;
    a->may_wait = may_wait;
    return was;
}

/* NOTIFY walpipe_discover with key (table_key()): `walpipe run` reads that table's key and columns soon. */
static int request_table(wp_applier_t *a, const char *key, const char *schema, const char *table)
{
    const char *params[] = {key};
    PGresult *res = PQexecParams(a->conn, "SELECT pg_notify('walpipe_discover', $1)", 1, NULL, params, NULL, NULL, 0);
    int rc = 0;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_warn("staging: could not ask `walpipe run` to read \"%s\".\"%s\": %s", schema, table,
                PQerrorMessage(a->conn));
        rc = -1;
    }
    PQclear(res);
    return rc;
}

int wp_applier_request_keys(wp_applier_t *a)
{
    int rc = 0;
    for (size_t i = 0; i < a->ntfails && rc == 0; i++) {
        if (a->tfails[i].fail == WP_FAIL_NO_KEY || a->tfails[i].fail == WP_FAIL_DEFER)
            rc = request_table(a, a->tfails[i].key, a->tfails[i].schema, a->tfails[i].table);
    }
    for (size_t i = 0; i < a->nneed_cols && rc == 0; i++)
        rc = request_table(a, a->need_cols[i].key, a->need_cols[i].schema, a->need_cols[i].table);
    return rc;
}

/* The staging clock now (before asking for a read): only a column catalog read recorded after it counts. */
static void columns_since(wp_applier_t *a, char *since, size_t len)
{
    snprintf(since, len, "infinity");
    if (a->nneed_cols == 0)
        return;
    PGresult *res = PQexec(a->conn, "SELECT clock_timestamp()::text");
    if (PQresultStatus(res) == PGRES_TUPLES_OK)
        snprintf(since, len, "%s", PQgetvalue(res, 0, 0));
    PQclear(res);
}

/* Whether `walpipe run` recorded a read of cn's column catalog after since, at or past the LSN it needs. */
static bool columns_read(wp_applier_t *a, const col_need_t *cn, const char *since)
{
    char lsn[WP_LSN_STRLEN];
    const char *params[] = {cn->source, cn->schema, cn->table, wp_lsn_format(cn->lsn, lsn), since};
    PGresult *res = PQexecParams(a->conn,
                                 "SELECT coalesce(min(read_lsn) >= $4::pg_lsn AND min(read_at) > $5::timestamptz, "
                                 "false) FROM walpipe.source_columns WHERE source = $1 AND schema_name = $2 AND "
                                 "table_name = $3",
                                 5, NULL, params, NULL, NULL, 0);
    bool read = PQresultStatus(res) == PGRES_TUPLES_OK && PQgetvalue(res, 0, 0)[0] == 't';
    PQclear(res);
    return read;
}

void wp_applier_wait_keys(wp_applier_t *a, int wait_ms)
{
    int64_t deadline = wp_now_ms() + wait_ms;
    size_t left = 0;
    char since[64];
    columns_since(a, since, sizeof since);
    wp_applier_request_keys(a);
    for (size_t i = 0; i < a->ntfails; i++) {
        table_fail_t *tf = &a->tfails[i];
        if (tf->fail != WP_FAIL_NO_KEY)
            continue;
        wp_info("waiting up to %d ms for `walpipe run` to record the key of table \"%s\".\"%s\" of source \"%s\"",
                wait_ms, tf->schema, tf->table, tf->source);
        left++;
    }
    for (size_t i = 0; i < a->nneed_cols; i++) {
        col_need_t *cn = &a->need_cols[i];
        wp_info("waiting up to %d ms for `walpipe run` to read the columns of table \"%s\".\"%s\" of source \"%s\"",
                wait_ms, cn->schema, cn->table, cn->source);
        left++;
    }
    /* one wait for all of them: keys and column catalogs together */
    while (left > 0 && wp_now_ms() < deadline && !wp_stop_requested()) {
        left = 0;
        for (size_t i = 0; i < a->ntfails; i++) {
            table_fail_t *tf = &a->tfails[i];
            if (tf->fail != WP_FAIL_NO_KEY)
                continue;
            const char *params[] = {tf->source, tf->schema, tf->table};
            PGresult *res = PQexecParams(a->conn,
                                         "SELECT 1 FROM walpipe.source_tables WHERE source = $1 AND schema_name = $2 "
                                         "AND table_name = $3",
                                         3, NULL, params, NULL, NULL, 0);
            bool found = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1;
            PQclear(res);
            if (found)
                tf->fail = WP_FAIL_NONE; /* recorded: nothing more to wait for */
            else
                left++;
        }
        for (size_t i = 0; i < a->nneed_cols; i++) {
            col_need_t *cn = &a->need_cols[i];
            if (!cn->read && !(cn->read = columns_read(a, cn, since)))
                left++;
        }
        if (left > 0) {
            struct timespec ts = {0, 200 * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
    /*
     * Waited once: the next attempt dead-letters a key still missing instead
     * of waiting again, and adds columns without a catalog still not read
     * (recording the mirror as diverged, mirror.c).  A table waited for for
     * its key counts as waited for for its columns too: `walpipe run` reads
     * a requested table's columns before its key (worker.c), so when the key
     * came, so did the columns, if they could be read at all.
     */
    for (size_t i = 0; i < a->ntfails; i++) {
        remember_waited(&a->waited, &a->nwaited, &a->waited_cap, a->tfails[i].key, KEY_WAIT_MEMORY_MS);
        if (a->tfails[i].fail == WP_FAIL_NO_KEY || a->tfails[i].fail == WP_FAIL_NONE)
            remember_waited(&a->cwaited, &a->ncwaited, &a->cwaited_cap, a->tfails[i].key, COLUMNS_WAIT_MEMORY_MS);
    }
    for (size_t i = 0; i < a->nneed_cols; i++) {
        col_need_t *cn = &a->need_cols[i];
        if (!cn->read)
            wp_info("`walpipe run` has not read the columns of table \"%s\".\"%s\" of source \"%s\" since they "
                    "changed: its new columns get no default for the rows that existed",
                    cn->schema, cn->table, cn->source);
        remember_waited(&a->cwaited, &a->ncwaited, &a->cwaited_cap, cn->key, COLUMNS_WAIT_MEMORY_MS);
    }
    tfails_clear(a);
    needs_clear(a);
}

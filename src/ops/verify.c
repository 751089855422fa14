/*
 * verify.c: `walpipe verify`: is each mirror table equal to its source table?
 *
 * Job: for each captured table of each source (or those named), compare the
 * mirror (staging) with the source table by count and checksum over key
 * ranges, name the keys of ranges that differ, report tables with no mirror
 * and mirrors with no source table; with --resync, record a divergence for
 * each table that differs, resync it and verify again.  The exit status is 0
 * only when every table compared is equal (at the end, with --resync).
 *
 * What is compared.  The mirror's user columns (not _walpipe_*), matched to
 * the source's by name, each rendered as text (::text) on both sides under
 * the same session settings (TimeZone UTC, DateStyle ISO, IntervalStyle
 * postgres, bytea_output hex, extra_float_digits 3): built-in types are the
 * same type on both sides, and enums, domains, composites and extension
 * types are text in the mirror holding the source's text form, so equal
 * values render equal.  A row's text is ROW(c1::text, ...)::text (which tells
 * NULL from ''), a key's is ROW(k1::text, ...)::text.  A source column the
 * mirror lacks makes the table differ; a mirror column the source lacks is
 * named and not compared.
 *
 * Key ranges, so that a large table never crosses the network.  Boundaries
 * are sampled from the mirror in key order (every range_rows-th key), giving
 * ranges [-inf, b1), [b1, b2), ..., [bn, +inf).  Per range each side sends
 * only count(*) and the sum of the first 64 bits of md5(row text) (as
 * numeric: order-independent, no sort), by the same SQL on both sides.  Only a
 * range whose pair differs is read row by row, and then only as (key text,
 * md5(row text)) pairs, merged in memory to name the keys missing from the
 * mirror, extra in it, and different.  Both sides must order keys alike for a
 * range to hold the same keys: a key column of the same built-in type on
 * both sides compares natively (COLLATE "C" when the type has a collation:
 * the two databases' default collations may differ); a key column that is
 * text in the mirror compares as ::text COLLATE "C" on both.  The price: a
 * text key whose index is not in the C collation cannot serve the range
 * predicates, so each range of such a table scans it (correct, slower).  (pgcopydb's
 * `compare data` computes one count and hash sum per whole table, at no
 * particular position; this borrows the hash sum and adds ranges and
 * positions.)
 *
 * Matching positions: why a difference reported is real.  The source keeps
 * changing and the mirror lags, so both are read as of one position P:
 *  1. P is the consistent point of a temporary logical slot on the source,
 *     created with an exported snapshot, which a REPEATABLE READ transaction
 *     imports (as `walpipe snapshot` does).  Every transaction whose commit
 *     ends at or before P is visible in it and none after: the source's rows
 *     are exactly its state after every change with version lsn <= P
 *     (README, "Initial snapshot").
 *  2. For each table verify waits (--wait seconds per position) until staging's checkpoint for the source
 *     is >= P (every change with lsn <= P is staged), no raw event of the
 *     table with lsn <= P is unprocessed, and none waits in the dead-letter
 *     queue for a retry; then, in the same REPEATABLE READ transaction on
 *     staging (snapshot M, taken by that check), it reads the mirror.  A claim
 *     marks its events processed and applies them in one transaction, so M
 *     holds every change with lsn <= P that can be applied (a parked dead
 *     letter cannot: its change is missing from the mirror, and what that
 *     makes differ is a real difference), plus some changes after P.
 *  3. The mirror's rows follow the max-merge of mirror.c: a key's row carries
 *     the version of its newest change (_walpipe_lsn), a deleted key its
 *     tombstone's version, a TRUNCATE walpipe.mirrors.truncated_lsn.  A key
 *     whose row or tombstone in M is newer than P "moved on": its state at P
 *     is no longer in the mirror, so it is not a difference, and it is left
 *     out of the range on BOTH sides (the same key list, passed as a text[]
 *     parameter to the same SQL).  Every other key of the mirror holds the
 *     result of all its changes <= P and none after, which is the source's
 *     state of that key at P (mirror.c's invariant); so any difference left
 *     (a row missing, extra or different) is a real one.  A mirror truncated
 *     after P moved on as a whole.
 *  4. Ranges that had keys moved on are compared again at a new position
 *     (a new temporary slot), up to ROUNDS positions in all; a range's
 *     latest comparison is its result, and the keys still moved on at the
 *     last position are reported as not settled (under steady load a hot key,
 *     pgbench's one branch row, changes after every position).  They do not
 *     make a table differ: nothing says they do.
 *
 * Every identifier is quoted with PQescapeIdentifier, every value (names,
 * boundaries, keys, LSNs) is a parameter; the exported snapshot's name, which
 * SET TRANSACTION SNAPSHOT cannot take as a parameter, is checked for its
 * form and quoted.
 */
#include "wp_setup.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <libpq-fe.h>

#include <walpipe/lsn.h>

#include "diverge.h"
#include "log.h"
#include "mem.h"
#include "pg.h"
#include "reader.h"
#include "runtime.h"
#include "snapshot.h"
#include "verify.h"

/* capture's resync (h-capture's branch): when it is there, --resync uses it (see resync_tables) */
#if defined(__has_include)
#if __has_include("resync.h")
#include "resync.h"
#define WP_VERIFY_RESYNC_TRUNCATES 1
#endif
#endif

#define SESSION_OPTIONS \
    "-c datestyle=ISO,MDY -c timezone=UTC -c intervalstyle=postgres -c bytea_output=hex -c extra_float_digits=3"
#define ROUNDS 3           /* positions a range is compared at, at most */
#define SAMPLES 5          /* differing keys named per range */
#define RANGES_SHOWN 10    /* differing ranges named per table */
#define UNSETTLED_SHOWN 5  /* keys not settled named per table */
#define PROGRESS_MS 5000
#define OID_INT8 20
#define OID_TEXT 25
#define OID_TEXT_ARRAY 1009
#define OID_PG_LSN 3220
#define FIRST_USER_OID 16384

enum side { SRC = 0, MIR = 1 };

/* How a key column is compared so that both sides order it alike. */
typedef enum keymode {
    KM_NATIVE,    /* the same built-in type on both sides, no collation */
    KM_COLLATE_C, /* the same built-in type, collatable: COLLATE "C" */
    KM_TEXT,      /* different types (text in the mirror): ::text COLLATE "C" */
} keymode_t;

typedef struct vcol {
    char *name;
    char *qname;          /* quoted identifier */
    char *mtype, *stype;  /* format_type on each side; stype NULL: the source has no such column */
    unsigned mtypoid, stypoid;
    bool collatable;      /* the source's type has a collation */
    keymode_t mode;       /* key columns only */
} vcol_t;

typedef struct vrange {
    bool compared;       /* compared at least once */
    bool done;           /* compared at a position with no key moved on */
    int64_t rows;        /* source rows compared (moved keys excluded) */
    int64_t missing, extra, different;
    const char *sample_kind[SAMPLES]; /* a few of the differing keys: "missing", "extra", "different" */
    char *sample_key[SAMPLES];        /* (owned) */
    size_t nsamples;
    char **moved;        /* keys left out at the latest position: the mirror moved past it (owned) */
    size_t nmoved;
} vrange_t;

typedef struct vtable {
    char *schema, *table;    /* the source table */
    bool on_source;          /* exists in the source's snapshot */
    bool not_found;          /* named by --table, but neither on the source nor mirrored */
    bool registered;         /* walpipe.mirrors has it and its table exists */
    bool source_has_rows;    /* (no mirror) the source table is not empty */
    char *gone_mirror;       /* registered, but this mirror table is gone (owned) */
    char *problem;           /* walpipe.source_tables.problem (owned) */
    char *qsource, *qmirror, *qtomb, *mirror_name;
    vcol_t *cols;            /* the mirror's user columns, attnum order */
    size_t ncols;
    size_t *keys;            /* indexes into cols, key order */
    size_t nkeys;
    bool meta;               /* cols and keys loaded */
    bool cols_differ;        /* a source column is missing in the mirror */
    wp_buf_t notes;          /* about columns and dead letters */
    char **bounds;           /* nbounds * nkeys boundary values (text) */
    size_t nbounds;
    vrange_t *ranges;        /* nbounds + 1 once planned */
    size_t nranges;
    bool truncated_after;    /* the mirror was truncated after the latest position */
    char *failed;            /* why it could not be compared (owned) */
    wp_lsn_t at;             /* latest position compared at */
} vtable_t;

typedef struct position {
    PGconn *conn; /* source, inside a REPEATABLE READ transaction under the slot's exported snapshot */
    wp_lsn_t lsn; /* the slot's consistent point */
} position_t;

typedef struct ctx {
    const wp_config_t *config;
    const wp_verify_opts_t *opts;
    const wp_source_config_t *source;
    PGconn *staging;
    int slots;           /* temporary slots made so far (their names) */
    int64_t deadline_ms; /* the mirror must reach the current position by then (wp_now_ms) */
} ctx_t;

/* ---------------------------------------------------------------- small helpers */

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static char *quote_ident(PGconn *conn, const char *name)
{
    char *q = PQescapeIdentifier(conn, name, strlen(name));
    char *out = q ? wp_strdup(q) : NULL;
    PQfreemem(q);
    return out;
}

/* "a"."b" from two names; NULL when libpq cannot quote them. */
static char *quote_qualified(PGconn *conn, const char *schema, const char *name)
{
    char *qs = quote_ident(conn, schema), *qn = quote_ident(conn, name);
    char *out = NULL;
    if (qs && qn) {
        wp_buf_t b = WP_BUF_INIT;
        wp_buf_printf(&b, "%s.%s", qs, qn);
        out = b.data;
    }
    free(qs);
    free(qn);
    return out;
}

/* The first line of the error of res (or of conn). */
static const char *pg_message(PGconn *conn, const PGresult *res, char *buf, size_t len)
{
    const char *msg = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if (msg == NULL)
        msg = PQerrorMessage(conn);
    snprintf(buf, len, "%.*s", (int)strcspn(msg, "\n"), msg);
    return buf;
}

/* Runs a parameterized statement; NULL (after logging "<what>: <error>") unless it returned want. */
static PGresult *query(PGconn *conn, const char *sql, int n, const unsigned *types, const char *const *vals,
                       ExecStatusType want, const char *what)
{
    PGresult *res = PQexecParams(conn, sql, n, types, vals, NULL, NULL, 0);
    if (PQresultStatus(res) != want) {
        char msg[512];
        wp_error("verify: could not %s: %s", what, pg_message(conn, res, msg, sizeof msg));
        PQclear(res);
        return NULL;
    }
    return res;
}

static void set_failed(vtable_t *t, const char *fmt, ...) WP_PRINTF(2, 3);
static void set_failed(vtable_t *t, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    free(t->failed);
    t->failed = wp_strdup(buf);
}

static void free_strings(char **v, size_t n)
{
    for (size_t i = 0; v && i < n; i++)
        free(v[i]);
    free(v);
}

static void range_reset(vrange_t *r)
{
    free_strings(r->moved, r->nmoved);
    r->moved = NULL;
    r->nmoved = 0;
    r->rows = r->missing = r->extra = r->different = 0;
    for (size_t i = 0; i < r->nsamples; i++)
        free(r->sample_key[i]);
    r->nsamples = 0;
}

static void free_tables(vtable_t *tables, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        vtable_t *t = &tables[i];
        free(t->schema);
        free(t->table);
        free(t->gone_mirror);
        free(t->problem);
        free(t->qsource);
        free(t->qmirror);
        free(t->qtomb);
        free(t->mirror_name);
        for (size_t k = 0; k < t->ncols; k++) {
            free(t->cols[k].name);
            free(t->cols[k].qname);
            free(t->cols[k].mtype);
            free(t->cols[k].stype);
        }
        free(t->cols);
        free(t->keys);
        wp_buf_free(&t->notes);
        free_strings(t->bounds, t->nbounds * t->nkeys);
        for (size_t r = 0; r < t->nranges; r++)
            range_reset(&t->ranges[r]);
        free(t->ranges);
        free(t->failed);
    }
    free(tables);
}

/* ---------------------------------------------------------------- positions */

/*
 * Takes a position on the source: a temporary slot's consistent point and a
 * REPEATABLE READ transaction that imported its exported snapshot.  The
 * replication connection (and with it the slot) goes as soon as the snapshot
 * is imported: the importing transaction keeps it.  Returns 0, or -1 (logged).
 */
static int open_position(ctx_t *ctx, position_t *pos)
{
    int rc = -1;
    wp_reader_t *reader = wp_reader_create(ctx->config, ctx->source);
    wp_slot_info_t info;
    bool fatal = false;
    char slot[64], snapshot_name[WP_SNAPSHOT_NAME_LEN], appname[96];
    char *lit = NULL;
    wp_buf_t sql = WP_BUF_INIT;
    pos->conn = NULL;
    pos->lsn = WP_LSN_INVALID;

    if (wp_reader_open(reader, &info, &fatal) != 0)
        goto out;
    snprintf(slot, sizeof slot, "walpipe_verify_%ld_%d", (long)getpid(), ++ctx->slots);
    wp_slot_spec_t spec = {.name = slot, .temporary = true, .export_snapshot = true};
    if (wp_reader_create_slot(reader, &spec, &pos->lsn, snapshot_name, &fatal) != 0)
        goto out;
    if (!wp_reader_snapshot_name_valid(snapshot_name)) {
        wp_error("verify: the source exported a snapshot name of an unknown form; refusing to import it");
        goto out;
    }
    snprintf(appname, sizeof appname, "walpipe_verify_%s", ctx->source->name);
    pos->conn = wp_pg_connect(ctx->source->conninfo, appname, SESSION_OPTIONS, "source");
    if (pos->conn == NULL)
        goto out;
    lit = PQescapeLiteral(pos->conn, snapshot_name, strlen(snapshot_name));
    if (lit == NULL) {
        wp_error("verify: could not quote the snapshot name: %s", PQerrorMessage(pos->conn));
        goto out;
    }
    wp_buf_printf(&sql, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT %s", lit);
    if (wp_pg_exec(pos->conn, "source", sql.data, "import the verify slot's snapshot") != 0)
        goto out;
    rc = 0;
out:
    wp_reader_destroy(reader);
    if (lit)
        PQfreemem(lit);
    wp_buf_free(&sql);
    if (rc != 0 && pos->conn) {
        PQfinish(pos->conn);
        pos->conn = NULL;
    }
    return rc;
}

static void close_position(position_t *pos)
{
    if (pos->conn)
        PQfinish(pos->conn); /* the read-only transaction ends with it */
    pos->conn = NULL;
}

/* ---------------------------------------------------------------- the tables to compare */

/* The table (schema, table) in tables[0..n), or NULL. */
static vtable_t *find_table(vtable_t *tables, size_t n, const char *schema, const char *table)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(tables[i].schema, schema) == 0 && strcmp(tables[i].table, table) == 0)
            return &tables[i];
    return NULL;
}

static bool in_refs(const wp_table_ref_t *refs, size_t n, const char *schema, const char *table)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(refs[i].schema, schema) == 0 && strcmp(refs[i].table, table) == 0)
            return true;
    return false;
}

/* Takes t's mirror from row i of a walpipe.mirrors query: mirror_schema, mirror_table, tombstones, exists (col 2-5). */
static void set_mirror(ctx_t *ctx, vtable_t *t, const PGresult *res, int i)
{
    char *qm = quote_qualified(ctx->staging, PQgetvalue(res, i, 2), PQgetvalue(res, i, 3));
    char *qt = quote_qualified(ctx->staging, "walpipe", PQgetvalue(res, i, 4));
    if (qm == NULL || qt == NULL) {
        set_failed(t, "could not quote the mirror's name");
        free(qm);
        free(qt);
        return;
    }
    wp_buf_t mn = WP_BUF_INIT;
    wp_buf_printf(&mn, "%s.%s", PQgetvalue(res, i, 2), PQgetvalue(res, i, 3));
    free(t->gone_mirror);
    t->gone_mirror = NULL;
    if (PQgetvalue(res, i, 5)[0] == 't') {
        t->registered = true;
        t->qmirror = qm;
        t->qtomb = qt;
        t->mirror_name = mn.data;
    } else {
        t->gone_mirror = mn.data;
        free(qm);
        free(qt);
    }
}

/*
 * Lists the tables: the captured leaf tables in the source's snapshot (refs,
 * or the source's `tables`, or every user table; a partitioned table stands
 * for its leaves), and the source's mirrors registered in staging (those
 * named, or all).  Returns 0, or -1 (logged).
 */
static int list_tables(ctx_t *ctx, const position_t *pos, const wp_table_ref_t *refs, size_t nrefs, vtable_t **out,
                       size_t *nout)
{
    int rc = -1;
    PGresult *res = NULL;
    wp_buf_t schemas = WP_BUF_INIT, names = WP_BUF_INIT;
    vtable_t *tables = NULL;
    size_t n = 0, cap = 0;
    const wp_table_ref_t *want = refs ? refs : ctx->source->tables;
    size_t nwant = refs ? nrefs : ctx->source->ntables;

    if (want) {
        const char **s = wp_calloc(nwant, sizeof *s), **t = wp_calloc(nwant, sizeof *t);
        for (size_t i = 0; i < nwant; i++) {
            s[i] = want[i].schema;
            t[i] = want[i].table;
        }
        wp_pg_text_array(&schemas, s, nwant);
        wp_pg_text_array(&names, t, nwant);
        free(s);
        free(t);
    }
    const char *p[] = {want ? schemas.data : NULL, want ? names.data : NULL};
    const unsigned types[] = {OID_TEXT_ARRAY, OID_TEXT_ARRAY};
    res = query(pos->conn,
                "SELECT n.nspname, c.relname FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND c.relpersistence = 'p' "
                "AND (($1::text[] IS NULL AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                "AND n.nspname NOT LIKE 'pg\\_%') OR EXISTS (SELECT 1 FROM unnest($1::text[], $2::text[]) AS w(s, t) "
                "JOIN pg_namespace wn ON wn.nspname = w.s JOIN pg_class wc ON wc.relnamespace = wn.oid "
                "AND wc.relname = w.t WHERE wc.oid = c.oid OR c.oid IN "
                "(SELECT relid FROM pg_partition_tree(wc.oid) WHERE isleaf))) ORDER BY 1, 2",
                2, types, p, PGRES_TUPLES_OK, "list the source's tables");
    if (res == NULL)
        goto out;
    cap = (size_t)PQntuples(res) + 16;
    tables = wp_calloc(cap, sizeof *tables);
    for (int i = 0; i < PQntuples(res); i++) {
        vtable_t *t = &tables[n++];
        t->schema = wp_strdup(PQgetvalue(res, i, 0));
        t->table = wp_strdup(PQgetvalue(res, i, 1));
        t->on_source = true;
    }
    PQclear(res);

    const char *p1[] = {ctx->source->name};
    res = query(ctx->staging,
                "SELECT m.schema_name, m.table_name, m.mirror_schema, m.mirror_table, m.tombstones, "
                "to_regclass(format('%I.%I', m.mirror_schema, m.mirror_table)) IS NOT NULL "
                "FROM walpipe.mirrors m WHERE m.source = $1 ORDER BY 1, 2",
                1, NULL, p1, PGRES_TUPLES_OK, "list the mirrors");
    if (res == NULL)
        goto out;
    for (int i = 0; i < PQntuples(res); i++) {
        const char *schema = PQgetvalue(res, i, 0), *table = PQgetvalue(res, i, 1);
        vtable_t *t = find_table(tables, n, schema, table);
        if (t == NULL) {
            if (want && !in_refs(want, nwant, schema, table))
                continue; /* not captured (any more), or not asked for */
            if (n == cap) {
                tables = wp_realloc(tables, (cap *= 2) * sizeof *tables);
                memset(&tables[n], 0, (cap - n) * sizeof *tables);
            }
            t = &tables[n++];
            t->schema = wp_strdup(schema);
            t->table = wp_strdup(table);
        }
        set_mirror(ctx, t, res, i);
    }
    PQclear(res);

    res = query(ctx->staging,
                "SELECT schema_name, table_name, problem FROM walpipe.source_tables WHERE source = $1 "
                "AND problem IS NOT NULL",
                1, NULL, p1, PGRES_TUPLES_OK, "read walpipe.source_tables");
    if (res == NULL)
        goto out;
    for (int i = 0; i < PQntuples(res); i++) {
        vtable_t *t = find_table(tables, n, PQgetvalue(res, i, 0), PQgetvalue(res, i, 1));
        if (t)
            t->problem = wp_strdup(PQgetvalue(res, i, 2));
    }
    PQclear(res);
    res = NULL;

    /* a table named on the command line that is neither a source table (or partitioned) nor a mirror */
    for (size_t i = 0; refs && i < nrefs; i++) {
        if (find_table(tables, n, refs[i].schema, refs[i].table))
            continue;
        const char *pr[] = {refs[i].schema, refs[i].table};
        res = query(pos->conn,
                    "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 "
                    "AND c.relname = $2 AND c.relkind = 'p'",
                    2, NULL, pr, PGRES_TUPLES_OK, "look a table up");
        if (res == NULL)
            goto out;
        bool partitioned = PQntuples(res) > 0;
        PQclear(res);
        res = NULL;
        if (partitioned)
            continue;
        if (n == cap) {
            tables = wp_realloc(tables, (cap *= 2) * sizeof *tables);
            memset(&tables[n], 0, (cap - n) * sizeof *tables);
        }
        vtable_t *t = &tables[n++];
        t->schema = wp_strdup(refs[i].schema);
        t->table = wp_strdup(refs[i].table);
        t->not_found = true;
    }

    for (size_t i = 0; i < n; i++) {
        vtable_t *t = &tables[i];
        t->qsource = quote_qualified(pos->conn, t->schema, t->table);
        if (t->qsource == NULL) {
            set_failed(t, "could not quote the table's name");
            continue;
        }
        if (t->on_source && !t->registered) {
            wp_buf_t sql = WP_BUF_INIT;
            wp_buf_printf(&sql, "SELECT EXISTS (SELECT 1 FROM ONLY %s)", t->qsource);
            PGresult *r = query(pos->conn, sql.data, 0, NULL, NULL, PGRES_TUPLES_OK, "look into a source table");
            wp_buf_free(&sql);
            if (r == NULL) {
                set_failed(t, "could not read the source table");
                continue;
            }
            t->source_has_rows = PQgetvalue(r, 0, 0)[0] == 't';
            PQclear(r);
        }
    }
    rc = 0;
out:
    PQclear(res);
    wp_buf_free(&schemas);
    wp_buf_free(&names);
    if (rc != 0) {
        free_tables(tables, n);
        tables = NULL;
        n = 0;
    }
    *out = tables;
    *nout = n;
    return rc;
}

/* ---------------------------------------------------------------- SQL of one table */

/* The expression that orders key column k alike on both sides. */
static void key_expr(const vtable_t *t, size_t k, wp_buf_t *sql)
{
    const vcol_t *c = &t->cols[t->keys[k]];
    if (c->mode == KM_NATIVE)
        wp_buf_puts(sql, c->qname);
    else if (c->mode == KM_COLLATE_C)
        wp_buf_printf(sql, "%s COLLATE \"C\"", c->qname);
    else
        wp_buf_printf(sql, "(%s::text) COLLATE \"C\"", c->qname);
}

/* The parameter type of a boundary value of key column k on side. */
static unsigned key_param_type(const vtable_t *t, size_t k, int side)
{
    const vcol_t *c = &t->cols[t->keys[k]];
    if (c->mode == KM_TEXT)
        return OID_TEXT;
    return side == SRC ? c->stypoid : c->mtypoid;
}

/* ROW(k1::text, ...)::text: a key as text, the same on both sides. */
static void key_text(const vtable_t *t, wp_buf_t *sql)
{
    wp_buf_puts(sql, "ROW(");
    for (size_t k = 0; k < t->nkeys; k++)
        wp_buf_printf(sql, "%s%s::text", k ? ", " : "", t->cols[t->keys[k]].qname);
    wp_buf_puts(sql, ")::text");
}

/* ROW(c1::text, ...)::text over the columns both sides have. */
static void row_text(const vtable_t *t, wp_buf_t *sql)
{
    bool first = true;
    wp_buf_puts(sql, "ROW(");
    for (size_t i = 0; i < t->ncols; i++) {
        if (t->cols[i].stype == NULL)
            continue;
        wp_buf_printf(sql, "%s%s::text", first ? "" : ", ", t->cols[i].qname);
        first = false;
    }
    wp_buf_puts(sql, ")::text");
}

/* One bound of a range: (e1, e2) OP ($n, $n+1). */
static void bound(const vtable_t *t, const char *op, int first_param, wp_buf_t *sql)
{
    wp_buf_puts(sql, "(");
    for (size_t k = 0; k < t->nkeys; k++) {
        if (k)
            wp_buf_puts(sql, ", ");
        key_expr(t, k, sql);
    }
    wp_buf_printf(sql, ") %s (", op);
    for (size_t k = 0; k < t->nkeys; k++)
        wp_buf_printf(sql, "%s$%d", k ? ", " : "", first_param + (int)k);
    wp_buf_puts(sql, ")");
}

/*
 * The parameters of range r on side: its lower and upper boundary values
 * (those it has), appended to vals/types from *n.  The predicate that uses
 * them goes to pred ("true" for the one range of an unsplit table).
 */
static void range_params(const vtable_t *t, size_t r, int side, const char **vals, unsigned *types, int *n,
                         wp_buf_t *pred)
{
    bool any = false;
    if (r > 0) {
        bound(t, ">=", *n + 1, pred);
        for (size_t k = 0; k < t->nkeys; k++) {
            vals[*n] = t->bounds[(r - 1) * t->nkeys + k];
            types[(*n)++] = key_param_type(t, k, side);
        }
        any = true;
    }
    if (r < t->nbounds) {
        if (any)
            wp_buf_puts(pred, " AND ");
        bound(t, "<", *n + 1, pred);
        for (size_t k = 0; k < t->nkeys; k++) {
            vals[*n] = t->bounds[r * t->nkeys + k];
            types[(*n)++] = key_param_type(t, k, side);
        }
        any = true;
    }
    if (!any)
        wp_buf_puts(pred, "true");
}

/* ---------------------------------------------------------------- waiting for the mirror */

/*
 * Waits until the mirror of t has applied every change up to pos->lsn that
 * can be applied (see the top of the file), then leaves staging inside a
 * REPEATABLE READ transaction whose snapshot saw that.  Returns 0, or -1
 * with t->failed set (timeout, stop request, error; no transaction open).
 */
static int wait_mirror(ctx_t *ctx, vtable_t *t, const position_t *pos)
{
    char lsn[WP_LSN_STRLEN];
    wp_lsn_format(pos->lsn, lsn);
    const char *p[] = {ctx->source->name, t->schema, t->table, lsn};
    int64_t next_log = wp_now_ms() + PROGRESS_MS;
    for (;;) {
        if (wp_pg_exec(ctx->staging, "staging", "BEGIN ISOLATION LEVEL REPEATABLE READ", "begin a transaction") != 0) {
            set_failed(t, "staging failed (see the log)");
            return -1;
        }
        PGresult *res = query(
            ctx->staging,
            "SELECT coalesce(c.lsn >= $4::pg_lsn, false), coalesce(c.lsn::text, 'none'), "
            "(SELECT count(*) FROM walpipe.raw_events e WHERE NOT e.processed AND e.source = $1 "
            " AND e.schema_name = $2 AND e.table_name = $3 AND e.lsn <= $4::pg_lsn), "
            "(SELECT count(*) FROM walpipe.dead_letters d WHERE d.kind = 'apply' AND d.source = $1 "
            " AND d.schema_name = $2 AND d.table_name = $3 AND d.lsn <= $4::pg_lsn AND d.next_attempt_at IS NOT NULL), "
            "(SELECT count(*) FROM walpipe.dead_letters d WHERE d.kind = 'apply' AND d.source = $1 "
            " AND d.schema_name = $2 AND d.table_name = $3 AND d.lsn <= $4::pg_lsn AND d.next_attempt_at IS NULL) "
            "FROM (SELECT (SELECT lsn FROM walpipe.checkpoints WHERE source = $1) AS lsn) c",
            4, NULL, p, PGRES_TUPLES_OK, "check how far the mirror got");
        if (res == NULL) {
            set_failed(t, "staging failed (see the log)");
            wp_pg_exec(ctx->staging, "staging", "ROLLBACK", "roll back");
            return -1;
        }
        bool reached = PQgetvalue(res, 0, 0)[0] == 't';
        long long unprocessed = atoll(PQgetvalue(res, 0, 2)), retrying = atoll(PQgetvalue(res, 0, 3));
        long long parked = atoll(PQgetvalue(res, 0, 4));
        char checkpoint[WP_LSN_STRLEN + 8];
        snprintf(checkpoint, sizeof checkpoint, "%s", PQgetvalue(res, 0, 1));
        PQclear(res);
        if (reached && unprocessed == 0 && retrying == 0) {
            if (parked > 0)
                wp_buf_printf(&t->notes, "; %lld parked dead letter(s) at or before %s (walpipe dlq list)", parked,
                              lsn);
            return 0;
        }
        wp_pg_exec(ctx->staging, "staging", "ROLLBACK", "roll back");
        int64_t now = wp_now_ms();
        if (wp_stop_requested() || now >= ctx->deadline_ms) {
            set_failed(t,
                       "the mirror did not reach %s within %ld s (staging checkpoint %s, %lld events at or before "
                       "it unprocessed, %lld waiting for a retry)",
                       lsn, ctx->opts->wait_seconds, checkpoint, unprocessed, retrying);
            return -1;
        }
        if (now >= next_log) {
            wp_info("waiting for the mirror of \"%s\".\"%s\" to reach %s: staging checkpoint %s, %lld unprocessed, "
                    "%lld waiting for a retry",
                    t->schema, t->table, lsn, checkpoint, unprocessed, retrying);
            next_log = now + PROGRESS_MS;
        }
        sleep_ms(200);
    }
}

/* ---------------------------------------------------------------- columns and ranges */

/*
 * Reads the mirror's columns and key (staging, in the wait's snapshot) and
 * the source table's columns (in the position's snapshot), and matches them
 * by name.  Returns 0, or -1 with t->failed set.
 */
static int load_meta(ctx_t *ctx, vtable_t *t, const position_t *pos)
{
    const char *p[] = {ctx->source->name, t->schema, t->table};
    PGresult *res = query(ctx->staging,
                          "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid, "
                          "coalesce(array_position(m.key_columns, a.attname::text), 0) FROM walpipe.mirrors m "
                          "JOIN pg_attribute a ON a.attrelid = to_regclass(format('%I.%I', m.mirror_schema, "
                          "m.mirror_table)) WHERE m.source = $1 AND m.schema_name = $2 AND m.table_name = $3 "
                          "AND a.attnum > 0 AND NOT a.attisdropped "
                          "AND a.attname NOT IN ('_walpipe_lsn', '_walpipe_seq', '_walpipe_stale') ORDER BY a.attnum",
                          3, NULL, p, PGRES_TUPLES_OK, "read the mirror's columns");
    if (res == NULL) {
        set_failed(t, "could not read the mirror's columns");
        return -1;
    }
    t->ncols = (size_t)PQntuples(res);
    t->cols = wp_calloc(t->ncols ? t->ncols : 1, sizeof *t->cols);
    int *keypos = wp_calloc(t->ncols ? t->ncols : 1, sizeof *keypos);
    for (size_t i = 0; i < t->ncols; i++) {
        vcol_t *c = &t->cols[i];
        c->name = wp_strdup(PQgetvalue(res, (int)i, 0));
        c->qname = quote_ident(ctx->staging, c->name);
        c->mtype = wp_strdup(PQgetvalue(res, (int)i, 1));
        c->mtypoid = (unsigned)strtoul(PQgetvalue(res, (int)i, 2), NULL, 10);
        keypos[i] = atoi(PQgetvalue(res, (int)i, 3));
        if (keypos[i] > 0)
            t->nkeys++;
    }
    PQclear(res);
    t->keys = wp_calloc(t->nkeys ? t->nkeys : 1, sizeof *t->keys);
    for (size_t i = 0; i < t->ncols; i++)
        if (keypos[i] > 0 && (size_t)keypos[i] <= t->nkeys)
            t->keys[keypos[i] - 1] = i;
    free(keypos);
    t->meta = true;

    const char *ps[] = {t->schema, t->table};
    res = query(pos->conn,
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid, ty.typcollation <> 0 "
                "FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid WHERE a.attrelid = "
                "(SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                " WHERE n.nspname = $1 AND c.relname = $2) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                2, NULL, ps, PGRES_TUPLES_OK, "read the source table's columns");
    if (res == NULL) {
        set_failed(t, "could not read the source table's columns");
        return -1;
    }
    for (int i = 0; i < PQntuples(res); i++) {
        const char *name = PQgetvalue(res, i, 0);
        vcol_t *c = NULL;
        for (size_t k = 0; k < t->ncols && c == NULL; k++)
            if (strcmp(t->cols[k].name, name) == 0)
                c = &t->cols[k];
        if (c == NULL) {
            wp_buf_printf(&t->notes, "; source column \"%s\" is not in the mirror", name);
            t->cols_differ = true;
            continue;
        }
        c->stype = wp_strdup(PQgetvalue(res, i, 1));
        c->stypoid = (unsigned)strtoul(PQgetvalue(res, i, 2), NULL, 10);
        c->collatable = PQgetvalue(res, i, 3)[0] == 't';
    }
    PQclear(res);
    for (size_t i = 0; i < t->ncols; i++) {
        vcol_t *c = &t->cols[i];
        if (c->qname == NULL) {
            set_failed(t, "could not quote a column name");
            return -1;
        }
        if (c->stype == NULL)
            wp_buf_printf(&t->notes, "; mirror column \"%s\" is not on the source (not compared)", c->name);
        else if (c->stypoid < FIRST_USER_OID && strcmp(c->stype, c->mtype) == 0)
            c->mode = c->collatable ? KM_COLLATE_C : KM_NATIVE;
        else
            c->mode = KM_TEXT;
    }
    if (t->nkeys == 0 || t->nkeys > 64) {
        set_failed(t, "the mirror has %zu key columns (verify handles 1 to 64)", t->nkeys);
        return -1;
    }
    for (size_t k = 0; k < t->nkeys; k++) {
        if (t->cols[t->keys[k]].stype == NULL) {
            set_failed(t, "key column \"%s\" of the mirror is not on the source", t->cols[t->keys[k]].name);
            return -1;
        }
    }
    return 0;
}

/* Samples range boundaries from the mirror: every range_rows-th key in key order.  Returns 0, or -1 (t->failed). */
static int plan_ranges(ctx_t *ctx, vtable_t *t)
{
    wp_buf_t sql = WP_BUF_INIT;
    char every[32];
    snprintf(every, sizeof every, "%ld", ctx->opts->range_rows);
    wp_buf_puts(&sql, "SELECT wp_b.* FROM (SELECT ");
    for (size_t k = 0; k < t->nkeys; k++)
        wp_buf_printf(&sql, "%s::text AS wp_k%zu, ", t->cols[t->keys[k]].qname, k);
    wp_buf_puts(&sql, "row_number() OVER (ORDER BY ");
    for (size_t k = 0; k < t->nkeys; k++) {
        if (k)
            wp_buf_puts(&sql, ", ");
        key_expr(t, k, &sql);
    }
    wp_buf_printf(&sql, ") AS wp_rn FROM ONLY %s) wp_b WHERE wp_b.wp_rn > 1 AND wp_b.wp_rn %% $1 = 1 "
                        "ORDER BY wp_b.wp_rn",
                  t->qmirror);
    const char *p[] = {every};
    const unsigned types[] = {OID_INT8};
    PGresult *res = query(ctx->staging, sql.data, 1, types, p, PGRES_TUPLES_OK, "sample the mirror's key ranges");
    wp_buf_free(&sql);
    if (res == NULL) {
        set_failed(t, "could not sample the mirror's keys");
        return -1;
    }
    t->nbounds = (size_t)PQntuples(res);
    t->bounds = wp_calloc(t->nbounds * t->nkeys + 1, sizeof *t->bounds);
    for (size_t b = 0; b < t->nbounds; b++)
        for (size_t k = 0; k < t->nkeys; k++)
            t->bounds[b * t->nkeys + k] = wp_strdup(PQgetvalue(res, (int)b, (int)k));
    PQclear(res);
    t->nranges = t->nbounds + 1;
    t->ranges = wp_calloc(t->nranges, sizeof *t->ranges);
    return 0;
}

/* ---------------------------------------------------------------- comparing a range */

typedef struct keyhash {
    char *key;
    char md5[33];
} keyhash_t;

static int keyhash_cmp(const void *a, const void *b)
{
    return strcmp(((const keyhash_t *)a)->key, ((const keyhash_t *)b)->key);
}

static void sample(vrange_t *r, const char *what, const char *key)
{
    if (r->nsamples < SAMPLES) {
        r->sample_kind[r->nsamples] = what;
        r->sample_key[r->nsamples++] = wp_strdup(key);
    }
}

/*
 * Reads (key text, md5 of the row text) of range r on one side, sorted by key
 * text.  Returns the count, or -1 (logged).  The caller frees the keys.
 */
static long fetch_rows(PGconn *conn, const vtable_t *t, size_t r, int side, const char *moved, keyhash_t **out)
{
    const char *vals[2 * 64 + 1];
    unsigned types[2 * 64 + 1];
    int n = 0;
    wp_buf_t pred = WP_BUF_INIT, sql = WP_BUF_INIT;
    range_params(t, r, side, vals, types, &n, &pred);
    vals[n] = moved;
    types[n++] = OID_TEXT_ARRAY;
    wp_buf_puts(&sql, "SELECT ");
    key_text(t, &sql);
    wp_buf_puts(&sql, ", md5(");
    row_text(t, &sql);
    wp_buf_printf(&sql, ") FROM ONLY %s WHERE %s AND ", side == SRC ? t->qsource : t->qmirror, pred.data);
    key_text(t, &sql);
    wp_buf_printf(&sql, " <> ALL ($%d::text[])", n);
    PGresult *res = query(conn, sql.data, n, types, vals, PGRES_TUPLES_OK,
                          side == SRC ? "read a range of the source table" : "read a range of the mirror");
    wp_buf_free(&pred);
    wp_buf_free(&sql);
    if (res == NULL)
        return -1;
    long rows = PQntuples(res);
    keyhash_t *kh = wp_calloc(rows ? (size_t)rows : 1, sizeof *kh);
    for (long i = 0; i < rows; i++) {
        kh[i].key = wp_strdup(PQgetvalue(res, (int)i, 0));
        snprintf(kh[i].md5, sizeof kh[i].md5, "%s", PQgetvalue(res, (int)i, 1));
    }
    PQclear(res);
    qsort(kh, (size_t)rows, sizeof *kh, keyhash_cmp);
    *out = kh;
    return rows;
}

/* (count, hash sum) of range r on one side, into out[2].  Returns 0, or -1 (logged). */
static int range_sum(PGconn *conn, const vtable_t *t, size_t r, int side, const char *moved, char out[2][64])
{
    const char *vals[2 * 64 + 1];
    unsigned types[2 * 64 + 1];
    int n = 0;
    wp_buf_t pred = WP_BUF_INIT, sql = WP_BUF_INIT;
    range_params(t, r, side, vals, types, &n, &pred);
    vals[n] = moved;
    types[n++] = OID_TEXT_ARRAY;
    wp_buf_puts(&sql, "SELECT count(*), coalesce(sum(('x' || left(md5(");
    row_text(t, &sql);
    wp_buf_printf(&sql, "), 16))::bit(64)::bigint::numeric), 0) FROM ONLY %s WHERE %s AND ",
                  side == SRC ? t->qsource : t->qmirror, pred.data);
    key_text(t, &sql);
    wp_buf_printf(&sql, " <> ALL ($%d::text[])", n);
    PGresult *res = query(conn, sql.data, n, types, vals, PGRES_TUPLES_OK,
                          side == SRC ? "checksum a range of the source table" : "checksum a range of the mirror");
    wp_buf_free(&pred);
    wp_buf_free(&sql);
    if (res == NULL)
        return -1;
    snprintf(out[0], 64, "%s", PQgetvalue(res, 0, 0));
    snprintf(out[1], 64, "%s", PQgetvalue(res, 0, 1));
    PQclear(res);
    return 0;
}

/* The keys of range r whose mirror row or tombstone is newer than the position. Returns 0, or -1 (logged). */
static int moved_keys(ctx_t *ctx, vtable_t *t, size_t r, const char *lsn, vrange_t *out)
{
    const char *vals[2 * 64 + 1];
    unsigned types[2 * 64 + 1];
    int n = 0;
    wp_buf_t pred = WP_BUF_INIT, sql = WP_BUF_INIT;
    range_params(t, r, MIR, vals, types, &n, &pred);
    vals[n] = lsn;
    types[n++] = OID_PG_LSN;
    for (int part = 0; part < 2; part++) {
        wp_buf_puts(&sql, part ? " UNION SELECT " : "SELECT ");
        key_text(t, &sql);
        wp_buf_printf(&sql, " FROM ONLY %s WHERE %s AND _walpipe_lsn > $%d", part ? t->qtomb : t->qmirror, pred.data,
                      n);
    }
    PGresult *res = query(ctx->staging, sql.data, n, types, vals, PGRES_TUPLES_OK,
                          "find the mirror's keys newer than the position");
    wp_buf_free(&pred);
    wp_buf_free(&sql);
    if (res == NULL)
        return -1;
    out->nmoved = (size_t)PQntuples(res);
    out->moved = wp_calloc(out->nmoved ? out->nmoved : 1, sizeof *out->moved);
    for (size_t i = 0; i < out->nmoved; i++)
        out->moved[i] = wp_strdup(PQgetvalue(res, (int)i, 0));
    PQclear(res);
    return 0;
}

/* Compares range r at the position (source) and the wait's snapshot (staging).  Returns 0, or -1 (t->failed). */
static int compare_range(ctx_t *ctx, vtable_t *t, size_t r, const position_t *pos)
{
    int rc = -1;
    vrange_t *rg = &t->ranges[r];
    char lsn[WP_LSN_STRLEN];
    char sums[2][2][64];
    wp_buf_t moved = WP_BUF_INIT;
    keyhash_t *rows[2] = {NULL, NULL};
    long nrows[2] = {0, 0};
    wp_lsn_format(pos->lsn, lsn);

    range_reset(rg);
    if (moved_keys(ctx, t, r, lsn, rg) != 0)
        goto out;
    wp_pg_text_array(&moved, (const char *const *)rg->moved, rg->nmoved);
    if (range_sum(pos->conn, t, r, SRC, moved.data, sums[SRC]) != 0 ||
        range_sum(ctx->staging, t, r, MIR, moved.data, sums[MIR]) != 0)
        goto out;
    rg->rows = atoll(sums[SRC][0]);
    if (strcmp(sums[SRC][0], sums[MIR][0]) != 0 || strcmp(sums[SRC][1], sums[MIR][1]) != 0) {
        /* only this range, as (key, md5) pairs: which keys differ */
        nrows[SRC] = fetch_rows(pos->conn, t, r, SRC, moved.data, &rows[SRC]);
        nrows[MIR] = fetch_rows(ctx->staging, t, r, MIR, moved.data, &rows[MIR]);
        if (nrows[SRC] < 0 || nrows[MIR] < 0)
            goto out;
        long i = 0, j = 0;
        while (i < nrows[SRC] || j < nrows[MIR]) {
            int c = i >= nrows[SRC] ? 1 : j >= nrows[MIR] ? -1 : strcmp(rows[SRC][i].key, rows[MIR][j].key);
            if (c < 0) {
                rg->missing++;
                sample(rg, "missing", rows[SRC][i++].key);
            } else if (c > 0) {
                rg->extra++;
                sample(rg, "extra", rows[MIR][j++].key);
            } else {
                if (strcmp(rows[SRC][i].md5, rows[MIR][j].md5) != 0) {
                    rg->different++;
                    sample(rg, "different", rows[SRC][i].key);
                }
                i++;
                j++;
            }
        }
        if (rg->missing + rg->extra + rg->different == 0) {
            /* counts or sums differed but the rows did not: the two reads disagree with each other */
            set_failed(t, "range %zu checksummed differently but its rows compared equal", r);
            goto out;
        }
    }
    rg->compared = true;
    rg->done = rg->nmoved == 0;
    rc = 0;
out:
    if (rc != 0 && t->failed == NULL)
        set_failed(t, "a comparison failed (see the log)");
    for (int s = 0; s < 2; s++) {
        for (long i = 0; i < nrows[s]; i++)
            free(rows[s][i].key);
        free(rows[s]);
    }
    wp_buf_free(&moved);
    return rc;
}

/*
 * One table at one position: waits for the mirror, loads what it needs the
 * first time, and compares the ranges not settled yet.  Leaves staging
 * outside any transaction.
 */
static void compare_table(ctx_t *ctx, vtable_t *t, const position_t *pos)
{
    char lsn[WP_LSN_STRLEN];
    wp_lsn_format(pos->lsn, lsn);
    if (wait_mirror(ctx, t, pos) != 0)
        return;
    if (!t->meta && load_meta(ctx, t, pos) != 0)
        goto out;
    if (t->ranges == NULL && plan_ranges(ctx, t) != 0)
        goto out;
    t->at = pos->lsn;
    const char *p[] = {ctx->source->name, t->schema, t->table, lsn};
    PGresult *res = query(ctx->staging,
                          "SELECT truncated_lsn > $4::pg_lsn FROM walpipe.mirrors WHERE source = $1 "
                          "AND schema_name = $2 AND table_name = $3",
                          4, NULL, p, PGRES_TUPLES_OK, "read the mirror's truncate version");
    if (res == NULL || PQntuples(res) != 1) {
        set_failed(t, "could not read the mirror's registry row");
        PQclear(res);
        goto out;
    }
    t->truncated_after = PQgetvalue(res, 0, 0)[0] == 't';
    PQclear(res);
    if (t->truncated_after) {
        /* every key moved on at once: nothing of the mirror is the source's state at this position */
        for (size_t r = 0; r < t->nranges; r++)
            t->ranges[r].done = false;
        goto out;
    }
    size_t todo = 0, seen = 0;
    for (size_t r = 0; r < t->nranges; r++)
        todo += !t->ranges[r].done;
    if (t->nranges > 1)
        wp_info("comparing \"%s\".\"%s\" at %s: %zu of %zu key ranges", t->schema, t->table, lsn, todo, t->nranges);
    int64_t next_log = wp_now_ms() + PROGRESS_MS;
    for (size_t r = 0; r < t->nranges; r++) {
        if (t->ranges[r].done)
            continue;
        if (wp_stop_requested()) {
            set_failed(t, "stopped");
            goto out;
        }
        if (compare_range(ctx, t, r, pos) != 0)
            goto out;
        seen++;
        if (wp_now_ms() >= next_log) {
            wp_info("\"%s\".\"%s\": %zu of %zu ranges compared", t->schema, t->table, seen, todo);
            next_log = wp_now_ms() + PROGRESS_MS;
        }
    }
out:
    wp_pg_exec(ctx->staging, "staging", "COMMIT", "end the verify transaction");
}

/*
 * A source table with rows and no mirror: waits until staging has applied
 * its changes up to the position, then looks for its mirror again.  (The
 * wait's failure is not the table's: without a mirror it stays "missing".)
 */
static void recheck_mirror(ctx_t *ctx, vtable_t *t, const position_t *pos)
{
    if (wait_mirror(ctx, t, pos) != 0) {
        free(t->failed);
        t->failed = NULL;
        return;
    }
    const char *p[] = {ctx->source->name, t->schema, t->table};
    PGresult *res = query(ctx->staging,
                          "SELECT m.schema_name, m.table_name, m.mirror_schema, m.mirror_table, m.tombstones, "
                          "to_regclass(format('%I.%I', m.mirror_schema, m.mirror_table)) IS NOT NULL "
                          "FROM walpipe.mirrors m WHERE m.source = $1 AND m.schema_name = $2 AND m.table_name = $3",
                          3, NULL, p, PGRES_TUPLES_OK, "look the mirror up");
    if (res && PQntuples(res) == 1)
        set_mirror(ctx, t, res, 0);
    PQclear(res);
    wp_pg_exec(ctx->staging, "staging", "COMMIT", "end the verify transaction");
}

/* True when t has ranges still to compare at a new position. */
static bool unsettled(const vtable_t *t)
{
    if (t->failed || !t->on_source || !t->registered || t->ranges == NULL)
        return false;
    for (size_t r = 0; r < t->nranges; r++)
        if (!t->ranges[r].done)
            return true;
    return false;
}

/*
 * Verifies the tables of one source (refs: those named; NULL: all captured)
 * at up to ROUNDS positions.  *out receives the tables (the caller frees them
 * with free_tables).  Returns 0, or -1 when no position could be taken
 * (logged).
 */
static int verify_source(ctx_t *ctx, const wp_table_ref_t *refs, size_t nrefs, vtable_t **out, size_t *nout)
{
    vtable_t *tables = NULL;
    size_t n = 0;
    int rc = 0;
    for (int round = 1; round <= ROUNDS && rc == 0; round++) {
        bool any = round == 1;
        for (size_t i = 0; i < n && !any; i++)
            any = unsettled(&tables[i]);
        if (!any)
            break;
        position_t pos;
        if (open_position(ctx, &pos) != 0) {
            rc = -1;
            break;
        }
        char lsn[WP_LSN_STRLEN];
        wp_info("source \"%s\": position %d at %s", ctx->source->name, round, wp_lsn_format(pos.lsn, lsn));
        /* one wait per position, not per table: a source that staging does not follow costs it once */
        ctx->deadline_ms = wp_now_ms() + (int64_t)ctx->opts->wait_seconds * 1000;
        if (round == 1 && list_tables(ctx, &pos, refs, nrefs, &tables, &n) != 0)
            rc = -1;
        for (size_t i = 0; i < n && rc == 0; i++) {
            vtable_t *t = &tables[i];
            if (round == 1 && t->on_source && !t->registered && t->source_has_rows && !t->failed)
                recheck_mirror(ctx, t, &pos); /* its mirror may only lag: a new table, a resync */
            if ((round == 1 && t->on_source && t->registered && !t->failed) || (round > 1 && unsettled(t)))
                compare_table(ctx, t, &pos);
        }
        close_position(&pos);
    }
    *out = tables;
    *nout = n;
    return rc;
}

/* ---------------------------------------------------------------- report */

typedef enum verdict { V_EQUAL, V_DIFFERS, V_MISSING, V_FAILED } verdict_t;

/* A boundary as text: (v1,v2), or "start"/"end". */
static void put_bound(const vtable_t *t, size_t b, wp_buf_t *out)
{
    wp_buf_putc(out, '(');
    for (size_t k = 0; k < t->nkeys; k++)
        wp_buf_printf(out, "%s%s", k ? "," : "", t->bounds[b * t->nkeys + k]);
    wp_buf_putc(out, ')');
}

static verdict_t describe_raw(const vtable_t *t, wp_buf_t *line);

/*
 * The table's result as one line (without source and name) into line; returns
 * its verdict.  Keys and names come from the databases: the line is scrubbed
 * to one line of valid UTF-8 (control characters become spaces).
 */
static verdict_t describe(const vtable_t *t, wp_buf_t *line)
{
    verdict_t v = describe_raw(t, line);
    if (line->data)
        wp_log_sanitize(line->data);
    return v;
}

static verdict_t describe_raw(const vtable_t *t, wp_buf_t *line)
{
    char lsn[WP_LSN_STRLEN];
    if (t->failed) {
        wp_buf_printf(line, "not compared: %s", t->failed);
        return V_FAILED;
    }
    if (t->not_found) {
        wp_buf_puts(line, "not found: no such table on the source and no mirror of it");
        return V_MISSING;
    }
    if (!t->on_source) {
        wp_buf_printf(line, "missing source table (mirror %s%s)", t->mirror_name ? t->mirror_name : t->gone_mirror,
                      t->registered ? "" : ", whose table is gone too");
        return V_MISSING;
    }
    if (!t->registered) {
        if (!t->source_has_rows && t->gone_mirror == NULL) {
            wp_buf_puts(line, "equal (the source table is empty and has no mirror yet)");
            return V_EQUAL;
        }
        wp_buf_puts(line, "missing mirror");
        if (t->gone_mirror)
            wp_buf_printf(line, " (%s is registered in walpipe.mirrors but the table is gone)", t->gone_mirror);
        else if (t->problem)
            wp_buf_printf(line, " (cannot be mirrored: %s)", t->problem);
        else
            wp_buf_puts(line, " (the source table has rows)");
        return V_MISSING;
    }
    bool any_compared = false;
    for (size_t r = 0; r < t->nranges; r++)
        any_compared = any_compared || t->ranges[r].compared;
    if (!any_compared) {
        wp_buf_puts(line, "not compared: the mirror was truncated after every position taken (the source truncates "
                          "it faster than verify compares)");
        return V_FAILED;
    }
    int64_t rows = 0, missing = 0, extra = 0, different = 0;
    size_t bad = 0, nmoved = 0;
    for (size_t r = 0; r < t->nranges; r++) {
        const vrange_t *rg = &t->ranges[r];
        rows += rg->rows;
        missing += rg->missing;
        extra += rg->extra;
        different += rg->different;
        bad += rg->missing + rg->extra + rg->different > 0;
        nmoved += rg->nmoved;
    }
    verdict_t v = bad || t->cols_differ ? V_DIFFERS : V_EQUAL;
    wp_lsn_format(t->at, lsn);
    if (v == V_EQUAL) {
        wp_buf_printf(line, "equal (%lld rows in %zu key range%s at %s", (long long)rows, t->nranges,
                      t->nranges == 1 ? "" : "s", lsn);
    } else {
        wp_buf_printf(line, "differs at %s: %lld missing, %lld extra, %lld different in %zu of %zu key range%s",
                      lsn, (long long)missing, (long long)extra, (long long)different, bad, t->nranges,
                      t->nranges == 1 ? "" : "s");
        size_t shown = 0;
        for (size_t r = 0; r < t->nranges && shown < RANGES_SHOWN; r++) {
            const vrange_t *rg = &t->ranges[r];
            if (rg->missing + rg->extra + rg->different == 0)
                continue;
            wp_buf_puts(line, shown++ ? "; " : ": ");
            wp_buf_puts(line, "[");
            if (r == 0)
                wp_buf_puts(line, "start");
            else
                put_bound(t, r - 1, line);
            wp_buf_puts(line, ", ");
            if (r == t->nbounds)
                wp_buf_puts(line, "end]");
            else {
                put_bound(t, r, line);
                wp_buf_putc(line, ')');
            }
            wp_buf_printf(line, " %lld missing, %lld extra, %lld different (", (long long)rg->missing,
                          (long long)rg->extra, (long long)rg->different);
            for (size_t i = 0; i < rg->nsamples; i++)
                wp_buf_printf(line, "%s%s %s", i ? ", " : "", rg->sample_kind[i], rg->sample_key[i]);
            wp_buf_putc(line, ')');
        }
        if (bad > shown)
            wp_buf_printf(line, "; and %zu more ranges", bad - shown);
    }
    if (t->truncated_after) {
        wp_buf_puts(line, "; the mirror was truncated after the last position, not compared there");
    } else if (nmoved) {
        wp_buf_printf(line, "; %zu key%s changed after every position and %s not settled:", nmoved,
                      nmoved == 1 ? "" : "s", nmoved == 1 ? "is" : "are");
        size_t shown = 0;
        for (size_t r = 0; r < t->nranges && shown < UNSETTLED_SHOWN; r++)
            for (size_t i = 0; i < t->ranges[r].nmoved && shown < UNSETTLED_SHOWN; i++)
                wp_buf_printf(line, "%s %s", shown++ ? "," : "", t->ranges[r].moved[i]);
        if (nmoved > shown)
            wp_buf_puts(line, ", ...");
    }
    if (t->notes.len)
        wp_buf_puts(line, t->notes.data);
    if (v == V_EQUAL)
        wp_buf_putc(line, ')');
    return v;
}

/* The bounds b of t as a JSON array of the key columns' text, or null (the start or the end). */
static json_t *json_bound(const vtable_t *t, size_t b, bool none)
{
    if (none)
        return json_null();
    json_t *a = json_array();
    for (size_t k = 0; k < t->nkeys; k++)
        json_array_append_new(a, json_string(t->bounds[b * t->nkeys + k]));
    return a;
}

/*
 * One table's result as one JSON object on one line (--json): the verdict,
 * the text line, and the numbers and keys behind it.
 */
static void print_json(const ctx_t *ctx, const vtable_t *t, verdict_t v, const char *text, int pass)
{
    static const char *const verdicts[] = {"equal", "differs", "missing", "not_compared"};
    char lsn[WP_LSN_STRLEN];
    json_t *o = json_object();
    json_object_set_new(o, "source", json_string(ctx->source->name));
    json_object_set_new(o, "schema", json_string(t->schema));
    json_object_set_new(o, "table", json_string(t->table));
    json_object_set_new(o, "pass", json_integer(pass));
    json_object_set_new(o, "verdict", json_string(verdicts[v]));
    json_object_set_new(o, "text", json_string(text));
    json_object_set_new(o, "mirror", t->mirror_name ? json_string(t->mirror_name) : json_null());
    json_object_set_new(o, "position", t->at ? json_string(wp_lsn_format(t->at, lsn)) : json_null());
    json_int_t rows = 0, missing = 0, extra = 0, different = 0;
    json_t *ranges = json_array(), *unsettled = json_array();
    for (size_t r = 0; r < t->nranges; r++) {
        const vrange_t *rg = &t->ranges[r];
        rows += rg->rows;
        missing += rg->missing;
        extra += rg->extra;
        different += rg->different;
        for (size_t i = 0; i < rg->nmoved; i++)
            json_array_append_new(unsettled, json_string(rg->moved[i]));
        if (rg->missing + rg->extra + rg->different == 0)
            continue;
        json_t *jr = json_object(), *keys = json_array();
        json_object_set_new(jr, "from", json_bound(t, r - (r > 0), r == 0));
        json_object_set_new(jr, "to", json_bound(t, r, r == t->nbounds));
        json_object_set_new(jr, "missing", json_integer(rg->missing));
        json_object_set_new(jr, "extra", json_integer(rg->extra));
        json_object_set_new(jr, "different", json_integer(rg->different));
        for (size_t i = 0; i < rg->nsamples; i++) {
            json_t *k = json_object();
            json_object_set_new(k, "kind", json_string(rg->sample_kind[i]));
            json_object_set_new(k, "key", json_string(rg->sample_key[i]));
            json_array_append_new(keys, k);
        }
        json_object_set_new(jr, "keys", keys);
        json_array_append_new(ranges, jr);
    }
    json_object_set_new(o, "rows", json_integer(rows));
    json_object_set_new(o, "missing", json_integer(missing));
    json_object_set_new(o, "extra", json_integer(extra));
    json_object_set_new(o, "different", json_integer(different));
    json_object_set_new(o, "key_ranges", json_integer((json_int_t)t->nranges));
    json_object_set_new(o, "differing_ranges", ranges);
    json_object_set_new(o, "unsettled_keys", unsettled);
    char *out = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
    if (out)
        printf("%s\n", out);
    free(out);
    json_decref(o);
}

/* A line that is not a table's: text, or {"source": S, key: value} with --json. */
static void print_note(const ctx_t *ctx, const char *key, json_t *value, const char *text)
{
    if (ctx->opts->json) {
        json_t *o = json_object();
        json_object_set_new(o, "source", json_string(ctx->source->name));
        json_object_set_new(o, key, value);
        char *out = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
        if (out)
            printf("%s\n", out);
        free(out);
        json_decref(o);
    } else {
        json_decref(value);
        printf("%s: %s\n", ctx->source->name, text);
    }
    fflush(stdout);
}

typedef struct totals {
    int tables, equal, differ, missing, failed;
} totals_t;

/* Prints one line per table; counts verdicts; marks in wanted[] the tables a resync would fix. */
static void report(const ctx_t *ctx, const vtable_t *tables, size_t n, totals_t *tot, bool *wanted, int pass)
{
    for (size_t i = 0; i < n; i++) {
        wp_buf_t line = WP_BUF_INIT;
        verdict_t v = describe(&tables[i], &line);
        if (ctx->opts->json) {
            print_json(ctx, &tables[i], v, line.data, pass);
        } else {
            wp_buf_t name = WP_BUF_INIT;
            wp_buf_printf(&name, "%s.%s", tables[i].schema, tables[i].table);
            wp_log_sanitize(name.data);
            printf("%s %s: %s\n", ctx->source->name, name.data, line.data);
            wp_buf_free(&name);
        }
        wp_buf_free(&line);
        tot->tables++;
        tot->equal += v == V_EQUAL;
        tot->differ += v == V_DIFFERS;
        tot->missing += v == V_MISSING;
        tot->failed += v == V_FAILED;
        if (wanted)
            wanted[i] = v == V_DIFFERS || (v == V_MISSING && tables[i].on_source && tables[i].problem == NULL);
    }
    fflush(stdout);
}

/* ---------------------------------------------------------------- resync */

/*
 * The one place verify resyncs tables, with the signature of capture's
 * wp_resync_tables (src/capture/resync.h), which it calls when that header
 * exists: a re-snapshot with a truncate at its consistent point, so rows the
 * mirror has extra go too.  Without it, `walpipe snapshot`'s requested
 * snapshot: it upserts every row of the tables at a new consistent point but
 * cannot remove rows the mirror has and the source has not.  *cp_out: the
 * consistent point, WP_LSN_INVALID when not known.
 */
static int resync_tables(const wp_config_t *config, const wp_source_config_t *source, char *const *schemas,
                         char *const *tables, size_t n, wp_lsn_t *cp_out)
{
#ifdef WP_VERIFY_RESYNC_TRUNCATES
    int rc = wp_resync_tables(config, source, schemas, tables, n, cp_out);
    wp_log_set_component("verify");
    return rc == 0 ? 0 : -1;
#else
    const char **names = wp_calloc(n ? n : 1, sizeof *names);
    *cp_out = WP_LSN_INVALID;
    for (size_t i = 0; i < n; i++) {
        /* the `tables` syntax: "schema"."table", a quote doubled */
        wp_buf_t b = WP_BUF_INIT;
        for (int part = 0; part < 2; part++) {
            wp_buf_puts(&b, part ? ".\"" : "\"");
            for (const char *s = part ? tables[i] : schemas[i]; *s; s++) {
                if (*s == '"')
                    wp_buf_putc(&b, '"');
                wp_buf_putc(&b, *s);
            }
            wp_buf_putc(&b, '"');
        }
        names[i] = b.data;
    }
    int rc = wp_snapshot_command(config, source->name, names, (int)n) == 0 ? 0 : -1;
    wp_log_set_component("verify");
    for (size_t i = 0; i < n; i++)
        free((char *)names[i]);
    free(names);
    return rc;
#endif
}

/*
 * --resync for one source: records a divergence for each table in wanted,
 * resyncs them, verifies them again (printing the new lines) and resolves
 * the divergences of those now equal.  Adjusts tot to the new verdicts.
 * Returns 0, or -1 (logged).
 */
static int resync_source(ctx_t *ctx, vtable_t *tables, size_t n, const bool *wanted, totals_t *tot)
{
    int rc = -1;
    size_t k = 0;
    char **schemas = wp_calloc(n ? n : 1, sizeof *schemas), **names = wp_calloc(n ? n : 1, sizeof *names);
    wp_table_ref_t *refs = wp_calloc(n ? n : 1, sizeof *refs);
    vtable_t *again = NULL;
    size_t nagain = 0;
    totals_t before = {0}, after = {0};
    for (size_t i = 0; i < n; i++) {
        if (!wanted[i])
            continue;
        wp_buf_t line = WP_BUF_INIT;
        verdict_t v = describe(&tables[i], &line);
        before.tables++;
        before.differ += v == V_DIFFERS;
        before.missing += v == V_MISSING;
        if (wp_diverge_record(ctx->staging, ctx->source->name, tables[i].schema, tables[i].table, WP_DIVERGE_VERIFY,
                              tables[i].at, line.data) < 0) {
            wp_buf_free(&line);
            goto out;
        }
        wp_buf_free(&line);
        schemas[k] = tables[i].schema;
        names[k] = tables[i].table;
        refs[k].schema = tables[i].schema;
        refs[k].table = tables[i].table;
        k++;
    }
    if (k == 0) {
        rc = 0;
        goto out;
    }
    wp_lsn_t cp;
    wp_info("resyncing %zu table(s) of source \"%s\"", k, ctx->source->name);
    if (resync_tables(ctx->config, ctx->source, schemas, names, k, &cp) != 0) {
        wp_error("verify: the resync of source \"%s\" failed; the tables stay diverged", ctx->source->name);
        goto out;
    }
    char text[96];
    snprintf(text, sizeof text, "resynced %zu table(s); verifying them again", k);
    print_note(ctx, "resynced", json_integer((json_int_t)k), text);
    if (verify_source(ctx, refs, k, &again, &nagain) != 0)
        goto out;
    report(ctx, again, nagain, &after, NULL, 2);
    for (size_t i = 0; i < nagain; i++) {
        wp_buf_t line = WP_BUF_INIT;
        verdict_t v = describe(&again[i], &line);
        wp_buf_free(&line);
        if (v != V_EQUAL)
            continue;
        wp_lsn_t upto = cp != WP_LSN_INVALID ? cp : again[i].at;
        char by[128], lsn[WP_LSN_STRLEN];
        snprintf(by, sizeof by, "walpipe verify --resync: equal at %s", wp_lsn_format(again[i].at, lsn));
        if (wp_diverge_resolve(ctx->staging, ctx->source->name, again[i].schema, again[i].table, upto, by) < 0)
            goto out;
    }
    tot->differ -= before.differ;
    tot->missing -= before.missing;
    tot->tables -= before.tables;
    tot->tables += after.tables;
    tot->equal += after.equal;
    tot->differ += after.differ;
    tot->missing += after.missing;
    tot->failed += after.failed;
    rc = 0;
out:
    free_tables(again, nagain);
    free(schemas);
    free(names);
    free(refs);
    return rc;
}

/* ---------------------------------------------------------------- the command */

int wp_verify_command(const wp_config_t *config, const wp_verify_opts_t *opts)
{
    int rc = 2;
    wp_table_ref_t *refs = NULL;
    size_t nrefs = 0;
    wp_buf_t list = WP_BUF_INIT;
    char err[WP_ERRLEN];
    PGconn *staging = NULL;
    totals_t tot = {0};
    bool trouble = false;

    for (int i = 0; i < opts->ntables; i++) {
        if (i)
            wp_buf_puts(&list, ", ");
        wp_buf_puts(&list, opts->tables[i]);
    }
    if (opts->ntables > 0 && wp_config_parse_tables(list.data, &refs, &nrefs, err, sizeof err) != 0) {
        fprintf(stderr, "walpipe: verify: %s\n", err);
        goto out;
    }
    bool known = opts->source == NULL;
    for (size_t i = 0; i < config->nsources && !known; i++)
        known = strcmp(config->sources[i].name, opts->source) == 0;
    if (!known) {
        fprintf(stderr, "walpipe: verify: %s configures no source \"%s\"\n", config->path, opts->source);
        goto out;
    }
    rc = 1;
    wp_log_set_component("verify");
    if (wp_pg_connect_staging(config, "walpipe_verify", SESSION_OPTIONS, true, &staging) != WP_STAGING_OK)
        goto out;
    for (size_t s = 0; s < config->nsources; s++) {
        if (opts->source && strcmp(config->sources[s].name, opts->source) != 0)
            continue;
        ctx_t ctx = {.config = config, .opts = opts, .source = &config->sources[s], .staging = staging};
        vtable_t *tables = NULL;
        size_t n = 0;
        if (verify_source(&ctx, refs, nrefs, &tables, &n) != 0) {
            print_note(&ctx, "error", json_string("could not take a position on the source (see the log)"),
                       "not verified: could not take a position on the source (see the log)");
            trouble = true;
        }
        bool *wanted = wp_calloc(n ? n : 1, sizeof *wanted);
        report(&ctx, tables, n, &tot, wanted, 1);
        if (opts->resync && resync_source(&ctx, tables, n, wanted, &tot) != 0)
            trouble = true;
        free(wanted);
        free_tables(tables, n);
    }
    if (opts->json)
        printf("{\"summary\":{\"tables\":%d,\"equal\":%d,\"differ\":%d,\"missing\":%d,\"not_compared\":%d}}\n",
               tot.tables, tot.equal, tot.differ, tot.missing, tot.failed);
    else
        printf("verify: %d table%s: %d equal, %d differ, %d missing, %d not compared\n", tot.tables,
               tot.tables == 1 ? "" : "s", tot.equal, tot.differ, tot.missing, tot.failed);
    rc = !trouble && tot.differ == 0 && tot.missing == 0 && tot.failed == 0 ? 0 : 1;
out:
    if (staging)
        PQfinish(staging);
    wp_config_free_tables(refs, nrefs);
    wp_buf_free(&list);
    return rc;
}

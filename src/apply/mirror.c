/*
 * mirror.c: the mirror transform's SQL: the registry, mirror DDL and the
 * statements that apply one change.  (Payloads are read by payload.c, shapes
 * by shape.c, keys discovered by keys.c.)
 *
 * Job: keep analytics.<schema>_<table> (configurable) equal to each captured
 * source table, whatever order staged events are applied in and however many
 * times: several workers, retries from the dead-letter queue and replays
 * (processed = false again) must all converge to the source's state.
 *
 * Invariant, and why it holds.
 *
 * A change's version is (commit LSN, seq).  Changes to one row are totally
 * ordered by it: a transaction that writes a row another transaction wrote
 * waits for that one's commit, so its own commit record ends later in the WAL;
 * inside a transaction seq orders the changes.  The source's state of a key is
 * a function of the changes to that key: the row exists iff the newest change
 * is an insert or update (not a delete) and is newer than the newest TRUNCATE;
 * and each column holds the value of the newest change that carried that
 * column (an UPDATE leaves a column out only when it is an unchanged TOAST
 * value, i.e. the value did not change).
 *
 * The mirror keeps exactly what computes that function incrementally:
 *  - each row carries _walpipe_lsn/_walpipe_seq, the newest version that wrote it;
 *  - _walpipe_stale maps a column the newest write left out to the version of
 *    the value the column still holds (NULL when no column lags: the usual case);
 *  - walpipe."tombstones_<id>" maps each deleted key to the newest delete's version;
 *  - walpipe.mirrors.truncated_lsn/seq is the newest TRUNCATE's version.
 * Applying a change is a max-merge on these: a row image at version v is
 * written where v is newer than the row, or fills a stale column older than v;
 * not at all when a tombstone of the key is newer than v or the newest
 * TRUNCATE is at v or newer.  A delete at v raises the tombstone to v and
 * removes the row unless the row is newer.  A TRUNCATE at v raises the table's
 * truncate version and removes rows and tombstones older than v.  Max is
 * commutative, associative and idempotent, so any interleaving, replay or
 * retry of the same changes ends in the same state, the one the newest changes
 * dictate: the source's.  (A tombstone equal to a write's version only arises
 * when an UPDATE changes the key to a value equal to the old one, e.g. numeric
 * 1.0 -> 1.00: the write wins, so tombstones block writes strictly older.)
 *
 * Concurrency.  Row writes to one key serialize on the mirror's primary key
 * (INSERT ... ON CONFLICT waits for another worker's uncommitted row and
 * re-checks).  A delete and an older insert of the same key could still miss
 * each other under READ COMMITTED: the insert checks for a tombstone before
 * the delete commits, the delete looks for the row before the insert commits,
 * and the row is resurrected.  Three statements close that gap:
 *  1. the delete first inserts a placeholder row for its key (ON CONFLICT DO
 *     NOTHING), together with the tombstone.  This waits for any uncommitted
 *     insert of the key; and an insert that comes after it waits for the
 *     delete's commit;
 *  2. then, in a new statement (a new snapshot, taken after that wait), it
 *     deletes the key's row, placeholder included, unless the row is newer;
 *  3. before it commits, a worker sweeps the keys it wrote: it deletes its
 *     rows that a tombstone visible now (committed meanwhile) makes dead.
 * If the insert came first, the delete waited for it and statement 2 sees and
 * deletes its row.  If the delete came first, the insert waited for the
 * delete's commit, so the insert's sweep sees the tombstone.  A TRUNCATE takes
 * LOCK TABLE ... IN EXCLUSIVE MODE, which waits for every transaction writing
 * the mirror and makes new writers wait until it commits.
 *
 * Columns are the source's columns by identity: each mirror column keeps the
 * source attnum it mirrors (walpipe.mirrors.column_attnums), which a rename
 * keeps and no other column ever gets, so following a newer shape renames,
 * adds and drops by attnum (wp_mirror_follow), and the applier reads an
 * older shape's values by attnum (applier.c).  A column added to the source
 * with a constant DEFAULT gets, as its mirror DEFAULT, the value the rows
 * that existed read (attmissingval, from walpipe.source_columns): every row
 * the mirror holds or receives without that column is such a row.
 *
 * Limits (README, "Transform workers"): a key-changing UPDATE that leaves a
 * TOASTed column out copies that value from the old key's mirror row, so an
 * older change to that column applied later does not follow the row to its
 * new key; a volatile DEFAULT or ALTER COLUMN TYPE ... USING rewrites rows
 * without row changes in the WAL; tables need a key (see keys.c).
 *
 * Every identifier in generated SQL is quoted with PQescapeIdentifier and
 * every name used as a value with PQescapeLiteral or passed as a parameter.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "diverge.h"
#include "log.h"
#include "mirror.h"
#include "pg.h"

#define OID_TEXT 25
#define OID_INT4 23
#define OID_PG_LSN 3220
#define OID_TEXT_ARRAY 1009
#define FIRST_USER_OID 16384
/* pg_advisory_xact_lock(int, int) class for mirror creation (the (int, int) key space is separate from bigint keys). */
#define MIRROR_LOCK_CLASS "774563"
#define NAMEDATALEN_MAX 63

/* ---------------------------------------------------------------- small SQL helpers */

static char *quote_ident(PGconn *conn, const char *name)
{
    char *q = PQescapeIdentifier(conn, name, strlen(name));
    char *out = q ? wp_strdup(q) : NULL;
    PQfreemem(q);
    return out;
}

static char *quote_literal(PGconn *conn, const char *s)
{
    char *q = PQescapeLiteral(conn, s, strlen(s));
    char *out = q ? wp_strdup(q) : NULL;
    PQfreemem(q);
    return out;
}

/* Copies PostgreSQL's message (first line) into err. */
static void set_pg_error(char *err, size_t errlen, const char *what, PGconn *conn, const PGresult *res)
{
    const char *msg = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if (msg == NULL)
        msg = PQerrorMessage(conn);
    size_t n = strcspn(msg, "\n");
    snprintf(err, errlen, "%s: %.*s", what, (int)n, msg);
}

wp_fail_t wp_mirror_classify(const PGresult *res, PGconn *conn)
{
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    if (PQstatus(conn) != CONNECTION_OK || state == NULL)
        return WP_FAIL_TRANSIENT;
    if (strncmp(state, "40", 2) == 0 || strcmp(state, "55P03") == 0 || strncmp(state, "08", 2) == 0 ||
        strncmp(state, "57", 2) == 0 || strcmp(state, "53300") == 0)
        return WP_FAIL_TRANSIENT;
    return WP_FAIL_RETRY;
}

/* Runs sql with text parameters; returns the result (caller clears) or NULL after filling err. */
static PGresult *run(PGconn *conn, const char *sql, int n, const char *const *params, ExecStatusType want,
                     const char *what, wp_fail_t *fail, char *err, size_t errlen)
{
    /* without parameters: the simple protocol, which also runs several ;-separated DDL statements */
    PGresult *res = n == 0 ? PQexec(conn, sql) : PQexecParams(conn, sql, n, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != want) {
        set_pg_error(err, errlen, what, conn, res);
        *fail = wp_mirror_classify(res, conn);
        PQclear(res);
        return NULL;
    }
    return res;
}

/* ---------------------------------------------------------------- mirror metadata */

static void free_cols(wp_mcol_t *cols, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(cols[i].name);
        free(cols[i].qname);
        free(cols[i].lit);
        free(cols[i].type);
    }
    free(cols);
}

void wp_mirror_destroy(wp_mirror_t *m)
{
    if (m == NULL)
        return;
    free(m->source);
    free(m->schema);
    free(m->table);
    free(m->qmirror);
    free(m->qtomb);
    free_cols(m->cols, m->ncols);
    free(m->keys);
    free(m);
}

static bool is_reserved(const char *name)
{
    return strcmp(name, "_walpipe_lsn") == 0 || strcmp(name, "_walpipe_seq") == 0 ||
           strcmp(name, "_walpipe_stale") == 0;
}

/* Reads the registry row's key columns (a text[] literal parsed by the server) and the mirror's columns. */
int wp_mirror_reload(PGconn *conn, wp_mirror_t *m, char *err, size_t errlen)
{
    char id[16];
    wp_fail_t fail;
    int rc = -1;
    snprintf(id, sizeof id, "%d", m->id);
    const char *params[] = {id};
    PGresult *res = run(conn,
                        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid, "
                        "       a.attname = ANY (r.key_columns), r.generation, r.shape_lsn, "
                        "       coalesce(a.attname = ANY (st.not_null_columns), false), "
                        "       coalesce((r.column_attnums ->> a.attname)::int, -1), a.atthasdef "
                        "FROM walpipe.mirrors r "
                        "JOIN pg_attribute a ON a.attrelid = to_regclass(format('%I.%I', r.mirror_schema, "
                        "r.mirror_table)) "
                        "LEFT JOIN walpipe.source_tables st ON (st.source, st.schema_name, st.table_name) = "
                        "(r.source, r.schema_name, r.table_name) "
                        "WHERE r.id = $1 AND a.attnum > 0 AND NOT a.attisdropped "
                        "  AND a.attname NOT IN ('_walpipe_lsn', '_walpipe_seq', '_walpipe_stale') "
                        "ORDER BY a.attnum",
                        1, params, PGRES_TUPLES_OK, "could not read the mirror's columns", &fail, err, errlen);
    if (res == NULL)
        return -1;
    size_t n = (size_t)PQntuples(res);
    if (n == 0) {
        snprintf(err, errlen, "mirror table %s does not exist (dropped by hand?); hint: drop its row from "
                              "walpipe.mirrors and walpipe.%s too, and re-snapshot the table",
                 m->qmirror, m->qtomb);
        goto out;
    }
    wp_mcol_t *cols = wp_calloc(n, sizeof *cols);
    size_t *keys = wp_calloc(n, sizeof *keys);
    size_t nkeys = 0;
    for (size_t i = 0; i < n; i++) {
        cols[i].name = wp_strdup(PQgetvalue(res, (int)i, 0));
        cols[i].type = wp_strdup(PQgetvalue(res, (int)i, 1));
        cols[i].typoid = (unsigned)strtoul(PQgetvalue(res, (int)i, 2), NULL, 10);
        cols[i].is_key = PQgetvalue(res, (int)i, 3)[0] == 't';
        cols[i].src_not_null = PQgetvalue(res, (int)i, 6)[0] == 't';
        cols[i].attnum = atoi(PQgetvalue(res, (int)i, 7));
        cols[i].has_default = PQgetvalue(res, (int)i, 8)[0] == 't';
        cols[i].qname = quote_ident(conn, cols[i].name);
        cols[i].lit = quote_literal(conn, cols[i].name);
    }
    m->generation = atoi(PQgetvalue(res, 0, 4));
    const char *sl = PQgetvalue(res, 0, 5);
    wp_lsn_parse(sl, strlen(sl), &m->shape_lsn);
    PQclear(res);
    /* key order is the registry's, not attnum order */
    res = run(conn, "SELECT k FROM walpipe.mirrors r, unnest(r.key_columns) WITH ORDINALITY u(k, o) WHERE r.id = $1 "
                    "ORDER BY o",
              1, params, PGRES_TUPLES_OK, "could not read the mirror's key", &fail, err, errlen);
    if (res == NULL) {
        free_cols(cols, n);
        free(keys);
        return -1;
    }
    for (int r = 0; r < PQntuples(res); r++) {
        for (size_t i = 0; i < n; i++) {
            if (strcmp(cols[i].name, PQgetvalue(res, r, 0)) == 0) {
                keys[nkeys++] = i;
                break;
            }
        }
    }
    if (nkeys != (size_t)PQntuples(res) || nkeys == 0) {
        snprintf(err, errlen, "mirror table %s lacks one of its key columns; hint: restore the column or rebuild the "
                              "mirror", m->qmirror);
        free_cols(cols, n);
        free(keys);
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        if (cols[i].qname == NULL || cols[i].lit == NULL) {
            snprintf(err, errlen, "could not quote a column name of mirror %s", m->qmirror);
            free_cols(cols, n);
            free(keys);
            goto out;
        }
    }
    free_cols(m->cols, m->ncols);
    free(m->keys);
    m->cols = cols;
    m->ncols = n;
    m->keys = keys;
    m->nkeys = nkeys;
    rc = 0;
out:
    PQclear(res);
    return rc;
}

/* The type a mirror column gets for a source column: the source's own when built in, else text. */
static char *map_type(PGconn *conn, const char *type, int64_t typeoid)
{
    bool safe = typeoid > 0 && typeoid < FIRST_USER_OID && strlen(type) < 128;
    for (const char *s = type; safe && *s; s++)
        safe = (*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || strchr(" _(),[]\"", *s) != NULL;
    if (safe) {
        /* to_regtype parses the name without executing anything: the last guard against odd input */
        const char *params[] = {type};
        PGresult *res = PQexecParams(conn, "SELECT to_regtype($1) IS NOT NULL", 1, NULL, params, NULL, NULL, 0);
        safe = PQresultStatus(res) == PGRES_TUPLES_OK && PQgetvalue(res, 0, 0)[0] == 't';
        PQclear(res);
    }
    return wp_strdup(safe ? type : "text");
}

/* Expands the mirror_table pattern; long names are cut and given a hash so they stay unique. */
static char *mirror_name(const char *pattern, const char *source, const char *schema, const char *table,
                         bool force_hash)
{
    wp_buf_t b = WP_BUF_INIT;
    uint64_t h = UINT64_C(14695981039346656037);
    wp_buf_append(&b, "", 0);
    for (const char *s = pattern; *s; s++) {
        if (strncmp(s, "{source}", 8) == 0) {
            wp_buf_puts(&b, source);
            s += 7;
        } else if (strncmp(s, "{schema}", 8) == 0) {
            wp_buf_puts(&b, schema);
            s += 7;
        } else if (strncmp(s, "{table}", 7) == 0) {
            wp_buf_puts(&b, table);
            s += 6;
        } else {
            wp_buf_putc(&b, *s);
        }
    }
    for (const char *s = source; *s; s++)
        h = (h ^ (unsigned char)*s) * UINT64_C(1099511628211);
    h = (h ^ 0xFF) * UINT64_C(1099511628211);
    for (const char *s = schema; *s; s++)
        h = (h ^ (unsigned char)*s) * UINT64_C(1099511628211);
    h = (h ^ 0xFF) * UINT64_C(1099511628211);
    for (const char *s = table; *s; s++)
        h = (h ^ (unsigned char)*s) * UINT64_C(1099511628211);
    if (b.len > NAMEDATALEN_MAX || force_hash) {
        size_t keep = b.len > 54 ? 54 : b.len;
        while (keep > 0 && ((unsigned char)b.data[keep] & 0xC0) == 0x80) /* never split a UTF-8 character */
            keep--;
        b.len = keep;
        b.data[keep] = '\0';
        wp_buf_printf(&b, "_%08x", (unsigned)(h & 0xFFFFFFFFu));
    }
    return b.data;
}

/* Fills the names of a freshly loaded or created mirror. */
static wp_mirror_t *mirror_new(PGconn *conn, int id, const char *source, const char *schema, const char *table,
                               const char *mschema, const char *mtable, const char *tomb)
{
    wp_mirror_t *m = wp_calloc(1, sizeof *m);
    char *qs = quote_ident(conn, mschema), *qt = quote_ident(conn, mtable), *qb = quote_ident(conn, tomb);
    m->id = id;
    m->source = wp_strdup(source);
    m->schema = wp_strdup(schema);
    m->table = wp_strdup(table);
    if (qs && qt && qb) {
        wp_buf_t b = WP_BUF_INIT;
        wp_buf_printf(&b, "%s.%s", qs, qt);
        m->qmirror = b.data;
        b = (wp_buf_t)WP_BUF_INIT;
        wp_buf_printf(&b, "walpipe.%s", qb);
        m->qtomb = b.data;
    }
    free(qs);
    free(qt);
    free(qb);
    if (m->qmirror == NULL || m->qtomb == NULL) {
        wp_mirror_destroy(m);
        return NULL;
    }
    return m;
}

/* Looks the mirror up in the registry; *found says whether it exists. */
static wp_mirror_t *mirror_load(PGconn *conn, const char *source, const char *schema, const char *table, bool *found,
                                wp_fail_t *fail, char *err, size_t errlen)
{
    const char *params[] = {source, schema, table};
    wp_mirror_t *m = NULL;
    *found = false;
    PGresult *res = run(conn,
                        "SELECT id, mirror_schema, mirror_table, tombstones FROM walpipe.mirrors "
                        "WHERE source = $1 AND schema_name = $2 AND table_name = $3",
                        3, params, PGRES_TUPLES_OK, "could not read walpipe.mirrors", fail, err, errlen);
    if (res == NULL)
        return NULL;
    if (PQntuples(res) == 1) {
        *found = true;
        m = mirror_new(conn, atoi(PQgetvalue(res, 0, 0)), source, schema, table, PQgetvalue(res, 0, 1),
                       PQgetvalue(res, 0, 2), PQgetvalue(res, 0, 3));
        if (m == NULL) {
            snprintf(err, errlen, "could not quote the names of mirror %s.%s", PQgetvalue(res, 0, 1),
                     PQgetvalue(res, 0, 2));
            *fail = WP_FAIL_RETRY;
        } else if (wp_mirror_reload(conn, m, err, errlen) != 0) {
            *fail = WP_FAIL_RETRY;
            wp_mirror_destroy(m);
            m = NULL;
        }
    }
    PQclear(res);
    return m;
}

/* " DEFAULT 'value'::type" for a column whose existing rows read value (escaped, never spliced raw). */
static bool append_default(PGconn *conn, wp_buf_t *sql, const char *type, const char *value)
{
    if (value == NULL)
        return true;
    char *lit = quote_literal(conn, value);
    if (lit == NULL)
        return false;
    wp_buf_printf(sql, " DEFAULT %s::%s", lit, type);
    free(lit);
    return true;
}

/* One column definition of a CREATE TABLE: "name" type [DEFAULT value]. */
static bool append_coldef(PGconn *conn, wp_buf_t *sql, const char *name, const char *type, bool not_null,
                          const char *def)
{
    char *q = quote_ident(conn, name);
    if (q == NULL)
        return false;
    wp_buf_printf(sql, "%s %s%s", q, type, not_null ? " NOT NULL" : "");
    free(q);
    if (!append_default(conn, sql, type, def))
        return false;
    wp_buf_puts(sql, ", ");
    return true;
}

/* ---------------------------------------------------------------- the source's column catalog */

/*
 * What walpipe.source_columns says about one table's columns (written by
 * `walpipe run`, columns.c).  read_lsn is the oldest of its rows' reads:
 * every column added by a transaction that committed before it is there.
 */
typedef struct srccat {
    PGresult *res; /* attnum, name, dropped, has_missing, missing_value */
    wp_lsn_t read_lsn;
} srccat_t;

static int catalog_load(PGconn *conn, const char *source, const char *schema, const char *table, srccat_t *cat,
                        wp_fail_t *fail, char *err, size_t errlen)
{
    const char *params[] = {source, schema, table};
    cat->read_lsn = 0;
    cat->res = run(conn,
                   "SELECT attnum, name, dropped, has_missing, missing_value, min(read_lsn) OVER ()::text "
                   "FROM walpipe.source_columns WHERE source = $1 AND schema_name = $2 AND table_name = $3",
                   3, params, PGRES_TUPLES_OK, "could not read walpipe.source_columns", fail, err, errlen);
    if (cat->res == NULL)
        return -1;
    if (PQntuples(cat->res) > 0) {
        const char *l = PQgetvalue(cat->res, 0, 5);
        wp_lsn_parse(l, strlen(l), &cat->read_lsn);
    }
    return 0;
}

/* The catalog's row of the column at attnum, or -1. */
static int catalog_row(const srccat_t *cat, int attnum)
{
    for (int r = 0; cat->res && attnum > 0 && r < PQntuples(cat->res); r++)
        if (atoi(PQgetvalue(cat->res, r, 0)) == attnum)
            return r;
    return -1;
}

/* The attnum of the column the source calls name now (key discovery names key columns so), or -1. */
static int catalog_attnum(const srccat_t *cat, const char *name)
{
    for (int r = 0; cat->res && r < PQntuples(cat->res); r++)
        if (PQgetvalue(cat->res, r, 2)[0] == 'f' && strcmp(PQgetvalue(cat->res, r, 1), name) == 0)
            return atoi(PQgetvalue(cat->res, r, 0));
    return -1;
}

/* What the rows that existed when a column was added read for it. */
typedef enum missing {
    MISSING_KNOWN,   /* *value: the catalog's attmissingval, or NULL: they read NULL */
    MISSING_UNKNOWN, /* the catalog does not say (column dropped since, never read): record a divergence */
    MISSING_ASK,     /* the catalog was not read since the column appeared: ask for a read, then retry */
} missing_t;

/*
 * For the column at attnum, first seen in a shape at first_lsn: the catalog
 * knows it when it was read after first_lsn (the column was added before
 * that shape's first change committed).  An attnum is never reused, so the
 * row found is this very column, whatever it is called now.
 */
static missing_t catalog_missing(const srccat_t *cat, int attnum, wp_lsn_t first_lsn, bool waited, const char **value)
{
    *value = NULL;
    if (cat->res == NULL || PQntuples(cat->res) == 0 || cat->read_lsn < first_lsn)
        return waited ? MISSING_UNKNOWN : MISSING_ASK;
    int r = catalog_row(cat, attnum);
    if (r < 0 || PQgetvalue(cat->res, r, 2)[0] == 't')
        return MISSING_UNKNOWN;
    if (PQgetvalue(cat->res, r, 3)[0] == 't') {
        if (PQgetisnull(cat->res, r, 4))
            return MISSING_UNKNOWN; /* a value columns.c could not render */
        *value = PQgetvalue(cat->res, r, 4);
    }
    return MISSING_KNOWN;
}

static void catalog_ask(wp_fail_t *fail, char *err, size_t errlen, const char *source, const char *schema,
                        const char *table, const char *column)
{
    *fail = WP_FAIL_NO_COLUMNS;
    snprintf(err, errlen,
             "column \"%s\" of \"%s\".\"%s\" (source \"%s\") is new: the value existing rows read for it is in the "
             "source's catalog, which `walpipe run` has not read since the column appeared; hint: make sure `walpipe "
             "run` is running and can connect to the source, then `walpipe dlq retry`",
             column, schema, table, source);
}

/* Records that the mirror's existing rows read NULL for a column whose value on the source is not known. */
static int diverge_missing(PGconn *conn, const char *source, const char *schema, const char *table, const char *column,
                           int attnum, wp_lsn_t lsn, wp_fail_t *fail, char *err, size_t errlen)
{
    wp_buf_t reason = WP_BUF_INIT;
    wp_buf_printf(&reason,
                  "column \"%s\" (attnum %d) was added while rows existed; the value they read for it on the source "
                  "(pg_attribute.attmissingval) could not be read from the source's catalog (not reachable, or the "
                  "column was dropped since), so the mirror's rows from before hold NULL there",
                  column, attnum);
    int rc = wp_diverge_record(conn, source, schema, table, WP_DIVERGE_REWRITE, lsn, reason.data) < 0 ? -1 : 0;
    wp_buf_free(&reason);
    if (rc != 0) {
        *fail = PQstatus(conn) != CONNECTION_OK ? WP_FAIL_TRANSIENT : WP_FAIL_RETRY;
        snprintf(err, errlen, "could not record the divergence of \"%s\".\"%s\"", schema, table);
    }
    return rc;
}

/* One column of a mirror being created. */
typedef struct newcol {
    const char *name;
    const char *type; /* the source's */
    int64_t typeoid;
    int position;     /* attnum, -1 when not known */
    bool is_key;
    char *mtype;      /* the mirror's type (owned) */
    const char *def;  /* the value rows from before the column read, or NULL */
    char *owned;      /* name's storage when the mirror names the column itself, or NULL */
} newcol_t;

/*
 * The table's shapes older than first_lsn that were recorded with positions,
 * newest first.  A column some of them lack was added while rows existed, so
 * those rows read the column's missing value; a column they have that an
 * update's shape lacks may be an unchanged TOAST value the update left out.
 */
static int older_shapes(PGconn *conn, const char *source, const char *schema, const char *table, wp_lsn_t first_lsn,
                        wp_tshape_t **out, size_t *nout, wp_fail_t *fail, char *err, size_t errlen)
{
    char lsn[WP_LSN_STRLEN];
    wp_lsn_format(first_lsn, lsn);
    const char *params[] = {source, schema, table, lsn};
    *out = NULL;
    *nout = 0;
    PGresult *res = run(conn,
                        "SELECT columns::text FROM walpipe.table_schemas WHERE source = $1 AND schema_name = $2 "
                        "AND table_name = $3 AND first_lsn < $4 AND columns::text LIKE '%\"position\"%' "
                        "ORDER BY first_lsn DESC",
                        4, params, PGRES_TUPLES_OK, "could not read the table's older shapes", fail, err, errlen);
    if (res == NULL)
        return -1;
    *out = wp_calloc((size_t)PQntuples(res) + 1, sizeof **out);
    for (int r = 0; r < PQntuples(res); r++) {
        char e[128];
        if (wp_tshape_parse(PQgetvalue(res, r, 0), &(*out)[*nout], e, sizeof e) == 0 && (*out)[*nout].positioned)
            (*nout)++;
        else
            wp_tshape_clear(&(*out)[*nout]);
    }
    PQclear(res);
    return 0;
}

static void free_shapes(wp_tshape_t *shapes, size_t n)
{
    for (size_t i = 0; i < n; i++)
        wp_tshape_clear(&shapes[i]);
    free(shapes);
}

/*
 * A mirror created from an update's shape: that shape may leave unchanged
 * TOAST columns out, which the table had all the same.  They are the columns
 * older shapes have (by attnum, named and typed as the newest of them has
 * them) that the source's catalog does not list as dropped: without them,
 * the table's older inserts, applied later by another worker, would find no
 * column for their values (older shapes are never followed).  The catalog
 * must have been read since the update's shape appeared, or a column dropped
 * before it would come back: otherwise ask for a read (WP_FAIL_NO_COLUMNS),
 * unless catalog_waited, and then the column is kept (a later insert's shape
 * drops it; a missing column would lose values).  Appends to cols
 * (*ncols grows; the caller sized cols for every older column).
 */
static int add_left_out(const char *source, const char *schema, const char *table,
                        const wp_tshape_t *shape, const wp_tshape_t *older, size_t nolder, const srccat_t *cat,
                        bool catalog_waited, newcol_t *cols, size_t *ncols, wp_fail_t *fail, char *err, size_t errlen)
{
    bool covered = cat->res && PQntuples(cat->res) > 0 && cat->read_lsn >= shape->first_lsn;
    for (size_t o = 0; o < nolder; o++) {
        for (size_t c = 0; c < older[o].ncols; c++) {
            const wp_tshape_col_t *oc = &older[o].cols[c];
            bool have = oc->position <= 0 || is_reserved(oc->name);
            for (size_t i = 0; i < *ncols && !have; i++)
                have = cols[i].position == oc->position;
            if (have)
                continue;
            int r = catalog_row(cat, oc->position);
            if (covered && (r < 0 || PQgetvalue(cat->res, r, 2)[0] == 't'))
                continue; /* dropped (or filtered out) on the source */
            if (!covered && !catalog_waited) {
                catalog_ask(fail, err, errlen, source, schema, table, oc->name);
                return -1;
            }
            newcol_t *n = &cols[(*ncols)++];
            *n = (newcol_t){.name = oc->name, .type = oc->type, .typeoid = oc->typeoid, .position = oc->position};
            for (size_t i = 0; i + 1 < *ncols; i++) {
                if (strcmp(cols[i].name, oc->name) == 0) { /* its name went to another column since */
                    wp_buf_t b = WP_BUF_INIT;
                    wp_buf_printf(&b, "_walpipe_att%d", oc->position);
                    n->name = n->owned = b.data;
                    break;
                }
            }
        }
    }
    return 0;
}

/* Creates the registry row, the mirror table and its tombstone table.  The caller holds the creation lock. */
static wp_mirror_t *mirror_create(PGconn *conn, const wp_config_t *config, const char *source, const char *schema,
                                  const char *table, const wp_tshape_t *shape, bool shape_full, bool catalog_waited,
                                  wp_fail_t *fail, char *err, size_t errlen)
{
    const char *params[6] = {source, schema, table};
    wp_tshape_t key = {0};
    wp_mirror_t *m = NULL;
    wp_buf_t sql = WP_BUF_INIT, keylist = WP_BUF_INIT, keyarr = WP_BUF_INIT, namearr = WP_BUF_INIT,
             attarr = WP_BUF_INIT;
    char *name = NULL, *qschema = NULL;
    size_t ncols = 0, nolder = 0, nmore = 0;
    newcol_t *cols = NULL;
    size_t *keyidx = NULL;
    wp_tshape_t *older = NULL;
    srccat_t cat = {0};
    const char **names = NULL;
    int64_t *attnums = NULL;
    PGresult *res = run(conn,
                        "SELECT key_columns::text, problem FROM walpipe.source_tables "
                        "WHERE source = $1 AND schema_name = $2 AND table_name = $3",
                        3, params, PGRES_TUPLES_OK, "could not read walpipe.source_tables", fail, err, errlen);
    if (res == NULL)
        goto out;
    if (PQntuples(res) == 0) {
        *fail = WP_FAIL_NO_KEY;
        snprintf(err, errlen,
                 "no key is recorded for table \"%s\".\"%s\" of source \"%s\" in walpipe.source_tables: `walpipe "
                 "run` reads each table's key from the source's catalog when a worker asks, and has not recorded "
                 "this one; retried (and asked again) until it does; hint: check that `walpipe run` is running "
                 "and can connect to the source",
                 schema, table, source);
        goto out;
    }
    if (!PQgetisnull(res, 0, 1)) {
        *fail = WP_FAIL_PARK;
        snprintf(err, errlen, "table \"%s\".\"%s\" of source \"%s\" cannot be mirrored: %s", schema, table, source,
                 PQgetvalue(res, 0, 1));
        goto out;
    }
    if (PQgetisnull(res, 0, 0) || wp_tshape_parse(PQgetvalue(res, 0, 0), &key, err, errlen) != 0 || key.ncols == 0) {
        *fail = WP_FAIL_PARK;
        snprintf(err, errlen, "table \"%s\".\"%s\" of source \"%s\" has no key recorded in walpipe.source_tables",
                 schema, table, source);
        goto out;
    }
    PQclear(res);
    res = NULL;
    if (catalog_load(conn, source, schema, table, &cat, fail, err, errlen) != 0)
        goto out;
    if (shape && shape->positioned &&
        older_shapes(conn, source, schema, table, shape->first_lsn, &older, &nolder, fail, err, errlen) != 0)
        goto out;
    for (size_t o = 0; o < nolder; o++)
        nmore += older[o].ncols;

    /*
     * The columns: the shape's, then any key column the shape lacks (a
     * delete's shape is the key alone).  Key discovery names key columns as
     * the source does now, the shape as it did then (a rename may lie
     * between): a key column is the shape's column at its attnum.
     */
    cols = wp_calloc((shape ? shape->ncols : 0) + key.ncols + nmore, sizeof *cols);
    keyidx = wp_calloc(key.ncols, sizeof *keyidx);
    for (size_t i = 0; shape && i < shape->ncols; i++) {
        const wp_tshape_col_t *c = &shape->cols[i];
        cols[ncols++] = (newcol_t){.name = c->name, .type = c->type, .typeoid = c->typeoid, .position = c->position};
    }
    for (size_t k = 0; k < key.ncols; k++) {
        const wp_tshape_col_t *kc = &key.cols[k];
        int pos = kc->position > 0 ? kc->position : catalog_attnum(&cat, kc->name);
        ssize_t at = -1;
        for (size_t i = 0; i < ncols && at < 0 && pos > 0; i++)
            if (cols[i].position == pos)
                at = (ssize_t)i;
        for (size_t i = 0; i < ncols && at < 0; i++)
            if (strcmp(cols[i].name, kc->name) == 0 && (cols[i].position <= 0 || pos <= 0 || cols[i].position == pos))
                at = (ssize_t)i;
        if (at < 0 && pos <= 0 && shape && shape->positioned && !catalog_waited) {
            /* a key named as the source does now, which the shape names otherwise: its attnum is in a newer read */
            catalog_ask(fail, err, errlen, source, schema, table, kc->name);
            goto out;
        }
        if (at < 0) {
            at = (ssize_t)ncols;
            cols[ncols++] = (newcol_t){.name = kc->name, .type = kc->type, .typeoid = kc->typeoid, .position = pos};
        }
        cols[at].is_key = true;
        keyidx[k] = (size_t)at;
    }
    if (!shape_full && nolder > 0 && add_left_out(source, schema, table, shape, older, nolder, &cat, catalog_waited, cols, &ncols,
                                    fail, err, errlen) != 0)
        goto out;
    for (size_t i = 0; i < ncols; i++) {
        if (is_reserved(cols[i].name)) {
            *fail = WP_FAIL_PARK;
            snprintf(err, errlen,
                     "table \"%s\".\"%s\" of source \"%s\" has a column named \"%s\", which the mirror reserves for "
                     "itself; hint: rename the column on the source",
                     schema, table, source, cols[i].name);
            goto out;
        }
        cols[i].mtype = map_type(conn, cols[i].type, cols[i].typeoid);
    }

    /* a column older shapes lack was added while rows existed: they read its missing value */
    for (size_t i = 0; i < ncols; i++) {
        bool added = false;
        for (size_t o = 0; o < nolder && !added && !cols[i].is_key && cols[i].position > 0; o++)
            added = wp_tshape_at(&older[o], cols[i].position) < 0;
        if (!added)
            continue;
        switch (catalog_missing(&cat, cols[i].position, shape->first_lsn, catalog_waited, &cols[i].def)) {
        case MISSING_KNOWN:
            break;
        case MISSING_ASK:
            catalog_ask(fail, err, errlen, source, schema, table, cols[i].name);
            goto out;
        case MISSING_UNKNOWN:
            if (diverge_missing(conn, source, schema, table, cols[i].name, cols[i].position, shape->first_lsn, fail,
                                err, errlen) != 0)
                goto out;
            break;
        }
    }

    /* the name: the pattern's, or with a hash when that is taken by another mirror */
    qschema = quote_ident(conn, config->mirror_schema);
    for (int attempt = 0; attempt < 2 && qschema; attempt++) {
        free(name);
        name = mirror_name(config->mirror_table, source, schema, table, attempt > 0);
        const char *p2[] = {config->mirror_schema, name};
        res = run(conn,
                  "SELECT EXISTS (SELECT 1 FROM walpipe.mirrors WHERE mirror_schema = $1 AND mirror_table = $2), "
                  "to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL",
                  2, p2, PGRES_TUPLES_OK, "could not check the mirror's name", fail, err, errlen);
        if (res == NULL)
            goto out;
        bool taken = PQgetvalue(res, 0, 0)[0] == 't', exists = PQgetvalue(res, 0, 1)[0] == 't';
        PQclear(res);
        res = NULL;
        if (!taken && exists) {
            *fail = WP_FAIL_PARK;
            snprintf(err, errlen,
                     "cannot create the mirror of \"%s\".\"%s\": table \"%s\".\"%s\" already exists and is not a "
                     "walpipe mirror; hint: drop or rename it, or set mirror_schema / mirror_table in [workers]",
                     schema, table, config->mirror_schema, name);
            goto out;
        }
        if (!taken)
            break;
        if (attempt == 1) {
            *fail = WP_FAIL_PARK;
            snprintf(err, errlen, "mirror name \"%s\".\"%s\" is taken; hint: change mirror_table in [workers]",
                     config->mirror_schema, name);
            goto out;
        }
    }
    if (qschema == NULL) {
        *fail = WP_FAIL_PARK;
        snprintf(err, errlen, "could not quote mirror_schema");
        goto out;
    }

    res = run(conn, "SELECT nextval('walpipe.mirrors_id_seq')", 0, NULL, PGRES_TUPLES_OK,
              "could not allocate a mirror id", fail, err, errlen);
    if (res == NULL)
        goto out;
    int id = atoi(PQgetvalue(res, 0, 0));
    PQclear(res);
    res = NULL;
    char tomb[32], idtext[16], shape_lsn[WP_LSN_STRLEN];
    snprintf(tomb, sizeof tomb, "tombstones_%d", id);
    snprintf(idtext, sizeof idtext, "%d", id);
    wp_lsn_format(shape ? shape->first_lsn : 0, shape_lsn);
    names = wp_calloc(ncols + 1, sizeof *names);
    attnums = wp_calloc(ncols + 1, sizeof *attnums);
    for (size_t k = 0; k < key.ncols; k++)
        names[k] = cols[keyidx[k]].name;
    wp_pg_text_array(&keyarr, names, key.ncols);
    for (size_t i = 0; i < ncols; i++) {
        names[i] = cols[i].name;
        attnums[i] = cols[i].position;
    }
    wp_pg_text_array(&namearr, names, ncols);
    wp_pg_int8_array(&attarr, attnums, ncols);
    const char *p7[] = {idtext, source, schema, table, config->mirror_schema, name, tomb, keyarr.data, shape_lsn,
                        namearr.data, attarr.data};
    res = run(conn,
              "INSERT INTO walpipe.mirrors (id, source, schema_name, table_name, mirror_schema, mirror_table, "
              "tombstones, key_columns, shape_lsn, column_attnums) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, "
              "(SELECT coalesce(jsonb_object_agg(n, a), '{}') FROM unnest($10::text[], $11::int[]) u(n, a) "
              "WHERE a > 0))",
              11, p7, PGRES_COMMAND_OK, "could not register the mirror", fail, err, errlen);
    if (res == NULL)
        goto out;
    PQclear(res);

    m = mirror_new(conn, id, source, schema, table, config->mirror_schema, name, tomb);
    if (m == NULL) {
        *fail = WP_FAIL_PARK;
        snprintf(err, errlen, "could not quote the mirror's names");
        goto out;
    }
    wp_buf_printf(&sql, "CREATE SCHEMA IF NOT EXISTS %s; CREATE TABLE %s (", qschema, m->qmirror);
    for (size_t i = 0; i < ncols; i++) {
        if (!append_coldef(conn, &sql, cols[i].name, cols[i].mtype, cols[i].is_key, cols[i].def))
            goto quote_failed;
    }
    wp_buf_puts(&sql, "_walpipe_lsn pg_lsn NOT NULL, _walpipe_seq integer NOT NULL, _walpipe_stale jsonb, PRIMARY KEY (");
    for (size_t k = 0; k < key.ncols; k++) {
        char *q = quote_ident(conn, cols[keyidx[k]].name);
        if (q == NULL)
            goto quote_failed;
        wp_buf_printf(&keylist, "%s%s", k ? ", " : "", q);
        free(q);
    }
    wp_buf_printf(&sql, "%s)); CREATE TABLE %s (", keylist.data, m->qtomb);
    for (size_t k = 0; k < key.ncols; k++) {
        if (!append_coldef(conn, &sql, cols[keyidx[k]].name, cols[keyidx[k]].mtype, true, NULL))
            goto quote_failed;
    }
    wp_buf_printf(&sql, "_walpipe_lsn pg_lsn NOT NULL, _walpipe_seq integer NOT NULL, PRIMARY KEY (%s))",
                  keylist.data);
    res = run(conn, sql.data, 0, NULL, PGRES_COMMAND_OK, "could not create the mirror table", fail, err, errlen);
    if (res == NULL) {
        wp_mirror_destroy(m);
        m = NULL;
        goto out;
    }
    PQclear(res);
    res = NULL;
    if (wp_mirror_reload(conn, m, err, errlen) != 0) {
        *fail = WP_FAIL_RETRY;
        wp_mirror_destroy(m);
        m = NULL;
        goto out;
    }
    wp_info("created mirror %s of \"%s\".\"%s\" (source \"%s\")", m->qmirror, schema, table, source);
    goto out;
quote_failed:
    *fail = WP_FAIL_PARK;
    snprintf(err, errlen, "could not quote a column name of \"%s\".\"%s\"", schema, table);
    wp_mirror_destroy(m);
    m = NULL;
out:
    PQclear(res);
    PQclear(cat.res);
    for (size_t i = 0; cols && i < ncols; i++) {
        free(cols[i].mtype);
        free(cols[i].owned);
    }
    free(cols);
    free(keyidx);
    free(names);
    free(attnums);
    free_shapes(older, nolder);
    free(name);
    free(qschema);
    wp_tshape_clear(&key);
    wp_buf_free(&sql);
    wp_buf_free(&keylist);
    wp_buf_free(&keyarr);
    wp_buf_free(&namearr);
    wp_buf_free(&attarr);
    return m;
}

wp_mirror_t *wp_mirror_open(PGconn *conn, const wp_config_t *config, const char *source, const char *schema,
                            const char *table, const wp_tshape_t *shape, bool shape_full, bool catalog_waited,
                            wp_fail_t *fail, char *err, size_t errlen)
{
    bool found;
    *fail = WP_FAIL_NONE;
    wp_mirror_t *m = mirror_load(conn, source, schema, table, &found, fail, err, errlen);
    if (m != NULL || found || *fail != WP_FAIL_NONE)
        return m;
    /* one creator at a time; the loser of a race finds the winner's mirror */
    PGresult *res = run(conn, "SELECT pg_advisory_xact_lock(" MIRROR_LOCK_CLASS ", 0)", 0, NULL, PGRES_TUPLES_OK,
                        "could not take the mirror creation lock", fail, err, errlen);
    if (res == NULL)
        return NULL;
    PQclear(res);
    m = mirror_load(conn, source, schema, table, &found, fail, err, errlen);
    if (m != NULL || found || *fail != WP_FAIL_NONE)
        return m;
    return mirror_create(conn, config, source, schema, table, shape, shape_full, catalog_waited, fail, err, errlen);
}

/* ---------------------------------------------------------------- schema changes */

/*
 * How the mirror's columns meet a newer shape.  match[i]: the shape column
 * mirror column i is (by attnum where both know it, else by name), or -1;
 * owner[j]: the mirror column shape column j is, or -1 (a new column).
 */
typedef struct fplan {
    ssize_t *match;
    ssize_t *owner;
    char **final;  /* per mirror column: its name afterwards (owned), NULL when dropped */
    int *attnum;   /* per mirror column: its attnum afterwards */
    bool *drop;
    int changes;   /* DDL statements and registry changes needed */
    bool renames;
} fplan_t;

static void fplan_free(fplan_t *f, size_t ncols)
{
    for (size_t i = 0; f->final && i < ncols; i++)
        free(f->final[i]);
    free(f->final);
    free(f->match);
    free(f->owner);
    free(f->attnum);
    free(f->drop);
    memset(f, 0, sizeof *f);
}

static void plan_follow(const wp_mirror_t *m, const wp_tshape_t *shape, bool full, fplan_t *f)
{
    size_t nm = m->ncols, ns = shape->ncols;
    f->match = wp_calloc(nm + 1, sizeof *f->match);
    f->owner = wp_calloc(ns + 1, sizeof *f->owner);
    f->final = wp_calloc(nm + 1, sizeof *f->final);
    f->attnum = wp_calloc(nm + 1, sizeof *f->attnum);
    f->drop = wp_calloc(nm + 1, sizeof *f->drop);
    for (size_t i = 0; i < nm; i++)
        f->match[i] = -1;
    for (size_t j = 0; j < ns; j++)
        f->owner[j] = -1;
    /* by attnum: a column keeps its attnum whatever it is called */
    for (size_t i = 0; i < nm; i++) {
        ssize_t j = wp_tshape_at(shape, m->cols[i].attnum);
        if (j >= 0 && f->owner[j] < 0 && !is_reserved(shape->cols[j].name)) {
            f->match[i] = j;
            f->owner[j] = (ssize_t)i;
        }
    }
    /* by name, where one side does not know the attnum; two known attnums that differ are two columns
       (DROP COLUMN x, ADD COLUMN x is not a rename) */
    for (size_t j = 0; j < ns; j++) {
        if (f->owner[j] >= 0 || is_reserved(shape->cols[j].name))
            continue;
        for (size_t i = 0; i < nm; i++) {
            if (f->match[i] < 0 && strcmp(m->cols[i].name, shape->cols[j].name) == 0 &&
                (m->cols[i].attnum <= 0 || shape->cols[j].position <= 0)) {
                f->match[i] = (ssize_t)j;
                f->owner[j] = (ssize_t)i;
                break;
            }
        }
    }
    for (size_t i = 0; i < nm; i++) {
        const wp_mcol_t *c = &m->cols[i];
        f->attnum[i] = c->attnum;
        if (f->match[i] >= 0) {
            const wp_tshape_col_t *sc = &shape->cols[f->match[i]];
            f->final[i] = wp_strdup(sc->name);
            if (strcmp(sc->name, c->name) != 0) {
                f->renames = true;
                f->changes++;
            }
            if (sc->position > 0 && sc->position != c->attnum) {
                f->attnum[i] = sc->position; /* learnt: the registry records it */
                f->changes++;
            }
            continue;
        }
        /* not in the shape: dropped on the source (an insert's shape lists every column), or left out */
        if (full && !c->is_key) {
            f->drop[i] = true;
            f->changes++;
            continue;
        }
        bool wanted = false; /* its name goes to another column */
        for (size_t j = 0; j < ns && !wanted; j++)
            wanted = strcmp(shape->cols[j].name, c->name) == 0;
        if (wanted && c->attnum > 0) {
            wp_buf_t b = WP_BUF_INIT;
            wp_buf_printf(&b, "_walpipe_att%d", c->attnum);
            f->final[i] = b.data;
            f->renames = true;
            f->changes++;
        } else {
            f->final[i] = wp_strdup(c->name);
        }
    }
}

/*
 * Appends the ALTERs that bring m to shape as f planned; returns how many, or
 * -1 when a name cannot be quoted.  defs[j]: the DEFAULT of new shape column
 * j; tdefs[i]: the DEFAULT mirror column i gets again after a type change.
 */
static int render_alters(PGconn *conn, const wp_mirror_t *m, const wp_tshape_t *shape, const fplan_t *f,
                         const char *const *defs, const char *const *tdefs, wp_buf_t *sql)
{
    int n = 0;
    char *q = NULL;
    wp_buf_t from = WP_BUF_INIT, to = WP_BUF_INIT;
    for (size_t i = 0; i < m->ncols; i++) {
        if (f->drop[i]) {
            wp_buf_printf(sql, "ALTER TABLE %s DROP COLUMN IF EXISTS %s; ", m->qmirror, m->cols[i].qname);
            wp_buf_printf(&from, "%s%s", from.len ? ", " : "", m->cols[i].lit);
            wp_buf_printf(&to, "%sNULL", to.len ? ", " : "");
            n++;
        }
    }
    if (f->renames) {
        /* in two steps, through names of their own, so that names may swap */
        for (int step = 0; step < 2; step++) {
            for (size_t i = 0; i < m->ncols; i++) {
                if (f->drop[i] || strcmp(f->final[i], m->cols[i].name) == 0)
                    continue;
                char tmp[40];
                snprintf(tmp, sizeof tmp, "_walpipe_tmp%zu", i);
                free(q);
                q = quote_ident(conn, f->final[i]);
                if (q == NULL) {
                    n = -1;
                    goto out;
                }
                const char *a = step == 0 ? m->cols[i].qname : tmp, *b = step == 0 ? tmp : q;
                wp_buf_printf(sql, "ALTER TABLE %s RENAME COLUMN %s TO %s; ", m->qmirror, a, b);
                if (m->cols[i].is_key)
                    wp_buf_printf(sql, "ALTER TABLE %s RENAME COLUMN %s TO %s; ", m->qtomb, a, b);
                if (step == 1) {
                    char *lit = quote_literal(conn, f->final[i]);
                    if (lit == NULL) {
                        n = -1;
                        goto out;
                    }
                    wp_buf_printf(&from, "%s%s", from.len ? ", " : "", m->cols[i].lit);
                    wp_buf_printf(&to, "%s%s", to.len ? ", " : "", lit);
                    free(lit);
                    n++;
                }
            }
        }
    }
    if (from.len)
        wp_buf_printf(sql, "UPDATE %s SET _walpipe_stale = walpipe.stale_rename(_walpipe_stale, ARRAY[%s]::text[], "
                           "ARRAY[%s]::text[]) WHERE _walpipe_stale IS NOT NULL; ",
                      m->qmirror, from.data, to.data);
    for (size_t i = 0; i < m->ncols; i++) {
        if (f->match[i] < 0)
            continue;
        const wp_tshape_col_t *c = &shape->cols[f->match[i]];
        char *type = map_type(conn, c->type, c->typeoid);
        if (strcmp(m->cols[i].type, type) != 0) {
            free(q);
            q = quote_ident(conn, f->final[i]);
            if (q == NULL) {
                free(type);
                n = -1;
                goto out;
            }
            /* a default (the source's missing value) is set again for the new type: the cast of the old one
               may not exist or may not be the source's */
            if (m->cols[i].has_default)
                wp_buf_printf(sql, "ALTER TABLE %s ALTER COLUMN %s DROP DEFAULT; ", m->qmirror, q);
            wp_buf_printf(sql, "ALTER TABLE %s ALTER COLUMN %s TYPE %s USING %s::text::%s; ", m->qmirror, q, type, q,
                          type);
            if (m->cols[i].has_default && tdefs && tdefs[i]) {
                wp_buf_printf(sql, "ALTER TABLE %s ALTER COLUMN %s SET", m->qmirror, q);
                if (!append_default(conn, sql, type, tdefs[i])) {
                    free(type);
                    n = -1;
                    goto out;
                }
                wp_buf_puts(sql, "; ");
            }
            if (m->cols[i].is_key)
                wp_buf_printf(sql, "ALTER TABLE %s ALTER COLUMN %s TYPE %s USING %s::text::%s; ", m->qtomb, q, type,
                              q, type);
            n++;
        }
        free(type);
    }
    for (size_t j = 0; j < shape->ncols; j++) {
        const wp_tshape_col_t *c = &shape->cols[j];
        if (f->owner[j] >= 0 || is_reserved(c->name))
            continue;
        char *type = map_type(conn, c->type, c->typeoid);
        free(q);
        q = quote_ident(conn, c->name);
        if (q == NULL) {
            free(type);
            n = -1;
            goto out;
        }
        wp_buf_printf(sql, "ALTER TABLE %s ADD COLUMN IF NOT EXISTS %s %s", m->qmirror, q, type);
        bool ok = append_default(conn, sql, type, defs ? defs[j] : NULL);
        free(type);
        if (!ok) {
            n = -1;
            goto out;
        }
        wp_buf_puts(sql, "; ");
        n++;
    }
out:
    free(q);
    wp_buf_free(&from);
    wp_buf_free(&to);
    return n;
}

/* How many new columns the plan adds (and so may need the catalog's missing values). */
static size_t plan_adds(const wp_tshape_t *shape, const fplan_t *f)
{
    size_t n = 0;
    for (size_t j = 0; j < shape->ncols; j++)
        n += f->owner[j] < 0 && !is_reserved(shape->cols[j].name);
    return n;
}

int wp_mirror_follow(PGconn *conn, wp_mirror_t *m, const wp_tshape_t *shape, bool full, bool catalog_waited,
                     bool *changed, wp_fail_t *fail, char *err, size_t errlen)
{
    wp_buf_t sql = WP_BUF_INIT, namearr = WP_BUF_INIT, attarr = WP_BUF_INIT, keyarr = WP_BUF_INIT;
    fplan_t f = {0};
    size_t planned_cols = 0;
    srccat_t cat = {0};
    const char **defs = NULL, **tdefs = NULL, **names = NULL;
    int64_t *attnums = NULL;
    int rc = -1;
    PGresult *res = NULL;
    *changed = false;
    if (shape->first_lsn <= m->shape_lsn)
        return 0; /* an older shape: its changes apply to the columns both have, by attnum */
    plan_follow(m, shape, full, &f);
    bool needed = f.changes > 0 || plan_adds(shape, &f) > 0;
    for (size_t i = 0; i < m->ncols && !needed; i++) {
        const wp_tshape_col_t *c = f.match[i] >= 0 ? &shape->cols[f.match[i]] : NULL;
        if (c) {
            char *type = map_type(conn, c->type, c->typeoid);
            needed = strcmp(type, m->cols[i].type) != 0;
            free(type);
        }
    }
    fplan_free(&f, m->ncols);
    if (!needed) {
        rc = 0;
        goto out;
    }
    /* lock the registry row: one worker alters, the others then see its result */
    char id[16], lsn[WP_LSN_STRLEN];
    snprintf(id, sizeof id, "%d", m->id);
    wp_lsn_format(shape->first_lsn, lsn);
    const char *lock[] = {id};
    res = run(conn, "SELECT 1 FROM walpipe.mirrors WHERE id = $1 FOR UPDATE", 1, lock, PGRES_TUPLES_OK,
              "could not lock the mirror's registry row", fail, err, errlen);
    if (res == NULL)
        goto out;
    PQclear(res);
    res = NULL;
    if (wp_mirror_reload(conn, m, err, errlen) != 0) {
        *fail = WP_FAIL_RETRY;
        goto out;
    }
    *changed = true;
    if (shape->first_lsn <= m->shape_lsn) {
        rc = 0; /* another worker got there first */
        goto out;
    }
    plan_follow(m, shape, full, &f);
    planned_cols = m->ncols;

    /* new columns, and retyped columns that have one: the value rows from before read for them */
    defs = wp_calloc(shape->ncols + 1, sizeof *defs);
    tdefs = wp_calloc(m->ncols + 1, sizeof *tdefs);
    bool retyped_default = false;
    for (size_t i = 0; i < m->ncols; i++) {
        if (f.match[i] < 0 || !m->cols[i].has_default || m->cols[i].attnum <= 0)
            continue;
        const wp_tshape_col_t *c = &shape->cols[f.match[i]];
        char *type = map_type(conn, c->type, c->typeoid);
        retyped_default |= strcmp(type, m->cols[i].type) != 0;
        free(type);
    }
    if ((plan_adds(shape, &f) > 0 || retyped_default) &&
        catalog_load(conn, m->source, m->schema, m->table, &cat, fail, err, errlen) != 0)
        goto out;
    for (size_t i = 0; i < m->ncols && retyped_default; i++) {
        if (f.match[i] < 0 || !m->cols[i].has_default || m->cols[i].attnum <= 0)
            continue;
        /* (a rewrite of the source table, which a retyping may be, clears the missing value: then none) */
        switch (catalog_missing(&cat, m->cols[i].attnum, shape->first_lsn, catalog_waited, &tdefs[i])) {
        case MISSING_KNOWN:
            break;
        case MISSING_ASK:
            catalog_ask(fail, err, errlen, m->source, m->schema, m->table, f.final[i]);
            goto out;
        case MISSING_UNKNOWN:
            if (diverge_missing(conn, m->source, m->schema, m->table, f.final[i], m->cols[i].attnum,
                                shape->first_lsn, fail, err, errlen) != 0)
                goto out;
            break;
        }
    }
    for (size_t j = 0; j < shape->ncols; j++) {
        const wp_tshape_col_t *c = &shape->cols[j];
        if (f.owner[j] >= 0 || is_reserved(c->name) || c->position <= 0)
            continue; /* a shape without positions (older staging) is followed by name, as before */
        switch (catalog_missing(&cat, c->position, shape->first_lsn, catalog_waited, &defs[j])) {
        case MISSING_KNOWN:
            break;
        case MISSING_ASK:
            catalog_ask(fail, err, errlen, m->source, m->schema, m->table, c->name);
            goto out;
        case MISSING_UNKNOWN:
            if (diverge_missing(conn, m->source, m->schema, m->table, c->name, c->position, shape->first_lsn, fail,
                                err, errlen) != 0)
                goto out;
            break;
        }
    }
    int n = render_alters(conn, m, shape, &f, defs, tdefs, &sql);
    if (n < 0) {
        *fail = WP_FAIL_PARK;
        snprintf(err, errlen, "could not quote a column name of \"%s\".\"%s\"", m->schema, m->table);
        goto out;
    }
    if (n > 0) {
        res = run(conn, sql.data, 0, NULL, PGRES_COMMAND_OK, "could not change the mirror's columns", fail, err,
                  errlen);
        if (res == NULL)
            goto out;
        PQclear(res);
        res = NULL;
        wp_info("mirror %s follows a new shape of \"%s\".\"%s\": %s", m->qmirror, m->schema, m->table, sql.data);
    }
    /* the registry: attnums and key names as they are now */
    names = wp_calloc(m->ncols + shape->ncols + 1, sizeof *names);
    attnums = wp_calloc(m->ncols + shape->ncols + 1, sizeof *attnums);
    size_t na = 0;
    for (size_t i = 0; i < m->ncols; i++) {
        if (!f.drop[i]) {
            names[na] = f.final[i];
            attnums[na++] = f.attnum[i];
        }
    }
    for (size_t j = 0; j < shape->ncols; j++) {
        if (f.owner[j] < 0 && !is_reserved(shape->cols[j].name)) {
            names[na] = shape->cols[j].name;
            attnums[na++] = shape->cols[j].position;
        }
    }
    wp_pg_text_array(&namearr, names, na);
    wp_pg_int8_array(&attarr, attnums, na);
    for (size_t k = 0; k < m->nkeys; k++)
        names[k] = f.final[m->keys[k]];
    wp_pg_text_array(&keyarr, names, m->nkeys);
    const char *params[] = {id, lsn, namearr.data, attarr.data, keyarr.data};
    res = run(conn,
              "UPDATE walpipe.mirrors SET shape_lsn = $2, generation = generation + 1, key_columns = $5::text[], "
              "column_attnums = (SELECT coalesce(jsonb_object_agg(n, a), '{}') FROM unnest($3::text[], $4::int[]) "
              "u(n, a) WHERE a > 0) WHERE id = $1",
              5, params, PGRES_COMMAND_OK, "could not record the mirror's shape", fail, err, errlen);
    if (res == NULL)
        goto out;
    if (wp_mirror_reload(conn, m, err, errlen) != 0) {
        *fail = WP_FAIL_RETRY;
        goto out;
    }
    rc = 0;
out:
    PQclear(res);
    PQclear(cat.res);
    fplan_free(&f, planned_cols);
    free(defs);
    free(tdefs);
    free(names);
    free(attnums);
    wp_buf_free(&sql);
    wp_buf_free(&namearr);
    wp_buf_free(&attarr);
    wp_buf_free(&keyarr);
    return rc;
}

int wp_mirror_truncate(PGconn *conn, wp_mirror_t *m, wp_lsn_t lsn, int seq, wp_fail_t *fail, char *err, size_t errlen)
{
    char id[16], l[WP_LSN_STRLEN], s[16];
    wp_buf_t sql = WP_BUF_INIT;
    int rc = -1;
    snprintf(id, sizeof id, "%d", m->id);
    snprintf(s, sizeof s, "%d", seq);
    wp_lsn_format(lsn, l);
    const char *params[] = {id, l, s};
    wp_buf_printf(&sql, "LOCK TABLE %s IN EXCLUSIVE MODE", m->qmirror);
    PGresult *res = run(conn, sql.data, 0, NULL, PGRES_COMMAND_OK, "could not lock the mirror", fail, err, errlen);
    if (res == NULL)
        goto out;
    PQclear(res);
    res = run(conn,
              "UPDATE walpipe.mirrors SET truncated_lsn = $2, truncated_seq = $3 "
              "WHERE id = $1 AND (truncated_lsn, truncated_seq) < ($2::pg_lsn, $3::int)",
              3, params, PGRES_COMMAND_OK, "could not record the truncate", fail, err, errlen);
    if (res == NULL)
        goto out;
    bool newest = strcmp(PQcmdTuples(res), "1") == 0;
    PQclear(res);
    if (newest) {
        const char *p2[] = {l, s};
        wp_buf_reset(&sql);
        wp_buf_printf(&sql, "DELETE FROM %s WHERE (_walpipe_lsn, _walpipe_seq) < ($1::pg_lsn, $2::int)", m->qmirror);
        res = run(conn, sql.data, 2, p2, PGRES_COMMAND_OK, "could not truncate the mirror", fail, err, errlen);
        if (res == NULL)
            goto out;
        PQclear(res);
        wp_buf_reset(&sql);
        wp_buf_printf(&sql, "DELETE FROM %s WHERE (_walpipe_lsn, _walpipe_seq) < ($1::pg_lsn, $2::int)", m->qtomb);
        res = run(conn, sql.data, 2, p2, PGRES_COMMAND_OK, "could not prune tombstones", fail, err, errlen);
        if (res == NULL)
            goto out;
        PQclear(res);
    }
    rc = 0;
out:
    wp_buf_free(&sql);
    return rc;
}

/* ---------------------------------------------------------------- apply statements */

/* " AND x.k1 = $a AND x.k2 = $b", with the key parameters numbered from param_of[key]. */
static void key_match(const wp_mirror_t *m, const char *alias, const int *param_of, wp_buf_t *sql)
{
    for (size_t k = 0; k < m->nkeys; k++) {
        size_t i = m->keys[k];
        wp_buf_printf(sql, " AND %s%s%s = $%d", alias ? alias : "", alias ? "." : "", m->cols[i].qname,
                      param_of[i]);
    }
}

void wp_mirror_sql_upsert(const wp_mirror_t *m, const bool *absent, wp_buf_t *sql, unsigned *types, int *ntypes)
{
    int *param_of = wp_calloc(m->ncols, sizeof *param_of);
    int n = 0;
    bool any_absent = false, first;
    for (size_t i = 0; i < m->ncols; i++) {
        if (absent[i]) {
            any_absent = true;
            continue;
        }
        param_of[i] = ++n;
        types[n - 1] = m->cols[i].typoid;
    }
    int L = n + 1, S = n + 2;
    types[n] = OID_PG_LSN;
    types[n + 1] = OID_INT4;
    *ntypes = n + 2;

    wp_buf_printf(sql, "INSERT INTO %s AS t (", m->qmirror);
    for (size_t i = 0; i < m->ncols; i++)
        if (!absent[i])
            wp_buf_printf(sql, "%s, ", m->cols[i].qname);
    wp_buf_puts(sql, "_walpipe_lsn, _walpipe_seq, _walpipe_stale) SELECT ");
    for (int p = 1; p <= n; p++)
        wp_buf_printf(sql, "$%d, ", p);
    wp_buf_printf(sql, "$%d, $%d, ", L, S);
    if (any_absent) {
        /* a row first written by a change that left columns out: their values are unknown (version 0) */
        wp_buf_puts(sql, "jsonb_build_object(");
        first = true;
        for (size_t i = 0; i < m->ncols; i++) {
            if (absent[i]) {
                wp_buf_printf(sql, "%s%s, 0", first ? "" : ", ", m->cols[i].lit);
                first = false;
            }
        }
        wp_buf_puts(sql, ")");
    } else {
        wp_buf_puts(sql, "NULL::jsonb");
    }
    wp_buf_printf(sql, " WHERE NOT EXISTS (SELECT FROM %s x WHERE (x._walpipe_lsn, x._walpipe_seq) > ($%d, $%d)",
                  m->qtomb, L, S);
    key_match(m, "x", param_of, sql);
    wp_buf_printf(sql,
                  ") AND NOT EXISTS (SELECT FROM walpipe.mirrors r WHERE r.id = %d AND (r.truncated_lsn, "
                  "r.truncated_seq) >= ($%d, $%d)) ON CONFLICT (",
                  m->id, L, S);
    for (size_t k = 0; k < m->nkeys; k++)
        wp_buf_printf(sql, "%s%s", k ? ", " : "", m->cols[m->keys[k]].qname);
    wp_buf_puts(sql, ") DO UPDATE SET ");
    char newer[96];
    snprintf(newer, sizeof newer, "(t._walpipe_lsn, t._walpipe_seq) < ($%d, $%d)", L, S);
    for (size_t i = 0; i < m->ncols; i++) {
        if (absent[i] || m->cols[i].is_key)
            continue;
        wp_buf_printf(sql, "%s = CASE WHEN %s OR walpipe.stale_lt(t._walpipe_stale, %s, $%d, $%d) THEN excluded.%s "
                           "ELSE t.%s END, ",
                      m->cols[i].qname, newer, m->cols[i].lit, L, S, m->cols[i].qname, m->cols[i].qname);
    }
    wp_buf_printf(sql, "_walpipe_stale = CASE WHEN %s THEN ", newer);
    if (any_absent) {
        wp_buf_puts(sql, "walpipe.stale_keep(t._walpipe_stale, ARRAY[");
        first = true;
        for (size_t i = 0; i < m->ncols; i++) {
            if (absent[i]) {
                wp_buf_printf(sql, "%s%s", first ? "" : ", ", m->cols[i].lit);
                first = false;
            }
        }
        wp_buf_puts(sql, "]::text[], t._walpipe_lsn, t._walpipe_seq)");
    } else {
        wp_buf_puts(sql, "NULL");
    }
    wp_buf_puts(sql, " ELSE walpipe.stale_fill(t._walpipe_stale, ARRAY[");
    first = true;
    for (size_t i = 0; i < m->ncols; i++) {
        if (!absent[i] && !m->cols[i].is_key) {
            wp_buf_printf(sql, "%s%s", first ? "" : ", ", m->cols[i].lit);
            first = false;
        }
    }
    wp_buf_printf(sql,
                  "]::text[], $%d, $%d) END, _walpipe_lsn = CASE WHEN %s THEN $%d ELSE t._walpipe_lsn END, "
                  "_walpipe_seq = CASE WHEN %s THEN $%d ELSE t._walpipe_seq END WHERE %s OR t._walpipe_stale IS NOT "
                  "NULL",
                  L, S, newer, L, newer, S, newer);
    free(param_of);
}

void wp_mirror_sql_delete(const wp_mirror_t *m, int which, wp_buf_t *sql, unsigned *types, int *ntypes)
{
    int *param_of = wp_calloc(m->ncols, sizeof *param_of);
    int n = 0;
    for (size_t k = 0; k < m->nkeys; k++) {
        param_of[m->keys[k]] = ++n;
        types[n - 1] = m->cols[m->keys[k]].typoid;
    }
    int L = n + 1, S = n + 2;
    types[n] = OID_PG_LSN;
    types[n + 1] = OID_INT4;
    *ntypes = n + 2;
    wp_buf_t keys = WP_BUF_INIT, vals = WP_BUF_INIT;
    for (size_t k = 0; k < m->nkeys; k++) {
        wp_buf_printf(&keys, "%s%s", k ? ", " : "", m->cols[m->keys[k]].qname);
        wp_buf_printf(&vals, "%s$%d", k ? ", " : "", (int)k + 1);
    }
    if (which == 1) {
        /* the tombstone, and a placeholder row that makes a concurrent insert of the key and this delete
           wait for each other (see the top of this file) */
        wp_buf_printf(sql,
                      "WITH tomb AS (INSERT INTO %s AS x (%s, _walpipe_lsn, _walpipe_seq) VALUES (%s, $%d, $%d) "
                      "ON CONFLICT (%s) DO UPDATE SET _walpipe_lsn = excluded._walpipe_lsn, _walpipe_seq = "
                      "excluded._walpipe_seq WHERE (x._walpipe_lsn, x._walpipe_seq) < (excluded._walpipe_lsn, "
                      "excluded._walpipe_seq) RETURNING 1) "
                      "INSERT INTO %s (%s, _walpipe_lsn, _walpipe_seq) VALUES (%s, $%d, $%d) ON CONFLICT (%s) DO "
                      "NOTHING",
                      m->qtomb, keys.data, vals.data, L, S, keys.data, m->qmirror, keys.data, vals.data, L, S,
                      keys.data);
    } else {
        wp_buf_printf(sql, "DELETE FROM %s WHERE (_walpipe_lsn, _walpipe_seq) <= ($%d, $%d)", m->qmirror, L, S);
        key_match(m, NULL, param_of, sql);
    }
    wp_buf_free(&keys);
    wp_buf_free(&vals);
    free(param_of);
}

void wp_mirror_sql_read(const wp_mirror_t *m, const bool *absent, wp_buf_t *sql, unsigned *types, int *ntypes)
{
    int *param_of = wp_calloc(m->ncols, sizeof *param_of);
    int n = 0;
    for (size_t k = 0; k < m->nkeys; k++) {
        param_of[m->keys[k]] = ++n;
        types[n - 1] = m->cols[m->keys[k]].typoid;
    }
    *ntypes = n;
    wp_buf_puts(sql, "SELECT _walpipe_lsn::text, _walpipe_seq");
    for (size_t i = 0; i < m->ncols; i++)
        if (absent[i])
            wp_buf_printf(sql, ", %s", m->cols[i].qname);
    wp_buf_printf(sql, " FROM %s WHERE true", m->qmirror);
    key_match(m, NULL, param_of, sql);
    free(param_of);
}

void wp_mirror_sql_sweep(const wp_mirror_t *m, wp_buf_t *sql, unsigned *types, int *ntypes)
{
    wp_buf_printf(sql, "DELETE FROM %s m USING %s x, unnest(", m->qmirror, m->qtomb);
    for (size_t k = 0; k < m->nkeys; k++) {
        wp_buf_printf(sql, "%s$%d::text[]", k ? ", " : "", (int)k + 1);
        types[k] = OID_TEXT_ARRAY;
    }
    *ntypes = (int)m->nkeys;
    wp_buf_puts(sql, ") AS k(");
    for (size_t k = 0; k < m->nkeys; k++)
        wp_buf_printf(sql, "%sk%zu", k ? ", " : "", k);
    wp_buf_puts(sql, ") WHERE (m._walpipe_lsn, m._walpipe_seq) < (x._walpipe_lsn, x._walpipe_seq)");
    for (size_t k = 0; k < m->nkeys; k++) {
        const wp_mcol_t *c = &m->cols[m->keys[k]];
        wp_buf_printf(sql, " AND m.%s = k.k%zu::%s AND x.%s = m.%s", c->qname, k, c->type, c->qname, c->qname);
    }
}

void wp_mirror_sql_pending(const wp_mirror_t *m, wp_buf_t *sql)
{
    wp_buf_t match = WP_BUF_INIT;
    static const char *const images[] = {"after", "key", "before"};
    for (int img = 0; img < 3; img++) {
        wp_buf_printf(&match, "%s(", img ? " OR " : "");
        for (size_t k = 0; k < m->nkeys; k++)
            wp_buf_printf(&match, "%se.payload->'%s'->>%s = $%zu", k ? " AND " : "", images[img],
                          m->cols[m->keys[k]].lit, k + 4);
        wp_buf_putc(&match, ')');
    }
    wp_buf_printf(sql,
                  "SELECT EXISTS (SELECT 1 FROM walpipe.raw_events e WHERE NOT e.processed AND e.source = $1 "
                  "AND e.schema_name = (SELECT schema_name FROM walpipe.mirrors WHERE id = %d) "
                  "AND e.table_name = (SELECT table_name FROM walpipe.mirrors WHERE id = %d) "
                  "AND (e.lsn, e.seq) < ($2::pg_lsn, $3::int) AND (%s)) "
                  "OR EXISTS (SELECT 1 FROM walpipe.dead_letters d JOIN walpipe.raw_events e "
                  "ON (e.id, e.received_at) = (d.event_id, d.event_received_at) WHERE d.kind = 'apply' "
                  "AND d.source = $1 AND (d.schema_name, d.table_name) = (SELECT schema_name, table_name FROM "
                  "walpipe.mirrors WHERE id = %d) AND (d.lsn, d.seq) < ($2::pg_lsn, $3::int) AND (%s))",
                  m->id, m->id, match.data, m->id, match.data);
    wp_buf_free(&match);
}

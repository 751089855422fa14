/*
 * rewrites.c: notice the source rewriting a captured table without row
 * changes in the WAL, and mark its mirror diverged.
 *
 * Job: `walpipe run`'s monitor (worker.c) calls wp_rewrites_poll every few
 * seconds, and at once when a worker met a newer table shape.  A poll reads
 * pg_class over one plain connection per source (a single cheap query for
 * all the tables recorded in walpipe.source_tables) and compares each
 * table's oid and relfilenode with what walpipe.source_tables recorded:
 *
 *   - same oid, new relfilenode: the table's storage was replaced.  A
 *     TRUNCATE does that and is in the stream (the mirror applies it);
 *     ADD COLUMN with a volatile default, ALTER COLUMN TYPE ... USING,
 *     VACUUM FULL and CLUSTER do it too, with no row changes in the WAL.
 *     The change is a TRUNCATE when the transaction that last wrote the
 *     table's pg_class row (its xmin) staged a TRUNCATE of the table: a
 *     TRUNCATE that came last leaves exactly the rows streamed after it,
 *     whatever was rewritten before.  Otherwise it is recorded as a
 *     "rewrite" divergence (VACUUM FULL and CLUSTER included: a resync of
 *     them is harmless).
 *   - new oid under the same name: the table was dropped and created again;
 *     the DROP removed the old rows without row changes in the WAL, so the
 *     mirror still holds them: also a "rewrite" divergence.
 *
 * Invariant: a change is judged only once staging's checkpoint of the
 * source has passed the WAL insert position read after the catalog showed
 * it (so a TRUNCATE that explains it is staged, if there is one), and it is
 * then recorded at that position: the rewrite committed before it, so a
 * resync from a later consistent point repairs it.  The TRUNCATE is looked
 * for by its transaction id, among the truncates staged between the
 * position read just before the previous sighting of the old storage and
 * that one; a TRUNCATE outside that window (it would have to be staged
 * before it was visible on the source) only turns into a harmless false
 * report, never a missed rewrite.  What it cannot see: a rewrite in the same
 * transaction as a later TRUNCATE of the same table (the TRUNCATE is judged
 * to come last), and a rewrite before walpipe first recorded the table's
 * storage (a poll or two after it first read the table's key).
 *
 * Ownership: the poller owns its source connections and pending changes;
 * the staging connection is the caller's.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <walpipe/lsn.h>

#include "diverge.h"
#include "log.h"
#include "mem.h"
#include "pg.h"
#include "rewrites.h"

/* A new relfilenode seen, waiting for staging to pass lsn before it is judged. */
typedef struct pending {
    size_t source; /* index into config->sources */
    char *schema, *table;
    char relfilenode[24];
    char xmin[24];
    wp_lsn_t lsn;
} pending_t;

struct wp_rewrites {
    const wp_config_t *config;
    PGconn **conns; /* per source: plain connection, NULL until needed or after a failure */
    bool *told;     /* per source: its connection failure is logged (once per outage) */
    pending_t *pending;
    size_t npending, pending_cap;
};

/* The recorded tables that can be mirrored, with what was recorded of their storage. */
static const char RECORDED_SQL[] =
    "SELECT schema_name, table_name, relid::text, relfilenode::text, storage_lsn::text FROM walpipe.source_tables "
    "WHERE source = $1 AND problem IS NULL ORDER BY schema_name, table_name";

/* Their pg_class rows now; o is the index into the recorded rows (from 1). */
static const char CATALOG_SQL[] =
    "SELECT t.o, c.oid::text, c.relfilenode::text, c.xmin::text, pg_current_wal_insert_lsn()::text "
    "FROM unnest($1::text[], $2::text[]) WITH ORDINALITY t(s, r, o) "
    "JOIN pg_namespace n ON n.nspname = t.s JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.r "
    "WHERE c.relkind = 'r'";

wp_rewrites_t *wp_rewrites_create(const wp_config_t *config)
{
    wp_rewrites_t *r = wp_calloc(1, sizeof *r);
    r->config = config;
    r->conns = wp_calloc(config->nsources ? config->nsources : 1, sizeof *r->conns);
    r->told = wp_calloc(config->nsources ? config->nsources : 1, sizeof *r->told);
    return r;
}

static void pending_free(pending_t *p)
{
    free(p->schema);
    free(p->table);
}

void wp_rewrites_destroy(wp_rewrites_t *r)
{
    if (r == NULL)
        return;
    for (size_t i = 0; i < r->config->nsources; i++)
        if (r->conns[i])
            PQfinish(r->conns[i]);
    free(r->conns);
    free(r->told);
    for (size_t i = 0; i < r->npending; i++)
        pending_free(&r->pending[i]);
    free(r->pending);
    free(r);
}

static pending_t *find_pending(wp_rewrites_t *r, size_t source, const char *schema, const char *table)
{
    for (size_t i = 0; i < r->npending; i++) {
        pending_t *p = &r->pending[i];
        if (p->source == source && strcmp(p->schema, schema) == 0 && strcmp(p->table, table) == 0)
            return p;
    }
    return NULL;
}

static void drop_pending(wp_rewrites_t *r, pending_t *p)
{
    if (p == NULL)
        return;
    pending_free(p);
    *p = r->pending[--r->npending];
}

/* The source's plain connection, (re)connected when needed; NULL when it cannot be had (logged). */
static PGconn *source_conn(wp_rewrites_t *r, size_t i)
{
    const wp_source_config_t *src = &r->config->sources[i];
    if (r->conns[i] && PQstatus(r->conns[i]) == CONNECTION_OK)
        return r->conns[i];
    if (r->conns[i])
        PQfinish(r->conns[i]);
    r->conns[i] = wp_pg_connect_source(src->conninfo, "walpipe_rewrites");
    if (PQstatus(r->conns[i]) != CONNECTION_OK) {
        if (!r->told[i])
            wp_warn("could not connect to source \"%s\" to watch its tables for rewrites (tried again every few "
                    "seconds, quietly): %s",
                    src->name, PQerrorMessage(r->conns[i]));
        r->told[i] = true;
        PQfinish(r->conns[i]);
        r->conns[i] = NULL;
    } else {
        r->told[i] = false;
    }
    return r->conns[i];
}

static int record_storage(PGconn *staging, const char *source, const char *schema, const char *table,
                          const char *relid, const char *relfilenode, const char *lsn)
{
    const char *p[] = {source, schema, table, relid, relfilenode, lsn};
    PGresult *res = PQexecParams(staging,
                                 "UPDATE walpipe.source_tables SET relid = $4, relfilenode = $5, storage_lsn = $6 "
                                 "WHERE source = $1 AND schema_name = $2 AND table_name = $3",
                                 6, NULL, p, NULL, NULL, 0);
    int rc = PQresultStatus(res) == PGRES_COMMAND_OK ? 0 : -1;
    if (rc != 0)
        wp_warn("staging: could not record the storage of \"%s\".\"%s\": %s", schema, table, PQerrorMessage(staging));
    PQclear(res);
    return rc;
}

/* Whether a TRUNCATE of the table by transaction xmin is staged with lsn in (after, upto]. 1, 0 or -1. */
static int truncate_staged(PGconn *staging, const char *source, const char *schema, const char *table,
                           const char *xmin, const char *after, wp_lsn_t upto)
{
    char uptobuf[WP_LSN_STRLEN];
    wp_lsn_format(upto, uptobuf);
    const char *p[] = {source, schema, table, xmin, after ? after : "0/0", uptobuf};
    PGresult *res = PQexecParams(staging,
                                 "SELECT EXISTS (SELECT 1 FROM walpipe.raw_events WHERE source = $1 AND lsn > $5 AND "
                                 "lsn <= $6 AND event_type = 'truncate' AND schema_name = $2 AND table_name = $3 AND "
                                 "xid = $4::bigint)",
                                 6, NULL, p, NULL, NULL, 0);
    int rc = -1;
    if (PQresultStatus(res) == PGRES_TUPLES_OK)
        rc = PQgetvalue(res, 0, 0)[0] == 't';
    else
        wp_warn("staging: could not look for a TRUNCATE of \"%s\".\"%s\": %s", schema, table, PQerrorMessage(staging));
    PQclear(res);
    return rc;
}

/* Builds the {schema,...} and {table,...} literals of the recorded rows. */
static void recorded_arrays(const PGresult *rec, wp_buf_t *schemas, wp_buf_t *tables)
{
    int n = PQntuples(rec);
    const char **items = wp_calloc((size_t)n + 1, sizeof *items);
    for (int i = 0; i < n; i++)
        items[i] = PQgetvalue(rec, i, 0);
    wp_pg_text_array(schemas, items, (size_t)n);
    for (int i = 0; i < n; i++)
        items[i] = PQgetvalue(rec, i, 1);
    wp_pg_text_array(tables, items, (size_t)n);
    free(items);
}

/*
 * Judges one table whose pg_class row the poll read: records a first sight,
 * a TRUNCATE or a rewrite.  Inside the caller's staging transaction.
 * Returns 0 or -1 (logged).
 */
static int judge(wp_rewrites_t *r, size_t si, PGconn *staging, const PGresult *rec, int o, const PGresult *cat, int row,
                 const char *lpre, wp_lsn_t staged, bool *rediscover)
{
    const char *source = r->config->sources[si].name;
    const char *schema = PQgetvalue(rec, o, 0), *table = PQgetvalue(rec, o, 1);
    const char *oid = PQgetvalue(cat, row, 1), *rfn = PQgetvalue(cat, row, 2), *xmin = PQgetvalue(cat, row, 3);
    const char *lpost_text = PQgetvalue(cat, row, 4);
    wp_lsn_t lpost = 0;
    wp_lsn_parse(lpost_text, strlen(lpost_text), &lpost);
    pending_t *p = find_pending(r, si, schema, table);
    wp_buf_t why = WP_BUF_INIT;
    int rc = 0;

    if (PQgetisnull(rec, o, 2)) {
        rc = record_storage(staging, source, schema, table, oid, rfn, lpre); /* first sight */
        goto out;
    }
    if (strcmp(PQgetvalue(rec, o, 2), oid) != 0) {
        wp_buf_printf(&why,
                      "the table was dropped and created again under the same name (oid %s, now %s): the DROP "
                      "removed the old table's rows without row changes in the WAL, and the mirror still holds "
                      "them until the table is resynced",
                      PQgetvalue(rec, o, 2), oid);
        if (wp_diverge_record(staging, source, schema, table, WP_DIVERGE_REWRITE, lpost, why.data) < 0 ||
            record_storage(staging, source, schema, table, oid, rfn, lpre) != 0)
            rc = -1;
        *rediscover = true;
        drop_pending(r, p);
        goto out;
    }
    if (strcmp(PQgetvalue(rec, o, 3), rfn) == 0) {
        drop_pending(r, p);
        goto out;
    }
    /* new storage: remember where it was first seen (or seen changed again), judge it once that is staged */
    if (p == NULL || strcmp(p->relfilenode, rfn) != 0 || strcmp(p->xmin, xmin) != 0) {
        if (p == NULL) {
            if (r->npending == r->pending_cap) {
                r->pending_cap = r->pending_cap ? r->pending_cap * 2 : 8;
                r->pending = wp_realloc(r->pending, r->pending_cap * sizeof *r->pending);
            }
            p = &r->pending[r->npending++];
            memset(p, 0, sizeof *p);
            p->source = si;
            p->schema = wp_strdup(schema);
            p->table = wp_strdup(table);
        }
        snprintf(p->relfilenode, sizeof p->relfilenode, "%s", rfn);
        snprintf(p->xmin, sizeof p->xmin, "%s", xmin);
        p->lsn = lpost;
    }
    if (staged < p->lsn)
        goto out; /* a TRUNCATE that explains it may not be staged yet */
    int t = truncate_staged(staging, source, schema, table, xmin, PQgetisnull(rec, o, 4) ? NULL : PQgetvalue(rec, o, 4),
                            p->lsn);
    if (t < 0) {
        rc = -1;
        goto out;
    }
    if (t == 0) {
        wp_buf_printf(&why,
                      "the source rewrote the table without row changes in the WAL (relfilenode %s, now %s, by "
                      "transaction %s, which staged no TRUNCATE of it): ADD COLUMN with a volatile default, ALTER "
                      "COLUMN TYPE ... USING, VACUUM FULL or CLUSTER; rows that existed then may differ in the "
                      "mirror until the table is resynced",
                      PQgetvalue(rec, o, 3), rfn, xmin);
        if (wp_diverge_record(staging, source, schema, table, WP_DIVERGE_REWRITE, p->lsn, why.data) < 0) {
            rc = -1;
            goto out;
        }
    } else {
        wp_debug("\"%s\".\"%s\" of source \"%s\" has new storage from a TRUNCATE (transaction %s), in the stream",
                 schema, table, source, xmin);
    }
    rc = record_storage(staging, source, schema, table, oid, rfn, lpre);
    drop_pending(r, p);
out:
    wp_buf_free(&why);
    return rc;
}

static int poll_source(wp_rewrites_t *r, size_t si, PGconn *staging, bool *rediscover)
{
    const char *name = r->config->sources[si].name;
    PGresult *rec = NULL, *pre = NULL, *cat = NULL, *cp = NULL;
    wp_buf_t schemas = WP_BUF_INIT, tables = WP_BUF_INIT;
    bool in_txn = false;
    int rc = -1;
    const char *p1[] = {name};

    rec = PQexecParams(staging, RECORDED_SQL, 1, NULL, p1, NULL, NULL, 0);
    if (PQresultStatus(rec) != PGRES_TUPLES_OK) {
        wp_warn("staging: could not read the recorded tables of source \"%s\": %s", name, PQerrorMessage(staging));
        goto out;
    }
    if (PQntuples(rec) == 0) {
        rc = 0;
        goto out;
    }
    PGconn *src = source_conn(r, si);
    if (src == NULL)
        goto out;
    /* the position before the catalog read bounds what a later TRUNCATE can be; the one after, what this one saw */
    pre = PQexec(src, "SELECT pg_current_wal_insert_lsn()::text");
    recorded_arrays(rec, &schemas, &tables);
    const char *p2[] = {schemas.data, tables.data};
    cat = PQresultStatus(pre) == PGRES_TUPLES_OK ? PQexecParams(src, CATALOG_SQL, 2, NULL, p2, NULL, NULL, 0) : NULL;
    if (PQresultStatus(cat) != PGRES_TUPLES_OK) {
        wp_warn("could not read the storage of source \"%s\"'s tables: %s", name, PQerrorMessage(src));
        goto out;
    }
    cp = PQexecParams(staging, "SELECT lsn::text FROM walpipe.checkpoints WHERE source = $1", 1, NULL, p1, NULL, NULL,
                      0);
    if (PQresultStatus(cp) != PGRES_TUPLES_OK) {
        wp_warn("staging: could not read the checkpoint of source \"%s\": %s", name, PQerrorMessage(staging));
        goto out;
    }
    wp_lsn_t staged = 0;
    if (PQntuples(cp) == 1) {
        const char *l = PQgetvalue(cp, 0, 0);
        wp_lsn_parse(l, strlen(l), &staged);
    }
    bool changed = false; /* the usual poll: nothing changed, nothing to write */
    for (int row = 0; row < PQntuples(cat) && !changed; row++) {
        int o = atoi(PQgetvalue(cat, row, 0)) - 1;
        changed = o >= 0 && o < PQntuples(rec) &&
                  (PQgetisnull(rec, o, 2) || strcmp(PQgetvalue(rec, o, 2), PQgetvalue(cat, row, 1)) != 0 ||
                   strcmp(PQgetvalue(rec, o, 3), PQgetvalue(cat, row, 2)) != 0);
    }
    if (!changed) {
        rc = 0;
        goto out;
    }
    if (wp_pg_exec(staging, "staging", "BEGIN", "begin recording table storage") != 0)
        goto out;
    in_txn = true;
    bool again = false;
    for (int row = 0; row < PQntuples(cat); row++) {
        int o = atoi(PQgetvalue(cat, row, 0)) - 1;
        if (o < 0 || o >= PQntuples(rec))
            continue;
        if (judge(r, si, staging, rec, o, cat, row, PQgetvalue(pre, 0, 0), staged, &again) != 0)
            goto out;
    }
    in_txn = false;
    if (wp_pg_exec(staging, "staging", "COMMIT", "commit the table storage") != 0)
        goto out;
    *rediscover |= again;
    rc = 0;
out:
    if (in_txn)
        PQclear(PQexec(staging, "ROLLBACK"));
    if (rc != 0 && r->conns[si] && PQstatus(r->conns[si]) != CONNECTION_OK) {
        PQfinish(r->conns[si]);
        r->conns[si] = NULL;
    }
    PQclear(rec);
    PQclear(pre);
    PQclear(cat);
    PQclear(cp);
    wp_buf_free(&schemas);
    wp_buf_free(&tables);
    return rc;
}

int wp_rewrites_poll(wp_rewrites_t *r, PGconn *staging, bool *rediscover)
{
    int rc = 0;
    for (size_t i = 0; i < r->config->nsources; i++)
        if (poll_source(r, i, staging, rediscover) != 0)
            rc = -1;
    return rc;
}

/*
 * feed.c: one source's staged events, read in order for a sink.
 *
 * Job: page through walpipe.raw_events of one source by (lsn, seq, id)
 * after a position (the index raw_events_source_order, sql/012_sinks.sql),
 * attach each event's columns and key from small caches, number the initial
 * snapshot's rows, and mark what the sink's tables filter lets through.
 * feed.h says which events a sink sees and why.
 *
 * Invariant: rows come back in the source's commit order, and a row the
 * caller passed is never returned again: the next read starts strictly after
 * the position the caller hands back.  Filtered rows are returned too
 * (match = false, no payload), so the caller's position moves over them.
 *
 * Ownership: a read's rows point into the feed's PGresult and caches, valid
 * until the next read; caches are only cleared before a read.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "feed.h"
#include "log.h"
#include "mem.h"
#include "pg.h"
#include "runtime.h"

#define CACHE_TTL_MS 60000   /* shapes and keys are read again after this long ... */
#define MISSING_TTL_MS 5000  /* ... and a table with no key recorded yet after this */

/* ---------------------------------------------------------------- a small string map */

typedef struct entry {
    char *key;   /* owned; NULL = free slot */
    char *value; /* owned; NULL = known to be absent */
} entry_t;

typedef struct map {
    entry_t *slots;
    size_t cap, n; /* cap a power of two */
} map_t;

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

static entry_t *map_find(map_t *m, const char *key)
{
    if (m->cap == 0)
        return NULL;
    for (size_t i = hash_str(key) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        if (m->slots[i].key == NULL)
            return NULL;
        if (strcmp(m->slots[i].key, key) == 0)
            return &m->slots[i];
    }
}

static void map_clear(map_t *m)
{
    for (size_t i = 0; i < m->cap; i++) {
        free(m->slots[i].key);
        free(m->slots[i].value);
    }
    free(m->slots);
    memset(m, 0, sizeof *m);
}

/* Sets key to a copy of value (NULL allowed). */
static void map_put(map_t *m, const char *key, const char *value)
{
    entry_t *e = map_find(m, key);
    if (e) {
        free(e->value);
        e->value = value ? wp_strdup(value) : NULL;
        return;
    }
    if ((m->n + 1) * 2 > m->cap) {
        map_t bigger = {wp_calloc(m->cap ? m->cap * 2 : 64, sizeof(entry_t)), m->cap ? m->cap * 2 : 64, 0};
        for (size_t i = 0; i < m->cap; i++) {
            if (m->slots[i].key == NULL)
                continue;
            size_t j = hash_str(m->slots[i].key) & (bigger.cap - 1);
            while (bigger.slots[j].key)
                j = (j + 1) & (bigger.cap - 1);
            bigger.slots[j] = m->slots[i];
            bigger.n++;
        }
        free(m->slots);
        *m = bigger;
    }
    size_t j = hash_str(key) & (m->cap - 1);
    while (m->slots[j].key)
        j = (j + 1) & (m->cap - 1);
    m->slots[j].key = wp_strdup(key);
    m->slots[j].value = value ? wp_strdup(value) : NULL;
    m->n++;
}

/* ---------------------------------------------------------------- the feed */

struct wp_feed {
    const char *source;
    const wp_table_ref_t *tables;
    size_t ntables;
    wp_buf_t schemas_arr, tables_arr; /* the tables filter as text[] literals */
    map_t shapes;                     /* "shape_id" -> columns JSON */
    map_t keys;                       /* "schema\x1ftable" -> key_columns JSON, NULL = none recorded */
    int64_t cached_at, missing_at;
    bool has_missing;                 /* a table had no key recorded when last read */
    PGresult *res;
    wp_feed_row_t *rows;
    int rows_cap;
};

wp_feed_t *wp_feed_create(const char *source, const wp_table_ref_t *tables, size_t ntables)
{
    wp_feed_t *feed = wp_calloc(1, sizeof *feed);
    feed->source = source;
    feed->tables = tables;
    feed->ntables = ntables;
    if (tables) {
        const char **s = wp_calloc(ntables, sizeof *s), **t = wp_calloc(ntables, sizeof *t);
        for (size_t i = 0; i < ntables; i++) {
            s[i] = tables[i].schema;
            t[i] = tables[i].table;
        }
        wp_pg_text_array(&feed->schemas_arr, s, ntables);
        wp_pg_text_array(&feed->tables_arr, t, ntables);
        free(s);
        free(t);
    }
    return feed;
}

void wp_feed_forget(wp_feed_t *feed)
{
    map_clear(&feed->shapes);
    map_clear(&feed->keys);
    feed->cached_at = wp_now_ms();
    feed->has_missing = false;
}

void wp_feed_destroy(wp_feed_t *feed)
{
    if (feed == NULL)
        return;
    map_clear(&feed->shapes);
    map_clear(&feed->keys);
    PQclear(feed->res);
    free(feed->rows);
    wp_buf_free(&feed->schemas_arr);
    wp_buf_free(&feed->tables_arr);
    free(feed);
}

/* Runs a read-only query; the result, or NULL after logging what failed. */
static PGresult *query(PGconn *conn, const char *sql, int nparams, const char *const *params, const char *what)
{
    PGresult *res = PQexecParams(conn, sql, nparams, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_error("staging: could not %s: %s", what, PQerrorMessage(conn));
        PQclear(res);
        return NULL;
    }
    return res;
}

/* The source's initial snapshot: *busy while it is being copied; its lsn as text in lsn (or "" = none done). */
static int snapshot_state(wp_feed_t *feed, PGconn *conn, bool *busy, char *lsn, size_t lsnlen)
{
    const char *params[] = {feed->source};
    PGresult *res = query(conn,
                          "SELECT snapshot_state, snapshot_lsn::text FROM walpipe.checkpoints WHERE source = $1", 1,
                          params, "read the source's snapshot state");
    if (res == NULL)
        return -1;
    *busy = false;
    lsn[0] = '\0';
    if (PQntuples(res) == 1) {
        *busy = strcmp(PQgetvalue(res, 0, 0), "in_progress") == 0;
        if (strcmp(PQgetvalue(res, 0, 0), "done") == 0 && !PQgetisnull(res, 0, 1))
            snprintf(lsn, lsnlen, "%s", PQgetvalue(res, 0, 1));
    }
    PQclear(res);
    return 0;
}

/* Reads the columns of shapes and the keys of tables the rows need and the caches lack. */
static int fill_caches(wp_feed_t *feed, PGconn *conn, int n)
{
    wp_buf_t ids = WP_BUF_INIT, schemas = WP_BUF_INIT, names = WP_BUF_INIT, key = WP_BUF_INIT;
    const char **s = wp_calloc((size_t)n + 1, sizeof *s), **t = wp_calloc((size_t)n + 1, sizeof *t);
    int64_t *shape_ids = wp_calloc((size_t)n + 1, sizeof *shape_ids);
    size_t nshapes = 0, ntables = 0;
    int rc = -1;
    PGresult *res = NULL;

    for (int i = 0; i < n; i++) {
        if (PQgetisnull(feed->res, i, 8) == 0) {
            char *id = PQgetvalue(feed->res, i, 8);
            if (map_find(&feed->shapes, id) == NULL) {
                map_put(&feed->shapes, id, NULL); /* asked once per read */
                shape_ids[nshapes++] = strtoll(id, NULL, 10);
            }
        }
        if (PQgetisnull(feed->res, i, 4) == 0 && PQgetisnull(feed->res, i, 5) == 0) {
            wp_buf_reset(&key);
            wp_buf_printf(&key, "%s\x1f%s", PQgetvalue(feed->res, i, 4), PQgetvalue(feed->res, i, 5));
            if (map_find(&feed->keys, key.data) == NULL) {
                map_put(&feed->keys, key.data, NULL);
                s[ntables] = PQgetvalue(feed->res, i, 4);
                t[ntables++] = PQgetvalue(feed->res, i, 5);
            }
        }
    }
    if (nshapes) {
        wp_pg_int8_array(&ids, shape_ids, nshapes);
        const char *params[] = {feed->source, ids.data};
        res = query(conn,
                    "SELECT shape_id::text, columns::text FROM walpipe.table_schemas WHERE source = $1 AND "
                    "shape_id = ANY ($2::int8[])",
                    2, params, "read table shapes");
        if (res == NULL)
            goto out;
        for (int i = 0; i < PQntuples(res); i++)
            map_put(&feed->shapes, PQgetvalue(res, i, 0), PQgetvalue(res, i, 1));
        PQclear(res);
        res = NULL;
    }
    if (ntables) {
        wp_pg_text_array(&schemas, s, ntables);
        wp_pg_text_array(&names, t, ntables);
        const char *params[] = {feed->source, schemas.data, names.data};
        res = query(conn,
                    "SELECT st.schema_name, st.table_name, st.key_columns::text FROM walpipe.source_tables st "
                    "JOIN unnest($2::text[], $3::text[]) AS w(s, t) ON st.schema_name = w.s AND st.table_name = w.t "
                    "WHERE st.source = $1",
                    3, params, "read table keys");
        if (res == NULL)
            goto out;
        int found = 0;
        for (int i = 0; i < PQntuples(res); i++) {
            wp_buf_reset(&key);
            wp_buf_printf(&key, "%s\x1f%s", PQgetvalue(res, i, 0), PQgetvalue(res, i, 1));
            map_put(&feed->keys, key.data, PQgetisnull(res, i, 2) ? NULL : PQgetvalue(res, i, 2));
            found++;
        }
        if ((size_t)found < ntables && !feed->has_missing) {
            feed->has_missing = true;
            feed->missing_at = wp_now_ms();
        }
    }
    rc = 0;
out:
    PQclear(res);
    wp_buf_free(&ids);
    wp_buf_free(&schemas);
    wp_buf_free(&names);
    wp_buf_free(&key);
    free(s);
    free(t);
    free(shape_ids);
    return rc;
}

/* The number a snapshot row at lsn with staging id has among its snapshot's rows (1..N); -1 on error. */
static int32_t snapshot_ordinal(wp_feed_t *feed, PGconn *conn, const char *lsn, const char *id)
{
    const char *params[] = {feed->source, lsn, id};
    PGresult *res = query(conn,
                          "SELECT count(*) FROM walpipe.raw_events WHERE source = $1 AND lsn = $2::pg_lsn AND seq = 0 "
                          "AND event_type = 'snapshot' AND id < $3::int8",
                          3, params, "number the snapshot's rows");
    if (res == NULL)
        return -1;
    long long n = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    return n >= INT32_MAX ? INT32_MAX : (int32_t)(n + 1);
}

static const char READ_SQL[] =
    "SELECT r.id::text, r.lsn::text, r.seq, r.event_type, r.schema_name, r.table_name, coalesce(r.xid, -1), "
    "coalesce((extract(epoch FROM r.commit_ts) * 1000000)::int8, 0), r.shape_id::text, m.match, "
    "CASE WHEN m.match THEN r.payload::text END "
    "FROM walpipe.raw_events r, LATERAL (SELECT $6::text[] IS NULL OR EXISTS (SELECT 1 FROM unnest($6::text[], "
    "$7::text[]) AS t(s, n) WHERE t.s = r.schema_name AND t.n = r.table_name) AS match) m "
    "WHERE r.source = $1 AND (r.lsn, r.seq, r.id) > ($2::pg_lsn, $3::int, $4::int8) "
    "AND ($8::pg_lsn IS NULL OR r.lsn <= $8::pg_lsn) AND r.seq >= 0 "
    "AND (r.event_type <> 'snapshot' OR r.lsn = $9::pg_lsn) "
    "ORDER BY r.lsn, r.seq, r.id LIMIT $5";

int wp_feed_read(wp_feed_t *feed, PGconn *conn, const wp_sink_pos_t *after, wp_lsn_t upto, int limit,
                 wp_feed_row_t **rows)
{
    char lsn[WP_LSN_STRLEN], upto_s[WP_LSN_STRLEN], snap_lsn[32], seq[16], id[24], lim[16];
    bool busy;

    *rows = NULL;
    PQclear(feed->res);
    feed->res = NULL;
    int64_t now = wp_now_ms();
    if (now - feed->cached_at > CACHE_TTL_MS) {
        wp_feed_forget(feed);
    } else if (feed->has_missing && now - feed->missing_at > MISSING_TTL_MS) {
        map_clear(&feed->keys); /* ask again for the keys that were not recorded yet */
        feed->has_missing = false;
    }
    if (snapshot_state(feed, conn, &busy, snap_lsn, sizeof snap_lsn) != 0)
        return -1;
    if (busy)
        return 0;
    wp_lsn_format(after->lsn, lsn);
    snprintf(seq, sizeof seq, "%d", after->seq);
    snprintf(id, sizeof id, "%lld", (long long)after->id);
    snprintf(lim, sizeof lim, "%d", limit);
    const char *params[] = {feed->source,
                            lsn,
                            seq,
                            id,
                            lim,
                            feed->tables ? feed->schemas_arr.data : NULL,
                            feed->tables ? feed->tables_arr.data : NULL,
                            upto ? wp_lsn_format(upto, upto_s) : NULL,
                            snap_lsn[0] ? snap_lsn : NULL};
    feed->res = query(conn, READ_SQL, 9, params, "read staged events");
    if (feed->res == NULL)
        return -1;
    int n = PQntuples(feed->res);
    if (n == 0)
        return 0;
    if (fill_caches(feed, conn, n) != 0)
        return -1;
    if (n > feed->rows_cap) {
        feed->rows_cap = n;
        feed->rows = wp_realloc(feed->rows, (size_t)n * sizeof *feed->rows);
    }
    wp_sink_pos_t prev = *after;
    wp_buf_t key = WP_BUF_INIT;
    int rc = n;
    for (int i = 0; i < n; i++) {
        PGresult *r = feed->res;
        wp_feed_row_t *row = &feed->rows[i];
        memset(row, 0, sizeof *row);
        row->pos.id = strtoll(PQgetvalue(r, i, 0), NULL, 10);
        if (!wp_lsn_parse(PQgetvalue(r, i, 1), strlen(PQgetvalue(r, i, 1)), &row->pos.lsn)) {
            wp_error("staging: event %s of source \"%s\" has an unreadable lsn", PQgetvalue(r, i, 0), feed->source);
            rc = -1;
            break;
        }
        row->pos.seq = (int32_t)strtol(PQgetvalue(r, i, 2), NULL, 10);
        const char *op = PQgetvalue(r, i, 3);
        if (strcmp(op, "snapshot") == 0) {
            if (prev.ord > 0 && prev.lsn == row->pos.lsn)
                row->pos.ord = prev.ord + 1;
            else if ((row->pos.ord = snapshot_ordinal(feed, conn, PQgetvalue(r, i, 1), PQgetvalue(r, i, 0))) < 0) {
                rc = -1;
                break;
            }
        }
        row->match = PQgetvalue(r, i, 9)[0] == 't';
        wp_sink_event_t *ev = &row->ev;
        ev->source = feed->source;
        ev->lsn = row->pos.lsn;
        ev->seq = row->pos.ord > 0 ? row->pos.ord : row->pos.seq;
        ev->op = op;
        ev->schema = PQgetisnull(r, i, 4) ? NULL : PQgetvalue(r, i, 4);
        ev->table = PQgetisnull(r, i, 5) ? NULL : PQgetvalue(r, i, 5);
        ev->xid = strtoll(PQgetvalue(r, i, 6), NULL, 10);
        ev->commit_us = strtoll(PQgetvalue(r, i, 7), NULL, 10);
        if (row->match) {
            ev->payload = PQgetvalue(r, i, 10);
            ev->payload_len = (size_t)PQgetlength(r, i, 10);
        }
        if (!PQgetisnull(r, i, 8)) {
            entry_t *e = map_find(&feed->shapes, PQgetvalue(r, i, 8));
            ev->columns = e ? e->value : NULL;
        }
        if (ev->schema && ev->table) {
            wp_buf_reset(&key);
            wp_buf_printf(&key, "%s\x1f%s", ev->schema, ev->table);
            entry_t *e = map_find(&feed->keys, key.data);
            ev->key_columns = e ? e->value : NULL;
        }
        prev = row->pos;
    }
    wp_buf_free(&key);
    if (rc > 0)
        *rows = feed->rows;
    return rc;
}

int wp_feed_index_ready(PGconn *conn)
{
    PGresult *res = query(conn, "SELECT to_regclass('walpipe.raw_events_source_order') IS NOT NULL", 0, NULL,
                          "look for the index sinks read by");
    if (res == NULL)
        return -1;
    int ready = PQgetvalue(res, 0, 0)[0] == 't' ? 1 : 0;
    PQclear(res);
    return ready;
}

long long wp_feed_backlog(PGconn *conn, const char *source, const wp_sink_pos_t *after)
{
    char lsn[WP_LSN_STRLEN], seq[16], id[24];
    wp_lsn_format(after->lsn, lsn);
    snprintf(seq, sizeof seq, "%d", after->seq);
    snprintf(id, sizeof id, "%lld", (long long)after->id);
    const char *params[] = {source, lsn, seq, id};
    PGresult *res = query(conn,
                          "SELECT count(*) FROM walpipe.raw_events r LEFT JOIN walpipe.checkpoints c ON c.source = "
                          "r.source WHERE r.source = $1 AND (r.lsn, r.seq, r.id) > ($2::pg_lsn, $3::int, $4::int8) "
                          "AND r.seq >= 0 AND (r.event_type <> 'snapshot' OR (c.snapshot_state = 'done' AND r.lsn = "
                          "c.snapshot_lsn))",
                          4, params, "count a sink's backlog");
    if (res == NULL)
        return -1;
    long long n = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    return n;
}

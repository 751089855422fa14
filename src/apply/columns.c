/*
 * columns.c: the source column catalog: every column of each captured table,
 * by attnum, read from the source's catalog into walpipe.source_columns.
 *
 * Job: run by `walpipe run`'s monitor (worker.c) next to key discovery, just
 * before it: at start and every few minutes for every captured table, and on
 * request (NOTIFY walpipe_discover, sent by an applier that meets a table
 * without a key, or adds a column the catalog was not read for yet) for the
 * tables asked for only.  The
 * mirror reads it when it adds a column: ADD COLUMN ... DEFAULT <constant>
 * writes no row changes to the WAL, and the rows that existed read the
 * value PostgreSQL keeps in pg_attribute.attmissingval; the mirror gives its
 * column that value as DEFAULT (mirror.c).
 *
 * Invariant: the source's rows in walpipe.source_columns are one read of the
 * catalog, all with the same read_lsn, the source's WAL position taken
 * before that read (in its own statement, so before the read's snapshot):
 * every column added by a transaction that committed before read_lsn is in
 * it.  An attnum is never reused by another column of a table, so a row
 * describes that column whatever it is called now.  Values are rendered
 * under the session settings the walsender uses (so they read as events
 * carry values) and names with client_encoding UTF8, so staging gets UTF-8.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "columns.h"
#include "filter.h"
#include "log.h"
#include "mem.h"
#include "pg.h"

/*
 * One JSON array of every column (dropped ones too) of the captured tables.
 * attmissingval is an anyarray of one element; its text form parses as a
 * text[] whose element is the value's text form when the type's array
 * delimiter is ',' (all built-in types but box): otherwise the value is left
 * NULL, which the mirror treats as not known.
 */
static const char COLUMNS_SQL[] =
    "SELECT coalesce(json_agg(json_build_object('s', n.nspname, 't', c.relname, 'n', a.attnum, 'name', a.attname, "
    "'type', format_type(a.atttypid, a.atttypmod), 'd', a.attisdropped, 'm', a.atthasmissing, "
    "'v', CASE WHEN a.atthasmissing AND t.typdelim = ',' THEN (a.attmissingval::text::text[])[1] END)), '[]')::text "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_attribute a ON a.attrelid = c.oid "
    "LEFT JOIN pg_type t ON t.oid = a.atttypid "
    "WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND a.attnum > 0 "
    "  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp_)' "
    "  AND ($1::text[] IS NULL OR (n.nspname, c.relname) IN (SELECT * FROM unnest($1::text[], $2::text[])))";

/*
 * Applies the source's filters and masks (filter.h) to the catalog read, a
 * JSON array of {s, t, name, type, v, ...}: what the stream never stages
 * (excluded tables and columns) is left out, and a masked column's type and
 * missing value are what the stream stages for it.  Returns a new JSON text
 * the caller frees, or NULL (logged) when it cannot be read.
 */
static char *filter_catalog(const wp_source_config_t *source, const char *text)
{
    char *out = NULL;
    json_error_t jerr;
    json_t *all = json_loads(text, 0, &jerr);
    json_t *kept = json_array();
    wp_filter_t *filter = wp_filter_create(source);

    if (!json_is_array(all)) {
        wp_warn("could not read source \"%s\"'s column catalog: %s", source->name, jerr.text);
        goto out;
    }
    size_t i;
    json_t *col;
    json_array_foreach(all, i, col) {
        const char *schema = json_string_value(json_object_get(col, "s"));
        const char *table = json_string_value(json_object_get(col, "t"));
        const char *name = json_string_value(json_object_get(col, "name"));
        const char *type = json_string_value(json_object_get(col, "type"));
        const char *value = json_string_value(json_object_get(col, "v"));
        char digest[WP_FILTER_SHA256_HEX + 1];
        if (schema == NULL || table == NULL || name == NULL || type == NULL) {
            wp_warn("could not read source \"%s\"'s column catalog: an entry lacks its names or type", source->name);
            goto out;
        }
        if (!wp_filter_catalog_column(filter, schema, table, name, &type, &value, digest))
            continue;
        json_object_set_new(col, "type", json_string(type));
        json_object_set_new(col, "v", value ? json_string(value) : json_null());
        json_array_append(kept, col);
    }
    out = json_dumps(kept, JSON_COMPACT);
out:
    json_decref(all);
    json_decref(kept);
    wp_filter_destroy(filter);
    return out;
}

/* The walsender's pinned settings (reader.c), so missing values read like event values. */
static const char SESSION_SQL[] = "SET DateStyle = 'ISO, MDY'; SET TimeZone = 'UTC'; SET IntervalStyle = postgres; "
                                  "SET bytea_output = hex; SET extra_float_digits = 3";

int wp_columns_discover(const wp_source_config_t *source, PGconn *staging)
{
    return wp_columns_discover_tables(source, staging, NULL, 0, false);
}

int wp_columns_discover_tables(const wp_source_config_t *source, PGconn *staging, const wp_keys_request_t *req,
                               size_t nreq, bool only)
{
    int rc = -1;
    PGresult *res = NULL, *lsn = NULL, *ins = NULL;
    wp_buf_t schemas = WP_BUF_INIT, tables = WP_BUF_INIT;
    PGconn *conn = wp_pg_connect_source(source->conninfo, "walpipe_columns");
    bool in_txn = false;
    char *catalog = NULL; /* the catalog read, filtered (filter_catalog) */

    if (PQstatus(conn) != CONNECTION_OK) {
        wp_warn("could not connect to source \"%s\" to read its tables' columns: %s", source->name,
                PQerrorMessage(conn));
        goto out;
    }
    res = PQexec(conn, SESSION_SQL);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        wp_warn("could not set up the session to read source \"%s\"'s columns: %s", source->name,
                PQerrorMessage(conn));
        goto out;
    }
    PQclear(res);
    /* first the position, then (a new snapshot) the catalog */
    lsn = PQexec(conn, "SELECT pg_current_wal_lsn()::text");
    if (PQresultStatus(lsn) != PGRES_TUPLES_OK) {
        wp_warn("could not read source \"%s\"'s WAL position: %s", source->name, PQerrorMessage(conn));
        res = NULL;
        goto out;
    }
    /* the tables: those requested, with the captured ones unless only; all when no list says */
    bool filter = only || source->tables != NULL;
    if (filter) {
        size_t ncap = only ? 0 : source->ntables, n = 0;
        const char **sch = wp_calloc(ncap + nreq + 1, sizeof *sch), **tab = wp_calloc(ncap + nreq + 1, sizeof *tab);
        for (size_t i = 0; i < ncap; i++, n++) {
            sch[n] = source->tables[i].schema;
            tab[n] = source->tables[i].table;
        }
        for (size_t i = 0; i < nreq; i++, n++) {
            sch[n] = req[i].schema;
            tab[n] = req[i].table;
        }
        wp_pg_text_array(&schemas, sch, n);
        wp_pg_text_array(&tables, tab, n);
        free(sch);
        free(tab);
    }
    const char *params[] = {filter ? schemas.data : NULL, filter ? tables.data : NULL};
    res = PQexecParams(conn, COLUMNS_SQL, 2, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_warn("could not read the columns of source \"%s\"'s tables: %s", source->name, PQerrorMessage(conn));
        goto out;
    }
    if (wp_pg_exec(staging, "staging", "BEGIN", "begin recording table columns") != 0)
        goto out;
    in_txn = true;
    catalog = filter_catalog(source, PQgetvalue(res, 0, 0));
    if (catalog == NULL)
        goto out;
    const char *p[] = {source->name, PQgetvalue(lsn, 0, 0), catalog};
    ins = PQexecParams(staging,
                       "INSERT INTO walpipe.source_columns (source, schema_name, table_name, attnum, name, type, "
                       "dropped, has_missing, missing_value, read_lsn) "
                       "SELECT $1, x.s, x.t, x.n, x.name, x.type, x.d, x.m, x.v, $2::pg_lsn "
                       "FROM json_to_recordset($3::json) AS x(s text, t text, n int, name text, type text, d boolean, "
                       "m boolean, v text) "
                       "ON CONFLICT (source, schema_name, table_name, attnum) DO UPDATE SET name = excluded.name, "
                       "type = excluded.type, dropped = excluded.dropped, has_missing = excluded.has_missing, "
                       "missing_value = excluded.missing_value, read_lsn = excluded.read_lsn, read_at = now()",
                       3, NULL, p, NULL, NULL, 0);
    if (PQresultStatus(ins) != PGRES_COMMAND_OK) {
        wp_warn("staging: could not record the columns of source \"%s\": %s", source->name, PQerrorMessage(staging));
        goto out;
    }
    /* columns of tables no longer there (or no longer captured) go; of a read of some tables, theirs only */
    PQclear(ins);
    const char *pp[] = {source->name, PQgetvalue(lsn, 0, 0), only ? schemas.data : NULL, only ? tables.data : NULL};
    ins = PQexecParams(staging,
                       "DELETE FROM walpipe.source_columns WHERE source = $1 AND read_lsn <> $2::pg_lsn AND "
                       "($3::text[] IS NULL OR (schema_name, table_name) IN (SELECT * FROM unnest($3::text[], "
                       "$4::text[])))",
                       4, NULL, pp, NULL, NULL, 0);
    if (PQresultStatus(ins) != PGRES_COMMAND_OK) {
        wp_warn("staging: could not prune the columns of source \"%s\": %s", source->name, PQerrorMessage(staging));
        goto out;
    }
    in_txn = false;
    if (wp_pg_exec(staging, "staging", "COMMIT", "commit the table columns") != 0)
        goto out;
    wp_debug("recorded the columns of source \"%s\" as of %s", source->name, PQgetvalue(lsn, 0, 0));
    rc = 0;
out:
    if (in_txn)
        PQclear(PQexec(staging, "ROLLBACK"));
    PQclear(ins);
    PQclear(res);
    PQclear(lsn);
    PQfinish(conn);
    free(catalog);
    wp_buf_free(&schemas);
    wp_buf_free(&tables);
    return rc;
}

/*
 * keys.c: key discovery: which columns identify each captured table's rows,
 * read from the source's catalog and recorded in walpipe.source_tables.
 *
 * Job: run by `walpipe run`'s monitor (worker.c) at start, on request
 * (NOTIFY walpipe_discover, sent by an applier that met a table without a
 * recorded key: then only the tables asked for are read) and every few
 * minutes.  It opens a plain connection to the source (not replication) and
 * writes staging in one transaction.
 *
 * Invariant: every captured table, and every table asked for, gets a row,
 * with a key or with the problem that keeps it from being mirrored (a table
 * asked for that the catalog no longer holds is recorded as gone, so that a
 * worker never waits for a key that cannot come); each problem is logged
 * once per process (the caller's named set).  Names are read with
 * client_encoding UTF8, whatever the source database's encoding, so what is
 * written to staging is UTF-8.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keys.h"
#include "log.h"
#include "pg.h"

/*
 * The mirror keys each table on the replica identity index (REPLICA IDENTITY
 * USING INDEX), else the primary key, else any unique index, whatever the
 * replica identity: only valid, immediate, non-partial unique indexes on
 * plain NOT NULL columns qualify, as for PostgreSQL's own replica identity.
 * The identity is what the catalog shows now, not what it was when the
 * staged changes were made; the applier judges each change by the key
 * values it carries (applier.c), so a key that identifies rows is all the
 * mirror needs.  Inserts carry every column; the UPDATEs and DELETEs that
 * wal2json drops for want of an identity are the stager's to detect.  Each
 * key column is recorded with its attnum ("position", as shapes carry it):
 * the mirror matches key columns by attnum, so a key column renamed since a
 * shape named it is still found without asking for the column catalog
 * (mirror.c).  Readers take entries with or without it (wp_tshape_parse):
 * rows recorded by an older walpipe have none until the next discovery.
 */
static const char DISCOVER_SQL[] =
    "WITH t AS ("
    "  SELECT c.oid, n.nspname, c.relname, c.relreplident FROM pg_class c JOIN pg_namespace n ON n.oid = "
    "c.relnamespace"
    "  WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
    "    AND n.nspname !~ '^pg_(toast|temp_)'"
    "    AND ($1::text[] IS NULL OR (n.nspname, c.relname) IN (SELECT * FROM unnest($1::text[], $2::text[])))"
    "    AND ($3::text[] IS NULL OR (n.nspname, c.relname) NOT IN (SELECT * FROM unnest($3::text[], $4::text[])))), "
    "idx AS ("
    "  SELECT DISTINCT ON (t.oid) t.oid, i.indexrelid FROM t JOIN pg_index i ON i.indrelid = t.oid"
    "  WHERE i.indisunique AND i.indisvalid AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL"
    "    AND NOT EXISTS (SELECT FROM unnest(i.indkey) k(attnum) JOIN pg_attribute a ON a.attrelid = t.oid AND "
    "a.attnum = k.attnum WHERE NOT a.attnotnull)"
    "  ORDER BY t.oid, i.indisreplident DESC, i.indisprimary DESC, i.indexrelid) "
    "SELECT t.nspname, t.relname,"
    "  CASE t.relreplident WHEN 'd' THEN 'default' WHEN 'i' THEN 'index' WHEN 'f' THEN 'full' ELSE 'nothing' END,"
    "  (SELECT json_agg(json_build_object('name', a.attname, 'type', format_type(a.atttypid, a.atttypmod), "
    "'typeoid', a.atttypid::int8, 'position', a.attnum) ORDER BY k.o)::text"
    "     FROM pg_index i, unnest(i.indkey) WITH ORDINALITY k(attnum, o), pg_attribute a"
    "    WHERE i.indexrelid = idx.indexrelid AND a.attrelid = t.oid AND a.attnum = k.attnum),"
    "  (SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_attribute a"
    "    WHERE a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull"
    /* a masked column's null is no lost value (a null mask stages null in a NOT NULL column) */
    "      AND NOT EXISTS (SELECT FROM unnest($5::text[], $6::text[], $7::text[]) m(s, t, c)"
    "                      WHERE m.s = t.nspname AND m.t = t.relname AND m.c = a.attname))::text "
    "FROM t LEFT JOIN idx ON idx.oid = t.oid ORDER BY 1, 2";

/*
 * Why a table without a usable key cannot be mirrored, true whatever its
 * changes carry: the mirror applies changes by key, and no set of columns is
 * known to tell its rows apart.  NULL when it has a key: REPLICA IDENTITY
 * NOTHING then only means that wal2json drops its UPDATEs and DELETEs, which
 * the stager detects and records as divergences (under pgoutput the source
 * refuses them); the inserts still apply.
 */
static const char *key_problem(const char *identity, bool has_key)
{
    if (has_key)
        return NULL;
    if (strcmp(identity, "full") == 0)
        return "it has REPLICA IDENTITY FULL but no primary key or unique index on NOT NULL columns: the mirror "
               "applies changes by key (in any order, any number of times), and rows that are exact duplicates "
               "cannot be told apart; its changes go to walpipe.dead_letters; hint: add a primary key";
    if (strcmp(identity, "nothing") == 0)
        return "it has no primary key or unique index on NOT NULL columns, and REPLICA IDENTITY NOTHING (its UPDATEs "
               "and DELETEs carry no key: wal2json drops them, and under pgoutput the source refuses them): the mirror applies changes by key; its changes go to "
               "walpipe.dead_letters; hint: add a primary key and ALTER TABLE ... REPLICA IDENTITY DEFAULT";
    if (strcmp(identity, "index") == 0)
        return "its replica identity index is not usable (dropped, invalid or deferrable) and it has no primary key "
               "or other unique index on NOT NULL columns: the mirror applies changes by key; its changes go to "
               "walpipe.dead_letters; hint: ALTER TABLE ... REPLICA IDENTITY USING INDEX on a valid unique index";
    return "it has no usable primary key (none, or DEFERRABLE) and no unique index on NOT NULL columns, and "
           "REPLICA IDENTITY DEFAULT, so its UPDATEs and DELETEs carry no key (wal2json drops them, and under "
           "pgoutput the source refuses them); its changes go to "
           "walpipe.dead_letters; hint: add a primary key";
}

/* The problem recorded for a table that has changes staged but is not in the source's catalog. */
static const char GONE_PROBLEM[] =
    "it no longer exists on the source: walpipe has changes of it, but no table of that name was in the source's "
    "catalog when walpipe read its key (it was dropped, or renamed, first), so no key is known to apply them by; "
    "hint: nothing can apply them: `walpipe dlq list` shows them, `walpipe dlq drop --id N` drops them";

/*
 * Builds the {schema,...} and {table,...} array literals of the tables to
 * read: the configured ones plus the requested ones (only the requested
 * ones when only is set).  False when all of the database's tables are to
 * be read (the requested ones are among them).
 */
static bool table_filter(const wp_source_config_t *source, const wp_keys_request_t *req, size_t nreq, bool only,
                         wp_buf_t *schemas, wp_buf_t *tables)
{
    if (source->tables == NULL && !only)
        return false;
    size_t nconf = only ? 0 : source->ntables;
    size_t n = nconf + nreq;
    const char **items = wp_calloc(n + 1, sizeof *items);
    for (size_t i = 0; i < nconf; i++)
        items[i] = source->tables[i].schema;
    for (size_t i = 0; i < nreq; i++)
        items[nconf + i] = req[i].schema;
    wp_pg_text_array(schemas, items, n);
    for (size_t i = 0; i < nconf; i++)
        items[i] = source->tables[i].table;
    for (size_t i = 0; i < nreq; i++)
        items[nconf + i] = req[i].table;
    wp_pg_text_array(tables, items, n);
    free(items);
    return true;
}

/* The {schema,...} and {table,...} array literals of exclude_tables; false when there are none. */
static bool excluded_tables(const wp_source_config_t *source, wp_buf_t *schemas, wp_buf_t *tables)
{
    if (source->exclude_tables == NULL)
        return false;
    size_t n = source->nexclude_tables;
    const char **items = wp_calloc(n + 1, sizeof *items);
    for (size_t i = 0; i < n; i++)
        items[i] = source->exclude_tables[i].schema;
    wp_pg_text_array(schemas, items, n);
    for (size_t i = 0; i < n; i++)
        items[i] = source->exclude_tables[i].table;
    wp_pg_text_array(tables, items, n);
    free(items);
    return true;
}

/* The masked columns of source's [table] sections as three parallel text[] literals (schema, table, column). */
static void masked_columns(const wp_source_config_t *source, wp_buf_t *schemas, wp_buf_t *tables, wp_buf_t *columns)
{
    size_t n = 0;
    for (size_t r = 0; r < source->nrules; r++)
        n += source->rules[r].nmasks;
    const char **s = wp_calloc(n + 1, sizeof *s), **t = wp_calloc(n + 1, sizeof *t), **c = wp_calloc(n + 1, sizeof *c);
    size_t k = 0;
    for (size_t r = 0; r < source->nrules; r++) {
        for (size_t m = 0; m < source->rules[r].nmasks; m++, k++) {
            s[k] = source->rules[r].schema;
            t[k] = source->rules[r].table;
            c[k] = source->rules[r].masks[m].column;
        }
    }
    wp_pg_text_array(schemas, s, n);
    wp_pg_text_array(tables, t, n);
    wp_pg_text_array(columns, c, n);
    free(s);
    free(t);
    free(c);
}

/*
 * Runs DISCOVER_SQL for the tables named by the schemas and tables array
 * literals (NULL: all), leaving out exclude_tables and the masked columns'
 * NOT NULL.  Returns the result (the caller checks and clears it).
 */
static PGresult *exec_discover(PGconn *conn, const wp_source_config_t *source, const char *schemas,
                               const char *tables)
{
    wp_buf_t xschemas = WP_BUF_INIT, xtables = WP_BUF_INIT; /* exclude_tables: never captured, no key needed */
    wp_buf_t mschemas = WP_BUF_INIT, mtables = WP_BUF_INIT, mcolumns = WP_BUF_INIT; /* masked columns */
    bool excluded = excluded_tables(source, &xschemas, &xtables);
    masked_columns(source, &mschemas, &mtables, &mcolumns);
    const char *params[] = {schemas, tables, excluded ? xschemas.data : NULL, excluded ? xtables.data : NULL,
                            mschemas.data, mtables.data, mcolumns.data};
    PGresult *res = PQexecParams(conn, DISCOVER_SQL, 7, NULL, params, NULL, NULL, 0);
    wp_buf_free(&xschemas);
    wp_buf_free(&xtables);
    wp_buf_free(&mschemas);
    wp_buf_free(&mtables);
    wp_buf_free(&mcolumns);
    return res;
}

/* Logs that a table cannot be mirrored, once per process (named is the caller's set). */
static void name_problem(const char *source, const char *schema, const char *table, const char *problem,
                         wp_buf_t *named)
{
    wp_buf_t tag = WP_BUF_INIT;
    wp_buf_printf(&tag, "\n%zu:%s%zu:%s%zu:%s\n", strlen(source), source, strlen(schema), schema, strlen(table),
                  table);
    if (named->data == NULL || strstr(named->data, tag.data) == NULL) {
        wp_warn("table \"%s\".\"%s\" of source \"%s\" cannot be mirrored: %s", schema, table, source, problem);
        wp_buf_puts(named, tag.data + (named->len && named->data[named->len - 1] == '\n' ? 1 : 0));
    }
    wp_buf_free(&tag);
}

static bool in_result(const PGresult *res, const char *schema, const char *table)
{
    for (int r = 0; r < PQntuples(res); r++)
        if (strcmp(PQgetvalue(res, r, 0), schema) == 0 && strcmp(PQgetvalue(res, r, 1), table) == 0)
            return true;
    return false;
}

int wp_keys_discover(const wp_source_config_t *source, PGconn *staging, wp_buf_t *named)
{
    return wp_keys_discover_tables(source, staging, named, NULL, 0, false);
}

int wp_keys_discover_tables(const wp_source_config_t *source, PGconn *staging, wp_buf_t *named,
                            const wp_keys_request_t *req, size_t nreq, bool only)
{
    int rc = -1;
    PGresult *res = NULL, *ins = NULL;
    wp_buf_t schemas = WP_BUF_INIT, tables = WP_BUF_INIT;
    PGconn *conn = wp_pg_connect_source(source->conninfo, "walpipe_discover");
    bool in_txn = false;

    if (PQstatus(conn) != CONNECTION_OK) {
        wp_warn("could not connect to source \"%s\" to read its tables' keys: %s", source->name,
                PQerrorMessage(conn));
        goto out;
    }
    bool filtered = table_filter(source, req, nreq, only, &schemas, &tables);
    res = exec_discover(conn, source, filtered ? schemas.data : NULL, filtered ? tables.data : NULL);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_warn("could not read the keys of source \"%s\"'s tables: %s", source->name, PQerrorMessage(conn));
        goto out;
    }
    if (wp_pg_exec(staging, "staging", "BEGIN", "begin recording table keys") != 0)
        goto out;
    in_txn = true;
    for (int r = 0; r < PQntuples(res); r++) {
        const char *identity = PQgetvalue(res, r, 2);
        bool has_key = !PQgetisnull(res, r, 3);
        const char *problem = key_problem(identity, has_key);
        const char *p[] = {source->name,
                           PQgetvalue(res, r, 0),
                           PQgetvalue(res, r, 1),
                           identity,
                           has_key ? PQgetvalue(res, r, 3) : NULL,
                           PQgetisnull(res, r, 4) ? NULL : PQgetvalue(res, r, 4),
                           problem};
        ins = PQexecParams(staging,
                           "INSERT INTO walpipe.source_tables AS s (source, schema_name, table_name, replica_identity, "
                           "key_columns, not_null_columns, problem) VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7) "
                           "ON CONFLICT (source, schema_name, table_name) DO UPDATE SET replica_identity = "
                           "excluded.replica_identity, key_columns = excluded.key_columns, not_null_columns = "
                           "excluded.not_null_columns, problem = excluded.problem, discovered_at = now()",
                           7, NULL, p, NULL, NULL, 0);
        if (PQresultStatus(ins) != PGRES_COMMAND_OK) {
            wp_warn("staging: could not record the key of \"%s\".\"%s\": %s", p[1], p[2], PQerrorMessage(staging));
            goto out;
        }
        PQclear(ins);
        ins = NULL;
        if (problem)
            name_problem(source->name, p[1], p[2], problem, named);
    }
    /*
     * A requested table that the catalog does not hold: its changes were
     * staged, so it existed, and it is gone.  Recorded with that problem, so
     * that its events are parked with the true reason instead of waiting for
     * a key that will never come.  A row recorded while it existed (with its
     * key) stays: the mirror goes on applying the changes it had.
     */
    for (size_t i = 0; i < nreq; i++) {
        if (in_result(res, req[i].schema, req[i].table))
            continue;
        const char *p[] = {source->name, req[i].schema, req[i].table, GONE_PROBLEM};
        ins = PQexecParams(staging,
                           "INSERT INTO walpipe.source_tables (source, schema_name, table_name, replica_identity, "
                           "problem) VALUES ($1, $2, $3, 'gone', $4) ON CONFLICT DO NOTHING",
                           4, NULL, p, NULL, NULL, 0);
        if (PQresultStatus(ins) != PGRES_COMMAND_OK) {
            wp_warn("staging: could not record that \"%s\".\"%s\" is gone: %s", p[1], p[2], PQerrorMessage(staging));
            goto out;
        }
        bool recorded = strcmp(PQcmdTuples(ins), "1") == 0;
        PQclear(ins);
        ins = NULL;
        if (recorded)
            name_problem(source->name, p[1], p[2], GONE_PROBLEM, named);
    }
    in_txn = false;
    if (wp_pg_exec(staging, "staging", "COMMIT", "commit the table keys") != 0)
        goto out;
    wp_debug("recorded the keys of %d table(s) of source \"%s\"", PQntuples(res), source->name);
    rc = 0;
out:
    if (in_txn)
        PQclear(PQexec(staging, "ROLLBACK"));
    PQclear(ins);
    PQclear(res);
    PQfinish(conn);
    wp_buf_free(&schemas);
    wp_buf_free(&tables);
    return rc;
}

PGresult *wp_keys_read(PGconn *conn, const wp_source_config_t *source)
{
    wp_buf_t schemas = WP_BUF_INIT, tables = WP_BUF_INIT;
    bool filtered = table_filter(source, NULL, 0, false, &schemas, &tables);
    PGresult *res = exec_discover(conn, source, filtered ? schemas.data : NULL, filtered ? tables.data : NULL);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_warn("could not read the keys of source \"%s\"'s tables: %s", source->name, PQerrorMessage(conn));
        PQclear(res);
        res = NULL;
    }
    wp_buf_free(&schemas);
    wp_buf_free(&tables);
    return res;
}

const char *wp_keys_problem(const char *identity, bool has_key)
{
    return key_problem(identity, has_key);
}

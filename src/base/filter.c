/*
 * filter.c: a source's column filters and masks, compiled once and applied
 * per change (decoder.c calls wp_filter_column for each column of a table
 * that has rules; the reader passes exclude_tables to wal2json as
 * filter-tables and the snapshot skips them).  In base, because what else
 * copies the source's columns or values into staging (catalog reads in
 * apply/, verify and check in ops/) must apply the same rules.
 *
 * Job: hold each [table] section's include / exclude / mask lists, answer
 * "what becomes of this column", hash masked values, and refuse at start
 * rules that touch a table's key (the mirror and the replica identity need
 * the key's real values).
 *
 * Invariant: the filter is immutable after wp_filter_create, so threads
 * share it without locks; the salt it holds is never logged.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "filter.h"
#include "log.h"
#include "mem.h"

struct wp_filter_table {
    char *schema;
    char *table;
    char **include; /* NULL = all columns */
    size_t ninclude;
    char **exclude;
    size_t nexclude;
    char **mask_columns;
    wp_mask_kind_t *mask_kinds;
    size_t nmasks;
    int line;
};

struct wp_filter {
    char *source;
    wp_table_ref_t *excluded; /* exclude_tables */
    size_t nexcluded;
    char *salt; /* NULL when no sha256 mask; a secret */
    size_t salt_len;
    wp_filter_table_t *tables;
    size_t ntables;
};

static char **copy_names(char *const *names, size_t n)
{
    if (names == NULL)
        return NULL;
    char **out = wp_calloc(n ? n : 1, sizeof *out);
    for (size_t i = 0; i < n; i++)
        out[i] = wp_strdup(names[i]);
    return out;
}

static void free_names(char **names, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
}

wp_filter_t *wp_filter_create(const wp_source_config_t *source)
{
    wp_filter_t *filter = wp_calloc(1, sizeof *filter);
    filter->source = wp_strdup(source->name);
    filter->nexcluded = source->nexclude_tables;
    filter->excluded = wp_calloc(source->nexclude_tables ? source->nexclude_tables : 1, sizeof *filter->excluded);
    for (size_t i = 0; i < source->nexclude_tables; i++) {
        filter->excluded[i].schema = wp_strdup(source->exclude_tables[i].schema);
        filter->excluded[i].table = wp_strdup(source->exclude_tables[i].table);
    }
    if (source->mask_salt) {
        filter->salt = wp_strdup(source->mask_salt);
        filter->salt_len = strlen(source->mask_salt);
    }
    filter->ntables = source->nrules;
    filter->tables = wp_calloc(source->nrules ? source->nrules : 1, sizeof *filter->tables);
    for (size_t i = 0; i < source->nrules; i++) {
        const wp_table_rule_t *rule = &source->rules[i];
        wp_filter_table_t *t = &filter->tables[i];
        t->schema = wp_strdup(rule->schema);
        t->table = wp_strdup(rule->table);
        t->include = copy_names(rule->include, rule->ninclude);
        t->ninclude = rule->ninclude;
        t->exclude = copy_names(rule->exclude, rule->nexclude);
        t->nexclude = rule->nexclude;
        t->nmasks = rule->nmasks;
        t->mask_columns = wp_calloc(rule->nmasks ? rule->nmasks : 1, sizeof *t->mask_columns);
        t->mask_kinds = wp_calloc(rule->nmasks ? rule->nmasks : 1, sizeof *t->mask_kinds);
        for (size_t k = 0; k < rule->nmasks; k++) {
            t->mask_columns[k] = wp_strdup(rule->masks[k].column);
            t->mask_kinds[k] = rule->masks[k].kind;
        }
        t->line = rule->line;
    }
    return filter;
}

void wp_filter_destroy(wp_filter_t *filter)
{
    if (filter == NULL)
        return;
    for (size_t i = 0; i < filter->ntables; i++) {
        wp_filter_table_t *t = &filter->tables[i];
        free(t->schema);
        free(t->table);
        free_names(t->include, t->ninclude);
        free_names(t->exclude, t->nexclude);
        free_names(t->mask_columns, t->nmasks);
        free(t->mask_kinds);
    }
    free(filter->tables);
    for (size_t i = 0; i < filter->nexcluded; i++) {
        free(filter->excluded[i].schema);
        free(filter->excluded[i].table);
    }
    free(filter->excluded);
    if (filter->salt) {
        memset(filter->salt, 0, filter->salt_len);
        free(filter->salt);
    }
    free(filter->source);
    free(filter);
}

static bool same(const char *s, const char *text, size_t len)
{
    return strncmp(s, text, len) == 0 && s[len] == '\0';
}

const wp_filter_table_t *wp_filter_table(const wp_filter_t *filter, const char *schema, size_t slen,
                                         const char *table, size_t tlen)
{
    if (filter == NULL)
        return NULL;
    for (size_t i = 0; i < filter->ntables; i++) {
        const wp_filter_table_t *t = &filter->tables[i];
        if (same(t->schema, schema, slen) && same(t->table, table, tlen))
            return t;
    }
    return NULL;
}

bool wp_filter_has_rules(const wp_filter_t *filter)
{
    return filter != NULL && filter->ntables > 0;
}

static bool listed(char *const *names, size_t n, const char *name, size_t len)
{
    for (size_t i = 0; i < n; i++)
        if (same(names[i], name, len))
            return true;
    return false;
}

wp_filter_action_t wp_filter_column(const wp_filter_table_t *table, const char *name, size_t len)
{
    if (table == NULL)
        return WP_FILTER_KEEP;
    if (table->include && !listed(table->include, table->ninclude, name, len))
        return WP_FILTER_DROP;
    if (listed(table->exclude, table->nexclude, name, len))
        return WP_FILTER_DROP;
    for (size_t i = 0; i < table->nmasks; i++) {
        if (!same(table->mask_columns[i], name, len))
            continue;
        switch (table->mask_kinds[i]) {
        case WP_MASK_SHA256:
            return WP_FILTER_SHA256;
        case WP_MASK_REDACT:
            return WP_FILTER_REDACT;
        case WP_MASK_NULL:
            return WP_FILTER_NULL;
        }
    }
    return WP_FILTER_KEEP;
}

void wp_filter_sha256(const wp_filter_t *filter, const char *prefix, const char *text, size_t len,
                      char out[WP_FILTER_SHA256_HEX + 1])
{
    static const char hex[] = "0123456789abcdef";
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();

    /* Only allocation can fail here, and walpipe treats running out of memory as fatal (mem.h). */
    if (ctx == NULL || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1 ||
        (filter->salt && EVP_DigestUpdate(ctx, filter->salt, filter->salt_len) != 1) ||
        (prefix && EVP_DigestUpdate(ctx, prefix, strlen(prefix)) != 1) || EVP_DigestUpdate(ctx, text, len) != 1 ||
        EVP_DigestFinal_ex(ctx, md, &mdlen) != 1 || mdlen * 2 != WP_FILTER_SHA256_HEX) {
        wp_error("could not compute a SHA-256 digest (OpenSSL); out of memory?");
        abort();
    }
    EVP_MD_CTX_free(ctx);
    for (unsigned int i = 0; i < mdlen; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 0x0F];
    }
    out[WP_FILTER_SHA256_HEX] = '\0';
}

bool wp_filter_catalog_column(const wp_filter_t *filter, const char *schema, const char *table, const char *column,
                              const char **type, const char **value, char digest[WP_FILTER_SHA256_HEX + 1])
{
    for (size_t i = 0; i < filter->nexcluded; i++)
        if (strcmp(filter->excluded[i].schema, schema) == 0 && strcmp(filter->excluded[i].table, table) == 0)
            return false;
    const wp_filter_table_t *t = wp_filter_table(filter, schema, strlen(schema), table, strlen(table));
    switch (wp_filter_column(t, column, strlen(column))) {
    case WP_FILTER_KEEP:
        return true;
    case WP_FILTER_DROP:
        return false;
    case WP_FILTER_NULL:
        *value = NULL;
        return true;
    case WP_FILTER_REDACT:
        *type = "text";
        if (*value)
            *value = WP_FILTER_REDACTED;
        return true;
    case WP_FILTER_SHA256:
        *type = "text";
        if (*value) {
            wp_filter_sha256(filter, NULL, *value, strlen(*value), digest);
            *value = digest;
        }
        return true;
    }
    return true;
}

/*
 * The key columns of one table: the key its mirror is keyed on (keys.c: the
 * replica identity index, else the primary key, else the first unique index;
 * each valid, immediate, non-partial, on plain NOT NULL columns), and the
 * key wal2json sends as the UPDATE/DELETE identity (the primary key under
 * REPLICA IDENTITY DEFAULT, the index under USING INDEX).  Simple query
 * protocol: conn may be a replication connection.
 */
static const char KEY_SQL_HEAD[] =
    "WITH c AS (SELECT c.oid, c.relreplident FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = %s AND c.relname = %s), "
    "k AS ((SELECT DISTINCT ON (c.oid) i.indexrelid FROM c JOIN pg_index i ON i.indrelid = c.oid "
    "WHERE i.indisunique AND i.indisvalid AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL "
    "AND NOT EXISTS (SELECT FROM unnest(i.indkey) k(attnum) JOIN pg_attribute b ON b.attrelid = c.oid "
    "AND b.attnum = k.attnum WHERE NOT b.attnotnull) "
    "ORDER BY c.oid, i.indisreplident DESC, i.indisprimary DESC, i.indexrelid) "
    "UNION SELECT i.indexrelid FROM c JOIN pg_index i ON i.indrelid = c.oid "
    "WHERE (c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident)) "
    "SELECT DISTINCT a.attname, CASE WHEN i.indisprimary THEN 'primary key' WHEN i.indisreplident THEN "
    "'replica identity index' ELSE 'unique index (the key of its mirror)' END FROM k "
    "JOIN pg_index i ON i.indexrelid = k.indexrelid JOIN pg_attribute a ON a.attrelid = i.indrelid "
    "AND a.attnum = ANY (i.indkey) AND a.attnum > 0 ORDER BY 1, 2";

/* Appends '(schema, table)' as SQL literals; false (problem set) if they cannot be quoted. */
static bool put_pair(PGconn *conn, wp_buf_t *sql, const char *schema, const char *table, wp_buf_t *problem)
{
    char *s = PQescapeLiteral(conn, schema, strlen(schema));
    char *t = PQescapeLiteral(conn, table, strlen(table));
    bool ok = s != NULL && t != NULL;
    if (ok)
        wp_buf_printf(sql, "(%s, %s)", s, t);
    else
        wp_buf_printf(problem, "could not quote the name of table \"%s\".\"%s\": %s", schema, table,
                      PQerrorMessage(conn));
    PQfreemem(s);
    PQfreemem(t);
    return ok;
}

/*
 * A partitioned table named in exclude_tables or a [table] section would
 * filter nothing: wal2json reports its rows under its partitions' names (and
 * the snapshot copies the partitions).  Returns 1 (problem and fix set) for
 * the first one, 0 when there is none, -1 when the catalog could not be read.
 */
static int partitioned_named(const wp_filter_t *filter, PGconn *conn, wp_buf_t *problem, wp_buf_t *fix)
{
    int rc = -1;
    wp_buf_t sql = WP_BUF_INIT;
    PGresult *res = NULL;

    if (filter->nexcluded + filter->ntables == 0)
        return 0;
    wp_buf_puts(&sql, "SELECT w.s, w.t, (SELECT string_agg(format('%I.%I', pn.nspname, pc.relname), ', ' ORDER BY "
                      "pn.nspname, pc.relname) FROM pg_partition_tree(c.oid) p JOIN pg_class pc ON pc.oid = p.relid "
                      "JOIN pg_namespace pn ON pn.oid = pc.relnamespace WHERE p.isleaf) FROM (VALUES ");
    for (size_t i = 0; i < filter->nexcluded + filter->ntables; i++) {
        bool ex = i < filter->nexcluded;
        const char *schema = ex ? filter->excluded[i].schema : filter->tables[i - filter->nexcluded].schema;
        const char *table = ex ? filter->excluded[i].table : filter->tables[i - filter->nexcluded].table;
        if (i)
            wp_buf_puts(&sql, ", ");
        if (!put_pair(conn, &sql, schema, table, problem))
            goto out;
    }
    wp_buf_puts(&sql, ") AS w(s, t) JOIN pg_namespace n ON n.nspname = w.s JOIN pg_class c ON c.relnamespace = n.oid "
                      "AND c.relname = w.t WHERE c.relkind = 'p' LIMIT 1");
    res = PQexec(conn, sql.data);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_buf_printf(problem, "could not read which filtered tables are partitioned: %s", PQerrorMessage(conn));
        goto out;
    }
    rc = 0;
    if (PQntuples(res) == 0)
        goto out;
    wp_buf_printf(problem,
                  "table \"%s\".\"%s\" is partitioned, so exclude_tables or a [table] section naming it filters "
                  "nothing: wal2json reports its rows under its partitions' names",
                  PQgetvalue(res, 0, 0), PQgetvalue(res, 0, 1));
    wp_buf_printf(fix, "name its partitions instead (%s)", PQgetisnull(res, 0, 2) ? "none yet" : PQgetvalue(res, 0, 2));
    rc = 1;
out:
    PQclear(res);
    wp_buf_free(&sql);
    return rc;
}

int wp_filter_key_conflict(const wp_filter_t *filter, PGconn *conn, wp_buf_t *problem, wp_buf_t *fix)
{
    int rc = partitioned_named(filter, conn, problem, fix);
    wp_buf_t sql = WP_BUF_INIT;
    PGresult *res = NULL;

    if (rc != 0)
        goto out;
    rc = -1;
    for (size_t i = 0; i < filter->ntables; i++) {
        const wp_filter_table_t *t = &filter->tables[i];
        char *schema = PQescapeLiteral(conn, t->schema, strlen(t->schema));
        char *table = PQescapeLiteral(conn, t->table, strlen(t->table));
        if (schema == NULL || table == NULL) {
            wp_buf_printf(problem, "could not quote the name of table \"%s\".\"%s\": %s", t->schema, t->table,
                          PQerrorMessage(conn));
            PQfreemem(schema);
            PQfreemem(table);
            goto out;
        }
        wp_buf_reset(&sql);
        wp_buf_printf(&sql, KEY_SQL_HEAD, schema, table);
        PQfreemem(schema);
        PQfreemem(table);
        PQclear(res);
        res = PQexec(conn, sql.data);
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            wp_buf_printf(problem, "could not read the key of table \"%s\".\"%s\": %s", t->schema, t->table,
                          PQerrorMessage(conn));
            goto out;
        }
        for (int r = 0; r < PQntuples(res); r++) {
            const char *column = PQgetvalue(res, r, 0);
            wp_filter_action_t action = wp_filter_column(t, column, strlen(column));
            if (action == WP_FILTER_KEEP)
                continue;
            wp_buf_printf(problem,
                          "column \"%s\" of table \"%s\".\"%s\" is in its %s, so it cannot be %s: the mirror and the "
                          "replica identity match rows by the key's real values",
                          column, t->schema, t->table, PQgetvalue(res, r, 1),
                          action == WP_FILTER_DROP ? "excluded" : "masked");
            const char *how = action != WP_FILTER_DROP ? "remove its mask"
                              : t->include           ? "add it to include_columns"
                                                     : "remove it from exclude_columns";
            wp_buf_printf(fix, "%s in [table %s.%s.%s] (line %d) of the configuration, or key the table on other "
                          "columns",
                          how,
                          filter->source, t->schema, t->table, t->line);
            rc = 1;
            goto out;
        }
    }
    rc = 0;
out:
    PQclear(res);
    wp_buf_free(&sql);
    return rc;
}

int wp_filter_check_keys(const wp_filter_t *filter, PGconn *conn)
{
    wp_buf_t problem = WP_BUF_INIT, fix = WP_BUF_INIT;
    int rc = wp_filter_key_conflict(filter, conn, &problem, &fix);
    if (rc > 0)
        wp_error("source \"%s\": %s; hint: %s", filter->source, problem.data, fix.data);
    else if (rc < 0)
        wp_error("source \"%s\": %s", filter->source, problem.data);
    wp_buf_free(&problem);
    wp_buf_free(&fix);
    return rc;
}

/*
 * pg.c: shared libpq chores (see pg.h).
 *
 * Invariant: each failure is logged once, here; values always travel as
 * parameters or through the literal builders below, never spliced into SQL.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <string.h>

#include "log.h"
#include "migrate.h"
#include "pg.h"

PGconn *wp_pg_connect(const char *conninfo, const char *appname, const char *options, const char *what)
{
    const char *keys[] = {"dbname", "application_name", options ? "options" : NULL, NULL};
    const char *vals[] = {conninfo, appname, options, NULL};
    PGconn *conn = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(conn) != CONNECTION_OK) {
        wp_error("could not connect to %s: %s", what, PQerrorMessage(conn));
        PQfinish(conn);
        return NULL;
    }
    return conn;
}

int wp_pg_exec(PGconn *conn, const char *peer, const char *sql, const char *what)
{
    PGresult *res = PQexec(conn, sql);
    ExecStatusType st = PQresultStatus(res);
    int rc = (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) ? 0 : -1;
    if (rc != 0)
        wp_error("%s: could not %s: %s", peer, what, PQerrorMessage(conn));
    PQclear(res);
    return rc;
}

void wp_pg_text_array(wp_buf_t *out, const char *const *items, size_t n)
{
    wp_buf_putc(out, '{');
    for (size_t i = 0; i < n; i++) {
        wp_buf_puts(out, i ? ",\"" : "\"");
        for (const char *v = items[i]; *v; v++) {
            if (*v == '"' || *v == '\\')
                wp_buf_putc(out, '\\');
            wp_buf_putc(out, *v);
        }
        wp_buf_putc(out, '"');
    }
    wp_buf_putc(out, '}');
}

void wp_pg_int8_array(wp_buf_t *out, const int64_t *ids, size_t n)
{
    wp_buf_putc(out, '{');
    for (size_t i = 0; i < n; i++)
        wp_buf_printf(out, "%s%lld", i ? "," : "", (long long)ids[i]);
    wp_buf_putc(out, '}');
}

wp_staging_check_t wp_pg_connect_staging(const wp_config_t *config, const char *appname, const char *options,
                                         bool old_schema_is_error, PGconn **out)
{
    wp_staging_check_t rc = WP_STAGING_UNREACHABLE;
    *out = NULL;
    PGconn *conn = wp_pg_connect(config->staging_conninfo, appname, options, "staging");
    if (conn == NULL)
        return rc;
    int version = wp_migrate_staging_version(conn);
    if (version < 0) {
        wp_error("staging: could not read the schema version: %s", PQerrorMessage(conn));
    } else if (version < wp_migrate_latest_version()) {
        rc = WP_STAGING_OLD_SCHEMA;
        if (old_schema_is_error)
            wp_error("staging schema is at version %d but this walpipe needs %d; hint: run `walpipe init --config %s`",
                     version, wp_migrate_latest_version(), config->path ? config->path : "FILE");
    } else {
        rc = WP_STAGING_OK;
        *out = conn;
        conn = NULL;
    }
    PQfinish(conn);
    return rc;
}

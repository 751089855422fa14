/*
 * pg.c: shared libpq chores (see pg.h).
 *
 * Invariant: each failure is logged once, here; values always travel as
 * parameters or through the literal builders below, never spliced into SQL.
 */
#include "wp_setup.h"

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "migrate.h"
#include "pg.h"
#include "runtime.h"

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

PGconn *wp_pg_connect_source(const char *conninfo, const char *appname)
{
    /* later keys win: these override the conninfo's own */
    const char *keys[] = {"dbname", "application_name", "connect_timeout", "client_encoding", NULL};
    const char *vals[] = {conninfo, appname, "10", "UTF8", NULL};
    return PQconnectdbParams(keys, vals, 1);
}

/* True if p starts a SQLSTATE as libpq's verbose format prints it: five of [0-9A-Z], then ": ". */
static bool at_sqlstate(const char *p)
{
    for (int i = 0; i < 5; i++)
        if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'A' && p[i] <= 'Z')))
            return false;
    return p[5] == ':' && p[6] == ' ';
}

/*
 * Fills err from a failed connection's verbose message.  Each server error in
 * it reads "SEVERITY:  SQLSTATE: primary text" (the severity may be
 * translated, the layout is not); with several hosts the last one counts.
 * The message keeps the text without the SQLSTATE token and LOCATION lines.
 */
static void read_conn_error(PGconn *conn, wp_pg_conn_error_t *err)
{
    const char *msg = conn ? PQerrorMessage(conn) : "out of memory";
    size_t out = 0;
    bool line_start = true, skip_line = false;
    err->sqlstate[0] = '\0';
    err->needs_password = conn != NULL && PQconnectionNeedsPassword(conn);
    for (const char *p = msg; *p; p++) {
        if (line_start)
            skip_line = strncmp(p, "LOCATION:", 9) == 0;
        line_start = *p == '\n';
        if (p[0] == ':' && p[1] == ' ' && p[2] == ' ' && at_sqlstate(p + 3)) {
            memcpy(err->sqlstate, p + 3, 5);
            err->sqlstate[5] = '\0';
            if (!skip_line && out + 3 < sizeof err->message) {
                memcpy(err->message + out, ":  ", 3);
                out += 3;
            }
            p += 3 + 7 - 1; /* past ":  XXXXX: " */
            continue;
        }
        if (skip_line)
            continue;
        if (out + 1 < sizeof err->message)
            err->message[out++] = (*p == '\n' || *p == '\t') ? ' ' : *p;
    }
    while (out > 0 && err->message[out - 1] == ' ')
        out--;
    err->message[out] = '\0';
}

/* connect_timeout of conn's options in ms (libpq's rule: at least 2 s), or -1 when there is none. */
static int64_t connect_timeout_ms(PGconn *conn)
{
    int64_t ms = -1;
    PQconninfoOption *opts = PQconninfo(conn);
    for (PQconninfoOption *o = opts; o && o->keyword; o++) {
        if (strcmp(o->keyword, "connect_timeout") == 0 && o->val && *o->val) {
            long s = strtol(o->val, NULL, 10);
            if (s > 0)
                ms = (s < 2 ? 2 : s) * 1000LL;
        }
    }
    PQconninfoFree(opts);
    return ms;
}

PGconn *wp_pg_connect_params(const char *const *keys, const char *const *vals, wp_pg_conn_error_t *err)
{
    PGconn *conn = PQconnectStartParams(keys, vals, 1);
    if (conn == NULL || PQstatus(conn) == CONNECTION_BAD)
        goto fail;
    /* before the first message from the server: it is built in this format */
    PQsetErrorVerbosity(conn, PQERRORS_VERBOSE);
    int64_t timeout = connect_timeout_ms(conn);
    int64_t deadline = timeout < 0 ? -1 : wp_now_ms() + timeout;
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    while (st != PGRES_POLLING_OK) {
        if (st == PGRES_POLLING_FAILED)
            goto fail;
        struct pollfd pfd = {.fd = PQsocket(conn), .events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT};
        int ready = 0;
        while (ready == 0) {
            if (wp_stop_requested() || (deadline >= 0 && wp_now_ms() >= deadline)) {
                snprintf(err->message, sizeof err->message, "%s",
                         wp_stop_requested() ? "stop requested while connecting" : "timeout expired while connecting");
                err->sqlstate[0] = '\0';
                err->needs_password = false;
                PQfinish(conn);
                return NULL;
            }
            ready = pfd.fd < 0 ? 1 : poll(&pfd, 1, 100);
            if (ready < 0)
                ready = 1; /* EINTR and the like: let libpq look */
        }
        st = PQconnectPoll(conn);
    }
    PQsetErrorVerbosity(conn, PQERRORS_DEFAULT);
    return conn;
fail:
    read_conn_error(conn, err);
    PQfinish(conn);
    return NULL;
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

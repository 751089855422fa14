/*
 * check.c: `walpipe check`: the production checklist as a command.
 *
 * Job: for every source, then for staging, run each check of README's
 * "What the source needs" and print one line per check: pass, warn or fail,
 * what was found and, unless it passed, the fix.  A source: reachable (the
 * connection's SQLSTATE decides the fix, as in reader.c), wal_level, the
 * role's REPLICATION, a replication connection, free replication slots and
 * WAL senders (walpipe's own slot, when it exists, counted as present),
 * wal2json (a temporary slot proves it loads and takes walpipe's options),
 * wal_sender_timeout against status_interval_ms, max_slot_wal_keep_size,
 * walpipe's slot, and each captured table's key and replica identity (the
 * key rules are keys.c's, called, not copied).  Staging: reachable, schema
 * version, the right to create the mirror schema.
 *
 * Invariant: read-only on every database, but for the probe's temporary
 * slot (dropped at once, and with the session anyway); a check that cannot
 * run because an earlier one failed says so instead of guessing.  Nothing
 * printed holds a password or a full conninfo (host, port, dbname and user
 * at most, wp_config_conninfo_redacted); every line is one line of valid
 * UTF-8 whatever a server or a table name holds (wp_log_sanitize).
 */
#include "wp_setup.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>
#include <libpq-fe.h>

#include <walpipe/walpipe.h>

#include "check.h"
#include "filter.h"
#include "keys.h"
#include "log.h"
#include "mem.h"
#include "migrate.h"
#include "pg.h"

typedef enum check_status {
    CHECK_PASS = 0,
    CHECK_WARN = 1,
    CHECK_FAIL = 2,
} check_status_t;

static const char *const status_names[] = {"pass", "warn", "fail"};

typedef struct check_ctx {
    const wp_config_t *config;
    bool json;
    int counts[3];
    const char *source; /* the source being checked; NULL: staging */
} check_ctx_t;

/* Connections give up after this long: a check must end, whatever the network does. */
#define CONNECT_TIMEOUT "10"
/* A statement of a check (the slot probe waits for open transactions) gives up after this long. */
#define STATEMENT_TIMEOUT_MS 15000

/*
 * The options walpipe's reader gives wal2json: reader.c's START_REPLICATION,
 * plus include-column-positions (the decoder's column positions), all in
 * wal2json 2.5.  Keep in step with reader.c.
 */
static const char *const WAL2JSON_OPTIONS[] = {"format-version",   "2", "include-xids",      "1",
                                               "include-timestamp", "1", "include-lsn",       "1",
                                               "include-type-oids", "1", "include-column-positions", "1"};

/* The output plugin of src's slot, as pg_replication_slots names it. */
static const char *plugin_name(const wp_source_config_t *src)
{
    return src->plugin == WP_PLUGIN_PGOUTPUT ? "pgoutput" : "wal2json";
}

/* Copies src into a new buffer scrubbed to one line of valid UTF-8 (caller frees). */
static char *scrubbed(const char *src)
{
    char *s = wp_strdup(src ? src : "");
    wp_log_sanitize(s);
    size_t n = strlen(s);
    while (n > 0 && s[n - 1] == ' ')
        s[--n] = '\0';
    return s;
}

/* Prints one check's line; fix is NULL when there is nothing to do. */
static void report(check_ctx_t *ctx, check_status_t st, const char *check, const char *fix, const char *fmt, ...)
    WP_PRINTF(5, 6);

static void report(check_ctx_t *ctx, check_status_t st, const char *check, const char *fix, const char *fmt, ...)
{
    char raw[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(raw, sizeof raw, fmt, ap);
    va_end(ap);
    char *msg = scrubbed(raw);
    char *fx = fix ? scrubbed(fix) : NULL;
    ctx->counts[st]++;
    if (ctx->json) {
        char *src = ctx->source ? scrubbed(ctx->source) : NULL;
        json_t *o = json_object();
        json_object_set_new(o, "scope", json_string(ctx->source ? "source" : "staging"));
        json_object_set_new(o, "source", src ? json_string(src) : json_null());
        json_object_set_new(o, "check", json_string(check));
        json_object_set_new(o, "status", json_string(status_names[st]));
        json_object_set_new(o, "message", json_string(msg));
        json_object_set_new(o, "fix", fx ? json_string(fx) : json_null());
        char *text = json_dumps(o, JSON_COMPACT);
        printf("%s\n", text);
        free(text);
        json_decref(o);
        free(src);
    } else if (fx && st != CHECK_PASS) {
        printf("  %-4s  %-22s %s; fix: %s\n", status_names[st], check, msg, fx);
    } else {
        printf("  %-4s  %-22s %s\n", status_names[st], check, msg);
    }
    fflush(stdout);
    free(msg);
    free(fx);
}

/* Prints the header of a source's or staging's checks (text only): its name and where it is, redacted. */
static void header(const check_ctx_t *ctx, const char *what, const char *conninfo)
{
    if (ctx->json)
        return;
    char *where = wp_config_conninfo_redacted(conninfo);
    char *w = scrubbed(where);
    printf("%s (%s)\n", what, w);
    free(w);
    free(where);
}

/*
 * Opens a connection to conninfo (plus the given replication mode, or
 * NULL), with a connect timeout (unless the conninfo sets one), UTF8 names
 * and a statement timeout.  NULL with *err filled when it fails.
 */
static PGconn *connect_to(const char *conninfo, const char *replication, wp_pg_conn_error_t *err)
{
    char options[64];
    snprintf(options, sizeof options, "-c statement_timeout=%d", STATEMENT_TIMEOUT_MS);
    /* connect_timeout before dbname: a timeout the conninfo gives wins over this default */
    const char *keys[] = {"connect_timeout", "dbname", "application_name", "client_encoding", "options",
                          replication ? "replication" : NULL, NULL};
    const char *vals[] = {CONNECT_TIMEOUT, conninfo, "walpipe_check", "UTF8", options, replication, NULL};
    return wp_pg_connect_params(keys, vals, err);
}

/*
 * The fix for a failed connection, by SQLSTATE (reader.c's classification,
 * worded for a checklist); replication: the attempt was a replication
 * connection.
 */
static const char *connect_fix(const wp_pg_conn_error_t *err, bool replication)
{
    const char *s = err->sqlstate;
    if (err->needs_password)
        return "the server asks for a password: give it in the conninfo as password=${VARIABLE}, or in ~/.pgpass";
    if (*s == '\0')
        return "check host and port in the conninfo, and that the server runs and accepts connections there "
               "(listen_addresses, a firewall)";
    if (strcmp(s, "3D000") == 0)
        return "check dbname in the conninfo, or create the database";
    if (strcmp(s, "28P01") == 0)
        return "check the user and password in the conninfo";
    if (strcmp(s, "28000") == 0)
        return replication ? "allow the connection in pg_hba.conf (a replication=database connection matches the "
                             "lines of its database, not the `replication` keyword), and check the user"
                           : "check the user in the conninfo and allow the connection in pg_hba.conf";
    if (strcmp(s, "42501") == 0)
        return replication ? "ALTER ROLE <user> WITH REPLICATION (and GRANT CONNECT ON DATABASE)"
                           : "GRANT CONNECT ON DATABASE <dbname> TO <user>";
    if (strcmp(s, "53300") == 0)
        return replication ? "no WAL sender or connection is free: raise max_wal_senders (and restart), or stop a "
                             "replication client"
                           : "too many connections: raise max_connections, or end idle sessions";
    if (strcmp(s, "57P03") == 0)
        return "the server is starting up, shutting down or recovering: check again once it accepts connections";
    if (strcmp(s, "55000") == 0)
        return "the database does not accept connections (ALTER DATABASE ... ALLOW_CONNECTIONS true)";
    return "see the server's message";
}

/* The server's primary message of a failed result, else libpq's message of conn (report scrubs it to one line). */
static const char *err_message(PGconn *conn, const PGresult *res)
{
    const char *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    return primary ? primary : PQerrorMessage(conn);
}

/* ---- a source ------------------------------------------------------------------------------- */

typedef struct source_facts {
    char version[64];
    char wal_level[32];
    bool in_recovery;
    long max_slots, max_senders;
    long long sender_timeout_ms; /* 0 = disabled */
    long long keep_size_mb;      /* -1 = unbounded */
    bool super, replication;
    char user[128];
    long slots_used, senders_used;
    /* walpipe's slot */
    bool slot_exists, slot_ok_kind, slot_active, slot_lost;
    char slot_type[32], slot_plugin[128], slot_db[128], slot_status[32], slot_pid[32];
    char slot_retained[64], slot_behind[64], slot_safe[64];
} source_facts_t;

static void copy_value(char *dst, size_t n, const PGresult *res, int row, int col)
{
    snprintf(dst, n, "%s", PQgetisnull(res, row, col) ? "" : PQgetvalue(res, row, col));
}

/* Reads the settings, the role and the slots of the source into *f; false after reporting why not. */
static bool read_facts(check_ctx_t *ctx, PGconn *conn, const wp_source_config_t *src, source_facts_t *f)
{
    bool ok = false;
    PGresult *res = PQexec(conn,
                           "SELECT current_setting('server_version'), current_setting('wal_level'), "
                           "pg_is_in_recovery(), current_setting('max_replication_slots')::int, "
                           "current_setting('max_wal_senders')::int, "
                           "(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'), "
                           "(SELECT setting::bigint FROM pg_settings WHERE name = 'max_slot_wal_keep_size'), "
                           "r.rolsuper, r.rolreplication, current_user, "
                           "(SELECT count(*) FROM pg_replication_slots), "
                           "(SELECT count(*) FROM pg_stat_get_wal_senders()) "
                           "FROM pg_roles r WHERE r.rolname = current_user");
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        report(ctx, CHECK_FAIL, "settings", "see the server's message", "could not read the source's settings: %s",
               err_message(conn, res));
        goto out;
    }
    copy_value(f->version, sizeof f->version, res, 0, 0);
    copy_value(f->wal_level, sizeof f->wal_level, res, 0, 1);
    f->in_recovery = PQgetvalue(res, 0, 2)[0] == 't';
    f->max_slots = atol(PQgetvalue(res, 0, 3));
    f->max_senders = atol(PQgetvalue(res, 0, 4));
    f->sender_timeout_ms = atoll(PQgetvalue(res, 0, 5));
    f->keep_size_mb = atoll(PQgetvalue(res, 0, 6));
    f->super = PQgetvalue(res, 0, 7)[0] == 't';
    f->replication = PQgetvalue(res, 0, 8)[0] == 't';
    copy_value(f->user, sizeof f->user, res, 0, 9);
    f->slots_used = atol(PQgetvalue(res, 0, 10));
    f->senders_used = atol(PQgetvalue(res, 0, 11));
    PQclear(res);

    const char *params[] = {src->slot, plugin_name(src)};
    res = PQexecParams(conn,
                       "SELECT slot_type, coalesce(plugin, ''), coalesce(database::text, ''), "
                       "slot_type = 'logical' AND plugin = $2 AND database = current_database(), active, "
                       "coalesce(active_pid::text, ''), coalesce(wal_status, ''), "
                       "CASE WHEN pg_is_in_recovery() THEN '' ELSE "
                       "  coalesce(pg_size_pretty(pg_current_wal_lsn() - restart_lsn), '') END, "
                       "CASE WHEN pg_is_in_recovery() THEN '' ELSE "
                       "  coalesce(pg_size_pretty(pg_current_wal_lsn() - confirmed_flush_lsn), '') END, "
                       "coalesce(pg_size_pretty(safe_wal_size), '') "
                       "FROM pg_replication_slots WHERE slot_name = $1",
                       2, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        report(ctx, CHECK_FAIL, "slot", "see the server's message", "could not look up slot \"%s\": %s", src->slot,
               err_message(conn, res));
        goto out;
    }
    if (PQntuples(res) == 1) {
        f->slot_exists = true;
        copy_value(f->slot_type, sizeof f->slot_type, res, 0, 0);
        copy_value(f->slot_plugin, sizeof f->slot_plugin, res, 0, 1);
        copy_value(f->slot_db, sizeof f->slot_db, res, 0, 2);
        f->slot_ok_kind = PQgetvalue(res, 0, 3)[0] == 't';
        f->slot_active = PQgetvalue(res, 0, 4)[0] == 't';
        copy_value(f->slot_pid, sizeof f->slot_pid, res, 0, 5);
        copy_value(f->slot_status, sizeof f->slot_status, res, 0, 6);
        f->slot_lost = strcmp(f->slot_status, "lost") == 0;
        copy_value(f->slot_retained, sizeof f->slot_retained, res, 0, 7);
        copy_value(f->slot_behind, sizeof f->slot_behind, res, 0, 8);
        copy_value(f->slot_safe, sizeof f->slot_safe, res, 0, 9);
    }
    ok = true;
out:
    PQclear(res);
    return ok;
}

static void check_wal_level(check_ctx_t *ctx, const source_facts_t *f)
{
    if (f->in_recovery)
        report(ctx, CHECK_FAIL, "wal_level",
               "point the conninfo at the primary: PostgreSQL 15 decodes logical replication only there",
               "the source is a standby (in recovery)");
    else if (strcmp(f->wal_level, "logical") == 0)
        report(ctx, CHECK_PASS, "wal_level", NULL, "logical");
    else
        report(ctx, CHECK_FAIL, "wal_level",
               "ALTER SYSTEM SET wal_level = logical, then restart the source (a restart is needed)",
               "wal_level is %s; logical decoding needs logical", f->wal_level);
}

static void check_role(check_ctx_t *ctx, const source_facts_t *f)
{
    if (f->super)
        report(ctx, CHECK_PASS, "replication_privilege", NULL, "role \"%s\" is a superuser", f->user);
    else if (f->replication)
        report(ctx, CHECK_PASS, "replication_privilege", NULL, "role \"%s\" has REPLICATION", f->user);
    else {
        char fix[256];
        snprintf(fix, sizeof fix, "ALTER ROLE \"%s\" WITH REPLICATION", f->user);
        report(ctx, CHECK_FAIL, "replication_privilege", fix,
               "role \"%s\" has neither REPLICATION nor superuser: it can open no replication connection and "
               "create no slot",
               f->user);
    }
}

/* Free replication slots and WAL senders; walpipe's slot (and the WAL sender that holds it) counts as there. */
static void check_capacity(check_ctx_t *ctx, const wp_source_config_t *src, const source_facts_t *f)
{
    const char *extra = "a resync, `walpipe snapshot` or `walpipe verify` each hold one more while they copy";
    long need = f->slot_exists ? 0 : 1;
    long free_slots = f->max_slots - f->slots_used;
    char what[160];
    snprintf(what, sizeof what, "%ld of max_replication_slots = %ld in use (%s)", f->slots_used, f->max_slots,
             f->slot_exists ? "walpipe's slot among them" : "walpipe's slot not created yet");
    if (free_slots < need)
        report(ctx, CHECK_FAIL, "replication_slots",
               "raise max_replication_slots (and restart the source), or drop a slot nobody uses "
               "(SELECT slot_name, active FROM pg_replication_slots)",
               "%s: none is free for slot \"%s\"", what, src->slot);
    else if (free_slots < need + 1)
        report(ctx, CHECK_WARN, "replication_slots", "raise max_replication_slots by one (and restart the source)",
               "%s: none left over, and %s", what, extra);
    else
        report(ctx, CHECK_PASS, "replication_slots", NULL, "%s, %ld free", what, free_slots);

    bool ours = f->slot_exists && f->slot_active;
    need = ours ? 0 : 1;
    long free_senders = f->max_senders - f->senders_used;
    snprintf(what, sizeof what, "%ld of max_wal_senders = %ld in use%s", f->senders_used, f->max_senders,
             ours ? " (one streams from walpipe's slot)" : "");
    if (free_senders < need)
        report(ctx, CHECK_FAIL, "wal_senders",
               "raise max_wal_senders (and restart the source), or stop a replication client",
               "%s: none is free for walpipe", what);
    else if (free_senders < need + 1)
        report(ctx, CHECK_WARN, "wal_senders", "raise max_wal_senders by one (and restart the source)",
               "%s: none left over, and %s", what, extra);
    else
        report(ctx, CHECK_PASS, "wal_senders", NULL, "%s, %ld free", what, free_senders);
}

/* A replication=database connection, as walpipe's reader opens: pg_hba.conf, REPLICATION, a free WAL sender. */
static void check_replication_connection(check_ctx_t *ctx, const wp_source_config_t *src)
{
    wp_pg_conn_error_t err;
    PGconn *conn = connect_to(src->conninfo, "database", &err);
    if (conn == NULL) {
        report(ctx, CHECK_FAIL, "replication_connection", connect_fix(&err, true),
               "a replication connection was refused: %s", err.message);
        return;
    }
    PGresult *res = PQexec(conn, "IDENTIFY_SYSTEM");
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
        report(ctx, CHECK_PASS, "replication_connection", NULL, "accepted (system identifier %s)",
               PQgetvalue(res, 0, 0));
    else
        report(ctx, CHECK_FAIL, "replication_connection", "see the server's message",
               "IDENTIFY_SYSTEM failed: %s", err_message(conn, res));
    PQclear(res);
    PQfinish(conn);
}

/* The SQLSTATE of res, or "". */
static const char *sqlstate_of(const PGresult *res)
{
    const char *s = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    return s ? s : "";
}

/*
 * Does wal2json load, and does it take walpipe's options?  A temporary
 * logical slot with wal2json loads the plugin's library; peeking at it (up
 * to its own consistent point: no change is decoded) runs the plugin's
 * startup, which rejects any option it does not know.  wal2json reports no
 * version (its issue #181), so the version is only bounded: an option that
 * 2.6 added tells 2.6 and later from older ones.
 */
static void check_wal2json(check_ctx_t *ctx, PGconn *conn, const source_facts_t *f)
{
    PGresult *res = NULL;
    char slot[64], lsn[32] = "";
    bool created = false;
    snprintf(slot, sizeof slot, "walpipe_check_%ld", (long)getpid());

    const char *why_not = NULL;
    if (f->in_recovery)
        why_not = "the source is a standby";
    else if (strcmp(f->wal_level, "logical") != 0)
        why_not = "it needs wal_level = logical (above)";
    else if (!f->super && !f->replication)
        why_not = "it needs a role with REPLICATION (above)";
    else if (f->max_slots - f->slots_used < 1)
        why_not = "no replication slot is free for the probe's temporary slot (above)";
    if (why_not) {
        report(ctx, CHECK_WARN, "wal2json", "fix what is named above, then check again",
               "not checked: a temporary slot proves that wal2json loads, and %s", why_not);
        return;
    }

    const char *p1[] = {slot};
    res = PQexecParams(conn, "SELECT lsn FROM pg_create_logical_replication_slot($1, 'wal2json', true)", 1, NULL, p1,
                       NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        const char *s = sqlstate_of(res);
        if (strcmp(s, "58P01") == 0)
            report(ctx, CHECK_FAIL, "wal2json",
                   "install the wal2json output plugin on the source (Debian: apt-get install postgresql-15-wal2json)",
                   "not installed: %s", err_message(conn, res));
        else if (strcmp(s, "57014") == 0)
            report(ctx, CHECK_WARN, "wal2json", "check again once the source's long transactions have ended",
                   "not checked: creating the probe's temporary slot waited over %d s for transactions open on the "
                   "source (a logical slot waits for them; so will walpipe's)",
                   STATEMENT_TIMEOUT_MS / 1000);
        else
            report(ctx, CHECK_WARN, "wal2json", "see the server's message",
                   "not checked: could not create the probe's temporary slot: %s", err_message(conn, res));
        goto out;
    }
    created = true;
    snprintf(lsn, sizeof lsn, "%s", PQgetvalue(res, 0, 0));
    PQclear(res);

    /* $1 slot, $2 upto lsn, then the options as a variadic text[] */
    wp_buf_t opts = WP_BUF_INIT;
    wp_pg_text_array(&opts, WAL2JSON_OPTIONS, sizeof WAL2JSON_OPTIONS / sizeof WAL2JSON_OPTIONS[0]);
    const char *p2[] = {slot, lsn, opts.data};
    res = PQexecParams(conn,
                       "SELECT count(*) FROM pg_logical_slot_peek_changes($1, $2::pg_lsn, NULL, VARIADIC $3::text[])",
                       3, NULL, p2, NULL, NULL, 0);
    wp_buf_free(&opts);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        /* an error drops the temporary slot with it */
        created = false;
        if (strcmp(sqlstate_of(res), "22023") == 0 || strcmp(sqlstate_of(res), "42704") == 0)
            report(ctx, CHECK_FAIL, "wal2json", "install wal2json 2.5 or later on the source",
                   "loads, but rejects an option walpipe uses: %s", err_message(conn, res));
        else
            report(ctx, CHECK_WARN, "wal2json", "see the server's message",
                   "loads, but the probe could not run it: %s", err_message(conn, res));
        goto out;
    }
    PQclear(res);
    const char *p3[] = {slot, lsn};
    res = PQexecParams(conn,
                       "SELECT count(*) FROM pg_logical_slot_peek_changes($1, $2::pg_lsn, NULL, "
                       "'numeric-data-types-as-string', '1')",
                       2, NULL, p3, NULL, NULL, 0);
    if (PQresultStatus(res) == PGRES_TUPLES_OK)
        report(ctx, CHECK_PASS, "wal2json", NULL,
               "loads and accepts walpipe's options; version 2.6 or later (it accepts numeric-data-types-as-string, "
               "added in 2.6; the server does not report the exact version)");
    else if (strcmp(sqlstate_of(res), "22023") == 0) {
        created = false;
        report(ctx, CHECK_PASS, "wal2json", NULL,
               "loads and accepts walpipe's options; version older than 2.6 (it rejects numeric-data-types-as-string, "
               "added in 2.6; the server does not report the exact version)");
    } else {
        created = false;
        report(ctx, CHECK_PASS, "wal2json", NULL,
               "loads and accepts walpipe's options; version unknown (the server does not report it, and the 2.6 "
               "probe failed: %s)",
               err_message(conn, res));
    }
out:
    PQclear(res);
    if (created) {
        res = PQexecParams(conn, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                                 "WHERE slot_name = $1",
                           1, NULL, p1, NULL, NULL, 0);
        PQclear(res); /* a failure leaves it to the end of the session, which drops it too */
    }
}

static void check_sender_timeout(check_ctx_t *ctx, const wp_source_config_t *src, const source_facts_t *f)
{
    long long t = f->sender_timeout_ms, s = src->status_interval_ms;
    char fix[256];
    snprintf(fix, sizeof fix,
             "raise wal_sender_timeout on the source (ALTER SYSTEM SET wal_sender_timeout = '60s'; SELECT "
             "pg_reload_conf()), or lower status_interval_ms in [source %s] below half of it",
             src->name);
    if (t == 0)
        report(ctx, CHECK_PASS, "wal_sender_timeout", NULL,
               "0 (disabled): the walsender never ends a silent connection; a walpipe that vanished holds the slot "
               "until TCP keepalives notice");
    else if (s >= t)
        report(ctx, CHECK_FAIL, "wal_sender_timeout", fix,
               "%lld ms is not above status_interval_ms = %lld: the walsender can end walpipe's connection between "
               "two status updates",
               t, s);
    else if (2 * s > t)
        report(ctx, CHECK_WARN, "wal_sender_timeout", fix,
               "%lld ms is less than twice status_interval_ms = %lld: one late status update (a loaded machine) "
               "ends walpipe's connection",
               t, s);
    else
        report(ctx, CHECK_PASS, "wal_sender_timeout", NULL, "%lld ms; walpipe sends status updates every %lld ms", t,
               s);
}

static void check_keep_size(check_ctx_t *ctx, const source_facts_t *f)
{
    if (f->keep_size_mb < 0)
        report(ctx, CHECK_WARN, "max_slot_wal_keep_size",
               "set max_slot_wal_keep_size to what the source's disk can spare, above the WAL the source writes "
               "during the longest outage of walpipe or staging it must ride out (ALTER SYSTEM SET "
               "max_slot_wal_keep_size = '50GB'; SELECT pg_reload_conf())",
               "-1 (unbounded): a slot that stops advancing (walpipe or staging down) keeps WAL until the source's "
               "disk is full, which stops the source; a bound sacrifices the slot instead (it is invalidated, its "
               "changes are lost, and walpipe needs a new slot and a re-snapshot), the source stays up");
    else
        report(ctx, CHECK_PASS, "max_slot_wal_keep_size", NULL,
               "%lld MB: a slot further behind is invalidated (its changes lost: a new slot and a re-snapshot), "
               "the source's disk does not fill; keep it above the WAL written during the longest outage walpipe "
               "must ride out",
               f->keep_size_mb);
}

static void check_slot(check_ctx_t *ctx, const wp_source_config_t *src, const source_facts_t *f)
{
    char fix[512];
    if (!f->slot_exists) {
        report(ctx, CHECK_PASS, "slot", NULL, "\"%s\" does not exist yet: `walpipe run` creates it%s", src->slot,
               src->snapshot_initial ? " and first copies the tables' rows (snapshot = initial)" : "");
        return;
    }
    if (!f->slot_ok_kind) {
        snprintf(fix, sizeof fix,
                 "name another slot in [source %s] (slot = ...), or drop this one if nobody uses it: SELECT "
                 "pg_drop_replication_slot('%s')",
                 src->name, src->slot);
        report(ctx, CHECK_FAIL, "slot", fix,
               "\"%s\" exists but is not a %s logical slot of this database (type %s, plugin %s, database %s)",
               src->slot, plugin_name(src), f->slot_type, *f->slot_plugin ? f->slot_plugin : "none",
               *f->slot_db ? f->slot_db : "none");
        return;
    }
    char state[96];
    if (f->slot_active)
        snprintf(state, sizeof state, "active (walsender pid %s)", f->slot_pid);
    else
        snprintf(state, sizeof state, "inactive (no walpipe streams from it now)");
    if (f->slot_lost) {
        snprintf(fix, sizeof fix,
                 "drop it (SELECT pg_drop_replication_slot('%s')), then `walpipe run --accept-gap %s` creates a new "
                 "one, and `walpipe snapshot --source %s` copies the tables again",
                 src->slot, src->name, src->name);
        report(ctx, CHECK_FAIL, "slot", fix,
               "\"%s\" has been invalidated (wal_status = lost): the source removed WAL it still needed "
               "(max_slot_wal_keep_size); the changes in it are gone",
               src->slot);
    } else if (strcmp(f->slot_status, "unreserved") == 0) {
        report(ctx, CHECK_WARN, "slot", "make sure `walpipe run` streams from it, now",
               "\"%s\" is %s, wal_status = unreserved: it is so far behind that the next checkpoint removes WAL it "
               "needs unless it advances (safe_wal_size %s)",
               src->slot, state, *f->slot_safe ? f->slot_safe : "?");
    } else {
        report(ctx, CHECK_PASS, "slot", NULL,
               "\"%s\": %s, %s, wal_status = %s, retains %s of WAL, %s behind the source's current WAL%s%s",
               src->slot, plugin_name(src), state, *f->slot_status ? f->slot_status : "?", *f->slot_retained ? f->slot_retained : "?",
               *f->slot_behind ? f->slot_behind : "?", *f->slot_safe ? ", safe_wal_size " : "", f->slot_safe);
    }
}

/*
 * pgoutput (built into the server: nothing to load) reads a publication.
 * A named one must exist; walpipe's own is created with the slot, so it must
 * exist once the slot does.
 */
static void check_publication(check_ctx_t *ctx, PGconn *conn, const wp_source_config_t *src, const source_facts_t *f)
{
    char fix[600];
    const char *params[] = {src->publication};
    PGresult *res = PQexecParams(conn,
                                 "SELECT puballtables, (SELECT count(*) FROM pg_catalog.pg_publication_tables t "
                                 "WHERE t.pubname = p.pubname) FROM pg_catalog.pg_publication p WHERE pubname = $1",
                                 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        report(ctx, CHECK_WARN, "publication", "see the server's message", "could not look it up: %s",
               err_message(conn, res));
    } else if (PQntuples(res) == 1) {
        report(ctx, CHECK_PASS, "publication", NULL, "\"%s\" exists, %s (%s table(s) now)", src->publication,
               PQgetvalue(res, 0, 0)[0] == 't' ? "FOR ALL TABLES" : "for a list of tables", PQgetvalue(res, 0, 1));
    } else if (src->publication_set || f->slot_exists) {
        snprintf(fix, sizeof fix,
                 "create it on the source: CREATE PUBLICATION \"%s\" FOR ALL TABLES (or FOR TABLE the tables to "
                 "capture)%s",
                 src->publication, src->publication_set ? ", or remove publication to let walpipe create its own" : "");
        report(ctx, CHECK_FAIL, "publication", fix, "\"%s\" does not exist on the source%s", src->publication,
               src->publication_set ? "" : ", though walpipe's slot does (walpipe created both; someone dropped it)");
    } else {
        report(ctx, CHECK_PASS, "publication", NULL,
               "\"%s\" does not exist yet: `walpipe run` creates it with the slot, %s", src->publication,
               src->ntables ? "FOR TABLE the source's tables" : "FOR ALL TABLES (which needs a superuser)");
    }
    PQclear(res);
}

/* Appends "\"schema\".\"table\"" (each part quoted as an SQL identifier) to out. */
static void quote_name(wp_buf_t *out, const char *schema, const char *table)
{
    const char *parts[2] = {schema, table};
    for (int k = 0; k < 2; k++) {
        wp_buf_puts(out, k ? ".\"" : "\"");
        for (const char *p = parts[k]; *p; p++) {
            if (*p == '"')
                wp_buf_putc(out, '"');
            wp_buf_putc(out, *p);
        }
        wp_buf_putc(out, '"');
    }
}

/* The key columns' names of a keys.c key ([{"name": ...}, ...]) as "a, b" (caller frees). */
static char *key_names(const char *json)
{
    wp_buf_t out = WP_BUF_INIT;
    json_t *a = json_loads(json, 0, NULL);
    size_t i;
    json_t *v;
    json_array_foreach(a, i, v) {
        const char *n = json_string_value(json_object_get(v, "name"));
        wp_buf_printf(&out, "%s%s", i ? ", " : "", n ? n : "?");
    }
    json_decref(a);
    if (out.data == NULL)
        wp_buf_puts(&out, "?");
    return out.data;
}

/* Configured tables the catalog query did not return: missing, or not something wal2json decodes. */
static void check_listed_tables(check_ctx_t *ctx, PGconn *conn, const wp_source_config_t *src, const PGresult *keys)
{
    for (size_t i = 0; i < src->ntables; i++) {
        const char *schema = src->tables[i].schema, *table = src->tables[i].table;
        bool found = false;
        for (int r = 0; r < PQntuples(keys) && !found; r++)
            found = strcmp(PQgetvalue(keys, r, 0), schema) == 0 && strcmp(PQgetvalue(keys, r, 1), table) == 0;
        if (found)
            continue;
        wp_buf_t name = WP_BUF_INIT;
        quote_name(&name, schema, table);
        const char *p[] = {schema, table};
        PGresult *res = PQexecParams(conn,
                                     "SELECT c.relkind, c.relpersistence FROM pg_class c JOIN pg_namespace n ON "
                                     "n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                                     2, NULL, p, NULL, NULL, 0);
        char kind = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 ? PQgetvalue(res, 0, 0)[0] : 0;
        char persistence = kind ? PQgetvalue(res, 0, 1)[0] : 0;
        if (PQresultStatus(res) != PGRES_TUPLES_OK)
            report(ctx, CHECK_WARN, "table", "see the server's message", "%s: could not look it up: %s", name.data,
                   err_message(conn, res));
        else if (kind == 0)
            report(ctx, CHECK_WARN, "table",
                   "create it, or correct the name in tables (names are taken as written, case kept)",
                   "%s is in tables but not on the source: nothing of it is captured", name.data);
        else if (kind == 'p')
            report(ctx, CHECK_FAIL, "table", "list its partitions in tables instead",
                   "%s is a partitioned table: wal2json reports its changes under its partitions' names, which "
                   "tables does not list, so none of them is streamed",
                   name.data);
        else if (kind == 'r' && persistence != 'p')
            report(ctx, CHECK_FAIL, "table", "ALTER TABLE ... SET LOGGED, or remove it from tables",
                   "%s is %s: PostgreSQL writes no WAL for it, so no change of it is decoded", name.data,
                   persistence == 'u' ? "unlogged" : "temporary");
        else
            report(ctx, CHECK_FAIL, "table", "remove it from tables",
                   "%s is not a table (relkind '%c'): logical decoding captures no change of it", name.data, kind);
        PQclear(res);
        wp_buf_free(&name);
    }
}

/*
 * Column filters and masks ([table] sections) on a key column, and a
 * partitioned table named by them or by exclude_tables: `walpipe run`
 * refuses them at start (filter.c).
 */
static void check_filters(check_ctx_t *ctx, PGconn *conn, const wp_source_config_t *src)
{
    wp_buf_t problem = WP_BUF_INIT, fix = WP_BUF_INIT;
    if (src->nrules == 0 && src->nexclude_tables == 0)
        return;
    wp_filter_t *filter = wp_filter_create(src);
    int rc = wp_filter_key_conflict(filter, conn, &problem, &fix);
    if (rc > 0)
        report(ctx, CHECK_FAIL, "filters", fix.data, "%s; `walpipe run` refuses to start", problem.data);
    else if (rc < 0)
        report(ctx, CHECK_FAIL, "filters", "see the server's message", "%s", problem.data);
    else
        report(ctx, CHECK_PASS, "filters", NULL,
               "%zu table(s) with column filters or masks, none on a key column; %zu excluded table(s), none "
               "partitioned",
               src->nrules, src->nexclude_tables);
    wp_filter_destroy(filter);
    wp_buf_free(&problem);
    wp_buf_free(&fix);
}

/*
 * Each captured table: can it be mirrored (keys.c's rules), and does
 * wal2json send its UPDATEs and DELETEs (a replica identity it can build an
 * old key from: FULL, DEFAULT with a primary key, USING INDEX whose index
 * still exists)?  One line per table with a problem, then one for the rest.
 */
static void check_tables(check_ctx_t *ctx, PGconn *conn, const wp_source_config_t *src)
{
    PGresult *keys = NULL, *ident = NULL;
    wp_buf_t schemas = WP_BUF_INIT, tables = WP_BUF_INIT, name = WP_BUF_INIT, fix = WP_BUF_INIT;
    const char **items = NULL;

    keys = wp_keys_read(conn, src);
    if (keys == NULL) {
        report(ctx, CHECK_FAIL, "tables", "see the server's message", "could not read the tables' keys: %s",
               err_message(conn, NULL));
        goto out;
    }
    int n = PQntuples(keys);
    items = wp_calloc((size_t)n + 1, sizeof *items);
    for (int r = 0; r < n; r++)
        items[r] = PQgetvalue(keys, r, 0);
    wp_pg_text_array(&schemas, items, (size_t)n);
    for (int r = 0; r < n; r++)
        items[r] = PQgetvalue(keys, r, 1);
    wp_pg_text_array(&tables, items, (size_t)n);
    const char *p[] = {schemas.data, tables.data};
    ident = PQexecParams(conn,
                         "SELECT n.nspname, c.relname, "
                         "  EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), "
                         "  EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident) "
                         "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                         "WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                         2, NULL, p, NULL, NULL, 0);
    if (PQresultStatus(ident) != PGRES_TUPLES_OK) {
        report(ctx, CHECK_FAIL, "tables", "see the server's message",
               "could not read the tables' replica identities: %s", err_message(conn, ident));
        goto out;
    }
    int good = 0;
    for (int r = 0; r < n; r++) {
        const char *schema = PQgetvalue(keys, r, 0), *table = PQgetvalue(keys, r, 1);
        const char *identity = PQgetvalue(keys, r, 2);
        bool has_key = !PQgetisnull(keys, r, 3);
        bool has_pk = false, has_replident = false;
        for (int k = 0; k < PQntuples(ident); k++) {
            if (strcmp(PQgetvalue(ident, k, 0), schema) == 0 && strcmp(PQgetvalue(ident, k, 1), table) == 0) {
                has_pk = PQgetvalue(ident, k, 2)[0] == 't';
                has_replident = PQgetvalue(ident, k, 3)[0] == 't';
            }
        }
        wp_buf_reset(&name);
        quote_name(&name, schema, table);
        const char *problem = wp_keys_problem(identity, has_key);
        const char *dropped = NULL;
        if (strcmp(identity, "nothing") == 0)
            dropped = "REPLICA IDENTITY NOTHING";
        else if (strcmp(identity, "default") == 0 && !has_pk)
            dropped = "REPLICA IDENTITY DEFAULT without a primary key";
        else if (strcmp(identity, "index") == 0 && !has_replident)
            dropped = "REPLICA IDENTITY USING INDEX whose index is gone";
        if (problem) {
            /* keys.c's text: "why; hint: fix" */
            const char *hint = strstr(problem, "; hint: ");
            int why_len = hint ? (int)(hint - problem) : (int)strlen(problem);
            /* keys.c's text says what becomes of the keyless UPDATEs and DELETEs where it applies; else this does */
            bool said = strstr(problem, "carry no key") != NULL;
            report(ctx, CHECK_FAIL, "table", hint ? hint + 8 : "give it a primary key",
                   "%s cannot be mirrored: %.*s%s%s", name.data, why_len, problem,
                   dropped && !said
                       ? (src->plugin == WP_PLUGIN_PGOUTPUT ? "; and the source refuses its UPDATEs and DELETEs: "
                                                            : "; and wal2json drops its UPDATEs and DELETEs: ")
                       : "",
                   dropped && !said ? dropped : "");
        } else if (dropped) {
            char *cols = key_names(PQgetvalue(keys, r, 3));
            wp_buf_reset(&fix);
            if (has_pk) {
                wp_buf_puts(&fix, "ALTER TABLE ");
                wp_buf_puts(&fix, name.data);
                wp_buf_puts(&fix, " REPLICA IDENTITY DEFAULT");
            } else {
                wp_buf_printf(&fix, "ALTER TABLE %s REPLICA IDENTITY USING INDEX <the unique index on (%s)>, or "
                                    "add a primary key", name.data, cols);
            }
            if (src->plugin == WP_PLUGIN_PGOUTPUT)
                report(ctx, CHECK_FAIL, "table", fix.data,
                       "%s: the source refuses its UPDATEs and DELETEs while a publication that publishes them "
                       "holds it (%s)",
                       name.data, dropped);
            else
                report(ctx, CHECK_FAIL, "table", fix.data,
                       "%s: wal2json drops its UPDATEs and DELETEs (%s), with only a warning; the mirror, keyed on "
                       "(%s), gets its inserts but misses those: each is recorded as a divergence",
                       name.data, dropped, cols);
            free(cols);
        } else {
            good++;
        }
    }
    check_listed_tables(ctx, conn, src, keys);
    if (n == 0 && src->tables == NULL)
        report(ctx, CHECK_WARN, "tables", "create the tables, or check dbname",
               "the database has no table to capture (yet)");
    else if (good > 0 || n == 0)
        report(ctx, CHECK_PASS, "tables", NULL,
               "%d%s captured table(s) can be mirrored, and %s sends their UPDATEs and DELETEs with a key",
               good, good < n ? " other" : "", plugin_name(src));
out:
    free(items);
    PQclear(ident);
    PQclear(keys);
    wp_buf_free(&schemas);
    wp_buf_free(&tables);
    wp_buf_free(&name);
    wp_buf_free(&fix);
}

static void check_source(check_ctx_t *ctx, const wp_source_config_t *src)
{
    char what[96];
    snprintf(what, sizeof what, "source %s", src->name);
    ctx->source = src->name;
    header(ctx, what, src->conninfo);

    wp_pg_conn_error_t err;
    PGconn *conn = connect_to(src->conninfo, NULL, &err);
    if (conn == NULL) {
        report(ctx, CHECK_FAIL, "reachable", connect_fix(&err, false),
               "could not connect: %s (the other checks of this source need a connection)", err.message);
        return;
    }
    source_facts_t f;
    memset(&f, 0, sizeof f);
    if (!read_facts(ctx, conn, src, &f))
        goto out;
    report(ctx, CHECK_PASS, "reachable", NULL, "PostgreSQL %s, as role \"%s\"", f.version, f.user);
    check_wal_level(ctx, &f);
    check_role(ctx, &f);
    /* counted before this check's own connections take a WAL sender and a slot */
    check_capacity(ctx, src, &f);
    check_replication_connection(ctx, src);
    if (src->plugin == WP_PLUGIN_PGOUTPUT)
        check_publication(ctx, conn, src, &f);
    else
        check_wal2json(ctx, conn, &f);
    check_sender_timeout(ctx, src, &f);
    check_keep_size(ctx, &f);
    check_slot(ctx, src, &f);
    check_tables(ctx, conn, src);
    check_filters(ctx, conn, src);
out:
    PQfinish(conn);
}

/* ---- staging -------------------------------------------------------------------------------- */

static void check_staging(check_ctx_t *ctx)
{
    const wp_config_t *config = ctx->config;
    char fix[512];
    PGresult *res = NULL;
    ctx->source = NULL;
    header(ctx, "staging", config->staging_conninfo);

    wp_pg_conn_error_t err;
    PGconn *conn = connect_to(config->staging_conninfo, NULL, &err);
    if (conn == NULL) {
        report(ctx, CHECK_FAIL, "reachable", connect_fix(&err, false),
               "could not connect: %s (the other checks of staging need a connection)", err.message);
        return;
    }
    res = PQexec(conn, "SELECT current_setting('server_version'), current_user, current_database()");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        report(ctx, CHECK_FAIL, "reachable", "see the server's message", "connected, but: %s", err_message(conn, res));
        goto out;
    }
    report(ctx, CHECK_PASS, "reachable", NULL, "PostgreSQL %s, as role \"%s\"", PQgetvalue(res, 0, 0),
           PQgetvalue(res, 0, 1));
    char *user = wp_strdup(PQgetvalue(res, 0, 1)), *db = wp_strdup(PQgetvalue(res, 0, 2));
    PQclear(res);
    res = NULL;

    const char *path = config->path ? config->path : "FILE";
    snprintf(fix, sizeof fix, "walpipe init --config %s", path);
    int version = wp_migrate_staging_version(conn), latest = wp_migrate_latest_version();
    if (version < 0)
        report(ctx, CHECK_FAIL, "schema_version", "see the server's message", "could not read it: %s",
               err_message(conn, NULL));
    else if (version == 0)
        report(ctx, CHECK_FAIL, "schema_version", fix,
               "not initialized: there is no walpipe schema in database \"%s\"; `walpipe run` refuses to start", db);
    else if (version < latest)
        report(ctx, CHECK_FAIL, "schema_version", fix,
               "at version %d, older than this walpipe's %d; `walpipe run` refuses to start", version, latest);
    else
        report(ctx, CHECK_PASS, "schema_version", NULL, "%d, this walpipe's", version);

    /*
     * The workers run CREATE SCHEMA IF NOT EXISTS before each new mirror
     * table (mirror.c), and PostgreSQL checks CREATE on the database before
     * it looks whether the schema exists; then CREATE TABLE needs CREATE on
     * the schema.
     */
    const char *p[] = {config->mirror_schema};
    res = PQexecParams(conn,
                       "SELECT has_database_privilege(current_database(), 'CREATE'), "
                       "(SELECT has_schema_privilege(n.oid, 'CREATE') FROM pg_namespace n WHERE n.nspname = $1)",
                       1, NULL, p, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        report(ctx, CHECK_FAIL, "mirror_schema", "see the server's message", "could not read the privileges: %s",
               err_message(conn, res));
    } else {
        bool db_create = PQgetvalue(res, 0, 0)[0] == 't';
        bool exists = !PQgetisnull(res, 0, 1), schema_create = exists && PQgetvalue(res, 0, 1)[0] == 't';
        check_status_t st = config->workers > 0 ? CHECK_FAIL : CHECK_WARN;
        const char *who = config->workers > 0 ? "" : " (this configuration starts no workers; whoever does needs it)";
        if (!db_create) {
            snprintf(fix, sizeof fix, "GRANT CREATE ON DATABASE \"%s\" TO \"%s\"", db, user);
            report(ctx, st, "mirror_schema", fix,
                   "role \"%s\" lacks CREATE on database \"%s\": the workers run CREATE SCHEMA IF NOT EXISTS \"%s\" "
                   "before each new mirror table, which PostgreSQL refuses without it, even when the schema "
                   "exists%s",
                   user, db, config->mirror_schema, who);
        } else if (exists && !schema_create) {
            snprintf(fix, sizeof fix, "GRANT CREATE, USAGE ON SCHEMA \"%s\" TO \"%s\"", config->mirror_schema, user);
            report(ctx, st, "mirror_schema", fix,
                   "role \"%s\" lacks CREATE on schema \"%s\", where the workers create the mirror tables%s", user,
                   config->mirror_schema, who);
        } else {
            report(ctx, CHECK_PASS, "mirror_schema", NULL, "role \"%s\" may create mirror tables in \"%s\" (%s)",
                   user, config->mirror_schema, exists ? "it exists" : "the workers create it");
        }
    }
    free(user);
    free(db);
out:
    PQclear(res);
    PQfinish(conn);
}

int wp_check_command(const wp_config_t *config, bool json)
{
    check_ctx_t ctx = {.config = config, .json = json};
    if (!json)
        printf("walpipe %s check of %s\n", WALPIPE_VERSION, config->path ? config->path : "(configuration)");
    for (size_t i = 0; i < config->nsources; i++)
        check_source(&ctx, &config->sources[i]);
    check_staging(&ctx);
    if (json) {
        json_t *o = json_pack("{s:{s:i,s:i,s:i}}", "summary", "pass", ctx.counts[CHECK_PASS], "warn",
                              ctx.counts[CHECK_WARN], "fail", ctx.counts[CHECK_FAIL]);
        char *text = json_dumps(o, JSON_COMPACT);
        printf("%s\n", text);
        free(text);
        json_decref(o);
    } else {
        printf("check: %d pass, %d warn, %d fail\n", ctx.counts[CHECK_PASS], ctx.counts[CHECK_WARN],
               ctx.counts[CHECK_FAIL]);
    }
    fflush(stdout);
    return ctx.counts[CHECK_FAIL] > 0 ? WP_EXIT_FATAL : WP_EXIT_OK;
}

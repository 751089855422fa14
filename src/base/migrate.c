/*
 * migrate.c: `walpipe init`: the staging schema, versioned.
 *
 * Job: apply the migrations compiled in from sql/ that the staging database
 * has not seen, each in its own transaction together with its row in
 * walpipe.schema_migrations, under an advisory lock so that two `init`s
 * cannot race.  Then apply the options that are configuration, not schema
 * (the GIN index on payload, the partitions ahead).
 *
 * Invariant: a version recorded in schema_migrations is fully applied; running
 * init again changes nothing that is already in place.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "log.h"
#include "migrate.h"
#include "pg.h"

#define MIGRATE_LOCK_KEY "7745637465"

int wp_migrate_latest_version(void)
{
    int latest = 0;
    for (size_t i = 0; i < wp_migrations_count; i++)
        if (wp_migrations[i].version > latest)
            latest = wp_migrations[i].version;
    return latest;
}

static bool is_applied(const PGresult *applied, int version)
{
    for (int r = 0; r < PQntuples(applied); r++)
        if (atoi(PQgetvalue(applied, r, 0)) == version)
            return true;
    return false;
}

int wp_migrate_staging_version(PGconn *conn)
{
    int version = -1;
    PGresult *res = PQexec(conn, "SELECT to_regclass('walpipe.schema_migrations') IS NOT NULL");
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQgetvalue(res, 0, 0)[0] == 'f') {
        version = 0;
    } else if (PQresultStatus(res) == PGRES_TUPLES_OK) {
        PQclear(res);
        res = PQexec(conn, "SELECT version FROM walpipe.schema_migrations");
        if (PQresultStatus(res) == PGRES_TUPLES_OK) {
            /* the newest version up to which every migration this walpipe knows is applied */
            version = 0;
            for (size_t i = 0; i < wp_migrations_count && is_applied(res, wp_migrations[i].version); i++)
                version = wp_migrations[i].version;
        }
    }
    PQclear(res);
    return version;
}

static int exec_ok(PGconn *conn, const char *sql, const char *what)
{
    return wp_pg_exec(conn, "staging", sql, what);
}

/* The versions recorded in walpipe.schema_migrations (caller clears), or NULL after logging why. */
static PGresult *applied_versions(PGconn *conn)
{
    PGresult *res = PQexec(conn, "SELECT version FROM walpipe.schema_migrations");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_error("staging: could not read walpipe.schema_migrations: %s", PQerrorMessage(conn));
        PQclear(res);
        return NULL;
    }
    return res;
}

int wp_migrate_apply(const wp_config_t *config)
{
    int rc = -1;
    bool locked = false;
    PGresult *applied = NULL;
    PGconn *conn = wp_pg_connect(config->staging_conninfo, "walpipe_init", NULL, "staging");
    if (conn == NULL)
        goto out;
    if (exec_ok(conn, "SET client_min_messages = warning", "set client_min_messages") != 0)
        goto out;
    if (exec_ok(conn, "SELECT pg_advisory_lock(" MIGRATE_LOCK_KEY ")", "take the migration lock") != 0)
        goto out;
    locked = true;
    if (exec_ok(conn,
                "CREATE SCHEMA IF NOT EXISTS walpipe; "
                "CREATE TABLE IF NOT EXISTS walpipe.schema_migrations (version INT PRIMARY KEY, name TEXT NOT NULL, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
                "create walpipe.schema_migrations") != 0)
        goto out;
    /* every migration not recorded yet, in order: a version merged below the newest one applied still runs */
    applied = applied_versions(conn);
    if (applied == NULL)
        goto out;
    for (size_t i = 0; i < wp_migrations_count; i++) {
        const wp_migration_t *m = &wp_migrations[i];
        if (is_applied(applied, m->version))
            continue;
        if (exec_ok(conn, "BEGIN", "begin a migration") != 0)
            goto out;
        if (exec_ok(conn, m->sql, m->name) != 0) {
            PQclear(PQexec(conn, "ROLLBACK"));
            goto out;
        }
        char *name = PQescapeLiteral(conn, m->name, strlen(m->name));
        char sql[256];
        snprintf(sql, sizeof sql, "INSERT INTO walpipe.schema_migrations (version, name) VALUES (%d, %s); COMMIT",
                 m->version, name ? name : "''");
        PQfreemem(name);
        if (exec_ok(conn, sql, "record a migration") != 0) {
            PQclear(PQexec(conn, "ROLLBACK"));
            goto out;
        }
        wp_info("applied migration %s", m->name);
    }
    if (config->payload_gin_index) {
        if (exec_ok(conn,
                    "CREATE INDEX IF NOT EXISTS raw_events_payload_gin ON walpipe.raw_events "
                    "USING gin (payload jsonb_path_ops)",
                    "create the GIN index on payload") != 0)
            goto out;
    } else if (exec_ok(conn, "DROP INDEX IF EXISTS walpipe.raw_events_payload_gin", "drop the GIN index") != 0) {
        goto out;
    }
    /* the index sinks read by (sql/012_sinks.sql): only where sinks run, never dropped (another
       configuration on this staging database may have the sinks) */
    if (config->nsinks > 0) {
        PGresult *res = PQexec(conn, "SELECT to_regclass('walpipe.raw_events_source_order') IS NULL");
        bool missing = PQresultStatus(res) == PGRES_TUPLES_OK && PQgetvalue(res, 0, 0)[0] == 't';
        PQclear(res);
        if (missing) {
            wp_info("creating the index sinks read by (walpipe.raw_events_source_order); staging waits for it");
            if (exec_ok(conn, WP_SINK_INDEX_SQL, "create the index sinks read by") != 0)
                goto out;
        }
    }
    char sql[96];
    snprintf(sql, sizeof sql, "SELECT walpipe.ensure_partitions(%d)", config->partitions_ahead);
    if (exec_ok(conn, sql, "create raw_events partitions") != 0)
        goto out;
    wp_info("staging schema is at version %d", wp_migrate_latest_version());
    rc = 0;
out:
    PQclear(applied);
    if (locked)
        PQclear(PQexec(conn, "SELECT pg_advisory_unlock(" MIGRATE_LOCK_KEY ")"));
    PQfinish(conn);
    return rc;
}

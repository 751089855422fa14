/*
 * replay.c: `walpipe replay`: a staged range delivered again through a sink's plugin
 * (or, with --mirror, handed to the transform workers to apply again).
 *
 * Job: resolve the range (--from LSN or the first event committed at or after
 * --from-time, up to --to or the newest event staged when the replay starts),
 * refuse it when staging no longer holds its beginning, then read it in
 * (lsn, seq) order (feed.c, the sink's own filter or --table) and deliver it
 * with replay = 1 in a plugin session of its own, until all of it is durable.
 * Progress goes to the log.
 *
 * Invariant: a replay never writes walpipe.sink_positions and takes no lock:
 * `walpipe run` goes on streaming to the same sink.  Events keep their
 * (source, lsn, seq) identity; a plugin tells a replay by ev->replay.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <walpipe/walpipe.h>

#include "feed.h"
#include "loader.h"
#include "log.h"
#include "pg.h"
#include "runtime.h"
#include "session.h"
#include "sink.h"

#define PROGRESS_MS 2000
#define BACKOFF_MIN_MS 500
#define BACKOFF_MAX_MS 10000
#define FLUSH_MS 30000

static void sleep_ms(int ms)
{
    while (ms > 0 && !wp_stop_requested()) {
        int step = ms < 100 ? ms : 100;
        struct timespec ts = {step / 1000, (long)(step % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        ms -= step;
    }
}

/* One row of text out of a query with text parameters; NULL (logged) on error. */
static PGresult *query(PGconn *conn, const char *sql, int n, const char *const *params, const char *what)
{
    PGresult *res = PQexecParams(conn, sql, n, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_error("staging: could not %s: %s", what, PQerrorMessage(conn));
        PQclear(res);
        return NULL;
    }
    return res;
}

/*
 * Resolves the range: *from (from --from or --from-time) and *to.  Returns
 * 0, 1 when the range is refused or empty (said why), -1 on an error (logged).
 */
static int resolve_range(PGconn *conn, const wp_replay_opts_t *opts, wp_lsn_t *from, wp_lsn_t *to)
{
    const char *params[] = {opts->source};
    char a[WP_LSN_STRLEN], f[WP_LSN_STRLEN];
    int rc = -1;
    /* what staging holds of the source: the oldest event (by the sink order) and the newest lsn */
    PGresult *res = query(conn,
                          "SELECT (SELECT lsn::text FROM walpipe.raw_events WHERE source = $1 AND seq >= 0 "
                          "ORDER BY lsn, seq, id LIMIT 1), (SELECT commit_ts::text FROM walpipe.raw_events WHERE "
                          "source = $1 AND seq >= 0 AND commit_ts IS NOT NULL ORDER BY lsn, seq, id LIMIT 1), "
                          "(SELECT lsn::text FROM walpipe.raw_events WHERE source = $1 ORDER BY lsn DESC, seq DESC, "
                          "id DESC LIMIT 1)",
                          1, params, "read what staging holds");
    if (res == NULL)
        return -1;
    if (PQgetisnull(res, 0, 0)) {
        fprintf(stderr, "walpipe: staging holds no events of source \"%s\"; nothing to replay\n", opts->source);
        rc = 1;
        goto out;
    }
    wp_lsn_t oldest, newest;
    wp_lsn_parse(PQgetvalue(res, 0, 0), strlen(PQgetvalue(res, 0, 0)), &oldest);
    wp_lsn_parse(PQgetvalue(res, 0, 2), strlen(PQgetvalue(res, 0, 2)), &newest);
    const char *oldest_time = PQgetisnull(res, 0, 1) ? "unknown" : PQgetvalue(res, 0, 1);
    if (opts->from_time) {
        /* the oldest event's commit time (in commit order: the first one staged) bounds what is held */
        const char *tparams[] = {opts->source, opts->from_time, PQgetisnull(res, 0, 1) ? NULL : oldest_time};
        PGresult *t = query(conn,
                            "SELECT coalesce($2::timestamptz < $3::timestamptz, false), (SELECT lsn::text FROM "
                            "walpipe.raw_events WHERE source = $1 AND seq >= 0 AND commit_ts >= $2::timestamptz "
                            "ORDER BY lsn, seq, id LIMIT 1)",
                            3, tparams, "find the first event at --from-time");
        if (t == NULL)
            goto out;
        bool older = PQgetvalue(t, 0, 0)[0] == 't';
        bool none = PQgetisnull(t, 0, 1);
        if (!none)
            wp_lsn_parse(PQgetvalue(t, 0, 1), strlen(PQgetvalue(t, 0, 1)), from);
        PQclear(t);
        if (older) {
            fprintf(stderr,
                    "walpipe: --from-time %s is older than what staging still holds of source \"%s\": its oldest "
                    "event is at lsn %s, committed %s; replay from there or later\n",
                    opts->from_time, opts->source, wp_lsn_format(oldest, a), oldest_time);
            rc = 1;
            goto out;
        }
        if (none) {
            fprintf(stderr, "walpipe: no event of source \"%s\" committed at or after %s is staged\n", opts->source,
                    opts->from_time);
            rc = 1;
            goto out;
        }
    } else {
        *from = opts->from;
        if (*from < oldest) {
            fprintf(stderr,
                    "walpipe: --from %s is older than what staging still holds of source \"%s\": its oldest event is "
                    "at lsn %s, committed %s; replay from there or later\n",
                    wp_lsn_format(*from, f), opts->source, wp_lsn_format(oldest, a), oldest_time);
            rc = 1;
            goto out;
        }
    }
    *to = opts->to ? opts->to : newest;
    if (*to < *from) {
        fprintf(stderr, "walpipe: --to is before the start of the range; nothing to replay\n");
        rc = 1;
        goto out;
    }
    rc = 0;
out:
    PQclear(res);
    return rc;
}

/* Delivers (after, to] until all of it is durable, a stop, or a fatal error; 0 done, 1 stopped/failed. */
static int deliver_range(PGconn *conn, wp_session_t *session, wp_feed_t *feed, const wp_lsn_t from,
                         const wp_lsn_t to)
{
    char err[WP_ERRLEN], a[WP_LSN_STRLEN], b[WP_LSN_STRLEN];
    wp_sink_pos_t durable = {from, INT32_MIN, 0, 0}; /* just before the first event at from */
    wp_sink_pos_t read = durable;
    long long done = 0, last_done = 0;
    int backoff = BACKOFF_MIN_MS;
    int64_t started = wp_now_ms(), last_log = started;
    bool at_end = false;

    while (!wp_stop_requested()) {
        if (!wp_session_is_open(session)) {
            int rc = wp_session_open(session, err, sizeof err);
            if (rc == WP_SINK_FATAL) {
                wp_error("replay stopped: %s", err);
                return 1;
            }
            if (rc != WP_SINK_OK) {
                wp_warn("%s; retrying in %d ms", err, backoff);
                sleep_ms(backoff);
                backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
                continue;
            }
            read = durable;
            at_end = false;
        }
        int rc = WP_SINK_OK;
        int n = 0;
        if (!at_end) {
            wp_feed_row_t *rows;
            n = wp_feed_read(feed, conn, &read, to, 1000, &rows);
            if (n < 0)
                return 1;
            if (n == 0 && wp_feed_waiting(feed)) {
                struct timespec ts = {0, 200 * 1000000L}; /* a table's key is not recorded yet (feed.h) */
                nanosleep(&ts, NULL);
            } else if (n == 0) {
                at_end = true;
            } else {
                rc = wp_session_deliver(session, 0, rows, n, err, sizeof err);
                read = rows[n - 1].pos;
            }
        }
        if (rc == WP_SINK_OK)
            rc = at_end ? wp_session_flush(session, FLUSH_MS, err, sizeof err) : wp_session_poll(session, 0, err,
                                                                                                  sizeof err);
        if (rc == WP_SINK_FATAL) {
            wp_error("replay stopped: %s", err);
            return 1;
        }
        if (rc != WP_SINK_OK) {
            wp_warn("%s; delivering again from %s in %d ms", err, wp_lsn_format(durable.lsn, a), backoff);
            wp_session_close(session);
            sleep_ms(backoff);
            backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
            continue;
        }
        int src, delivered;
        wp_sink_pos_t pos;
        while (wp_session_settle(session, &src, &pos, &delivered)) {
            durable = pos;
            done += delivered;
        }
        int64_t now = wp_now_ms();
        if (now - last_log >= PROGRESS_MS) {
            wp_info("replayed %lld events (%.0f/s), at %s of %s", done,
                    (double)(done - last_done) * 1000.0 / (double)(now - last_log), wp_lsn_format(durable.lsn, a),
                    wp_lsn_format(to, b));
            last_log = now;
            last_done = done;
        }
        if (at_end && wp_session_pending(session) == 0) {
            double secs = (double)(wp_now_ms() - started) / 1000.0;
            wp_info("replay done: %lld events from %s to %s in %.1f s (%.0f/s)", done, wp_lsn_format(from, a),
                    wp_lsn_format(to, b), secs, secs > 0 ? (double)done / secs : (double)done);
            return 0;
        }
        backoff = BACKOFF_MIN_MS;
    }
    wp_warn("replay stopped by request after %lld events, at %s", done, wp_lsn_format(durable.lsn, a));
    return 1;
}

/* The --table texts into *tables (caller frees with wp_config_free_tables); false after saying why. */
static bool parse_tables(const wp_replay_opts_t *opts, wp_table_ref_t **tables, size_t *ntables)
{
    char err[WP_ERRLEN];
    for (int i = 0; i < opts->ntables; i++) {
        wp_table_ref_t *one = NULL;
        size_t none = 0;
        if (wp_config_parse_tables(opts->tables[i], &one, &none, err, sizeof err) != 0) {
            fprintf(stderr, "walpipe: --table %s: %s\n", opts->tables[i], err);
            return false;
        }
        *tables = wp_realloc(*tables, (*ntables + none) * sizeof **tables);
        memcpy(*tables + *ntables, one, none * sizeof *one);
        *ntables += none;
        free(one); /* the names moved to tables */
    }
    return true;
}

/*
 * `walpipe replay --mirror`: the range's events, marked processed, are
 * marked unprocessed again in one statement, so the transform workers claim
 * and apply them once more.  Applying is an LSN-guarded max-merge (README,
 * "Transform workers"): what a mirror already holds at that version or newer
 * stays, and what it lost (rows deleted from it by hand, a mirror dropped and
 * recreated) comes back.  Events parked in the dead-letter queue are left to
 * `walpipe dlq retry`; messages are not applied to mirrors.
 */
static int replay_mirror(const wp_config_t *config, const wp_replay_opts_t *opts)
{
    PGconn *conn = NULL;
    PGresult *res = NULL;
    wp_table_ref_t *tables = NULL;
    size_t ntables = 0;
    wp_buf_t schemas = WP_BUF_INIT, names = WP_BUF_INIT;
    char a[WP_LSN_STRLEN], b[WP_LSN_STRLEN];
    int rc = WP_EXIT_CONFIG;

    bool known = false;
    for (size_t i = 0; i < config->nsources; i++)
        known = known || strcmp(config->sources[i].name, opts->source) == 0;
    if (!known) {
        fprintf(stderr, "walpipe: %s has no [source %s] section\n", config->path, opts->source);
        goto out;
    }
    if (!parse_tables(opts, &tables, &ntables))
        goto out;
    rc = WP_EXIT_FATAL;
    wp_log_set_component("replay");
    if (wp_pg_connect_staging(config, "walpipe_replay", NULL, true, &conn) != WP_STAGING_OK)
        goto out;
    wp_lsn_t from = 0, to = 0;
    if (resolve_range(conn, opts, &from, &to) != 0)
        goto out; /* refused (said why) or failed (logged) */
    const char **s = wp_calloc(ntables + 1, sizeof *s), **t = wp_calloc(ntables + 1, sizeof *t);
    for (size_t i = 0; i < ntables; i++) {
        s[i] = tables[i].schema;
        t[i] = tables[i].table;
    }
    wp_pg_text_array(&schemas, s, ntables);
    wp_pg_text_array(&names, t, ntables);
    free(s);
    free(t);
    const char *params[] = {opts->source, wp_lsn_format(from, a), wp_lsn_format(to, b),
                            ntables ? schemas.data : NULL, ntables ? names.data : NULL};
    res = PQexecParams(conn,
                       "WITH r AS (UPDATE walpipe.raw_events e SET processed = false WHERE e.source = $1 AND "
                       "e.lsn >= $2::pg_lsn AND e.lsn <= $3::pg_lsn AND e.processed AND e.event_type <> 'message' "
                       "AND ($4::text[] IS NULL OR EXISTS (SELECT 1 FROM unnest($4::text[], $5::text[]) AS w(s, n) "
                       "WHERE w.s = e.schema_name AND w.n = e.table_name)) "
                       "AND NOT EXISTS (SELECT 1 FROM walpipe.dead_letters d WHERE d.kind = 'apply' AND "
                       "d.event_id = e.id) RETURNING 1) "
                       "SELECT count(*), pg_notify('walpipe_raw_events', '') FROM r",
                       5, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_error("staging: could not hand the range to the transform workers again: %s", PQerrorMessage(conn));
        goto out;
    }
    printf("%s staged events of source \"%s\" from %s to %s handed to the transform workers to apply again "
           "(`walpipe run` or `walpipe work` applies them; the mirrors keep what is newer)\n",
           PQgetvalue(res, 0, 0), opts->source, a, b);
    rc = WP_EXIT_OK;
out:
    PQclear(res);
    if (conn)
        PQfinish(conn);
    wp_buf_free(&schemas);
    wp_buf_free(&names);
    wp_config_free_tables(tables, ntables);
    return rc;
}

int wp_replay_command(const wp_config_t *config, const wp_replay_opts_t *opts)
{
    if (opts->mirror)
        return replay_mirror(config, opts);
    const wp_sink_config_t *sc = NULL;
    wp_plugin_t *lib = NULL;
    PGconn *conn = NULL;
    wp_session_t *session = NULL;
    wp_feed_t *feed = NULL;
    wp_table_ref_t *tables = NULL;
    size_t ntables = 0;
    char err[WP_ERRLEN], a[WP_LSN_STRLEN], b[WP_LSN_STRLEN];
    int rc = WP_EXIT_CONFIG;
    size_t si;

    for (si = 0; si < config->nsinks && sc == NULL; si++)
        if (strcmp(config->sinks[si].name, opts->sink) == 0)
            sc = &config->sinks[si];
    if (sc == NULL) {
        fprintf(stderr, "walpipe: %s has no [sink %s] section\n", config->path, opts->sink);
        goto out;
    }
    si--;
    bool known = false;
    for (size_t k = 0; k < wp_sink_nsources(config, si); k++)
        known = known || strcmp(wp_sink_source(config, si, k), opts->source) == 0;
    if (!known) {
        fprintf(stderr, "walpipe: [sink %s] does not read source \"%s\"\n", sc->name, opts->source);
        goto out;
    }
    if (!parse_tables(opts, &tables, &ntables))
        goto out;
    lib = wp_plugin_load(config, sc, err, sizeof err);
    if (lib == NULL) {
        fprintf(stderr, "walpipe: %s\n", err);
        goto out;
    }
    rc = WP_EXIT_FATAL;
    wp_log_set_component("replay");
    if (wp_pg_connect_staging(config, "walpipe_replay", WP_FEED_PG_OPTIONS, true, &conn) != WP_STAGING_OK)
        goto out;
    int ready = wp_feed_index_ready(conn);
    if (ready == 0)
        fprintf(stderr, "walpipe: staging has no index for sinks to read by (walpipe.raw_events_source_order); run "
                        "`walpipe init --config %s`, which creates it for a configuration with [sink] sections\n",
                config->path);
    if (ready != 1)
        goto out;
    wp_lsn_t from = 0, to = 0;
    int r = resolve_range(conn, opts, &from, &to);
    if (r != 0)
        goto out; /* refused (said why) or failed (logged) */
    wp_info("replaying source \"%s\" from %s to %s through sink \"%s\" (plugin %s)", opts->source,
            wp_lsn_format(from, a), wp_lsn_format(to, b), sc->name, sc->plugin);
    feed = wp_feed_create(opts->source, tables ? tables : sc->tables, tables ? ntables : sc->ntables);
    session = wp_session_create(sc, lib, true);
    rc = deliver_range(conn, session, feed, from, to) == 0 ? WP_EXIT_OK : WP_EXIT_FATAL;
out:
    wp_session_destroy(session);
    wp_feed_destroy(feed);
    if (conn)
        PQfinish(conn);
    wp_plugin_unload(lib);
    wp_config_free_tables(tables, ntables);
    return rc;
}

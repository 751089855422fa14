/*
 * sink.c: the sinks of `walpipe run` and `walpipe sink`: one thread each.
 *
 * Job: per sink, a loop of sessions.  A session holds a staging connection
 * (LISTEN walpipe_raw_events, which the stager NOTIFYs at each commit) and a
 * plugin session (session.c).  It reads each of the sink's sources after
 * the place already handed to the plugin (feed.c), delivers, polls, and
 * writes the position of a source only up to what the plugin reported
 * durable, with one parameterized UPSERT per source that moved.  With
 * nothing new it sleeps on the NOTIFY (1 s at most).
 *
 * Errors: a plugin's RETRY closes the plugin session, waits (capped
 * exponential backoff, as a source does) and opens a new one, which starts
 * again from the durable positions: events that were delivered but not
 * durable are delivered again (a plugin that can tell skips them: jsonl,
 * kafka).  A FATAL stops this sink alone, its reason logged; `walpipe run`
 * goes on.  Losing staging reconnects; the positions in memory are the
 * durable truth and are written when staging is back.  On a stop request a
 * sink flushes (5 s at most), saves its positions and closes.
 *
 * Invariant: a sink's position in walpipe.sink_positions only moves forward
 * and never past an event its plugin has not reported durable.  One sink runs
 * in one process at a time (a session-level advisory lock on its name): two
 * would deliver everything twice.
 */
#include "wp_setup.h"

#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "feed.h"
#include "loader.h"
#include "log.h"
#include "metrics.h"
#include "pg.h"
#include "runtime.h"
#include "session.h"
#include "sink.h"

#define BACKOFF_MIN_MS 500
#define BACKOFF_MAX_MS 10000 /* reopening a plugin is cheap; a sink back up resumes within 10 s */
#define IDLE_WAIT_MS 1000
#define BUSY_POLL_MS 50      /* poll timeout while events wait to become durable */
#define FLUSH_MS 5000        /* a stopping sink waits this long for its plugin */
#define STATS_MS 5000        /* backlog gauge and progress log */
#define PENDING_BATCHES 4    /* read ahead of durable by at most this many batches */

typedef struct sink_source {
    const char *name;
    wp_feed_t *feed;
    wp_sink_pos_t durable; /* the position: last durable place */
    wp_sink_pos_t read;    /* last place handed to the plugin (>= durable) */
    long long unsaved;     /* events delivered durable since the position was last written */
    bool dirty;            /* durable moved since the last write */
    bool loaded;           /* durable was read from staging */
    wp_metric_t *m_events, *m_lag, *m_pos;
} sink_source_t;

typedef struct sink {
    struct wp_sinks *pool;
    const wp_config_t *config;
    const wp_sink_config_t *sc;
    wp_plugin_t *lib;
    pthread_t thread;
    bool started;
    atomic_int fatal;
    atomic_int done;
    sink_source_t *sources;
    size_t nsources;
    PGconn *conn;
    wp_session_t *session;
    unsigned long long delivered; /* events durable in this process, for the log */
    wp_metric_t *m_up;
} sink_t;

struct wp_sinks {
    const wp_config_t *config;
    sink_t *sinks;
    size_t n;
    atomic_int stop;
};

static bool stopping(const sink_t *k)
{
    return wp_stop_requested() || atomic_load(&k->pool->stop);
}

static void sleep_ms(const sink_t *k, int ms)
{
    while (ms > 0 && !stopping(k)) {
        int step = ms < 100 ? ms : 100;
        struct timespec ts = {step / 1000, (long)(step % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        ms -= step;
    }
}

static void close_conn(sink_t *k)
{
    if (k->conn)
        PQfinish(k->conn);
    k->conn = NULL;
}

/* Waits for NOTIFY walpipe_raw_events, the timeout or a stop. */
static void wait_notify(sink_t *k, int timeout_ms)
{
    int64_t deadline = wp_now_ms() + timeout_ms;
    for (;;) {
        PGnotify *note;
        bool got = false;
        PQconsumeInput(k->conn);
        while ((note = PQnotifies(k->conn)) != NULL) {
            got = true;
            PQfreemem(note);
        }
        int64_t left = deadline - wp_now_ms();
        if (got || left <= 0 || stopping(k) || PQstatus(k->conn) != CONNECTION_OK)
            return;
        struct pollfd pfd = {.fd = PQsocket(k->conn), .events = POLLIN};
        poll(&pfd, 1, left < 250 ? (int)left : 250);
    }
}

/* Reads the saved positions of sources not loaded yet; 0, or -1 (logged). */
static int load_positions(sink_t *k)
{
    const char *params[] = {k->sc->name};
    PGresult *res = PQexecParams(k->conn,
                                 "SELECT source, lsn::text, seq, event_id FROM walpipe.sink_positions WHERE sink = $1",
                                 1, NULL, params, NULL, NULL, 0);
    int rc = -1;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_error("staging: could not read the positions of sink \"%s\": %s", k->sc->name, PQerrorMessage(k->conn));
        goto out;
    }
    for (int i = 0; i < PQntuples(res); i++) {
        for (size_t s = 0; s < k->nsources; s++) {
            sink_source_t *src = &k->sources[s];
            if (src->loaded || strcmp(src->name, PQgetvalue(res, i, 0)) != 0)
                continue;
            wp_lsn_parse(PQgetvalue(res, i, 1), strlen(PQgetvalue(res, i, 1)), &src->durable.lsn);
            src->durable.seq = (int32_t)strtol(PQgetvalue(res, i, 2), NULL, 10);
            src->durable.id = strtoll(PQgetvalue(res, i, 3), NULL, 10);
            src->durable.ord = 0;
        }
    }
    for (size_t s = 0; s < k->nsources; s++) {
        sink_source_t *src = &k->sources[s];
        if (!src->loaded) {
            char l[WP_LSN_STRLEN];
            src->loaded = true;
            src->read = src->durable;
            wp_metric_set(src->m_pos, (double)src->durable.lsn);
            wp_info("source \"%s\": from position %s/%d/%lld", src->name, wp_lsn_format(src->durable.lsn, l),
                    src->durable.seq, (long long)src->durable.id);
        }
    }
    rc = 0;
out:
    PQclear(res);
    return rc;
}

static const char SAVE_SQL[] =
    "INSERT INTO walpipe.sink_positions AS p (sink, source, lsn, seq, event_id, events_delivered, updated_at) "
    "VALUES ($1, $2, $3::pg_lsn, $4::int, $5::int8, $6::int8, now()) ON CONFLICT (sink, source) DO UPDATE "
    "SET lsn = excluded.lsn, seq = excluded.seq, event_id = excluded.event_id, "
    "events_delivered = p.events_delivered + excluded.events_delivered, updated_at = now() "
    "WHERE (p.lsn, p.seq, p.event_id) <= (excluded.lsn, excluded.seq, excluded.event_id)";

/* Writes the positions that moved; 0, or -1 (logged; they stay dirty). */
static int save_positions(sink_t *k)
{
    if (k->conn == NULL)
        return -1;
    for (size_t s = 0; s < k->nsources; s++) {
        sink_source_t *src = &k->sources[s];
        if (!src->dirty)
            continue;
        char lsn[WP_LSN_STRLEN], seq[16], id[24], n[24];
        wp_lsn_format(src->durable.lsn, lsn);
        snprintf(seq, sizeof seq, "%d", src->durable.seq);
        snprintf(id, sizeof id, "%lld", (long long)src->durable.id);
        snprintf(n, sizeof n, "%lld", src->unsaved);
        const char *params[] = {k->sc->name, src->name, lsn, seq, id, n};
        PGresult *res = PQexecParams(k->conn, SAVE_SQL, 6, NULL, params, NULL, NULL, 0);
        bool ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        if (!ok)
            wp_error("staging: could not save the position of sink \"%s\" for source \"%s\": %s", k->sc->name,
                     src->name, PQerrorMessage(k->conn));
        PQclear(res);
        if (!ok)
            return -1;
        src->dirty = false;
        src->unsaved = 0;
    }
    return 0;
}

/* Moves the positions over what became durable. */
static void settle(sink_t *k)
{
    int src, delivered;
    wp_sink_pos_t pos;
    while (wp_session_settle(k->session, &src, &pos, &delivered)) {
        sink_source_t *s = &k->sources[src];
        s->durable = pos;
        s->dirty = true;
        s->unsaved += delivered;
        k->delivered += (unsigned long long)delivered;
        if (delivered)
            wp_metric_add(s->m_events, delivered);
        wp_metric_set(s->m_pos, (double)pos.lsn);
    }
}

/* Ends the plugin session after an error; back to the durable positions. */
static void end_session(sink_t *k)
{
    wp_session_close(k->session);
    wp_metric_set(k->m_up, 0);
    for (size_t s = 0; s < k->nsources; s++)
        k->sources[s].read = k->sources[s].durable;
}

/*
 * Every STATS_MS: the backlog gauge and a progress line.  Counting a backlog
 * scans the index from the position, so a sink far behind counts less often
 * (20 times the count's own duration apart): a sink must not load staging.
 */
static void stats(sink_t *k, int64_t *last_ms, int64_t *next_ms, unsigned long long *last_delivered)
{
    int64_t now = wp_now_ms();
    if (now < *next_ms || k->conn == NULL)
        return;
    long long backlog = 0;
    for (size_t s = 0; s < k->nsources; s++) {
        long long n = wp_feed_backlog(k->conn, k->sources[s].name, &k->sources[s].durable);
        if (n >= 0) {
            wp_metric_set(k->sources[s].m_lag, (double)n);
            backlog += n;
        }
    }
    int64_t took = wp_now_ms() - now;
    if (k->delivered != *last_delivered || backlog > 0)
        wp_info("delivered %llu events (%.0f/s), %lld behind", k->delivered,
                (double)(k->delivered - *last_delivered) * 1000.0 / (double)(now - *last_ms), backlog);
    *last_ms = now;
    *next_ms = now + (took * 20 > STATS_MS ? took * 20 : STATS_MS);
    *last_delivered = k->delivered;
}

/* True when staging has the index sinks read by; says once that `walpipe init` makes it. */
static bool index_ready(sink_t *k, bool *told)
{
    int ready = wp_feed_index_ready(k->conn);
    if (ready == 0 && !*told) {
        wp_error("staging has no index for sinks to read by (walpipe.raw_events_source_order); the sink waits: run "
                 "`walpipe init --config %s`, which creates it for a configuration with [sink] sections",
                 k->config->path ? k->config->path : "FILE");
        *told = true;
    }
    return ready == 1;
}

/* Takes the sink's lock in staging: true when held, false when another process holds it (or an error). */
static bool lock_sink(sink_t *k, bool *told)
{
    char key[128];
    snprintf(key, sizeof key, "walpipe sink %s", k->sc->name);
    const char *params[] = {key};
    PGresult *res = PQexecParams(k->conn, "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", 1, NULL, params,
                                 NULL, NULL, 0);
    bool held = PQresultStatus(res) == PGRES_TUPLES_OK && PQgetvalue(res, 0, 0)[0] == 't';
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        wp_error("staging: could not lock sink \"%s\": %s", k->sc->name, PQerrorMessage(k->conn));
    else if (!held && !*told) {
        wp_warn("sink \"%s\" is running in another walpipe process; waiting until it stops", k->sc->name);
        *told = true;
    }
    PQclear(res);
    return held;
}

static void *sink_main(void *arg)
{
    sink_t *k = arg;
    char name[96], appname[96], err[WP_ERRLEN];
    int backoff = BACKOFF_MIN_MS;
    int64_t last_stats = wp_now_ms(), next_stats = last_stats + STATS_MS;
    unsigned long long last_delivered = 0;
    bool told_locked = false, told_index = false;
    int batch = k->sc->batch_events;

    snprintf(name, sizeof name, "sink %s", k->sc->name);
    snprintf(appname, sizeof appname, "walpipe_sink_%s", k->sc->name);
    wp_log_set_component(name);
    k->session = wp_session_create(k->sc, k->lib, false);

    while (!stopping(k)) {
        if (k->conn == NULL) {
            if (wp_pg_connect_staging(k->config, appname, WP_FEED_PG_OPTIONS, true, &k->conn) != WP_STAGING_OK ||
                wp_pg_exec(k->conn, "staging", "LISTEN walpipe_raw_events", "listen for new events") != 0 ||
                !index_ready(k, &told_index) || !lock_sink(k, &told_locked) || load_positions(k) != 0) {
                close_conn(k);
                sleep_ms(k, backoff);
                backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
                continue;
            }
            told_locked = false;
            save_positions(k); /* what became durable while staging was away */
        }
        stats(k, &last_stats, &next_stats, &last_delivered); /* also while the plugin is down */
        if (!wp_session_is_open(k->session)) {
            int rc = wp_session_open(k->session, err, sizeof err);
            if (rc == WP_SINK_FATAL) {
                wp_error("sink \"%s\" stopped: %s", k->sc->name, err);
                atomic_store(&k->fatal, 1);
                break;
            }
            if (rc != WP_SINK_OK) {
                wp_warn("%s; retrying in %d ms", err, backoff);
                sleep_ms(k, backoff);
                backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
                continue;
            }
            wp_metric_set(k->m_up, 1);
            wp_info("plugin %s open (%s)", k->lib->plugin->name, k->lib->path);
        }

        /* read and deliver, a batch per source, while not too far ahead of durable */
        bool read_any = false, staging_lost = false;
        int rc = WP_SINK_OK;
        for (size_t s = 0; s < k->nsources && rc == WP_SINK_OK; s++) {
            if (wp_session_pending(k->session) >= (size_t)batch * PENDING_BATCHES)
                break;
            sink_source_t *src = &k->sources[s];
            wp_feed_row_t *rows;
            int n = wp_feed_read(src->feed, k->conn, &src->read, 0, batch, &rows);
            if (n < 0) {
                staging_lost = true;
                break;
            }
            if (n == 0)
                continue;
            rc = wp_session_deliver(k->session, (int)s, rows, n, err, sizeof err);
            src->read = rows[n - 1].pos;
            read_any = true;
        }
        if (rc == WP_SINK_OK)
            rc = wp_session_poll(k->session, read_any ? 0 : wp_session_pending(k->session) ? BUSY_POLL_MS : 0, err,
                                 sizeof err);
        if (rc == WP_SINK_OK) {
            settle(k);
            bool moved = false;
            for (size_t s = 0; s < k->nsources; s++)
                moved = moved || k->sources[s].dirty;
            if (moved && save_positions(k) != 0)
                staging_lost = true;
            else if (moved)
                backoff = BACKOFF_MIN_MS;
        } else if (rc == WP_SINK_FATAL) {
            wp_error("sink \"%s\" stopped: %s", k->sc->name, err);
            atomic_store(&k->fatal, 1);
            end_session(k); /* no flush: the plugin refused; what it made durable before is saved below */
            break;
        } else {
            wp_warn("%s; delivering again from the durable position in %d ms", err, backoff);
            end_session(k);
            sleep_ms(k, backoff);
            backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
            continue;
        }
        if (staging_lost || PQstatus(k->conn) != CONNECTION_OK) {
            /* the plugin session goes on; what it makes durable is saved once staging is back */
            close_conn(k);
            sleep_ms(k, backoff);
            backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
            continue;
        }
        if (!read_any && wp_session_pending(k->session) == 0)
            wait_notify(k, IDLE_WAIT_MS);
    }

    if (wp_session_is_open(k->session)) {
        if (wp_session_pending(k->session) > 0 && wp_session_flush(k->session, FLUSH_MS, err, sizeof err) != WP_SINK_OK)
            wp_warn("flush at stop: %s", err);
        settle(k);
        wp_session_close(k->session);
    }
    if (k->conn == NULL)
        wp_pg_connect_staging(k->config, appname, WP_FEED_PG_OPTIONS, false, &k->conn);
    if (save_positions(k) == 0)
        wp_info("stopped after delivering %llu events", k->delivered);
    else
        wp_warn("stopped; its last durable events will be delivered again (the position could not be saved)");
    close_conn(k);
    wp_metric_set(k->m_up, 0);
    atomic_store(&k->done, 1);
    return NULL;
}

/* ---------------------------------------------------------------- pool */

static void sink_free(sink_t *k)
{
    for (size_t s = 0; s < k->nsources; s++)
        wp_feed_destroy(k->sources[s].feed);
    free(k->sources);
    wp_session_destroy(k->session);
    wp_plugin_unload(k->lib);
}

size_t wp_sink_nsources(const wp_config_t *config, size_t i)
{
    return config->sinks[i].sources ? config->sinks[i].nsources : config->nsources;
}

const char *wp_sink_source(const wp_config_t *config, size_t i, size_t k)
{
    return config->sinks[i].sources ? config->sinks[i].sources[k] : config->sources[k].name;
}

int wp_sink_look(PGconn *conn, const wp_config_t *config, size_t i, size_t k, wp_sink_look_t *out, char *err,
                 size_t errlen)
{
    memset(out, 0, sizeof *out);
    out->sink = config->sinks[i].name;
    out->plugin = config->sinks[i].plugin;
    out->source = wp_sink_source(config, i, k);
    out->backlog = -1;
    const char *params[] = {out->sink, out->source};
    PGresult *res = PQexecParams(conn,
                                 "SELECT lsn::text, seq, event_id, events_delivered, extract(epoch FROM updated_at) "
                                 "FROM walpipe.sink_positions WHERE sink = $1 AND source = $2",
                                 2, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        snprintf(err, errlen, "could not read the position of sink \"%s\": %s", out->sink, PQerrorMessage(conn));
        PQclear(res);
        return -1;
    }
    wp_sink_pos_t pos = WP_SINK_POS_START;
    if (PQntuples(res) == 1) {
        out->has_position = true;
        wp_lsn_parse(PQgetvalue(res, 0, 0), strlen(PQgetvalue(res, 0, 0)), &pos.lsn);
        pos.seq = (int32_t)strtol(PQgetvalue(res, 0, 1), NULL, 10);
        pos.id = strtoll(PQgetvalue(res, 0, 2), NULL, 10);
        out->lsn = pos.lsn;
        out->seq = pos.seq;
        out->delivered = strtoll(PQgetvalue(res, 0, 3), NULL, 10);
        out->updated_unix = strtod(PQgetvalue(res, 0, 4), NULL);
    }
    PQclear(res);
    out->backlog = wp_feed_backlog(conn, out->source, &pos);
    return 0;
}

/* The sources of sc (its list, or every configured source), with their feeds and metrics. */
static void sink_sources(sink_t *k)
{
    const wp_sink_config_t *sc = k->sc;
    size_t n = wp_sink_nsources(k->config, (size_t)(sc - k->config->sinks));
    k->sources = wp_calloc(n ? n : 1, sizeof *k->sources);
    k->nsources = n;
    for (size_t i = 0; i < n; i++) {
        sink_source_t *s = &k->sources[i];
        s->name = wp_sink_source(k->config, (size_t)(sc - k->config->sinks), i);
        s->feed = wp_feed_create(s->name, sc->tables, sc->ntables);
        s->durable = s->read = WP_SINK_POS_START;
        s->m_events = wp_metric(WP_METRIC_COUNTER, "walpipe_sink_events_total",
                                "Events a sink's plugin reported durable downstream", "sink", sc->name, "source",
                                s->name, NULL);
        s->m_lag = wp_metric(WP_METRIC_GAUGE, "walpipe_sink_lag_events",
                             "Staged events a sink has still to deliver (its backlog)", "sink", sc->name, "source",
                             s->name, NULL);
        s->m_pos = wp_metric(WP_METRIC_GAUGE, "walpipe_sink_position_lsn",
                             "The lsn of a sink's position (last durable event), as a number", "sink", sc->name,
                             "source", s->name, NULL);
    }
    k->m_up = wp_metric(WP_METRIC_GAUGE, "walpipe_sink_up", "1 while a sink's plugin session is open", "sink",
                        sc->name, NULL);
}

wp_sinks_t *wp_sinks_start(const wp_config_t *config, const char *only)
{
    struct wp_sinks *p = wp_calloc(1, sizeof *p);
    char err[WP_ERRLEN];
    p->config = config;
    p->sinks = wp_calloc(config->nsinks ? config->nsinks : 1, sizeof *p->sinks);
    for (size_t i = 0; i < config->nsinks; i++) {
        const wp_sink_config_t *sc = &config->sinks[i];
        if (only && strcmp(only, sc->name) != 0)
            continue;
        sink_t *k = &p->sinks[p->n];
        k->pool = p;
        k->config = config;
        k->sc = sc;
        k->lib = wp_plugin_load(config, sc, err, sizeof err);
        if (k->lib == NULL) {
            wp_error("%s", err);
            goto fail;
        }
        sink_sources(k);
        p->n++;
    }
    for (size_t i = 0; i < p->n; i++) {
        sink_t *k = &p->sinks[i];
        if (pthread_create(&k->thread, NULL, sink_main, k) != 0) {
            wp_error("could not start the thread of sink \"%s\"", k->sc->name);
            atomic_store(&k->fatal, 1);
            atomic_store(&k->done, 1);
            continue;
        }
        k->started = true;
    }
    if (p->n > 0)
        wp_info("started %zu sink(s)", p->n);
    return p;
fail:
    for (size_t i = 0; i < p->n; i++)
        sink_free(&p->sinks[i]);
    free(p->sinks);
    free(p);
    return NULL;
}

void wp_sinks_wait(wp_sinks_t *p)
{
    for (;;) {
        bool all_done = true;
        for (size_t i = 0; i < p->n; i++)
            all_done = all_done && atomic_load(&p->sinks[i].done);
        if (all_done || wp_stop_requested() || atomic_load(&p->stop))
            return;
        struct timespec ts = {0, 200 * 1000000L};
        nanosleep(&ts, NULL);
    }
}

int wp_sinks_stop(wp_sinks_t *p)
{
    if (p == NULL)
        return 0;
    int rc = 0;
    atomic_store(&p->stop, 1);
    for (size_t i = 0; i < p->n; i++) {
        sink_t *k = &p->sinks[i];
        if (k->started)
            pthread_join(k->thread, NULL);
        if (atomic_load(&k->fatal))
            rc = -1;
        sink_free(k);
    }
    free(p->sinks);
    free(p);
    return rc;
}

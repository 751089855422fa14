/*
 * worker.c: the worker pool: claim raw_events, hand them to the applier,
 * mark them processed, in one staging transaction.
 *
 * Job: each worker thread (or `walpipe work` process) loops: claim up to
 * claim_size unprocessed events with FOR UPDATE SKIP LOCKED, setting
 * processed = true in the same statement; apply them (applier.c; mirror.c
 * says why any order is fine); dead-letter those that fail (dlq.c); commit.
 * When nothing is left it sleeps on LISTEN walpipe_raw_events, which the
 * stager NOTIFYs with each commit.  Every second it also retries the dead
 * letters that are due.  A monitor thread logs progress, runs key
 * discovery (keys.c: at start, every 5 minutes, and for the tables workers
 * ask for with NOTIFY walpipe_discover) and with it the source column
 * catalog (columns.c), and polls the sources' catalogs for rewritten tables
 * (rewrites.c).
 *
 * Unknown keys and column catalogs: a claim that meets tables with no key
 * recorded, or a new column whose catalog was not read since it appeared,
 * rolls back, asks for all of them at once and waits once (only if a
 * `walpipe run` holds the discovery lock, i.e. someone will answer); its
 * next attempt dead-letters what is still unknown as deferred and adds
 * columns without the catalog.  So every claim ends, and a table that is
 * gone is recorded as such by the discovery it asked for.
 *
 * Invariant: an event is marked processed in the same transaction that
 * applies it or records its dead letter.  A worker that dies mid-claim
 * leaves nothing behind: its transaction rolls back, the rows unlock, and
 * another worker claims them.  Since applying is idempotent, the only cost
 * of a crash is doing the claim again.
 *
 * Claiming granularity: rows (ORDER BY id LIMIT claim_size), not batch_id.
 * A staging batch is whatever the stager committed together: from one row
 * (a quiet source commits every change) to batch_rows, so batches make
 * uneven units of work; claiming by batch_id also needs an index on batch_id
 * that the stager would pay for on every insert.  README ("Transform
 * workers") has the measurements.
 *
 * Threading: a worker owns its connection, applier and caches; the pool
 * shares only counters (atomics) and the stop flag.
 */
#include "wp_setup.h"

#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "applier.h"
#include "columns.h"
#include "metrics.h"
#include "diverge.h"
#include "dlq.h"
#include "keys.h"
#include "log.h"
#include "migrate.h"
#include "pg.h"
#include "rewrites.h"
#include "runtime.h"
#include "worker.h"

#define DLQ_CHECK_MS 1000
#define IDLE_WAIT_MS 1000
#define PROGRESS_LOG_MS 10000
#define DISCOVER_EVERY_MS (300 * 1000)
#define DISCOVER_MIN_GAP_MS 1000
#define REQUEST_MIN_GAP_MS 200 /* between reads of just the tables workers asked for (cheap: those alone) */
#define REWRITE_POLL_MS 5000 /* how often `walpipe run` reads pg_class for rewritten tables (rewrites.c) */
#define FIRST_DISCOVERY_WAIT_MS 10000 /* workers of `walpipe run` wait this long at most for the keys read at start */
#define KEY_WAIT_MS 5000 /* a claim waits at most this long, once, for keys `walpipe run` has not recorded */
#define BACKOFF_MIN_MS 500
#define BACKOFF_MAX_MS 30000

/* ---------------------------------------------------------------- worker threads */

typedef struct worker {
    struct wp_workers *pool;
    int index;
    pthread_t thread;
    bool started;
    PGconn *conn;
    wp_applier_t *applier;
    wp_event_t *events;
} worker_t;

struct wp_workers {
    const wp_config_t *config;
    int count;
    bool discover;
    bool fatal_on_old_schema; /* `walpipe work`: nothing else will tell the user */
    atomic_int stop;
    atomic_int fatal;
    atomic_int running;
    atomic_int keys_read; /* the monitor's first discovery is done (or it gave up waiting for staging) */
    atomic_ullong applied;
    atomic_ullong failed;
    wp_metric_t *m_applied, *m_failed; /* metrics.h: looked up once */
    worker_t *workers;
    pthread_t monitor;
    bool monitor_started;
};

static bool stopping(const struct wp_workers *p)
{
    return wp_stop_requested() || atomic_load(&p->stop);
}

static void sleep_ms(const struct wp_workers *p, int ms)
{
    while (ms > 0 && !stopping(p)) {
        int step = ms < 100 ? ms : 100;
        struct timespec ts = {step / 1000, (long)(step % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        ms -= step;
    }
}

/*
 * Connects to staging, checks the schema and sets the session up for
 * applying.  NULL when it cannot (logged), with *old_schema set when the
 * schema is too old (not logged: the caller reports that once).
 */
static PGconn *connect_staging(const wp_config_t *config, const char *appname, bool *old_schema)
{
    PGconn *conn = NULL;
    wp_staging_check_t st = wp_pg_connect_staging(config, appname, NULL, false, &conn);
    *old_schema = st == WP_STAGING_OLD_SCHEMA;
    if (conn != NULL && wp_applier_session(conn) != 0) {
        PQfinish(conn);
        conn = NULL;
    }
    return conn;
}

static void report_old_schema(const struct wp_workers *p, bool fatal)
{
    if (fatal)
        wp_error("staging schema is older than this walpipe needs (version %d); hint: run `walpipe init --config %s`",
                 wp_migrate_latest_version(), p->config->path ? p->config->path : "FILE");
    else
        wp_warn("staging schema is older than this walpipe needs (version %d); workers wait for `walpipe init`",
                wp_migrate_latest_version());
}

static void worker_close(worker_t *w)
{
    wp_applier_destroy(w->applier);
    w->applier = NULL;
    if (w->conn)
        PQfinish(w->conn);
    w->conn = NULL;
}

/* Waits for NOTIFY walpipe_raw_events (or the timeout, or a stop). */
static void wait_notify(worker_t *w, int timeout_ms)
{
    int64_t deadline = wp_now_ms() + timeout_ms;
    for (;;) {
        PGnotify *note;
        bool got = false;
        PQconsumeInput(w->conn);
        while ((note = PQnotifies(w->conn)) != NULL) {
            got = true;
            PQfreemem(note);
        }
        int64_t left = deadline - wp_now_ms();
        if (got || left <= 0 || stopping(w->pool) || PQstatus(w->conn) != CONNECTION_OK)
            return;
        struct pollfd pfd = {.fd = PQsocket(w->conn), .events = POLLIN};
        poll(&pfd, 1, left < 250 ? (int)left : 250);
    }
}

static const char CLAIM_SQL[] =
    "WITH c AS (SELECT id, received_at FROM walpipe.raw_events WHERE NOT processed ORDER BY id LIMIT $1 "
    "FOR UPDATE SKIP LOCKED) "
    "UPDATE walpipe.raw_events r SET processed = true FROM c WHERE r.id = c.id AND r.received_at = c.received_at "
    "RETURNING r.id, r.received_at::text, r.source, r.event_type, r.payload::text, r.lsn::text, r.seq, "
    "r.schema_name, r.table_name, r.shape_id::text";

/*
 * Claiming by staging batch instead of by rows, for bench/mirror_apply.py
 * only (WALPIPE_BENCH_CLAIM=batch, with an index on batch_id the bench
 * creates): the comparison behind claiming by rows (see the top of the file).
 */
static const char CLAIM_BATCH_SQL[] =
    "WITH b AS (SELECT batch_id FROM walpipe.raw_events WHERE NOT processed ORDER BY id LIMIT 1 "
    "FOR UPDATE SKIP LOCKED), "
    "c AS (SELECT e.id, e.received_at FROM walpipe.raw_events e, b WHERE e.batch_id = b.batch_id AND NOT "
    "e.processed LIMIT $1 FOR UPDATE OF e SKIP LOCKED) "
    "UPDATE walpipe.raw_events r SET processed = true FROM c WHERE r.id = c.id AND r.received_at = c.received_at "
    "RETURNING r.id, r.received_at::text, r.source, r.event_type, r.payload::text, r.lsn::text, r.seq, "
    "r.schema_name, r.table_name, r.shape_id::text";

/*
 * One claim: BEGIN, claim and mark, apply, dead-letter failures, COMMIT.
 * Returns the number of events claimed, or -1 (rolled back; logged).
 */
static int claim_and_apply(worker_t *w)
{
    char limit[16];
    int n = -1;
    PGresult *res = NULL;
    snprintf(limit, sizeof limit, "%d", w->pool->config->claim_size);
    const char *params[] = {limit};
    if (wp_pg_exec(w->conn, "staging", "BEGIN", "begin a claim") != 0)
        return -1;
    const char *bench = getenv("WALPIPE_BENCH_CLAIM");
    res = PQexecParams(w->conn, bench && strcmp(bench, "batch") == 0 ? CLAIM_BATCH_SQL : CLAIM_SQL, 1, NULL, params,
                       NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        wp_warn("staging: could not claim events: %s", PQerrorMessage(w->conn));
        goto rollback;
    }
    size_t count = wp_events_from_result(res, w->events);
    if (count == 0) {
        PQclear(res);
        return wp_pg_exec(w->conn, "staging", "COMMIT", "commit an empty claim") == 0 ? 0 : -1;
    }
    if (wp_applier_check_generations(w->applier) != 0)
        goto rollback;
    int rc = wp_applier_apply(w->applier, w->events, count);
    if (rc < 0)
        wp_info("claim of %zu events rolled back, to be claimed again: %s", count, wp_applier_last_error(w->applier));
    if (rc == 1) {
        PQclear(PQexec(w->conn, "ROLLBACK"));
        wp_applier_reset(w->applier);
        wp_applier_wait_keys(w->applier, KEY_WAIT_MS);
        PQclear(res);
        return (int)count; /* claim again at once */
    }
    if (rc != 0)
        goto rollback;
    unsigned long long failed = 0;
    for (size_t i = 0; i < count; i++) {
        if (w->events[i].fail == WP_FAIL_NONE)
            continue;
        if (wp_dlq_record(w->conn, w->pool->config, &w->events[i]) != 0)
            goto rollback;
        failed++;
    }
    if (failed > 0 && wp_applier_request_keys(w->applier) != 0) /* for deferred unknown tables, sent at commit */
        goto rollback;
    if (wp_pg_exec(w->conn, "staging", "COMMIT", "commit a claim") != 0)
        goto rollback;
    atomic_fetch_add(&w->pool->applied, (unsigned long long)count - failed);
    atomic_fetch_add(&w->pool->failed, failed);
    wp_metric_add(w->pool->m_applied, (double)(count - failed));
    wp_metric_add(w->pool->m_failed, (double)failed);
    n = (int)count;
    PQclear(res);
    return n;
rollback:
    PQclear(res);
    if (PQstatus(w->conn) == CONNECTION_OK)
        PQclear(PQexec(w->conn, "ROLLBACK"));
    wp_applier_reset(w->applier);
    return -1;
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    struct wp_workers *p = w->pool;
    char name[48], appname[64];
    int backoff = BACKOFF_MIN_MS;
    bool told_old = false;
    int64_t next_dlq = 0;
    snprintf(name, sizeof name, "worker %d", w->index + 1);
    snprintf(appname, sizeof appname, "walpipe_worker_%d", w->index + 1);
    wp_log_set_component(name);
    w->events = wp_calloc((size_t)p->config->claim_size, sizeof *w->events);
    /* `walpipe run`: the keys read at start spare the first claims a wait, or a deferral */
    for (int64_t until = wp_now_ms() + FIRST_DISCOVERY_WAIT_MS;
         p->discover && !atomic_load(&p->keys_read) && wp_now_ms() < until && !stopping(p);)
        sleep_ms(p, 50);

    while (!stopping(p)) {
        if (w->conn == NULL) {
            bool old = false;
            w->conn = connect_staging(p->config, appname, &old);
            if (w->conn == NULL) {
                if (old && !told_old) {
                    report_old_schema(p, p->fatal_on_old_schema);
                    told_old = true;
                }
                if (old && p->fatal_on_old_schema) {
                    atomic_store(&p->fatal, 1);
                    break;
                }
                sleep_ms(p, backoff);
                backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
                continue;
            }
            if (wp_pg_exec(w->conn, "staging", "LISTEN walpipe_raw_events", "listen for new events") != 0) {
                worker_close(w);
                sleep_ms(p, backoff);
                backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
                continue;
            }
            w->applier = wp_applier_create(p->config, w->conn);
            wp_applier_may_wait_keys(w->applier, true);
            told_old = false;
        }
        int n = claim_and_apply(w);
        if (n < 0) {
            if (PQstatus(w->conn) != CONNECTION_OK) {
                worker_close(w);
                wp_info("retrying in %d ms", backoff);
                sleep_ms(p, backoff);
                backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
            } else {
                sleep_ms(p, 100); /* a deadlock or lock timeout: let the other side finish */
            }
            continue;
        }
        backoff = BACKOFF_MIN_MS;
        if (wp_now_ms() >= next_dlq) {
            int r = wp_dlq_retry_due(w->applier, w->conn, p->config);
            next_dlq = wp_now_ms() + (r > 0 ? 0 : DLQ_CHECK_MS);
            if (r < 0 && PQstatus(w->conn) != CONNECTION_OK) {
                worker_close(w);
                continue;
            }
        }
        if (n == 0)
            wait_notify(w, IDLE_WAIT_MS);
    }
    worker_close(w);
    free(w->events);
    w->events = NULL;
    atomic_fetch_sub(&p->running, 1);
    return NULL;
}

/* ---------------------------------------------------------------- monitor thread */

static void log_progress(struct wp_workers *p, PGconn *conn, int64_t *last_ms, unsigned long long *last_applied,
                         long long *last_dead, long long *last_diverged)
{
    int64_t now = wp_now_ms();
    unsigned long long applied = atomic_load(&p->applied), failed = atomic_load(&p->failed);
    long long waiting = 0, parked = 0, undecodable = 0, diverged = 0;
    if (wp_dlq_counts(conn, &waiting, &parked, &undecodable) != 0 || wp_diverge_count_open(conn, &diverged) != 0)
        return;
    long long dead = waiting + parked;
    if (applied != *last_applied || dead != *last_dead || diverged != *last_diverged) {
        double secs = (double)(now - *last_ms) / 1000.0;
        wp_info("mirror: applied %llu changes (%.0f/s), %llu dead-lettered; dead letters: %lld waiting for retry, "
                "%lld parked, %lld undecodable; %lld diverged mirror(s)",
                applied, secs > 0 ? (double)(applied - *last_applied) / secs : 0.0, failed, waiting, parked,
                undecodable, diverged);
        if (dead > *last_dead && *last_dead >= 0)
            wp_warn("dead-letter queue grew by %lld to %lld; see `walpipe dlq list --config %s`", dead - *last_dead,
                    dead, p->config->path ? p->config->path : "FILE");
        if (diverged > 0 && diverged > *last_diverged)
            wp_warn("%lld mirror(s) diverged from their source (missed changes); see walpipe.divergences%s", diverged,
                    p->config->resync_auto ? "; `walpipe run` resyncs them (resync = auto)"
                                           : "; resync = off: resync them with `walpipe snapshot --table`");
    }
    *last_ms = now;
    *last_applied = applied;
    *last_dead = dead;
    *last_diverged = diverged;
}

/* Tables workers asked for (NOTIFY walpipe_discover payloads), until the next discovery reads them. */
typedef struct requests {
    char **source, **schema, **table; /* owned */
    size_t n, cap;
} requests_t;

static void requests_clear(requests_t *r)
{
    for (size_t i = 0; i < r->n; i++) {
        free(r->source[i]);
        free(r->schema[i]);
        free(r->table[i]);
    }
    r->n = 0;
}

static void requests_free(requests_t *r)
{
    requests_clear(r);
    free(r->source);
    free(r->schema);
    free(r->table);
}

/* Reads one "<len>:text" of a payload into a new string; NULL when malformed. */
static char *payload_part(const char **pp)
{
    char *end;
    unsigned long len = strtoul(*pp, &end, 10);
    if (end == *pp || *end != ':' || strlen(end + 1) < len)
        return NULL;
    char *out = wp_malloc(len + 1);
    memcpy(out, end + 1, len);
    out[len] = '\0';
    *pp = end + 1 + len;
    return out;
}

/* Adds the table a payload "<len>:source<len>:schema<len>:table" names (see applier.c, table_key). */
static void requests_add(requests_t *r, const char *payload)
{
    const char *pp = payload;
    char *src = payload_part(&pp), *schema = src ? payload_part(&pp) : NULL, *table = schema ? payload_part(&pp) : NULL;
    bool dup = false;
    for (size_t i = 0; table && i < r->n && !dup; i++)
        dup = strcmp(r->source[i], src) == 0 && strcmp(r->schema[i], schema) == 0 && strcmp(r->table[i], table) == 0;
    if (table == NULL || dup || r->n >= 10000) {
        free(src);
        free(schema);
        free(table);
        return;
    }
    if (r->n == r->cap) {
        r->cap = r->cap ? r->cap * 2 : 16;
        r->source = wp_realloc(r->source, r->cap * sizeof *r->source);
        r->schema = wp_realloc(r->schema, r->cap * sizeof *r->schema);
        r->table = wp_realloc(r->table, r->cap * sizeof *r->table);
    }
    r->source[r->n] = src;
    r->schema[r->n] = schema;
    r->table[r->n++] = table;
}

/*
 * Reads every source's keys and columns (all = true) or only those of the
 * tables workers asked for, and the tables workers asked for in either case;
 * forgets the requests once tried.
 */
static void discover(struct wp_workers *p, PGconn *conn, requests_t *req, bool all, wp_buf_t *named)
{
    wp_keys_request_t *mine = wp_calloc(req->n + 1, sizeof *mine);
    for (size_t i = 0; i < p->config->nsources && !stopping(p); i++) {
        const wp_source_config_t *src = &p->config->sources[i];
        size_t n = 0;
        for (size_t k = 0; k < req->n; k++) {
            if (strcmp(req->source[k], src->name) == 0) {
                mine[n].schema = req->schema[k];
                mine[n++].table = req->table[k];
            }
        }
        if (all || n > 0) {
            /* columns first: a worker that waited for a key then finds the columns read too (applier.c) */
            wp_columns_discover_tables(src, conn, mine, n, !all);
            wp_keys_discover_tables(src, conn, named, mine, n, !all);
        }
    }
    free(mine);
    requests_clear(req); /* read or failed (logged): a table still unknown is asked for again by its retries */
}

static void *monitor_main(void *arg)
{
    struct wp_workers *p = arg;
    PGconn *conn = NULL;
    wp_buf_t named = WP_BUF_INIT;
    requests_t req = {0};
    wp_rewrites_t *rewrites = p->discover ? wp_rewrites_create(p->config) : NULL;
    bool want_poll = false;
    int64_t last_poll = 0;
    int64_t last_log = wp_now_ms(), last_discover = 0, last_request = 0;
    unsigned long long last_applied = 0;
    long long last_dead = -1, last_diverged = 0;
    bool want_discover = p->discover, told_old = false;
    wp_log_set_component("workers");

    while (!stopping(p)) {
        if (conn == NULL) {
            bool old = false;
            conn = connect_staging(p->config, "walpipe_monitor", &old);
            if (conn == NULL) {
                if (old && !told_old && !p->fatal_on_old_schema)
                    report_old_schema(p, false);
                told_old |= old;
                sleep_ms(p, 5000);
                continue;
            }
            if (p->discover &&
                (wp_pg_exec(conn, "staging", "LISTEN walpipe_discover", "listen for key discovery requests") != 0 ||
                 wp_pg_exec(conn, "staging", "SELECT pg_advisory_lock_shared(" WP_KEYS_DISCOVERY_LOCK ")",
                            "show the workers that keys are discovered") != 0)) {
                PQfinish(conn);
                conn = NULL;
                sleep_ms(p, 5000);
                continue;
            }
            long long waiting = 0, parked = 0, undecodable = 0;
            if (last_dead < 0 && wp_dlq_counts(conn, &waiting, &parked, &undecodable) == 0) {
                last_dead = waiting + parked; /* the baseline a rise is measured from */
                if (waiting + parked + undecodable > 0)
                    wp_warn("dead-letter queue holds %lld waiting for retry, %lld parked, %lld undecodable; see "
                            "`walpipe dlq list --config %s`",
                            waiting, parked, undecodable, p->config->path ? p->config->path : "FILE");
            }
        }
        int64_t now = wp_now_ms();
        if (p->discover && (want_discover || now - last_discover >= DISCOVER_EVERY_MS) &&
            now - last_discover >= DISCOVER_MIN_GAP_MS) {
            discover(p, conn, &req, true, &named);
            atomic_store(&p->keys_read, 1);
            last_discover = wp_now_ms();
            want_discover = false;
        } else if (p->discover && req.n > 0 && now - last_request >= REQUEST_MIN_GAP_MS) {
            discover(p, conn, &req, false, &named);
            last_request = wp_now_ms();
        }
        now = wp_now_ms();
        if (rewrites && (want_poll || now - last_poll >= REWRITE_POLL_MS)) {
            bool rediscover = false;
            wp_rewrites_poll(rewrites, conn, &rediscover);
            want_discover |= rediscover;
            last_poll = wp_now_ms();
            want_poll = false;
        }
        if (now - last_log >= PROGRESS_LOG_MS)
            log_progress(p, conn, &last_log, &last_applied, &last_dead, &last_diverged);
        if (p->count > 0 && atomic_load(&p->running) == 0 && atomic_load(&p->fatal))
            break;
        /* wait for a discovery request */
        struct pollfd pfd = {.fd = PQsocket(conn), .events = POLLIN};
        poll(&pfd, 1, 250);
        PQconsumeInput(conn);
        PGnotify *note;
        while ((note = PQnotifies(conn)) != NULL) {
            if (note->extra && strcmp(note->extra, WP_REWRITES_POLL_NOW) == 0) {
                want_poll = true;
            } else if (note->extra && note->extra[0]) {
                requests_add(&req, note->extra); /* a worker's request: read those tables soon */
            } else {
                want_discover = true;
            }
            PQfreemem(note);
        }
        if (PQstatus(conn) != CONNECTION_OK) {
            PQfinish(conn);
            conn = NULL;
        }
    }
    if (conn)
        PQfinish(conn);
    wp_buf_free(&named);
    requests_free(&req);
    wp_rewrites_destroy(rewrites);
    return NULL;
}

/* ---------------------------------------------------------------- pool */

wp_workers_t *wp_workers_start(const wp_config_t *config, int count, bool discover_keys)
{
    struct wp_workers *p = wp_calloc(1, sizeof *p);
    p->config = config;
    p->count = count;
    p->discover = discover_keys;
    p->fatal_on_old_schema = !discover_keys;
    p->m_applied = wp_metric(WP_METRIC_COUNTER, "walpipe_events_applied_total",
                             "Staged events the consumer processed (applied or dead-lettered apart)", "consumer",
                             "mirror", NULL);
    p->m_failed = wp_metric(WP_METRIC_COUNTER, "walpipe_events_dead_lettered_total",
                            "Staged events the consumer could not apply and dead-lettered", "consumer", "mirror",
                            NULL);
    p->workers = wp_calloc(count > 0 ? (size_t)count : 1, sizeof *p->workers);
    atomic_store(&p->running, count);
    for (int i = 0; i < count; i++) {
        worker_t *w = &p->workers[i];
        w->pool = p;
        w->index = i;
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            wp_error("could not start worker thread %d", i + 1);
            atomic_fetch_sub(&p->running, 1);
            continue;
        }
        w->started = true;
    }
    if (pthread_create(&p->monitor, NULL, monitor_main, p) == 0)
        p->monitor_started = true;
    else
        wp_error("could not start the workers' monitor thread");
    if (count > 0)
        wp_info("started %d transform worker(s), claiming %d events at a time, mirrors in schema \"%s\"", count,
                config->claim_size, config->mirror_schema);
    return p;
}

void wp_workers_wait(wp_workers_t *p)
{
    while (!stopping(p) && !(p->count > 0 && atomic_load(&p->running) == 0))
        sleep_ms(p, 200);
}

int wp_workers_stop(wp_workers_t *p)
{
    if (p == NULL)
        return 0;
    atomic_store(&p->stop, 1);
    for (int i = 0; i < p->count; i++)
        if (p->workers[i].started)
            pthread_join(p->workers[i].thread, NULL);
    if (p->monitor_started)
        pthread_join(p->monitor, NULL);
    int rc = atomic_load(&p->fatal) ? -1 : 0;
    if (p->count > 0)
        wp_info("transform workers stopped: %llu changes applied, %llu dead-lettered",
                (unsigned long long)atomic_load(&p->applied), (unsigned long long)atomic_load(&p->failed));
    free(p->workers);
    free(p);
    return rc;
}

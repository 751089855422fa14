/*
 * lagguard.c: probes sources and staging once a second for metrics and
 * warnings (see lagguard.h).
 *
 * "Behind" for the lag-seconds warning: the slot has not confirmed the WAL
 * position the source had one window (2 status intervals + 2 s) earlier.
 * A healthy walpipe confirms everything within one status interval, so a
 * quiet source, or one writing only tables walpipe does not capture, is not
 * "behind" however old its newest staged change is.
 *
 * Catch-up (catchup.h): from the same look, a source WP_CATCHUP_ENTER_BYTES
 * behind is "catching up"; the guard logs that at once, then every
 * WP_CATCHUP_LOG_MS how far behind, the net rate and the time left, and
 * "caught up after N s" when it is under WP_CATCHUP_LEAVE_BYTES.
 *
 * Invariant: each warning is logged once when its condition starts and once
 * when it clears; its gauge is 1 exactly in between.  The guard only reads.
 */
#include "wp_setup.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <walpipe/walpipe.h>

#include "catchup.h"
#include "lagguard.h"
#include "log.h"
#include "metrics.h"
#include "probe.h"
#include "runtime.h"

#define GUARD_INTERVAL_MS 1000

enum { W_RETAINED, W_LAG_SECONDS, W_STALLED, W_SAFE_WAL, W_COUNT };
static const char *const warning_names[W_COUNT] = {"retained_wal", "lag_seconds", "stalled", "safe_wal_size"};

typedef struct guarded {
    const wp_source_config_t *source;
    PGconn *conn;
    bool was_up;
    bool warned[W_COUNT];
    wp_lsn_t last_confirmed; /* stall: confirmed_flush_lsn at last_moved_ms */
    int64_t last_moved_ms;
    wp_lsn_t ref_lsn; /* behind: the source's WAL position at ref_ms */
    int64_t ref_ms;
    bool behind;
    wp_catchup_t catchup;
    int64_t catchup_log_ms; /* last catch-up report */
    wp_metric_t *m_catching_up, *m_behind, *m_rate, *m_eta;
    wp_metric_t *m_up, *m_active, *m_lag_bytes, *m_retained, *m_lag_seconds, *m_safe, *m_warn[W_COUNT];
    wp_metric_t *m_snap_rows, *m_snap_est, *m_snap_running;
} guarded_t;

struct wp_lagguard {
    const wp_config_t *config;
    bool with_sources;
    pthread_t thread;
    bool started;
    atomic_bool stop;
    guarded_t *sources;
    PGconn *staging;
};

static double now_unix(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void set_warning(guarded_t *g, int w, bool on, const char *fmt, ...) WP_PRINTF(4, 5);

static void set_warning(guarded_t *g, int w, bool on, const char *fmt, ...)
{
    wp_metric_set(g->m_warn[w], on ? 1 : 0);
    if (on == g->warned[w])
        return;
    g->warned[w] = on;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (on)
        wp_warn("lag guard: source \"%s\": %s", g->source->name, msg);
    else
        wp_info("lag guard: source \"%s\": %s cleared", g->source->name, warning_names[w]);
}

#define MB (1024.0 * 1024.0)

/* "25 s": now - commit time of the newest staged change, or "?" */
static const char *commit_age(const wp_probe_source_t *p, char *buf, size_t len)
{
    if (p->last_commit_unix <= 0)
        return "?";
    double age = now_unix() - p->last_commit_unix;
    snprintf(buf, len, "%.0f", age > 0 ? age : 0);
    return buf;
}

/* Follows the source's catch-up (catchup.h): the log lines and the catch-up gauges. */
static void guard_catchup(guarded_t *g, const wp_probe_source_t *p, int64_t now)
{
    wp_lsn_t staged = wp_catchup_staged_lsn(p);
    if (staged == WP_LSN_INVALID)
        return;
    wp_catchup_event_t ev = wp_catchup_update(&g->catchup, now, p->current_lsn, staged);
    int64_t behind = wp_catchup_behind(&g->catchup);
    wp_catchup_rate_t rate = wp_catchup_rate(&g->catchup, WP_CATCHUP_RATE_MS);
    double eta = wp_catchup_eta(behind, &rate);
    bool on = g->catchup.catching_up;
    wp_metric_set(g->m_catching_up, on ? 1 : 0);
    wp_metric_set(g->m_behind, (double)behind);
    wp_metric_set(g->m_rate, rate.known ? rate.net : 0);
    wp_metric_set(g->m_eta, !on ? 0 : eta);

    const char *name = g->source->name;
    char age[32];
    if (ev == WP_CATCHUP_DONE) {
        wp_info("source \"%s\": caught up after %.0f s, %.1f MB of WAL staged (%.1f MB behind now)", name,
                wp_catchup_seconds(&g->catchup), (double)wp_catchup_consumed(&g->catchup) / MB, (double)behind / MB);
        return;
    }
    if (ev == WP_CATCHUP_STARTED) {
        g->catchup_log_ms = now;
        wp_info("source \"%s\": catching up: %.1f MB of WAL (%s s by commit time) behind the source%s", name,
                (double)behind / MB, commit_age(p, age, sizeof age),
                p->active ? "" : "; nothing streams from the slot yet");
        return;
    }
    if (!on || now - g->catchup_log_ms < WP_CATCHUP_LOG_MS)
        return;
    /* the rate since the last report */
    rate = wp_catchup_rate(&g->catchup, now - g->catchup_log_ms + GUARD_INTERVAL_MS / 2);
    eta = wp_catchup_eta(behind, &rate);
    g->catchup_log_ms = now;
    char left[64];
    if (eta >= 0)
        snprintf(left, sizeof left, "about %.0f s left", eta);
    else
        snprintf(left, sizeof left, "%s", rate.known && rate.net < 0 ? "falling further behind" : "time left unknown");
    wp_info("source \"%s\": catching up: %.1f MB of WAL (%s s by commit time) behind the source, %.2f MB/s net "
            "(staging %.2f MB/s, the source writing %.2f MB/s), %s%s",
            name, (double)behind / MB, commit_age(p, age, sizeof age), rate.net / MB, rate.staged / MB,
            rate.written / MB, left, p->active ? "" : "; nothing streams from the slot");
}

static void guard_source(wp_lagguard_t *guard, guarded_t *g)
{
    wp_probe_source_t p;
    const wp_source_config_t *src = g->source;
    int64_t now = wp_now_ms();
    wp_probe_source(src, &g->conn, guard->staging, &p);
    wp_metric_set(g->m_up, p.reachable ? 1 : 0);
    if (!p.reachable) {
        if (g->was_up || g->ref_ms == 0)
            wp_warn("lag guard: source \"%s\" does not answer: %s", src->name, p.error);
        g->was_up = false;
        g->ref_ms = g->ref_ms ? g->ref_ms : now;
        return;
    }
    g->was_up = true;
    wp_metric_set(g->m_active, p.active ? 1 : 0);
    if (!p.slot_exists)
        return;
    wp_metric_set(g->m_lag_bytes, (double)p.lag_bytes);
    wp_metric_set(g->m_retained, (double)p.retained_bytes);
    if (p.has_safe_wal_size)
        wp_metric_set(g->m_safe, (double)p.safe_wal_size);

    /* behind: has the slot confirmed what the source had written one window ago? */
    int64_t window = 2LL * src->status_interval_ms + 2000;
    if (g->ref_ms == 0) {
        g->ref_lsn = p.current_lsn;
        g->ref_ms = now;
    } else if (now - g->ref_ms >= window) {
        g->behind = p.confirmed_flush < g->ref_lsn;
        g->ref_lsn = p.current_lsn;
        g->ref_ms = now;
    }
    double lag_seconds = 0;
    if (g->behind && p.last_commit_unix > 0)
        lag_seconds = now_unix() - p.last_commit_unix;
    if (lag_seconds < 0)
        lag_seconds = 0;
    wp_metric_set(g->m_lag_seconds, lag_seconds);
    guard_catchup(g, &p, now);

    /* stall: confirmed_flush_lsn stands still although the source wrote past it */
    if (p.confirmed_flush != g->last_confirmed || g->last_moved_ms == 0 || p.current_lsn <= p.confirmed_flush) {
        g->last_confirmed = p.confirmed_flush;
        g->last_moved_ms = now;
    }
    double still = (double)(now - g->last_moved_ms) / 1000.0;
    char a[WP_LSN_STRLEN], b[WP_LSN_STRLEN];

    set_warning(g, W_RETAINED, p.retained_bytes > (int64_t)src->max_lag_bytes,
                "the slot \"%s\" retains %lld bytes of WAL, more than max_lag_bytes (%zu); walpipe is not keeping up "
                "or not running",
                src->slot, (long long)p.retained_bytes, src->max_lag_bytes);
    set_warning(g, W_LAG_SECONDS, lag_seconds > src->max_lag_seconds,
                "staging is %.0f s behind the source's commits, more than max_lag_seconds (%d)", lag_seconds,
                src->max_lag_seconds);
    set_warning(g, W_STALLED, still >= src->max_stall_seconds,
                "the slot's confirmed_flush_lsn has stood at %s for %.0f s while the source wrote up to %s "
                "(max_stall_seconds %d): staging is not advancing",
                wp_lsn_format(p.confirmed_flush, a), still, wp_lsn_format(p.current_lsn, b), src->max_stall_seconds);
    set_warning(g, W_SAFE_WAL, p.has_safe_wal_size && p.safe_wal_size < (int64_t)src->min_safe_wal_size,
                "only %lld bytes of WAL are left before max_slot_wal_keep_size invalidates the slot \"%s\" "
                "(min_safe_wal_size %zu)",
                (long long)p.safe_wal_size, src->slot, src->min_safe_wal_size);

    bool running = p.has_snapshot && strcmp(p.snapshot_state, "running") == 0;
    wp_metric_set(g->m_snap_running, running ? 1 : 0);
    if (p.has_snapshot) {
        wp_metric_set(g->m_snap_rows, (double)p.snapshot_rows);
        wp_metric_set(g->m_snap_est, (double)(p.snapshot_estimated > 0 ? p.snapshot_estimated : 0));
    }
}

static void guard_staging(wp_lagguard_t *guard)
{
    if (guard->staging && PQstatus(guard->staging) != CONNECTION_OK) {
        PQfinish(guard->staging);
        guard->staging = NULL;
    }
    if (guard->staging == NULL) {
        char err[256];
        guard->staging = wp_probe_connect(guard->config->staging_conninfo, "walpipe lag guard", err, sizeof err);
        if (guard->staging == NULL)
            return;
    }
    wp_probe_staging_t s;
    if (wp_probe_staging(guard->staging, &s) != 0)
        return;
    static const char *const kinds[] = {"waiting", "parked", "undecodable"};
    int64_t counts[] = {s.dead_waiting, s.dead_parked, s.dead_undecodable};
    for (int i = 0; i < 3; i++)
        wp_metric_set(wp_metric(WP_METRIC_GAUGE, "walpipe_dead_letters", "Dead letters in walpipe.dead_letters",
                                "kind", kinds[i], NULL),
                      (double)counts[i]);
    wp_metric_set(wp_metric(WP_METRIC_GAUGE, "walpipe_consumer_backlog_events",
                            "Staged events the consumer has not processed yet", "consumer", "mirror", NULL),
                  (double)s.backlog_events);
    wp_metric_set(wp_metric(WP_METRIC_GAUGE, "walpipe_consumer_lag_seconds",
                            "Age of the oldest staged event the consumer has not processed (0: none)", "consumer",
                            "mirror", NULL),
                  s.consumer_lag_seconds);
    if (s.diverged_mirrors >= 0)
        wp_metric_set(wp_metric(WP_METRIC_GAUGE, "walpipe_diverged_mirrors",
                                "Mirror tables with an open divergence (walpipe.divergences)", NULL),
                      (double)s.diverged_mirrors);
    wp_metric_set(wp_metric(WP_METRIC_GAUGE, "walpipe_raw_events_partitions", "Partitions of walpipe.raw_events",
                            NULL),
                  (double)s.partitions);
    wp_metric_set(wp_metric(WP_METRIC_GAUGE, "walpipe_raw_events_bytes",
                            "Size of walpipe.raw_events with its indexes", NULL),
                  (double)s.raw_events_bytes);
    if (s.cache_hit_ratio >= 0)
        wp_metric_set(wp_metric(WP_METRIC_GAUGE, "walpipe_staging_cache_hit_ratio",
                                "Share of the staging database's block reads served from shared buffers", NULL),
                      s.cache_hit_ratio);
}

static void *guard_main(void *arg)
{
    wp_lagguard_t *guard = arg;
    wp_log_set_component("lag guard");
    while (!atomic_load(&guard->stop) && !wp_stop_requested()) {
        int64_t started = wp_now_ms();
        guard_staging(guard);
        for (size_t i = 0; guard->with_sources && i < guard->config->nsources; i++)
            guard_source(guard, &guard->sources[i]);
        while (!atomic_load(&guard->stop) && !wp_stop_requested() && wp_now_ms() - started < GUARD_INTERVAL_MS) {
            struct timespec ts = {0, 50 * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

wp_lagguard_t *wp_lagguard_start(const wp_config_t *config, bool with_sources)
{
    wp_lagguard_t *guard = wp_calloc(1, sizeof *guard);
    guard->config = config;
    guard->with_sources = with_sources;
    atomic_init(&guard->stop, false);
    guard->sources = wp_calloc(config->nsources ? config->nsources : 1, sizeof *guard->sources);
    wp_metric_set(wp_metric(WP_METRIC_GAUGE, "walpipe_build_info", "walpipe's version (always 1)", "version",
                            WALPIPE_VERSION, NULL),
                  1);
    for (size_t i = 0; with_sources && i < config->nsources; i++) {
        guarded_t *g = &guard->sources[i];
        const char *n = config->sources[i].name;
        g->source = &config->sources[i];
        g->m_up = wp_metric(WP_METRIC_GAUGE, "walpipe_source_up", "1 when the lag guard's last look-up reached the "
                                                                  "source", "source", n, NULL);
        g->m_active = wp_metric(WP_METRIC_GAUGE, "walpipe_replication_slot_active",
                                "1 when a walsender streams from the source's slot", "source", n, NULL);
        g->m_lag_bytes = wp_metric(WP_METRIC_GAUGE, "walpipe_replication_lag_bytes",
                                   "Source's current WAL position minus the slot's confirmed_flush_lsn", "source", n,
                                   NULL);
        g->m_retained = wp_metric(WP_METRIC_GAUGE, "walpipe_replication_retained_wal_bytes",
                                  "Source's current WAL position minus the slot's restart_lsn (WAL the slot keeps)",
                                  "source", n, NULL);
        g->m_lag_seconds = wp_metric(WP_METRIC_GAUGE, "walpipe_replication_lag_seconds",
                                     "Now minus the commit time of the newest staged change while the slot is "
                                     "behind; 0 when caught up",
                                     "source", n, NULL);
        g->m_safe = wp_metric(WP_METRIC_GAUGE, "walpipe_replication_slot_safe_wal_size_bytes",
                              "WAL the source may still write before the slot is lost (set when "
                              "max_slot_wal_keep_size is)",
                              "source", n, NULL);
        for (int w = 0; w < W_COUNT; w++)
            g->m_warn[w] = wp_metric(WP_METRIC_GAUGE, "walpipe_lag_warning",
                                     "1 while the lag guard warns about the source for this reason", "source", n,
                                     "reason", warning_names[w], NULL);
        g->m_catching_up = wp_metric(WP_METRIC_GAUGE, "walpipe_source_catching_up",
                                     "1 while the source is catching up: from 64 MB of WAL behind until under 16 MB",
                                     "source", n, NULL);
        g->m_behind = wp_metric(WP_METRIC_GAUGE, "walpipe_source_behind_bytes",
                                "Source's current WAL position minus what walpipe staged (the later of the "
                                "checkpoint and confirmed_flush_lsn)",
                                "source", n, NULL);
        g->m_rate = wp_metric(WP_METRIC_GAUGE, "walpipe_source_catchup_rate_bytes_per_second",
                              "WAL staged per second minus WAL the source wrote per second, over the last 10 s",
                              "source", n, NULL);
        g->m_eta = wp_metric(WP_METRIC_GAUGE, "walpipe_source_catchup_eta_seconds",
                             "Time left to catch up at the current net rate; 0 when not catching up, -1 unknown",
                             "source", n, NULL);
        g->m_snap_running = wp_metric(WP_METRIC_GAUGE, "walpipe_snapshot_running",
                                      "1 while the source's newest snapshot is running", "source", n, NULL);
        g->m_snap_rows = wp_metric(WP_METRIC_GAUGE, "walpipe_snapshot_rows_copied",
                                   "Rows the source's newest snapshot has committed to staging", "source", n, NULL);
        g->m_snap_est = wp_metric(WP_METRIC_GAUGE, "walpipe_snapshot_rows_estimated",
                                  "Rows the source's newest snapshot expects to copy (planner estimate; 0 unknown)",
                                  "source", n, NULL);
    }
    if (pthread_create(&guard->thread, NULL, guard_main, guard) != 0)
        wp_error("lag guard: could not start its thread; no lag warnings and no lag metrics");
    else
        guard->started = true;
    return guard;
}

void wp_lagguard_stop(wp_lagguard_t *guard)
{
    if (guard == NULL)
        return;
    atomic_store(&guard->stop, true);
    if (guard->started)
        pthread_join(guard->thread, NULL);
    for (size_t i = 0; guard->with_sources && i < guard->config->nsources; i++)
        PQfinish(guard->sources[i].conn);
    PQfinish(guard->staging);
    free(guard->sources);
    free(guard);
}

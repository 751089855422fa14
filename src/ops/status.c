/*
 * status.c: `walpipe status [--json] [--watch SECONDS]`.
 *
 * Job: one probe (probe.h) of staging and of every source, printed as a
 * table or as one JSON object per look.  The JSON shape is documented in
 * README ("walpipe status --json") and only ever grows: fields are added,
 * never renamed or removed.
 *
 * Invariant: read only; an unreachable source or staging is printed as such
 * (with libpq's reason, never a conninfo) and the rest is printed anyway.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <walpipe/walpipe.h>

#include "mem.h"
#include "probe.h"
#include "runtime.h"
#include "sink.h"
#include "status.h"

typedef struct look {
    wp_probe_staging_t staging;
    wp_probe_source_t *sources;
    bool staging_up;
    bool all_up;
    wp_sink_look_t *sinks; /* every (sink, source) pair, in config order */
    size_t nsinks;
} look_t;

static void format_time(double unix_s, char *buf, size_t len)
{
    time_t t = (time_t)unix_s;
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static json_t *lsn_json(wp_lsn_t lsn)
{
    char buf[WP_LSN_STRLEN];
    return lsn == WP_LSN_INVALID ? json_null() : json_string(wp_lsn_format(lsn, buf));
}

static json_t *int_or_null(bool known, int64_t v)
{
    return known ? json_integer(v) : json_null();
}

static json_t *real_or_null(bool known, double v)
{
    return known ? json_real(v) : json_null();
}

/* Snapshot progress: copied / estimated, 0..1; -1 unknown. */
static double progress_of(const wp_probe_source_t *p)
{
    if (strcmp(p->snapshot_state, "done") == 0)
        return 1.0;
    if (p->snapshot_estimated <= 0)
        return -1;
    double f = (double)p->snapshot_rows / (double)p->snapshot_estimated;
    return f > 1 ? 1 : f;
}

static json_t *source_json(const wp_source_config_t *src, const wp_probe_source_t *p)
{
    char when[32];
    json_t *o = json_object();
    json_object_set_new(o, "name", json_string(src->name));
    json_object_set_new(o, "reachable", json_boolean(p->reachable));
    json_object_set_new(o, "error", p->reachable ? json_null() : json_string(p->error));
    json_t *slot = json_object();
    json_object_set_new(slot, "name", json_string(src->slot));
    json_object_set_new(slot, "exists", p->reachable ? json_boolean(p->slot_exists) : json_null());
    json_object_set_new(slot, "active", p->slot_exists ? json_boolean(p->active) : json_null());
    json_object_set_new(slot, "wal_status", p->slot_exists && p->wal_status[0] ? json_string(p->wal_status)
                                                                                 : json_null());
    json_object_set_new(slot, "safe_wal_size", int_or_null(p->has_safe_wal_size, p->safe_wal_size));
    json_object_set_new(slot, "current_wal_lsn", p->reachable ? lsn_json(p->current_lsn) : json_null());
    json_object_set_new(slot, "confirmed_flush_lsn", lsn_json(p->confirmed_flush));
    json_object_set_new(slot, "restart_lsn", lsn_json(p->restart_lsn));
    json_object_set_new(o, "slot", slot);
    json_object_set_new(o, "lag_bytes", int_or_null(p->lag_bytes >= 0, p->lag_bytes));
    json_object_set_new(o, "retained_wal_bytes", int_or_null(p->retained_bytes >= 0, p->retained_bytes));
    json_object_set_new(o, "lag_seconds", real_or_null(p->lag_seconds >= 0, p->lag_seconds));
    json_t *staged = json_object();
    json_object_set_new(staged, "events", json_integer(p->staged_events));
    json_object_set_new(staged, "rate_per_second", json_real(p->rate_per_s));
    json_object_set_new(staged, "checkpoint_lsn", p->has_checkpoint ? lsn_json(p->checkpoint_lsn) : json_null());
    if (p->last_commit_unix > 0) {
        format_time(p->last_commit_unix, when, sizeof when);
        json_object_set_new(staged, "last_commit_time", json_string(when));
    } else {
        json_object_set_new(staged, "last_commit_time", json_null());
    }
    json_object_set_new(o, "staged", staged);
    if (p->has_snapshot) {
        json_t *s = json_object();
        double f = progress_of(p);
        json_object_set_new(s, "id", json_integer(p->snapshot_id));
        json_object_set_new(s, "kind", json_string(p->snapshot_kind));
        json_object_set_new(s, "state", json_string(p->snapshot_state));
        json_object_set_new(s, "rows_copied", json_integer(p->snapshot_rows));
        json_object_set_new(s, "rows_estimated", int_or_null(p->snapshot_estimated >= 0, p->snapshot_estimated));
        json_object_set_new(s, "progress", real_or_null(f >= 0, f));
        json_object_set_new(s, "seconds", json_real(p->snapshot_seconds));
        json_object_set_new(s, "rows_per_second",
                            json_real(p->snapshot_seconds > 0 ? (double)p->snapshot_rows / p->snapshot_seconds : 0));
        json_object_set_new(o, "snapshot", s);
    } else {
        json_object_set_new(o, "snapshot", json_null());
    }
    return o;
}

static void print_json(const wp_config_t *config, const look_t *look)
{
    char when[32];
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    format_time((double)now.tv_sec, when, sizeof when);
    const wp_probe_staging_t *s = &look->staging;
    json_t *root = json_object();
    json_object_set_new(root, "format", json_integer(1));
    json_object_set_new(root, "version", json_string(WALPIPE_VERSION));
    json_object_set_new(root, "time", json_string(when));
    json_t *sources = json_array();
    for (size_t i = 0; i < config->nsources; i++)
        json_array_append_new(sources, source_json(&config->sources[i], &look->sources[i]));
    json_object_set_new(root, "sources", sources);

    json_t *consumers = json_array();
    if (s->reachable) {
        json_t *c = json_object();
        json_object_set_new(c, "name", json_string("mirror"));
        json_object_set_new(c, "backlog_events", json_integer(s->backlog_events));
        json_object_set_new(c, "position", int_or_null(s->oldest_unprocessed >= 0, s->oldest_unprocessed));
        json_object_set_new(c, "lag_seconds", json_real(s->consumer_lag_seconds));
        json_object_set_new(c, "last_error", s->last_error[0] ? json_string(s->last_error) : json_null());
        if (s->last_error[0]) {
            format_time(s->last_error_unix, when, sizeof when);
            json_object_set_new(c, "last_error_time", json_string(when));
        } else {
            json_object_set_new(c, "last_error_time", json_null());
        }
        json_array_append_new(consumers, c);
    }
    json_object_set_new(root, "consumers", consumers);
    json_t *sinks = json_array();
    for (size_t i = 0; i < look->nsinks; i++) {
        const wp_sink_look_t *k = &look->sinks[i];
        json_t *o = json_object();
        json_object_set_new(o, "name", json_string(k->sink));
        json_object_set_new(o, "plugin", json_string(k->plugin));
        json_object_set_new(o, "source", json_string(k->source));
        json_object_set_new(o, "position_lsn", k->has_position ? lsn_json(k->lsn) : json_null());
        json_object_set_new(o, "position_seq", int_or_null(k->has_position, k->seq));
        json_object_set_new(o, "backlog_events", int_or_null(k->backlog >= 0, k->backlog));
        json_object_set_new(o, "events_delivered", json_integer(k->delivered));
        if (k->updated_unix > 0) {
            format_time(k->updated_unix, when, sizeof when);
            json_object_set_new(o, "updated_at", json_string(when));
        } else {
            json_object_set_new(o, "updated_at", json_null());
        }
        json_array_append_new(sinks, o);
    }
    json_object_set_new(root, "sinks", sinks);
    if (s->reachable) {
        json_object_set_new(root, "dead_letters",
                            json_pack("{sIsIsI}", "waiting", (json_int_t)s->dead_waiting, "parked",
                                      (json_int_t)s->dead_parked, "undecodable", (json_int_t)s->dead_undecodable));
        json_object_set_new(root, "divergences",
                            json_pack("{sIsI}", "diverged_mirrors", (json_int_t)s->diverged_mirrors, "open",
                                      (json_int_t)s->divergences_open));
    } else {
        json_object_set_new(root, "dead_letters", json_null());
        json_object_set_new(root, "divergences", json_null());
    }
    json_t *st = json_object();
    json_object_set_new(st, "reachable", json_boolean(s->reachable));
    json_object_set_new(st, "error", s->reachable ? json_null() : json_string(s->error));
    json_object_set_new(st, "raw_events_partitions", s->reachable ? json_integer(s->partitions) : json_null());
    json_object_set_new(st, "raw_events_bytes", s->reachable ? json_integer(s->raw_events_bytes) : json_null());
    json_object_set_new(st, "cache_hit_ratio", real_or_null(s->reachable && s->cache_hit_ratio >= 0,
                                                            s->cache_hit_ratio));
    json_object_set_new(root, "staging", st);
    char *text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    printf("%s\n", text);
    free(text);
    json_decref(root);
}

/* "12.3 MB" */
static const char *human_bytes(int64_t v, char *buf, size_t len)
{
    static const char *const units[] = {"B", "kB", "MB", "GB", "TB"};
    double d = (double)v;
    int u = 0;
    while (d >= 1024 && u < 4) {
        d /= 1024;
        u++;
    }
    snprintf(buf, len, u ? "%.1f %s" : "%.0f %s", d, units[u]);
    return buf;
}

static void print_table(const wp_config_t *config, const look_t *look)
{
    char when[32], a[32], b[32], c[32];
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    format_time((double)now.tv_sec, when, sizeof when);
    printf("walpipe %s status at %s\n\n", WALPIPE_VERSION, when);
    printf("%-16s %-24s %-7s %-11s %10s %10s %9s %10s %8s\n", "SOURCE", "SLOT", "ACTIVE", "WAL_STATUS", "SAFE_WAL",
           "LAG", "LAG_S", "STAGED", "RATE/S");
    for (size_t i = 0; i < config->nsources; i++) {
        const wp_source_config_t *src = &config->sources[i];
        const wp_probe_source_t *p = &look->sources[i];
        if (!p->reachable)
            printf("%-16s %-24s unreachable: %s\n", src->name, src->slot, p->error);
        else if (!p->slot_exists)
            printf("%-16s %-24s no such slot (walpipe run creates it)\n", src->name, src->slot);
        else {
            snprintf(c, sizeof c, "%.1f", p->lag_seconds);
            printf("%-16s %-24s %-7s %-11s %10s %10s %9s %10lld %8.1f\n", src->name, src->slot,
                   p->active ? "yes" : "no", p->wal_status[0] ? p->wal_status : "-",
                   p->has_safe_wal_size ? human_bytes(p->safe_wal_size, a, sizeof a) : "-",
                   p->lag_bytes >= 0 ? human_bytes(p->lag_bytes, b, sizeof b) : "-", p->lag_seconds >= 0 ? c : "-",
                   (long long)p->staged_events, p->rate_per_s);
        }
        if (p->has_snapshot) {
            double f = progress_of(p);
            printf("%-16s snapshot %lld (%s) %s: %lld rows", "", (long long)p->snapshot_id, p->snapshot_kind,
                   p->snapshot_state, (long long)p->snapshot_rows);
            if (p->snapshot_estimated >= 0)
                printf(" of ~%lld", (long long)p->snapshot_estimated);
            if (f >= 0)
                printf(" (%.0f %%)", f * 100);
            if (p->snapshot_seconds > 0)
                printf(", %.0f rows/s", (double)p->snapshot_rows / p->snapshot_seconds);
            printf("\n");
        }
    }
    const wp_probe_staging_t *s = &look->staging;
    printf("\n");
    if (!s->reachable) {
        printf("staging: unreachable: %s\n", s->error);
        return;
    }
    printf("%-16s %10s %12s %9s  %s\n", "CONSUMER", "BACKLOG", "POSITION", "LAG_S", "LAST_ERROR");
    snprintf(a, sizeof a, "%lld", (long long)s->oldest_unprocessed);
    printf("%-16s %10lld %12s %9.1f  %s\n\n", "mirror", (long long)s->backlog_events,
           s->oldest_unprocessed >= 0 ? a : "-", s->consumer_lag_seconds, s->last_error[0] ? s->last_error : "-");
    if (look->nsinks > 0) {
        printf("%-16s %-10s %-16s %18s %10s %12s  %s\n", "SINK", "PLUGIN", "SOURCE", "POSITION", "BACKLOG",
               "DELIVERED", "UPDATED");
        for (size_t i = 0; i < look->nsinks; i++) {
            const wp_sink_look_t *k = &look->sinks[i];
            char lsn[WP_LSN_STRLEN], pos[40], backlog[24], updated[32] = "-";
            if (k->has_position)
                snprintf(pos, sizeof pos, "%s/%d", wp_lsn_format(k->lsn, lsn), k->seq);
            else
                snprintf(pos, sizeof pos, "-");
            snprintf(backlog, sizeof backlog, "%lld", k->backlog);
            if (k->updated_unix > 0)
                format_time(k->updated_unix, updated, sizeof updated);
            printf("%-16s %-10s %-16s %18s %10s %12lld  %s\n", k->sink, k->plugin, k->source, pos,
                   k->backlog >= 0 ? backlog : "-", k->delivered, updated);
        }
        printf("\n");
    }
    printf("dead letters: %lld waiting, %lld parked, %lld undecodable\n", (long long)s->dead_waiting,
           (long long)s->dead_parked, (long long)s->dead_undecodable);
    printf("diverged mirrors: %lld (%lld open divergences)\n", s->diverged_mirrors, s->divergences_open);
    snprintf(c, sizeof c, "%.1f %%%s", s->cache_hit_ratio * 100, s->cache_hit_ratio < 0.95 ? " (below 95 %)" : "");
    printf("staging: raw_events %lld partitions, %s; cache hit ratio %s\n", (long long)s->partitions,
           human_bytes(s->raw_events_bytes, a, sizeof a), s->cache_hit_ratio >= 0 ? c : "-");
}

static void take_look(const wp_config_t *config, look_t *look)
{
    PGconn *staging = wp_probe_connect(config->staging_conninfo, "walpipe status", look->staging.error,
                                       sizeof look->staging.error);
    char err[sizeof look->staging.error];
    snprintf(err, sizeof err, "%s", look->staging.error);
    look->all_up = true;
    if (staging == NULL || wp_probe_staging(staging, &look->staging) != 0) {
        if (staging)
            snprintf(err, sizeof err, "%s", look->staging.error);
        memset(&look->staging, 0, sizeof look->staging);
        snprintf(look->staging.error, sizeof look->staging.error, "%s", err);
        look->all_up = false;
    }
    look->nsinks = 0;
    for (size_t i = 0; look->staging.reachable && i < config->nsinks; i++) {
        for (size_t k = 0; k < wp_sink_nsources(config, i); k++) {
            if (wp_sink_look(staging, config, i, k, &look->sinks[look->nsinks], err, sizeof err) != 0) {
                look->all_up = false;
                continue;
            }
            look->nsinks++;
        }
    }
    for (size_t i = 0; i < config->nsources; i++) {
        PGconn *src = NULL;
        if (wp_probe_source(&config->sources[i], &src, look->staging.reachable ? staging : NULL,
                            &look->sources[i]) != 0)
            look->all_up = false;
        PQfinish(src);
    }
    PQfinish(staging);
}

int wp_status_command(const wp_config_t *config, bool json, long watch_seconds)
{
    look_t look;
    memset(&look, 0, sizeof look);
    look.sources = wp_calloc(config->nsources ? config->nsources : 1, sizeof *look.sources);
    size_t pairs = 0;
    for (size_t i = 0; i < config->nsinks; i++)
        pairs += wp_sink_nsources(config, i);
    look.sinks = wp_calloc(pairs ? pairs : 1, sizeof *look.sinks);
    for (;;) {
        take_look(config, &look);
        if (json)
            print_json(config, &look);
        else
            print_table(config, &look);
        fflush(stdout);
        if (watch_seconds <= 0)
            break;
        int64_t until = wp_now_ms() + watch_seconds * 1000;
        while (!wp_stop_requested() && wp_now_ms() < until) {
            struct timespec ts = {0, 100 * 1000000L};
            nanosleep(&ts, NULL);
        }
        if (wp_stop_requested())
            break;
        if (!json)
            printf("\n");
    }
    free(look.sources);
    free(look.sinks);
    return look.all_up ? WP_EXIT_OK : WP_EXIT_FATAL;
}

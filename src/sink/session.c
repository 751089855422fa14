/*
 * session.c: one plugin session of a sink: tickets out, durability back.
 *
 * Job: call the plugin's open/deliver/poll/flush/close (include/walpipe/sink.h)
 * and keep the queue of places (source, lsn, seq, id) waiting for the plugin
 * to call them durable (session.h).
 *
 * Invariant: the queue is in delivery order and a place leaves it only when
 * the plugin reported durable a ticket at or past the place's ticket: the
 * caller's positions never pass an event that is not durable downstream.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "mem.h"
#include "session.h"

typedef struct place {
    uint64_t ticket; /* durable once the plugin's durable ticket reaches this */
    int src;
    wp_sink_pos_t pos;
    int delivered;   /* 1 when this place is a delivered event, 0 for one filtered out */
} place_t;

struct wp_session {
    const wp_sink_config_t *sink;
    const wp_plugin_t *lib;
    bool replay;
    wp_sink_host_t host;
    void *state;     /* the plugin's; non-NULL while open */
    bool open;
    uint64_t last_ticket, durable;
    place_t *places; /* queue: [head, head + n) */
    size_t head, n, cap;
    wp_sink_event_t *events;
    size_t events_cap;
};

static const char *host_config_get(const wp_sink_host_t *host, const char *key)
{
    const wp_sink_config_t *sink = ((const wp_session_t *)host->host_data)->sink;
    for (size_t i = 0; i < sink->nkeys; i++)
        if (strcmp(sink->keys[i].key, key) == 0)
            return sink->keys[i].value;
    return NULL;
}

static void host_log(const wp_sink_host_t *host, int level, const char *message)
{
    static const wp_log_level_t levels[] = {WP_LOG_ERROR, WP_LOG_WARNING, WP_LOG_INFO, WP_LOG_DEBUG};
    wp_log_level_t l = level >= 0 && level <= 3 ? levels[level] : WP_LOG_INFO;
    if (l != WP_LOG_DEBUG || wp_log_enabled(WP_LOG_DEBUG))
        wp_log(l, "%s: %s", ((const wp_session_t *)host->host_data)->lib->plugin->name, message);
}

wp_session_t *wp_session_create(const wp_sink_config_t *sink, const wp_plugin_t *lib, bool replay)
{
    wp_session_t *s = wp_calloc(1, sizeof *s);
    s->sink = sink;
    s->lib = lib;
    s->replay = replay;
    s->host.abi_version = WP_SINK_ABI_VERSION;
    s->host.sink_name = sink->name;
    s->host.config_get = host_config_get;
    s->host.log = host_log;
    s->host.host_data = s;
    return s;
}

void wp_session_destroy(wp_session_t *s)
{
    if (s == NULL)
        return;
    wp_session_close(s);
    free(s->places);
    free(s->events);
    free(s);
}

/* The plugin's reason, or a placeholder when it gave none. */
static void ensure_reason(char *err, size_t errlen, const char *call)
{
    if (err[0] == '\0')
        snprintf(err, errlen, "%s failed without saying why", call);
}

int wp_session_open(wp_session_t *s, char *err, size_t errlen)
{
    err[0] = '\0';
    s->state = NULL;
    int rc = s->lib->plugin->open(&s->host, &s->state, err, errlen);
    if (rc != WP_SINK_OK) {
        ensure_reason(err, errlen, "open");
        return rc == WP_SINK_FATAL ? WP_SINK_FATAL : WP_SINK_RETRY;
    }
    s->open = true;
    s->durable = s->last_ticket; /* a new session: nothing of it is pending */
    s->head = s->n = 0;
    return WP_SINK_OK;
}

bool wp_session_is_open(const wp_session_t *s)
{
    return s->open;
}

static void push(wp_session_t *s, uint64_t ticket, int src, const wp_sink_pos_t *pos, int delivered)
{
    if (s->head + s->n == s->cap) {
        if (s->head > 0) {
            memmove(s->places, s->places + s->head, s->n * sizeof *s->places);
            s->head = 0;
        }
        if (s->n == s->cap) {
            s->cap = s->cap ? s->cap * 2 : 1024;
            s->places = wp_realloc(s->places, s->cap * sizeof *s->places);
        }
    }
    s->places[s->head + s->n++] = (place_t){ticket, src, *pos, delivered};
}

static int classify(int rc, char *err, size_t errlen, const char *call)
{
    if (rc == WP_SINK_OK)
        return rc;
    ensure_reason(err, errlen, call);
    return rc == WP_SINK_FATAL ? WP_SINK_FATAL : WP_SINK_RETRY;
}

int wp_session_deliver(wp_session_t *s, int src, const wp_feed_row_t *rows, int n, char *err, size_t errlen)
{
    size_t m = 0;
    if ((size_t)n > s->events_cap) {
        s->events_cap = (size_t)n;
        s->events = wp_realloc(s->events, s->events_cap * sizeof *s->events);
    }
    for (int i = 0; i < n; i++) {
        if (rows[i].match) {
            s->events[m] = rows[i].ev;
            s->events[m].ticket = ++s->last_ticket;
            s->events[m].replay = s->replay ? 1 : 0;
            m++;
            push(s, s->last_ticket, src, &rows[i].pos, 1);
        } else {
            /* passed once everything delivered before it is durable */
            push(s, s->last_ticket, src, &rows[i].pos, 0);
        }
    }
    if (m == 0)
        return WP_SINK_OK;
    err[0] = '\0';
    return classify(s->lib->plugin->deliver(s->state, s->events, m, err, errlen), err, errlen, "deliver");
}

/* Takes the plugin's durable ticket, which may only grow and never pass what was delivered. */
static void note_durable(wp_session_t *s, uint64_t durable)
{
    if (durable > s->last_ticket)
        durable = s->last_ticket;
    if (durable > s->durable)
        s->durable = durable;
}

int wp_session_poll(wp_session_t *s, int timeout_ms, char *err, size_t errlen)
{
    uint64_t durable = s->durable;
    err[0] = '\0';
    int rc = classify(s->lib->plugin->poll(s->state, timeout_ms, &durable, err, errlen), err, errlen, "poll");
    if (rc == WP_SINK_OK)
        note_durable(s, durable);
    return rc;
}

int wp_session_flush(wp_session_t *s, int timeout_ms, char *err, size_t errlen)
{
    uint64_t durable = s->durable;
    err[0] = '\0';
    int rc = classify(s->lib->plugin->flush(s->state, timeout_ms, &durable, err, errlen), err, errlen, "flush");
    if (rc == WP_SINK_OK)
        note_durable(s, durable);
    return rc;
}

size_t wp_session_pending(const wp_session_t *s)
{
    return s->n;
}

bool wp_session_settle(wp_session_t *s, int *src, wp_sink_pos_t *pos, int *delivered)
{
    if (s->n == 0 || s->places[s->head].ticket > s->durable)
        return false;
    place_t *p = &s->places[s->head];
    *src = p->src;
    *pos = p->pos;
    *delivered = p->delivered;
    s->head++;
    s->n--;
    if (s->n == 0)
        s->head = 0;
    return true;
}

void wp_session_close(wp_session_t *s)
{
    if (s->open)
        s->lib->plugin->close(s->state);
    s->open = false;
    s->state = NULL;
    s->head = s->n = 0;
}

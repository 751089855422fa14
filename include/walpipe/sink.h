/*
 * walpipe/sink.h: the sink plugin ABI (version 1).
 *
 * A sink plugin is a shared object (plugins/<name>/ builds walpipe_sink_<name>.so)
 * that exports one symbol, WP_SINK_ENTRY_SYMBOL, returning its wp_sink_plugin_t.
 * walpipe's core loads it with dlopen by name; the core binary never links a
 * plugin's libraries (librdkafka, libcurl).
 *
 * The contract, in the order the core calls it:
 *   open     once per session, with the host (logging, the [sink NAME] keys).
 *            Exported entry: const wp_sink_plugin_t *wp_sink_plugin_entry(void),
 *            marked WP_SINK_EXPORT.
 *   deliver  batches of events, in (source, lsn, seq) order per source.  The
 *            plugin may only queue them.  Each event carries a ticket, strictly
 *            increasing over the session.  The event memory is the core's and
 *            valid only during the call: copy what must outlive it.
 *   poll     serves the plugin's I/O for at most timeout_ms and reports
 *            *durable: the highest ticket T such that every event delivered with
 *            a ticket <= T is durable downstream (a contiguous prefix: never
 *            past an event that is not).  The core advances the sink's position
 *            only to events the plugin has reported durable.
 *   flush    waits up to timeout_ms until every delivered event is durable.
 *   close    releases everything; events not yet durable are delivered again by
 *            the next session (the core restarts from its durable position).
 *
 * Return codes: WP_SINK_OK; WP_SINK_RETRY (a passing failure: the core closes
 * the session, backs off and opens a new one, delivering again from its
 * durable position); WP_SINK_FATAL (configuration or a refusal: the sink
 * stops and says why).  On any failure the plugin writes a one-line reason
 * into err (errlen bytes, NUL-terminated) that names the problem and the fix;
 * it must never hold a password or a whole connection string.
 *
 * Redelivery: after a crash or a RETRY the core delivers again events that may
 * already be downstream.  A plugin that can tell (it reads the tail of what it
 * wrote, e.g. (source, lsn, seq) in Kafka headers or the last JSONL line)
 * skips them and reports them durable: that is how a sink is exactly once.
 * Events with replay set are a requested replay and are never skipped.
 *
 * Threads: the core calls one session's functions from one thread at a time.
 */
#ifndef WALPIPE_SINK_H
#define WALPIPE_SINK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define WP_SINK_ABI_VERSION 1
#define WP_SINK_ENTRY_SYMBOL "wp_sink_plugin_entry"

enum { WP_SINK_OK = 0, WP_SINK_RETRY = 1, WP_SINK_FATAL = 2 };

enum { WP_SINK_LOG_ERROR = 0, WP_SINK_LOG_WARN = 1, WP_SINK_LOG_INFO = 2, WP_SINK_LOG_DEBUG = 3 };

/* One staged event (a walpipe.raw_events row).  All strings are NUL-terminated UTF-8. */
typedef struct wp_sink_event {
    uint64_t ticket;        /* the core's sequence number for durability reports */
    const char *source;     /* source name */
    uint64_t lsn;           /* commit end LSN of the source transaction (a non-transactional message's own LSN) */
    int32_t seq;            /* ordinal within the transaction from 1; 0 for a non-transactional message */
    const char *op;         /* "insert", "update", "delete", "truncate", "message" or "snapshot" */
    const char *schema;     /* NULL for a message */
    const char *table;      /* NULL for a message */
    int64_t xid;            /* source transaction id, -1 when unknown */
    int64_t commit_us;      /* commit time, microseconds since the Unix epoch; 0 when unknown */
    const char *payload;    /* raw_events.payload as JSON text: {"after":{..}}, {"after":..,"key"|"before":..},
                               {"key"|"before":..}, {"prefix":..,"content":..,"transactional":..}, {} */
    size_t payload_len;
    const char *columns;    /* the event's shape: [{"name":..,"type":..,"typeoid":N},..] as JSON, or NULL */
    const char *key_columns; /* the table's key: [{"name":..,"type":..,"typeoid":N},..] as JSON, or NULL if none */
    int replay;             /* 1 when delivered by `walpipe replay`: never skipped as already written */
} wp_sink_event_t;

/* What the core offers a plugin.  Valid from open until close. */
typedef struct wp_sink_host {
    uint32_t abi_version;   /* WP_SINK_ABI_VERSION of the core */
    const char *sink_name;  /* the NAME of [sink NAME] */
    /* the value of key in [sink NAME], or NULL when it is not set */
    const char *(*config_get)(const struct wp_sink_host *host, const char *key);
    /* logs one line under the sink's name (no trailing newline needed) */
    void (*log)(const struct wp_sink_host *host, int level, const char *message);
    void *host_data;        /* the core's own; plugins do not touch it */
} wp_sink_host_t;

typedef struct wp_sink_plugin {
    uint32_t abi_version;   /* must be WP_SINK_ABI_VERSION */
    const char *name;       /* e.g. "jsonl" */
    /* the keys of [sink NAME] the plugin reads, NULL-terminated: the core refuses any other key that is
       not one of its own (plugin, sources, tables, ...) and names the typo */
    const char *const *keys;
    int (*open)(const wp_sink_host_t *host, void **state, char *err, size_t errlen);
    int (*deliver)(void *state, const wp_sink_event_t *events, size_t n, char *err, size_t errlen);
    int (*poll)(void *state, int timeout_ms, uint64_t *durable, char *err, size_t errlen);
    int (*flush)(void *state, int timeout_ms, uint64_t *durable, char *err, size_t errlen);
    void (*close)(void *state);
} wp_sink_plugin_t;

/* Every plugin exports this function (and nothing else is required). */
#define WP_SINK_EXPORT __attribute__((visibility("default")))
typedef const wp_sink_plugin_t *(*wp_sink_entry_fn)(void);

#ifdef __cplusplus
}
#endif

#endif /* WALPIPE_SINK_H */

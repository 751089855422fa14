/*
 * sink.h: sinks, consumers of raw_events with their own durable position.
 *
 * Each [sink NAME] runs in a thread of its own (in `walpipe run`, or alone
 * in `walpipe sink`), with its own staging connection and plugin session:
 * a sink that is down or slow never holds up staging, the mirror workers or
 * another sink; only its backlog grows.
 */
#ifndef WP_SINK_H
#define WP_SINK_H

#include "wp_setup.h"

#include <libpq-fe.h>
#include <walpipe/lsn.h>

#include "config.h"

typedef struct wp_sinks wp_sinks_t;

/*
 * Loads the plugins of every [sink] (or of the one named only) and starts a
 * thread per sink.  Returns the running sinks (possibly none), or NULL after
 * printing why a plugin cannot be used (no thread started).
 */
wp_sinks_t *wp_sinks_start(const wp_config_t *config, const char *only);

/* Waits until a stop is requested or every sink has stopped (a fatal error). */
void wp_sinks_wait(wp_sinks_t *sinks);

/* Stops the sinks (each flushes, saves its position and closes); -1 if one stopped on a fatal error. NULL ok. */
int wp_sinks_stop(wp_sinks_t *sinks);

/* What `walpipe status` shows of one sink and one of its sources. */
typedef struct wp_sink_look {
    const char *sink;       /* borrowed from the configuration */
    const char *plugin;
    const char *source;
    bool has_position;      /* false: the sink has not delivered anything of this source yet */
    wp_lsn_t lsn;           /* the position: last durable event's lsn ... */
    int seq;                /* ... and raw seq */
    long long delivered;    /* events delivered (durable) over the sink's life */
    long long backlog;      /* events still to deliver; -1 unknown */
    double updated_unix;    /* when the position was last written; 0 never */
} wp_sink_look_t;

/* The sources of sink number i of config: their count, and each one's name. */
size_t wp_sink_nsources(const wp_config_t *config, size_t i);
const char *wp_sink_source(const wp_config_t *config, size_t i, size_t k);

/* Reads sink i's position and backlog for its source number k on staging; 0, or -1 with err filled. */
int wp_sink_look(PGconn *conn, const wp_config_t *config, size_t i, size_t k, wp_sink_look_t *out, char *err,
                 size_t errlen);

/* `walpipe replay`: what to deliver again. */
typedef struct wp_replay_opts {
    const char *sink;
    const char *source;
    wp_lsn_t from;          /* from this lsn (inclusive) ... */
    const char *from_time;  /* ... or from the first event committed at or after this time (text for PostgreSQL) */
    wp_lsn_t to;            /* up to this lsn, inclusive; 0 = the newest staged when replay starts */
    const char *const *tables; /* schema.table texts; NULL = the sink's tables */
    int ntables;
    bool mirror;            /* --mirror: the transform workers apply the range again (no sink) */
} wp_replay_opts_t;

/* Runs `walpipe replay`; returns the process exit status. */
int wp_replay_command(const wp_config_t *config, const wp_replay_opts_t *opts);

#endif /* WP_SINK_H */

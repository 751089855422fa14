/*
 * probe.h: one look at how a source's slot and staging are doing, read only.
 *
 * Shared by `walpipe status`, the metrics that `walpipe run` serves and its
 * lag guard, so that the three never disagree on what "lag" means:
 *
 *   lag_bytes      source's pg_current_wal_lsn() - slot's confirmed_flush_lsn
 *   retained_bytes source's pg_current_wal_lsn() - slot's restart_lsn (WAL the slot keeps)
 *   lag_seconds    now - commit time of the newest staged change, while the slot has
 *                  WAL it has not confirmed (lag_bytes > 0); 0 when it has none
 *
 * Nothing here writes to a database.  Error texts are libpq's first line,
 * which names host and port but never a password (never print a conninfo).
 */
#ifndef WP_PROBE_H
#define WP_PROBE_H

#include "wp_setup.h"

#include <libpq-fe.h>

#include <walpipe/lsn.h>

#include "config.h"

typedef struct wp_probe_source {
    /* the source (its own connection) */
    bool reachable;
    char error[256];        /* why not reachable, or why the query failed */
    bool slot_exists;
    bool active;            /* a walsender streams from the slot */
    char wal_status[16];    /* reserved | extended | unreserved | lost | "" */
    bool has_safe_wal_size; /* NULL when max_slot_wal_keep_size = -1 */
    int64_t safe_wal_size;
    wp_lsn_t current_lsn, confirmed_flush, restart_lsn;
    int64_t lag_bytes;      /* -1 unknown */
    int64_t retained_bytes; /* -1 unknown */
    /* staging's view of the source */
    bool has_checkpoint;
    wp_lsn_t checkpoint_lsn;
    int64_t staged_events;   /* streamed events staged since the checkpoint was created */
    double last_commit_unix; /* 0 none */
    double lag_seconds;      /* -1 unknown */
    double rate_per_s;       /* streamed events staged in the last 60 s, per second */
    char checkpoint_snapshot[16]; /* none | in_progress | done */
    /* the newest snapshot (walpipe.snapshots), if any */
    bool has_snapshot;
    int64_t snapshot_id;
    char snapshot_kind[16], snapshot_state[16];
    int64_t snapshot_rows;      /* copied so far (committed chunks) */
    int64_t snapshot_estimated; /* -1 unknown */
    double snapshot_seconds;    /* since it began (to its end when finished) */
} wp_probe_source_t;

typedef struct wp_probe_staging {
    bool reachable;
    char error[256];
    int64_t backlog_events;     /* unprocessed raw_events: the mirror workers' backlog */
    int64_t oldest_unprocessed; /* id, -1 none: the workers' position */
    double consumer_lag_seconds; /* now - received_at of the oldest unprocessed event; 0 none */
    char last_error[512];       /* newest apply dead letter's reason, "" none */
    double last_error_unix;
    int64_t dead_waiting, dead_parked, dead_undecodable;
    long long divergences_open;  /* open walpipe.divergences rows */
    long long diverged_mirrors;  /* tables with an open divergence */
    int64_t partitions, raw_events_bytes;
    double cache_hit_ratio; /* -1 unknown (no block read yet) */
} wp_probe_staging_t;

/*
 * Opens a read-only look-up connection (connect_timeout 5 s unless conninfo
 * says otherwise).  NULL with libpq's first line in err when it fails.
 */
PGconn *wp_probe_connect(const char *conninfo, const char *appname, char *err, size_t errlen);

/*
 * Fills *out for source: from its own connection *src (opened if NULL or
 * broken; closed and set NULL when it fails) and from staging (may be NULL:
 * the staging fields stay empty).  Returns 0 when the source answered.
 */
int wp_probe_source(const wp_source_config_t *source, PGconn **src, PGconn *staging, wp_probe_source_t *out);

/* Fills *out from staging.  Returns 0, or -1 with out->error set. */
int wp_probe_staging(PGconn *staging, wp_probe_staging_t *out);

#endif /* WP_PROBE_H */

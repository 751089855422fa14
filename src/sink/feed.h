/*
 * feed.h: one source's staged events, read in order for a sink.
 *
 * A feed reads walpipe.raw_events of one source after a position, in
 * (lsn, seq, id) order, with each event's shape (table_schemas.columns) and
 * key (source_tables.key_columns) from caches, and marks which events the
 * sink's `tables` let through.  It reads; it never writes.
 *
 * What a sink sees (README "Sinks"): every streamed event, and the rows of
 * the source's initial snapshot once that snapshot is done (as one
 * transaction at the slot's consistent point, seq 1..N in staging order).
 * A resync's (requested snapshot's) truncate and rows are not delivered:
 * they are staged at a consistent point the sink has usually passed, and
 * commit chunk by chunk in no fixed order, so no position could say which
 * of them a sink has seen.  They repair mirrors; `walpipe replay` re-sends
 * history downstream.
 */
#ifndef WP_SINK_FEED_H
#define WP_SINK_FEED_H

#include "wp_setup.h"

#include <libpq-fe.h>
#include <walpipe/lsn.h>
#include <walpipe/sink.h>

#include "config.h"

/*
 * libpq options of a connection that reads feeds: the ordered read must walk
 * raw_events_source_order whatever the statistics say.  Without statistics
 * (a fresh day's partition before autovacuum analyzed it) the planner picks a
 * bitmap scan of every event after the position and a sort, whose cost grows
 * with the backlog (measured: 200 000 events behind, 0.9 s per batch of 1 000
 * instead of 11 ms), so the sink connection turns those plans off.
 */
#define WP_FEED_PG_OPTIONS "-c enable_sort=off -c enable_bitmapscan=off -c enable_seqscan=off"

/* A place in one source's event order. */
typedef struct wp_sink_pos {
    wp_lsn_t lsn;
    int32_t seq;  /* raw_events.seq */
    int64_t id;   /* raw_events.id */
    int32_t ord;  /* the seq a sink sees for a snapshot row (1..N), 0 when not one or not known */
} wp_sink_pos_t;

/* Before every event. */
#define WP_SINK_POS_START ((wp_sink_pos_t){0, INT32_MIN, 0, 0})

/* One event read: the plugin's view, its place, and whether the sink's tables take it. */
typedef struct wp_feed_row {
    wp_sink_event_t ev; /* strings point into the feed's current result and caches */
    wp_sink_pos_t pos;
    bool match;         /* false: filtered out by tables (ev.payload is NULL) */
} wp_feed_row_t;

typedef struct wp_feed wp_feed_t;

/* A feed of source for a sink with this tables filter (NULL = all); borrows all three. */
wp_feed_t *wp_feed_create(const char *source, const wp_table_ref_t *tables, size_t ntables);
void wp_feed_destroy(wp_feed_t *feed);

/*
 * Reads up to limit events after *after (and up to and including lsn upto
 * when upto is not 0) on conn.  Returns the number read, with *rows
 * pointing at them (valid until the next read or destroy), or -1 after
 * logging why.  Returns 0 while the source's initial snapshot is being
 * copied (its rows may still be discarded or commit out of order).
 */
int wp_feed_read(wp_feed_t *feed, PGconn *conn, const wp_sink_pos_t *after, wp_lsn_t upto, int limit,
                 wp_feed_row_t **rows);

/*
 * 1 when staging has the index feeds read by (walpipe init makes it for a
 * configuration with sinks), 0 when not, -1 after logging an error.
 */
int wp_feed_index_ready(PGconn *conn);

/* Forgets the cached shapes and keys (a new session). */
void wp_feed_forget(wp_feed_t *feed);

/*
 * Events of source after *after that a sink would be delivered (the sink's
 * backlog), counted on conn; -1 after logging why.
 */
long long wp_feed_backlog(PGconn *conn, const char *source, const wp_sink_pos_t *after);

#endif /* WP_SINK_FEED_H */

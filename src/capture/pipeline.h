/*
 * pipeline.h: the hand-off between a source's reader and its stager.
 *
 * Data flows one way: the reader decodes the replication stream into
 * segments (COPY-ready raw_events rows plus the stream position they bring
 * staging to) and pushes them onto a bounded queue; the stager pops them,
 * COPYs them into raw_events and commits them with the checkpoint.  The only
 * thing that flows back is the durable position the stager publishes after
 * each commit, which the reader may then acknowledge to the source.
 *
 * Invariant: segments are committed in the order they were pushed, so the
 * durable position only moves forward along the stream.
 */
#ifndef WP_PIPELINE_H
#define WP_PIPELINE_H

#include "wp_setup.h"

#include <pthread.h>

#include <walpipe/lsn.h>

#include "mem.h"
#include "runtime.h"

/* How far into a source's stream staging holds everything (the checkpoint). */
typedef struct wp_position {
    wp_lsn_t lsn;     /* every transaction whose commit ends at or before lsn is staged */
    wp_lsn_t txn_end; /* 0, or the commit end LSN of a transaction staged only in part ... */
    int txn_seq;      /* ... whose changes with seq <= txn_seq are staged */
} wp_position_t;

/*
 * The most of a message a dead letter keeps: walpipe.dead_letters.raw is a
 * bytea (at most 1 GB, and its Bind message too), so a larger message keeps
 * its first WP_DEAD_RAW_MAX bytes and says so in the reason.
 */
#define WP_DEAD_RAW_MAX ((size_t)1000 * 1024 * 1024)

typedef struct wp_dead_letter {
    wp_lsn_t lsn; /* commit end LSN of the enclosing transaction, else the message's own LSN */
    int seq;
    char *schema; /* owned, or NULL when the message does not say (unreadable) */
    char *table;  /* owned, or NULL */
    char *raw; /* owned: the message exactly as received, cut at WP_DEAD_RAW_MAX */
    size_t raw_len;
    char *reason; /* owned */
    struct wp_dead_letter *next;
} wp_dead_letter_t;

/*
 * A table shape used by rows of a segment.  id is the decoder's proposal (a
 * hash of the content); staging may hold another shape under it, so the
 * stager resolves the id staging really uses for this content and, when it
 * differs, rewrites the shape_id field of every row of this shape: refs are
 * the offsets of those 8-byte fields in the segment's copy buffer.
 */
typedef struct wp_shape {
    int64_t id;
    char *schema; /* owned */
    char *table;  /* owned */
    char *columns; /* owned: JSON array */
    size_t columns_len;
    wp_lsn_t first_lsn;
    size_t *refs; /* owned */
    size_t nrefs, refs_cap;
    struct wp_shape *next;
} wp_shape_t;

/*
 * Changes wal2json dropped (no replica identity: it sends only a WARNING
 * notice, see reader.c) of one table in one transaction.  The stager records
 * each as a "dropped_change" divergence in the batch that commits the
 * segment, so the record is as durable as the checkpoint that passes it.
 */
typedef struct wp_dropped {
    wp_lsn_t lsn;  /* commit end LSN (nextlsn) of the transaction, WP_LSN_INVALID if not known */
    char *schema;  /* owned, or NULL when the notice's names could not be split (then see names) */
    char *table;   /* owned, or NULL */
    char *names;   /* owned: the notice's quoted names as received ("schema"."table") */
    bool updates;  /* an UPDATE was dropped */
    bool deletes;  /* a DELETE was dropped */
    unsigned count; /* notices merged into this one */
    struct wp_dropped *next;
} wp_dropped_t;

/* Event types of raw_events, in the order of wp_event_type_names (for per-type counts). */
#define WP_EVENT_TYPES 6
extern const char *const wp_event_type_names[WP_EVENT_TYPES];

/* A run of rows of one source commit time (PostgreSQL µs since 2000), for the commit -> staged latency. */
typedef struct wp_commit_run {
    int64_t commit_time;
    uint64_t rows;
} wp_commit_run_t;

/*
 * The rows a segment (or an earlier segment of the open batch) keyed by a
 * predicted commit end LSN (reader.c: a pgoutput Begin lacks the real one)
 * whose transaction's Commit then gave another: the stager rewrites from
 * into to, in the batch, before the checkpoint that passes the transaction.
 */
typedef struct wp_relabel {
    wp_lsn_t from; /* the prediction */
    wp_lsn_t to;   /* the commit end LSN the Commit gave */
} wp_relabel_t;

typedef struct wp_segment {
    wp_buf_t copy; /* raw_events rows in binary COPY format (encoder.c) */
    size_t rows;
    uint64_t type_rows[WP_EVENT_TYPES]; /* rows per event type */
    wp_commit_run_t *commit_runs;       /* owned: rows with a commit time, one run per transaction */
    size_t ncommit_runs, commit_runs_cap;
    wp_dead_letter_t *dead; /* in stream order */
    wp_dropped_t *dropped;  /* changes wal2json dropped, in stream order */
    wp_shape_t *shapes;     /* every table shape the segment's rows use, each once */
    wp_relabel_t *relabels; /* owned: transactions ending in this segment whose key was mispredicted */
    size_t nrelabels, relabels_cap;
    wp_position_t pos;      /* position once this segment is committed */
    /*
     * The segment ends inside a source transaction whose rows are keyed by
     * a prediction (pgoutput): staging must not commit after it; the
     * transaction's Commit comes in a later segment.  With final: the
     * reader stopped inside it, and the stager rolls the batch back.
     */
    bool txn_open;
    bool final;             /* the reader stops after this segment */
    bool more_coming;       /* pushed because it was full: the reader is behind, more follows at once */
    struct wp_segment *next;
} wp_segment_t;

/*
 * Appends a dead letter to segment: copies of schema and table (each may be
 * NULL), of raw[0..raw_len) (cut at WP_DEAD_RAW_MAX) and of reason.
 */
void wp_segment_add_dead(wp_segment_t *segment, wp_lsn_t lsn, int seq, const char *schema, const char *table,
                         const char *raw, size_t raw_len, const char *reason);

/*
 * Notes on segment that wal2json dropped an UPDATE (is_update) or a DELETE
 * of schema.table (copied; both NULL when names could not be split) in the
 * transaction ending at lsn; names is the notice's text for the table.
 * Notices of one table and transaction merge into one note.
 */
void wp_segment_add_dropped(wp_segment_t *segment, wp_lsn_t lsn, bool is_update, const char *schema,
                            const char *table, const char *names);

/*
 * The segment's shape of (id, schema, table, columns[0..columns_len)),
 * added (copied, first_lsn recorded) if the segment has none yet.  Two
 * shapes with one id but different content stay two shapes.
 */
wp_shape_t *wp_segment_shape(wp_segment_t *segment, int64_t id, const char *schema, const char *table,
                             const char *columns, size_t columns_len, wp_lsn_t first_lsn);

/* True when shape describes (schema, table, columns[0..columns_len)). */
bool wp_shape_is(const wp_shape_t *shape, const char *schema, const char *table, const char *columns,
                 size_t columns_len);

/* Counts a row of event_type with commit_time (0: none) for metrics (encoder.c calls it per row). */
void wp_segment_count(wp_segment_t *segment, const char *event_type, int64_t commit_time);

wp_segment_t *wp_segment_create(void);
void wp_segment_destroy(wp_segment_t *segment); /* NULL is a no-op */
bool wp_segment_empty(const wp_segment_t *segment);
/* Notes that rows keyed by from belong to the transaction whose commit ends at to. */
void wp_segment_add_relabel(wp_segment_t *segment, wp_lsn_t from, wp_lsn_t to);

typedef struct wp_queue {
    pthread_mutex_t mu;
    pthread_cond_t changed;
    wp_segment_t *head, *tail;
    size_t count, max;
    bool failed;           /* either side hit an error: the session is over */
    wp_position_t durable; /* written by the stager after each commit */
    uint64_t staged_rows;  /* rows committed this session (for progress logs) */
    bool finished;         /* the stager handled the final segment (committed it, or rolled it back) */
} wp_queue_t;

void wp_queue_init(wp_queue_t *queue, size_t max);
void wp_queue_cleanup(wp_queue_t *queue); /* frees segments still queued */

/*
 * Reader side.  Pushes segment (ownership passes to the queue) if there is
 * room, waiting at most wait_ms.  Returns 1 if pushed, 0 if still full (the
 * caller keeps the segment and should send feedback before trying again),
 * -1 if the session has failed (the caller keeps the segment).
 */
int wp_queue_push(wp_queue_t *queue, wp_segment_t *segment, int wait_ms);

/* Stager side.  Pops the next segment, waiting at most wait_ms; NULL if none.  Sets *failed. */
wp_segment_t *wp_queue_pop(wp_queue_t *queue, int wait_ms, bool *failed);

void wp_queue_fail(wp_queue_t *queue);
bool wp_queue_failed(wp_queue_t *queue);
void wp_queue_set_durable(wp_queue_t *queue, const wp_position_t *pos, size_t rows);
wp_position_t wp_queue_durable(wp_queue_t *queue);
void wp_queue_set_finished(wp_queue_t *queue);
bool wp_queue_finished(wp_queue_t *queue);
size_t wp_queue_length(wp_queue_t *queue);


#endif /* WP_PIPELINE_H */

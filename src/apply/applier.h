/*
 * applier.h: apply a set of staged events to their mirrors (see applier.c).
 *
 * The worker pool (worker.c) and the dead-letter queue (dlq.c) use it; it
 * uses only the mirror and what feeds it (mirror.h, payload.h, shape.h).
 * Dependencies run one way: mirror <- applier <- dlq <- worker.
 */
#ifndef WP_APPLIER_H
#define WP_APPLIER_H

#include "wp_setup.h"

#include <libpq-fe.h>

#include <walpipe/lsn.h>

#include "config.h"
#include "mirror.h"
#include "payload.h"

/* One staged event.  The strings borrow from the PGresult it was read from. */
typedef struct wp_event {
    int64_t id;
    const char *received_at; /* timestamptz text (UTC): with id, raw_events' primary key */
    const char *source;
    const char *type; /* raw_events.event_type */
    const char *payload;
    const char *lsn_text;
    wp_lsn_t lsn;
    const char *seq_text;
    int seq;
    const char *schema; /* NULL for messages */
    const char *table;
    const char *shape_text; /* shape_id as text, NULL when none */
    /* outcome of wp_applier_apply */
    wp_fail_t fail;
    char error[400];
} wp_event_t;

/*
 * The columns raw_events must be selected as (in this order) for
 * wp_events_from_result.
 */
#define WP_EVENT_COLUMNS                                                                                            \
    "id, received_at::text, source, event_type, payload::text, lsn::text, seq, schema_name, table_name, "          \
    "shape_id::text"

/* Fills events[0..PQntuples) from res, sorted by id (stream order).  Returns the count. */
size_t wp_events_from_result(const PGresult *res, wp_event_t *events);

/*
 * Marks ev failed with fail and the formatted reason.  The reason is made
 * valid UTF-8 and cut on a character boundary to fit ev->error, so it can
 * always be written to walpipe.dead_letters.
 */
void wp_event_fail(wp_event_t *ev, wp_fail_t fail, const char *fmt, ...) WP_PRINTF(3, 4);

typedef struct wp_applier wp_applier_t;

/* The applier talks to staging over conn, which it borrows (the caller connects and closes). */
wp_applier_t *wp_applier_create(const wp_config_t *config, PGconn *conn);
void wp_applier_destroy(wp_applier_t *a); /* NULL is a no-op */

/*
 * Sets the session up for applying (time zone, styles, search_path, lock
 * timeout).  Returns 0 or -1 (logged).
 */
int wp_applier_session(PGconn *conn);

/*
 * Applies events[0..n) inside the caller's open transaction.  Each event
 * ends applied (fail = WP_FAIL_NONE) or with fail and error set for the
 * dead-letter queue; the transaction stays usable either way.
 * Returns 0; 1 when some table's key is not recorded yet and this applier
 * may wait for it (wp_applier_may_wait_keys) and has not lately: the caller
 * rolls back, calls wp_applier_wait_keys once for all of them, and claims
 * again; -1 on a transient error (the caller rolls back and retries later).
 * A table whose key is not recorded and was waited for already (or when
 * waiting is off) fails its events as WP_FAIL_DEFER instead, so a claim
 * waits at most once and always ends.
 */
int wp_applier_apply(wp_applier_t *a, wp_event_t *events, size_t n);

/*
 * Whether wp_applier_apply may return 1 to wait for unknown keys (off by
 * default; the worker pool sets it for its claims).  Returns the previous
 * setting.
 */
bool wp_applier_may_wait_keys(wp_applier_t *a, bool may_wait);

/*
 * Asks `walpipe run` (NOTIFY walpipe_discover, one per table) for the keys
 * of the tables the last wp_applier_apply found none recorded for.  Inside a
 * transaction the request goes out when it commits.  Returns 0 or -1
 * (logged; the caller's transaction is then aborted).
 */
int wp_applier_request_keys(wp_applier_t *a);

/*
 * After wp_applier_apply returned 1 and the caller rolled back: asks `walpipe
 * run` for the missing keys and waits up to wait_ms for all of them at once.
 * Tables still missing after that are dead-lettered (deferred) on the next
 * attempt instead of waited for again.
 */
void wp_applier_wait_keys(wp_applier_t *a, int wait_ms);

/* Why the last wp_applier_apply returned -1 (for the log). */
const char *wp_applier_last_error(const wp_applier_t *a);

/*
 * Before applying a claim: forgets cached mirrors that another worker altered
 * (or dropped) since this applier read them.  Returns 0, or -1 when staging
 * could not be asked (the caller rolls back).
 */
int wp_applier_check_generations(wp_applier_t *a);

/* Forgets cached mirrors and prepared statements (after a rollback that may have undone DDL). */
void wp_applier_reset(wp_applier_t *a);

#endif /* WP_APPLIER_H */

/*
 * dlq.h: the dead-letter queue of events that could not be applied.
 *
 * walpipe.dead_letters holds two kinds of rows: 'decode' (stream messages the
 * stager could not decode; see stager.c) and 'apply' (staged events a worker
 * could not apply).  An apply dead letter is retried with exponential backoff
 * up to [workers] max_attempts times, then parked until `walpipe dlq retry`.
 */
#ifndef WP_DLQ_H
#define WP_DLQ_H

#include "wp_setup.h"

#include <libpq-fe.h>

#include "config.h"
#include "applier.h"

/*
 * Records the failure of ev (fail and error set) in the caller's open
 * transaction: a new dead letter, or one more attempt of an existing one.
 * Returns 0, or -1 (logged; the caller rolls back).
 */
int wp_dlq_record(PGconn *conn, const wp_config_t *config, const wp_event_t *ev);

/*
 * Worker side: claims dead letters whose next attempt is due, applies their
 * events again and records the outcome, in one transaction.  Returns how many
 * were retried, or -1 on a transient error (rolled back).
 */
int wp_dlq_retry_due(wp_applier_t *a, PGconn *conn, const wp_config_t *config);

/* The queue's size: apply dead letters waiting for a retry, parked ones, undecodable messages. */
int wp_dlq_counts(PGconn *conn, long long *waiting, long long *parked, long long *undecodable);

/*
 * `walpipe dlq list | retry | drop [--id N]... [--all]`.  ids (nids of them)
 * select dead letters; none means all for list and retry, and drop needs
 * all = true.  Prints to stdout; returns an exit code.
 */
int wp_dlq_command(const wp_config_t *config, const char *action, const int64_t *ids, size_t nids, bool all);

#endif /* WP_DLQ_H */

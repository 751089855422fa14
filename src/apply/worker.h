/*
 * worker.h: the worker pool: threads that claim unprocessed raw_events,
 * apply them (applier.h), dead-letter what fails (dlq.h) and mark them
 * processed, all in one staging transaction.
 */
#ifndef WP_WORKER_H
#define WP_WORKER_H

#include "wp_setup.h"

#include "config.h"

typedef struct wp_workers wp_workers_t;

/*
 * Starts count worker threads, plus a monitor thread that logs progress and
 * the dead-letter queue's size every 10 s and, when discover is set (`walpipe
 * run`), records the sources' table keys (wp_keys_discover) at start, on
 * request and every 5 minutes.  Threads stop when wp_stop_requested() is true or
 * wp_workers_stop is called.
 */
wp_workers_t *wp_workers_start(const wp_config_t *config, int count, bool discover);

/*
 * Stops and joins every thread.  Returns 0, or -1 if a worker stopped on an
 * error retrying cannot fix (e.g. the staging schema is too old).
 */
int wp_workers_stop(wp_workers_t *w);

/* Blocks until a stop is requested or every worker has stopped on a fatal error. */
void wp_workers_wait(wp_workers_t *w);

#endif /* WP_WORKER_H */

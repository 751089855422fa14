/*
 * runtime.h: process-wide state every thread may read: the stop request and
 * the monotonic clock.
 *
 * Invariant: the stop flag is only ever set (by a signal handler or a
 * command), never cleared, and is an atomic, so every thread that polls it
 * sees the request without a data race.
 */
#ifndef WP_RUNTIME_H
#define WP_RUNTIME_H

#include "wp_setup.h"

/* Monotonic clock in milliseconds. */
int64_t wp_now_ms(void);

/* Asks every loop to finish the work in hand, commit, acknowledge and return.  Async-signal-safe. */
void wp_stop_request(void);

/* True once a stop was requested. */
bool wp_stop_requested(void);

#endif /* WP_RUNTIME_H */

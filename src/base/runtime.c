/*
 * runtime.c: the stop request and the monotonic clock (see runtime.h).
 *
 * Invariant: the flag is a lock-free atomic, so setting it from a signal
 * handler and reading it from any thread is well defined.
 */
#include "wp_setup.h"

#include <signal.h>
#include <stdatomic.h>
#include <time.h>

#include "runtime.h"

static atomic_int stop_flag = 0;

_Static_assert(ATOMIC_INT_LOCK_FREE == 2, "the stop flag must be lock-free to be set from a signal handler");

int64_t wp_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void wp_stop_request(void)
{
    atomic_store(&stop_flag, 1);
}

bool wp_stop_requested(void)
{
    return atomic_load(&stop_flag) != 0;
}

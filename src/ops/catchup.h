/*
 * catchup.h: is a source's walpipe catching up after an outage, how fast,
 * and for how long still?
 *
 * A tracker keeps the last samples of two WAL positions of one source:
 *
 *   source_lsn  the source's pg_current_wal_lsn()
 *   staged_lsn  how far walpipe has consumed it: the later of the checkpoint's
 *               lsn (staging) and the slot's confirmed_flush_lsn
 *
 * behind = source_lsn - staged_lsn.  A source is "catching up" from the
 * moment it is WP_CATCHUP_ENTER_BYTES behind until it is less than
 * WP_CATCHUP_LEAVE_BYTES behind (the gap between the two keeps a busy
 * source from flapping) and has staged all the source had written
 * WP_CATCHUP_LIVE_MS before (or at the oldest sample, if younger).  The rate is net: WAL staged per second minus WAL
 * the source wrote per second over the same samples, so behind / rate is the
 * time left.  Positions move at source commits (and staging commits), so a
 * rate is only as fine as the transactions it covers.
 *
 * Shared by the lag guard (samples once a second, logs every
 * WP_CATCHUP_LOG_MS while catching up) and `walpipe status`, so that both
 * say the same.  Pure: no I/O, no clock; the caller passes the time.
 */
#ifndef WP_CATCHUP_H
#define WP_CATCHUP_H

#include "wp_setup.h"

#include <walpipe/lsn.h>

#include "probe.h"

#define WP_CATCHUP_ENTER_BYTES (64LL * 1024 * 1024)
#define WP_CATCHUP_LEAVE_BYTES (16LL * 1024 * 1024)
#define WP_CATCHUP_LOG_MS 10000    /* the lag guard's report interval while catching up */
#define WP_CATCHUP_RATE_MS 10000   /* the window the rate is measured over */
#define WP_CATCHUP_LIVE_MS 3000    /* caught up: staged what the source had written this long ago */
#define WP_CATCHUP_SAMPLES 64

typedef struct wp_catchup_sample {
    int64_t ms;
    wp_lsn_t source_lsn, staged_lsn;
} wp_catchup_sample_t;

typedef struct wp_catchup {
    wp_catchup_sample_t samples[WP_CATCHUP_SAMPLES]; /* ring, oldest first from next - n */
    size_t n, next;
    bool catching_up;
    int64_t since_ms;       /* when catching up began */
    wp_lsn_t since_staged;  /* staged_lsn then */
} wp_catchup_t;

typedef enum wp_catchup_event {
    WP_CATCHUP_NOTHING = 0,
    WP_CATCHUP_STARTED, /* this sample is the first one past WP_CATCHUP_ENTER_BYTES */
    WP_CATCHUP_DONE,    /* this sample is the first one caught up again */
} wp_catchup_event_t;

typedef struct wp_catchup_rate {
    bool known;         /* two samples at least 1 s apart within the window */
    double seconds;     /* between them */
    double staged;      /* bytes of WAL staged per second */
    double written;     /* bytes of WAL the source wrote per second */
    double net;         /* staged - written: how fast behind shrinks (< 0: it grows) */
} wp_catchup_rate_t;

/* The later of the checkpoint's LSN and the slot's confirmed_flush_lsn; WP_LSN_INVALID when neither is known. */
wp_lsn_t wp_catchup_staged_lsn(const wp_probe_source_t *p);

/*
 * Adds a sample taken at now_ms (monotonic, > 0) and moves the state.  A
 * staged_lsn behind the last sample's (a look that missed the checkpoint)
 * counts as the last one; a source_lsn that goes backwards (another server)
 * starts the tracker over.
 */
wp_catchup_event_t wp_catchup_update(wp_catchup_t *c, int64_t now_ms, wp_lsn_t source_lsn, wp_lsn_t staged_lsn);

/* Bytes behind at the newest sample; -1 without one. */
int64_t wp_catchup_behind(const wp_catchup_t *c);

/* The rate between the newest sample and the oldest one at most window_ms older. */
wp_catchup_rate_t wp_catchup_rate(const wp_catchup_t *c, int64_t window_ms);

/* Seconds left at this rate: behind / net; -1 when unknown (no rate, or not shrinking). */
double wp_catchup_eta(int64_t behind, const wp_catchup_rate_t *rate);

/* Since catching up last began, to the newest sample (also right after DONE): seconds, WAL bytes staged; 0 never. */
double wp_catchup_seconds(const wp_catchup_t *c);
int64_t wp_catchup_consumed(const wp_catchup_t *c);

#endif /* WP_CATCHUP_H */

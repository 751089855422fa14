/*
 * catchup.c: the catch-up tracker (see catchup.h).
 *
 * Invariant: samples are in time order in the ring; catching_up changes only
 * at WP_CATCHUP_STARTED (behind >= WP_CATCHUP_ENTER_BYTES) and
 * WP_CATCHUP_DONE (behind < WP_CATCHUP_LEAVE_BYTES and everything the source
 * had written WP_CATCHUP_LIVE_MS earlier staged).
 */
#include "wp_setup.h"

#include <string.h>

#include "catchup.h"

wp_lsn_t wp_catchup_staged_lsn(const wp_probe_source_t *p)
{
    wp_lsn_t staged = p->has_checkpoint ? p->checkpoint_lsn : WP_LSN_INVALID;
    if (p->slot_exists && p->confirmed_flush != WP_LSN_INVALID && p->confirmed_flush > staged)
        staged = p->confirmed_flush;
    return staged;
}

static const wp_catchup_sample_t *sample_at(const wp_catchup_t *c, size_t age)
{
    /* age 0 = newest */
    return &c->samples[(c->next + WP_CATCHUP_SAMPLES - 1 - age) % WP_CATCHUP_SAMPLES];
}

static int64_t behind_of(const wp_catchup_sample_t *s)
{
    return s->source_lsn > s->staged_lsn ? (int64_t)(s->source_lsn - s->staged_lsn) : 0;
}

/*
 * Has the newest sample staged everything the source had written
 * WP_CATCHUP_LIVE_MS earlier (by the newest sample that old, else the oldest
 * one)?  Under WP_CATCHUP_LEAVE_BYTES is not enough on its own: a quiet
 * source with a few MB left is not caught up yet.
 */
static bool reached_recent(const wp_catchup_t *c)
{
    const wp_catchup_sample_t *now = sample_at(c, 0), *ref = NULL;
    for (size_t age = 1; age < c->n; age++) {
        ref = sample_at(c, age);
        if (now->ms - ref->ms >= WP_CATCHUP_LIVE_MS)
            break;
    }
    return ref != NULL && now->staged_lsn >= ref->source_lsn;
}

wp_catchup_event_t wp_catchup_update(wp_catchup_t *c, int64_t now_ms, wp_lsn_t source_lsn, wp_lsn_t staged_lsn)
{
    if (c->n > 0) {
        const wp_catchup_sample_t *last = sample_at(c, 0);
        if (source_lsn < last->source_lsn || now_ms < last->ms)
            memset(c, 0, sizeof *c); /* another server, or a clock gone back: start over */
        else if (staged_lsn < last->staged_lsn)
            staged_lsn = last->staged_lsn; /* one look without the checkpoint (staging down) */
    }
    wp_catchup_sample_t *s = &c->samples[c->next];
    s->ms = now_ms;
    s->source_lsn = source_lsn;
    s->staged_lsn = staged_lsn;
    c->next = (c->next + 1) % WP_CATCHUP_SAMPLES;
    if (c->n < WP_CATCHUP_SAMPLES)
        c->n++;
    int64_t behind = behind_of(s);
    if (!c->catching_up && behind >= WP_CATCHUP_ENTER_BYTES) {
        c->catching_up = true;
        c->since_ms = now_ms;
        c->since_staged = staged_lsn;
        return WP_CATCHUP_STARTED;
    }
    if (c->catching_up && behind < WP_CATCHUP_LEAVE_BYTES && reached_recent(c)) {
        c->catching_up = false;
        return WP_CATCHUP_DONE;
    }
    return WP_CATCHUP_NOTHING;
}

int64_t wp_catchup_behind(const wp_catchup_t *c)
{
    return c->n > 0 ? behind_of(sample_at(c, 0)) : -1;
}

wp_catchup_rate_t wp_catchup_rate(const wp_catchup_t *c, int64_t window_ms)
{
    wp_catchup_rate_t r;
    memset(&r, 0, sizeof r);
    if (c->n < 2)
        return r;
    const wp_catchup_sample_t *now = sample_at(c, 0);
    const wp_catchup_sample_t *then = NULL;
    for (size_t age = 1; age < c->n; age++) {
        const wp_catchup_sample_t *s = sample_at(c, age);
        if (now->ms - s->ms > window_ms)
            break;
        then = s;
    }
    if (then == NULL || now->ms - then->ms < 1000)
        return r;
    r.known = true;
    r.seconds = (double)(now->ms - then->ms) / 1000.0;
    r.staged = (double)(now->staged_lsn - then->staged_lsn) / r.seconds;
    r.written = (double)(now->source_lsn - then->source_lsn) / r.seconds;
    r.net = r.staged - r.written;
    return r;
}

double wp_catchup_eta(int64_t behind, const wp_catchup_rate_t *rate)
{
    if (behind <= 0)
        return 0;
    if (!rate->known || rate->net <= 0)
        return -1;
    return (double)behind / rate->net;
}

double wp_catchup_seconds(const wp_catchup_t *c)
{
    if (c->n == 0 || c->since_ms == 0)
        return 0;
    return (double)(sample_at(c, 0)->ms - c->since_ms) / 1000.0;
}

int64_t wp_catchup_consumed(const wp_catchup_t *c)
{
    if (c->n == 0 || c->since_ms == 0 || sample_at(c, 0)->staged_lsn < c->since_staged)
        return 0;
    return (int64_t)(sample_at(c, 0)->staged_lsn - c->since_staged);
}

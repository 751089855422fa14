/*
 * source.c: the life of one source: sessions, retries, refusals.
 *
 * Job: run sessions (staging connection, checkpoint, replication
 * connection, slot checks, then reader and stager side by side) until a stop
 * is requested, reconnecting with capped exponential backoff after any
 * retriable error.  Each source has its own threads and connections, so a
 * slow or broken source never stalls another.
 *
 * Invariant: streaming only starts from a checkpoint that matches the slot:
 * same cluster (systemid), same slot, and a slot that has not confirmed
 * anything past the checkpoint.  Otherwise changes would be missing from
 * staging without anyone knowing, so walpipe refuses and says why.
 *
 * Which errors stop the source (README, "Errors"): a refusal above, or a
 * staging schema older than the binary, always.  An error that needs a fix on
 * the source (reader.c decides by SQLSTATE: unknown database, credentials,
 * privilege, wal_level, plugin) only on the first attempt at a source that
 * has no checkpoint yet: that is a mistake in the configuration.  Once the
 * source has been staged from, or after a first attempt that failed for a
 * passing reason (server down), the same error means the source is being
 * restored, recreated or restarted: it is logged as an error and retried with
 * backoff.  Everything else is retried.
 */
#include "wp_setup.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "metrics.h"
#include "reader.h"
#include "snapshot.h"
#include "source.h"
#include "stager.h"

#define BACKOFF_MIN_MS 500
#define BACKOFF_MAX_MS 30000
#define QUEUE_SEGMENTS 16

struct wp_source {
    const wp_config_t *config;
    const wp_source_config_t *source;
    pthread_t thread;
    bool accept_gap;
    bool fatal;
    bool tried;        /* a session was attempted before */
    bool staged_before; /* staging holds a checkpoint of this source */
};

typedef struct stager_arg {
    wp_stager_t *stager;
    wp_queue_t *queue;
    int rc;
} stager_arg_t;

static void *stager_main(void *p)
{
    stager_arg_t *arg = p;
    char name[96];
    snprintf(name, sizeof name, "stager %s", wp_stager_source_name(arg->stager));
    wp_log_set_component(name);
    arg->rc = wp_stager_run(arg->stager, arg->queue);
    return NULL;
}

typedef enum check_result {
    CHECK_OK = 0,
    CHECK_REFUSED,     /* never streamable: a different cluster, another slot, an invalidated slot */
    CHECK_GAP_DROPPED, /* the slot is gone: changes since the checkpoint are lost */
    CHECK_GAP_AHEAD,   /* the slot confirmed past the checkpoint */
} check_result_t;

/*
 * Checks the checkpoint against the slot.  Gaps are logged as errors unless
 * the operator accepted them (--accept-gap), in which case the caller records
 * them; everything else that is not CHECK_OK is logged here.
 */
static check_result_t check_checkpoint(const wp_source_config_t *src, const wp_checkpoint_t *ckpt,
                                       const wp_slot_info_t *slot, bool accept_gap)
{
    char a[WP_LSN_STRLEN], b[WP_LSN_STRLEN];
    if (strcmp(ckpt->systemid, slot->systemid) != 0) {
        wp_error("source is a different cluster (system identifier %s) than the one staged so far (%s); refusing to "
                 "mix them; hint: point the conninfo back at the original cluster, or give this cluster its own "
                 "[source] section",
                 slot->systemid, ckpt->systemid);
        return CHECK_REFUSED;
    }
    if (strcmp(ckpt->slot, src->slot) != 0) {
        wp_error("the checkpoint was written for slot \"%s\" but the configuration names slot \"%s\"; refusing: "
                 "changes between the two would be lost; hint: restore slot = %s",
                 ckpt->slot, src->slot, ckpt->slot);
        return CHECK_REFUSED;
    }
    if (!slot->exists) {
        if (!accept_gap)
            wp_error("slot \"%s\" no longer exists on the source, but staging holds a checkpoint at %s: changes "
                     "since then are gone from the source; refusing to start with a silent gap; hint: re-snapshot "
                     "the source, or run with --accept-gap %s to create a new slot and record the gap",
                     src->slot, wp_lsn_format(ckpt->pos.lsn, a), src->name);
        return CHECK_GAP_DROPPED;
    }
    if (slot->lost) {
        wp_error("slot \"%s\" has been invalidated (wal_status = lost): the source removed WAL it still needed "
                 "(max_slot_wal_keep_size); hint: drop the slot, create a new one and re-snapshot the source",
                 src->slot);
        return CHECK_REFUSED;
    }
    if (slot->confirmed_flush > ckpt->pos.lsn) {
        if (!accept_gap)
            wp_error("slot \"%s\" has confirmed %s but staging's checkpoint is only at %s (staging restored from "
                     "an older backup, the slot advanced by hand, or dropped and recreated): changes in between are "
                     "not in staging; refusing to start with a silent gap; hint: re-snapshot, or run with "
                     "--accept-gap %s to record the gap and go on",
                     src->slot, wp_lsn_format(slot->confirmed_flush, a), wp_lsn_format(ckpt->pos.lsn, b), src->name);
        return CHECK_GAP_AHEAD;
    }
    return CHECK_OK;
}

/*
 * One session.  Returns 0 on a requested stop, -1 on error: *fatal when
 * walpipe refuses to go on, *needs_fix when the source needs a fix (the
 * caller decides between stopping and retrying).
 */
static int run_session(wp_source_t *s, wp_stager_t *stager, wp_reader_t *reader, bool *fatal, bool *needs_fix,
                       int64_t *streamed_ms)
{
    int rc = -1;
    wp_checkpoint_t ckpt;
    wp_slot_info_t slot;
    wp_queue_t queue;
    bool queue_ready = false;
    *fatal = false;
    *needs_fix = false;
    *streamed_ms = 0;

    bool restarted = false; /* the initial snapshot of a previous run is started over */
    if (wp_stager_open(stager, fatal) != 0)
        goto out;
    int found = wp_stager_checkpoint_read(stager, &ckpt);
    if (found < 0)
        goto out;
    if (found)
        s->staged_before = true;
    if (wp_reader_open(reader, &slot, needs_fix) != 0)
        goto out;
    int refused = wp_reader_check_filters(reader);
    if (refused != 0) {
        *fatal = refused > 0; /* a configuration error: retrying cannot cure it */
        goto out;
    }
    if (found && strcmp(ckpt.snapshot_state, "in_progress") == 0) {
        /* the previous run died while copying: its exported snapshot died with it */
        if (strcmp(ckpt.systemid, slot.systemid) != 0) {
            wp_error("source is a different cluster (system identifier %s) than the one staged so far (%s); "
                     "refusing to mix them",
                     slot.systemid, ckpt.systemid);
            *fatal = true;
            goto out;
        }
        wp_warn("the initial snapshot of a previous run did not finish and its exported snapshot is gone; "
                "discarding its rows and starting it over with a new slot (as a resync: mirrors may hold rows "
                "of the discarded attempt)");
        restarted = true;
        if (wp_stager_snapshot_discard(stager) != 0)
            goto out;
        if (slot.exists && wp_reader_drop_slot(reader) != 0)
            goto out;
        slot.exists = false;
        found = 0;
    } else if (found) {
        check_result_t check = check_checkpoint(s->source, &ckpt, &slot, s->accept_gap);
        if (check == CHECK_REFUSED || (check != CHECK_OK && !s->accept_gap)) {
            *fatal = true;
            goto out;
        }
        if (check == CHECK_GAP_DROPPED) {
            wp_lsn_t created;
            if (wp_reader_create_slot(reader, NULL, &created, NULL, needs_fix) != 0 ||
                wp_stager_accept_gap(stager, ckpt.pos.lsn, created, "slot was missing; created anew") != 0)
                goto out;
            ckpt.pos = (wp_position_t){.lsn = created};
        } else if (check == CHECK_GAP_AHEAD) {
            if (wp_stager_accept_gap(stager, ckpt.pos.lsn, slot.confirmed_flush,
                                     "slot had confirmed past the checkpoint") != 0)
                goto out;
            ckpt.pos = (wp_position_t){.lsn = slot.confirmed_flush};
        }
    }
    if (!found) {
        memset(&ckpt, 0, sizeof ckpt);
        if (slot.exists) {
            if (slot.lost) {
                wp_error("slot \"%s\" has been invalidated (wal_status = lost); hint: drop it and let walpipe "
                         "create a new one",
                         s->source->slot);
                *fatal = true;
                goto out;
            }
            ckpt.pos.lsn = slot.confirmed_flush;
            wp_info("adopting existing slot \"%s\"%s", s->source->slot,
                    s->source->snapshot_initial ? "; rows that existed before it are not copied (no snapshot can be "
                                                  "taken for a slot walpipe did not create); use `walpipe snapshot` "
                                                  "to copy tables"
                                                : "");
            if (wp_stager_checkpoint_init(stager, slot.systemid, ckpt.pos.lsn, "none") != 0)
                goto out;
        } else if (!s->source->snapshot_initial) {
            if (wp_reader_create_slot(reader, NULL, &ckpt.pos.lsn, NULL, needs_fix) != 0 ||
                wp_stager_checkpoint_init(stager, slot.systemid, ckpt.pos.lsn, "none") != 0)
                goto out;
        } else {
            char snapshot_name[WP_SNAPSHOT_NAME_LEN];
            wp_slot_spec_t spec = {.export_snapshot = true};
            uint64_t rows;
            if (wp_reader_create_slot(reader, &spec, &ckpt.pos.lsn, snapshot_name, needs_fix) != 0 ||
                wp_stager_checkpoint_init(stager, slot.systemid, ckpt.pos.lsn, "in_progress") != 0)
                goto out;
            /* the replication connection stays idle until the copy is done: its next command ends the snapshot */
            wp_snapshot_job_t job = {.config = s->config,
                                     .source = s->source,
                                     .snapshot_name = snapshot_name,
                                     .lsn = ckpt.pos.lsn,
                                     .kind = "initial",
                                     /* workers may have applied rows of the discarded attempt that the source
                                        has deleted since: a truncate at the new consistent point removes them */
                                     .resync = restarted};
            if (wp_snapshot_copy(&job, &rows) != 0 || wp_stager_snapshot_done(stager) != 0)
                goto out;
        }
    }

    wp_queue_init(&queue, QUEUE_SEGMENTS);
    wp_metric_set(wp_metric(WP_METRIC_GAUGE, "walpipe_queue_capacity_segments",
                            "Segments the reader -> stager queue holds at most", "source", s->source->name, NULL),
                  QUEUE_SEGMENTS);
    queue_ready = true;
    stager_arg_t arg = {.stager = stager, .queue = &queue, .rc = -1};
    pthread_t thread;
    if (pthread_create(&thread, NULL, stager_main, &arg) != 0) {
        wp_error("could not start the stager thread");
        goto out;
    }
    int64_t started = wp_now_ms();
    int rrc = wp_reader_stream(reader, &ckpt.pos, &queue, needs_fix);
    pthread_join(thread, NULL);
    *streamed_ms = wp_now_ms() - started;
    rc = (rrc == 0 && arg.rc == 0) ? 0 : -1;
out:
    wp_reader_close(reader);
    wp_stager_close(stager);
    if (queue_ready)
        wp_queue_cleanup(&queue);
    return rc;
}

static void sleep_ms_interruptible(int ms)
{
    while (ms > 0 && !wp_stop_requested()) {
        int step = ms < 100 ? ms : 100;
        struct timespec ts = {step / 1000, (long)(step % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        ms -= step;
    }
}

static void *source_main(void *p)
{
    wp_source_t *s = p;
    char name[96];
    snprintf(name, sizeof name, "source %s", s->source->name);
    wp_log_set_component(name);
    wp_stager_t *stager = wp_stager_create(s->config, s->source);
    wp_reader_t *reader = wp_reader_create(s->config, s->source);
    int backoff = BACKOFF_MIN_MS;

    while (!wp_stop_requested()) {
        bool fatal = false, needs_fix = false;
        int64_t streamed_ms = 0;
        bool first = !s->tried;
        s->tried = true;
        if (run_session(s, stager, reader, &fatal, &needs_fix, &streamed_ms) == 0 && wp_stop_requested())
            break;
        if (fatal || (needs_fix && first && !s->staged_before)) {
            wp_error("source \"%s\" stopped: the error above needs a fix before walpipe can go on", s->source->name);
            s->fatal = true;
            break;
        }
        if (wp_stop_requested())
            break;
        if (streamed_ms > 60000)
            backoff = BACKOFF_MIN_MS;
        if (needs_fix)
            wp_warn("retrying in %d ms: the error above needs a fix on the source, which walpipe %s, so it waits "
                    "for the source (restored, recreated or restarted) instead of stopping",
                    backoff, s->staged_before ? "has staged from before" : "could not reach at its first attempt");
        else
            wp_info("retrying in %d ms", backoff);
        wp_metric_add(wp_metric(WP_METRIC_COUNTER, "walpipe_reconnects_total",
                                "Sessions with the source that ended in an error and were retried", "source",
                                s->source->name, NULL),
                      1);
        sleep_ms_interruptible(backoff);
        backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
    }
    wp_reader_destroy(reader);
    wp_stager_destroy(stager);
    return NULL;
}

wp_source_t *wp_source_start(const wp_config_t *config, const wp_source_config_t *source_config, bool accept_gap)
{
    wp_source_t *s = wp_calloc(1, sizeof *s);
    s->config = config;
    s->source = source_config;
    s->accept_gap = accept_gap;
    if (pthread_create(&s->thread, NULL, source_main, s) != 0) {
        wp_error("could not start a thread for source \"%s\"", source_config->name);
        free(s);
        return NULL;
    }
    return s;
}

int wp_source_join(wp_source_t *s)
{
    pthread_join(s->thread, NULL);
    int rc = s->fatal ? -1 : 0;
    free(s);
    return rc;
}

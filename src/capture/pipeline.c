/*
 * pipeline.c: the bounded, ordered queue between a reader and its stager.
 *
 * Invariant: segments leave in the order they entered, and the queue never
 * holds more than max segments, which bounds a source's memory whatever the
 * size of the transactions it streams.
 */
#include "wp_setup.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pipeline.h"

wp_segment_t *wp_segment_create(void)
{
    wp_segment_t *segment = wp_calloc(1, sizeof *segment);
    return segment;
}

const char *const wp_event_type_names[WP_EVENT_TYPES] = {"insert",   "update",  "delete",
                                                         "truncate", "message", "snapshot"};

void wp_segment_count(wp_segment_t *segment, const char *event_type, int64_t commit_time)
{
    for (int i = 0; i < WP_EVENT_TYPES; i++) {
        if (strcmp(event_type, wp_event_type_names[i]) == 0) {
            segment->type_rows[i]++;
            break;
        }
    }
    if (commit_time == 0)
        return;
    if (segment->ncommit_runs && segment->commit_runs[segment->ncommit_runs - 1].commit_time == commit_time) {
        segment->commit_runs[segment->ncommit_runs - 1].rows++;
        return;
    }
    if (segment->ncommit_runs == segment->commit_runs_cap) {
        segment->commit_runs_cap = segment->commit_runs_cap ? segment->commit_runs_cap * 2 : 8;
        segment->commit_runs = wp_realloc(segment->commit_runs, segment->commit_runs_cap * sizeof *segment->commit_runs);
    }
    segment->commit_runs[segment->ncommit_runs++] = (wp_commit_run_t){commit_time, 1};
}

void wp_segment_destroy(wp_segment_t *segment)
{
    if (segment == NULL)
        return;
    wp_buf_free(&segment->copy);
    free(segment->commit_runs);
    free(segment->relabels);
    for (wp_dead_letter_t *d = segment->dead, *n; d; d = n) {
        n = d->next;
        free(d->schema);
        free(d->table);
        free(d->raw);
        free(d->reason);
        free(d);
    }
    for (wp_dropped_t *d = segment->dropped, *n; d; d = n) {
        n = d->next;
        free(d->schema);
        free(d->table);
        free(d->names);
        free(d);
    }
    for (wp_shape_t *s = segment->shapes, *n; s; s = n) {
        n = s->next;
        free(s->schema);
        free(s->table);
        free(s->columns);
        free(s->refs);
        free(s);
    }
    free(segment);
}

void wp_segment_add_dead(wp_segment_t *segment, wp_lsn_t lsn, int seq, const char *schema, const char *table,
                         const char *raw, size_t raw_len, const char *reason)
{
    wp_dead_letter_t *dead = wp_calloc(1, sizeof *dead);
    size_t keep = raw_len < WP_DEAD_RAW_MAX ? raw_len : WP_DEAD_RAW_MAX;
    dead->lsn = lsn;
    dead->seq = seq;
    dead->schema = schema ? wp_strdup(schema) : NULL;
    dead->table = table ? wp_strdup(table) : NULL;
    dead->raw = wp_malloc(keep ? keep : 1);
    memcpy(dead->raw, raw, keep);
    dead->raw_len = keep;
    if (keep < raw_len) {
        wp_buf_t r = WP_BUF_INIT;
        wp_buf_printf(&r, "%s (raw holds the first %zu of %zu bytes)", reason, keep, raw_len);
        dead->reason = r.data;
    } else {
        dead->reason = wp_strdup(reason);
    }
    wp_dead_letter_t **tail = &segment->dead;
    while (*tail)
        tail = &(*tail)->next;
    *tail = dead;
}

static bool same_text(const char *a, const char *b)
{
    return (a == NULL && b == NULL) || (a && b && strcmp(a, b) == 0);
}

void wp_segment_add_dropped(wp_segment_t *segment, wp_lsn_t lsn, bool is_update, const char *schema,
                            const char *table, const char *names)
{
    wp_dropped_t **tail = &segment->dropped;
    for (wp_dropped_t *d = segment->dropped; d; d = d->next) {
        if (d->lsn == lsn && same_text(d->schema, schema) && same_text(d->table, table) &&
            strcmp(d->names, names) == 0) {
            d->updates |= is_update;
            d->deletes |= !is_update;
            d->count++;
            return;
        }
        tail = &d->next;
    }
    wp_dropped_t *d = wp_calloc(1, sizeof *d);
    d->lsn = lsn;
    d->schema = schema ? wp_strdup(schema) : NULL;
    d->table = table ? wp_strdup(table) : NULL;
    d->names = wp_strdup(names);
    d->updates = is_update;
    d->deletes = !is_update;
    d->count = 1;
    *tail = d;
}

bool wp_shape_is(const wp_shape_t *shape, const char *schema, const char *table, const char *columns,
                 size_t columns_len)
{
    return shape->columns_len == columns_len && memcmp(shape->columns, columns, columns_len) == 0 &&
           strcmp(shape->table, table) == 0 && strcmp(shape->schema, schema) == 0;
}

wp_shape_t *wp_segment_shape(wp_segment_t *segment, int64_t id, const char *schema, const char *table,
                             const char *columns, size_t columns_len, wp_lsn_t first_lsn)
{
    /* a segment's rows use few shapes (a segment holds at most a few thousand rows) */
    wp_shape_t **tail = &segment->shapes;
    for (wp_shape_t *s = segment->shapes; s; s = s->next) {
        if (s->id == id && wp_shape_is(s, schema, table, columns, columns_len))
            return s;
        tail = &s->next;
    }
    wp_shape_t *shape = wp_calloc(1, sizeof *shape);
    shape->id = id;
    shape->schema = wp_strdup(schema);
    shape->table = wp_strdup(table);
    shape->columns = wp_strndup(columns, columns_len);
    shape->columns_len = columns_len;
    shape->first_lsn = first_lsn;
    *tail = shape;
    return shape;
}

bool wp_segment_empty(const wp_segment_t *segment)
{
    return segment->rows == 0 && segment->dead == NULL && segment->shapes == NULL && segment->dropped == NULL;
}

void wp_segment_add_relabel(wp_segment_t *segment, wp_lsn_t from, wp_lsn_t to)
{
    if (segment->nrelabels == segment->relabels_cap) {
        segment->relabels_cap = segment->relabels_cap ? segment->relabels_cap * 2 : 4;
        segment->relabels = wp_realloc(segment->relabels, segment->relabels_cap * sizeof *segment->relabels);
    }
    segment->relabels[segment->nrelabels++] = (wp_relabel_t){from, to};
}

void wp_queue_init(wp_queue_t *queue, size_t max)
{
    *queue = (wp_queue_t){0};
    pthread_mutex_init(&queue->mu, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&queue->changed, &attr);
    pthread_condattr_destroy(&attr);
    queue->max = max;
}

void wp_queue_cleanup(wp_queue_t *queue)
{
    for (wp_segment_t *s = queue->head, *n; s; s = n) {
        n = s->next;
        wp_segment_destroy(s);
    }
    queue->head = queue->tail = NULL;
    pthread_mutex_destroy(&queue->mu);
    pthread_cond_destroy(&queue->changed);
}

static void deadline_after(struct timespec *ts, int wait_ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += wait_ms / 1000;
    ts->tv_nsec += (long)(wait_ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

int wp_queue_push(wp_queue_t *queue, wp_segment_t *segment, int wait_ms)
{
    int rc = 0;
    struct timespec deadline;
    deadline_after(&deadline, wait_ms);
    pthread_mutex_lock(&queue->mu);
    while (!queue->failed && queue->count >= queue->max) {
        if (pthread_cond_timedwait(&queue->changed, &queue->mu, &deadline) == ETIMEDOUT)
            break;
    }
    if (queue->failed) {
        rc = -1;
        goto out;
    }
    if (queue->count >= queue->max)
        goto out;
    segment->next = NULL;
    if (queue->tail)
        queue->tail->next = segment;
    else
        queue->head = segment;
    queue->tail = segment;
    queue->count++;
    pthread_cond_broadcast(&queue->changed);
    rc = 1;
out:
    pthread_mutex_unlock(&queue->mu);
    return rc;
}

wp_segment_t *wp_queue_pop(wp_queue_t *queue, int wait_ms, bool *failed)
{
    wp_segment_t *segment = NULL;
    struct timespec deadline;
    deadline_after(&deadline, wait_ms);
    pthread_mutex_lock(&queue->mu);
    while (!queue->failed && queue->head == NULL && wait_ms > 0) {
        if (pthread_cond_timedwait(&queue->changed, &queue->mu, &deadline) == ETIMEDOUT)
            break;
    }
    *failed = queue->failed;
    if (!queue->failed && queue->head) {
        segment = queue->head;
        queue->head = segment->next;
        if (queue->head == NULL)
            queue->tail = NULL;
        queue->count--;
        segment->next = NULL;
        pthread_cond_broadcast(&queue->changed);
    }
    pthread_mutex_unlock(&queue->mu);
    return segment;
}

void wp_queue_fail(wp_queue_t *queue)
{
    pthread_mutex_lock(&queue->mu);
    queue->failed = true;
    pthread_cond_broadcast(&queue->changed);
    pthread_mutex_unlock(&queue->mu);
}

bool wp_queue_failed(wp_queue_t *queue)
{
    pthread_mutex_lock(&queue->mu);
    bool failed = queue->failed;
    pthread_mutex_unlock(&queue->mu);
    return failed;
}

void wp_queue_set_durable(wp_queue_t *queue, const wp_position_t *pos, size_t rows)
{
    pthread_mutex_lock(&queue->mu);
    queue->durable = *pos;
    queue->staged_rows += rows;
    pthread_cond_broadcast(&queue->changed);
    pthread_mutex_unlock(&queue->mu);
}

wp_position_t wp_queue_durable(wp_queue_t *queue)
{
    pthread_mutex_lock(&queue->mu);
    wp_position_t pos = queue->durable;
    pthread_mutex_unlock(&queue->mu);
    return pos;
}

size_t wp_queue_length(wp_queue_t *queue)
{
    pthread_mutex_lock(&queue->mu);
    size_t n = queue->count;
    pthread_mutex_unlock(&queue->mu);
    return n;
}

void wp_queue_set_finished(wp_queue_t *queue)
{
    pthread_mutex_lock(&queue->mu);
    queue->finished = true;
    pthread_cond_broadcast(&queue->changed);
    pthread_mutex_unlock(&queue->mu);
}

bool wp_queue_finished(wp_queue_t *queue)
{
    pthread_mutex_lock(&queue->mu);
    bool finished = queue->finished;
    pthread_mutex_unlock(&queue->mu);
    return finished;
}

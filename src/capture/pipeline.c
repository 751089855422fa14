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
#include <time.h>

#include "pipeline.h"

wp_segment_t *wp_segment_create(void)
{
    wp_segment_t *segment = wp_calloc(1, sizeof *segment);
    return segment;
}

void wp_segment_destroy(wp_segment_t *segment)
{
    if (segment == NULL)
        return;
    wp_buf_free(&segment->copy);
    for (wp_dead_letter_t *d = segment->dead, *n; d; d = n) {
        n = d->next;
        free(d->raw);
        free(d->reason);
        free(d);
    }
    for (wp_shape_t *s = segment->shapes, *n; s; s = n) {
        n = s->next;
        free(s->schema);
        free(s->table);
        free(s->columns);
        free(s);
    }
    free(segment);
}

bool wp_segment_empty(const wp_segment_t *segment)
{
    return segment->rows == 0 && segment->dead == NULL && segment->shapes == NULL;
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

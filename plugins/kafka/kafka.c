/*
 * plugins/kafka/kafka.c: the KAFKA sink plugin (ABI include/walpipe/sink.h): staged events
 * to Debezium-compatible Kafka records (envelope.c), produced with librdkafka, exactly once.
 *
 * Producer: enable.idempotence (acks=all, no reordering, no duplicates inside a session),
 * enable.gapless.guarantee (an error that could leave a gap in a partition stops the
 * producer instead), message.timeout.ms = 0 (a broker outage is retried inside
 * librdkafka for as long as it lasts, and the position holds).  Every record goes to a
 * partition this module computes itself: murmur2 of the key bytes (librdkafka's
 * rd_kafka_msg_partitioner_murmur2_random, Java-compatible for non-null keys: where
 * Debezium's producer puts the same key), partition 0 for a null key (truncate, a key-less
 * table; they keep their order there).  A bounded ring of in-flight events (queue_max_events)
 * gives backpressure: deliver waits on rd_kafka_poll while it is full; nothing is dropped.
 * A delivery report names the record's ring slot; the durable ticket is the last of the
 * contiguous prefix of events whose records (1..3) are all PERSISTED (bottledwater's rule).
 *
 * Headers on every record: walpipe.source, walpipe.lsn ("X/Y"), walpipe.seq, walpipe.record
 * (1..3, the record's index within its event), walpipe.replay ("1", only on a replay).
 *
 * EXACTLY ONCE, the argument.  Identity of a record: (source, lsn, seq, rec).  The core
 * delivers each source's events in strictly increasing (lsn, seq) and an event's records
 * are produced in rec order, so a session produces each partition's records of a source in
 * increasing identity.  The idempotent producer with the gapless guarantee persists, per
 * partition, a PREFIX of what the session produced there (no reorder, no duplicate, no
 * gap; anything else stops the producer).  Sessions never overlap in time (the core closes
 * one before it opens the next; close waits for outstanding deliveries, bounded).  So each
 * partition holds, per source, its records in increasing identity, and the last non-replay
 * record of a source in a partition (its "tail", read once per topic and session, before
 * the session produces to it) is the highest identity of that source ever written there.
 * The partition of a record depends only on its key bytes and the topic's partition count,
 * so a redelivered record lands in the partition it went to before.  Hence: a record with
 * identity <= the tail of its partition is already there (skip it, count it durable); one
 * above the tail is not (produce it).  No record is missing: the core redelivers from its
 * durable position, which never passed an event with a record not PERSISTED; none is
 * doubled: everything produced again is above its partition's tail.  A delete and its
 * tombstone share (lsn, seq) but differ in rec, so a crash between them produces only the
 * tombstone; the three records of a key change may sit in two partitions and each is
 * judged by its own.  A key-less table's records all go to partition 0 in order, so the
 * same rule holds.  Replayed events (ev->replay) are never skipped and are marked, and a
 * tail is the last record NOT so marked.  What it assumes: every delivery of an event carries
 * the same key (ev->key_columns: a table whose key is not known yet must not be delivered
 * key-less first and keyed later, or its records land in two partitions), the topic's
 * partition count does not change between sessions, and nobody else writes walpipe headers of
 * this source into its topics.  tests/integration/test_kafka.py proves it across SIGKILLs and broker outages.
 *
 * Ownership: the session (kafka_session_t) owns the producer, the tail consumer, the topic
 * table and the ring; event memory is the core's (copied by the encoder and librdkafka).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <librdkafka/rdkafka.h>
#include <walpipe/sink.h>

#include "envelope.h"

#define KAFKA_TOPIC_BUCKETS 256
#define KAFKA_META_TIMEOUT_MS 10000
#define KAFKA_TAIL_WINDOW 256
#define KAFKA_BLOCK_MS 30000 /* deliver gives up (RETRY) after waiting this long on a full queue */
#define KAFKA_CLOSE_FLUSH_MS 10000

/* One (source, topic) the session has used: its partition count and each partition's tail. */
typedef struct kafka_tail {
    int known;    /* 1: a record of this source is in the partition, identity below */
    uint64_t lsn;
    int32_t seq;
    int32_t rec;
} kafka_tail_t;

typedef struct kafka_topic {
    struct kafka_topic *next;
    char *source;
    char *name;
    rd_kafka_topic_t *rkt; /* the producer's handle */
    int32_t partitions;
    kafka_tail_t *tails;   /* partitions entries */
} kafka_topic_t;

/* An event in flight: its ticket and how many of its records are not yet persisted. */
typedef struct kafka_slot {
    uint64_t ticket;
    int remaining;
} kafka_slot_t;

typedef struct kafka_session {
    const wp_sink_host_t *host;
    rd_kafka_t *rk;        /* producer */
    rd_kafka_t *tail_rk;   /* consumer for reading partition tails, created on first need */
    wp_dbz_options_t dbz;
    char *topic_prefix;    /* NULL: each event's source name */
    char *database;
    int tombstones;
    kafka_topic_t *buckets[KAFKA_TOPIC_BUCKETS];
    kafka_slot_t *ring;
    size_t ring_cap;
    uint64_t ring_head;    /* oldest slot not yet durable */
    uint64_t ring_tail;    /* next free slot */
    uint64_t durable;      /* last ticket reported durable */
    int failed;            /* WP_SINK_OK, or the class of the first failed delivery */
    int closing;           /* close purges what is left: those reports are no failure */
    char fail_reason[256];
    uint64_t skipped;      /* records not produced because they were already there */
} kafka_session_t;

static const char *const kafka_keys[] = {
    "brokers", "topic_prefix", "database", "schemas_enable", "decimal_handling_mode",
    "tombstones_on_delete", "queue_max_events",
    /* passed to librdkafka as they are, without the "kafka." prefix */
    "kafka.linger.ms", "kafka.batch.num.messages", "kafka.batch.size", "kafka.compression.type",
    "kafka.client.id", "kafka.message.max.bytes", "kafka.security.protocol", "kafka.ssl.ca.location",
    "kafka.sasl.mechanisms", "kafka.sasl.username", "kafka.sasl.password", "kafka.debug",
    "kafka.socket.timeout.ms", "kafka.retry.backoff.ms", "kafka.reconnect.backoff.ms",
    "kafka.reconnect.backoff.max.ms", "kafka.topic.metadata.refresh.interval.ms",
    NULL};

static void kafka_log(const kafka_session_t *s, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void kafka_log(const kafka_session_t *s, int level, const char *fmt, ...)
{
    char line[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    s->host->log(s->host, level, line);
}

static int kafka_cmp_identity(uint64_t lsn, int32_t seq, int32_t rec, const kafka_tail_t *t)
{
    if (lsn != t->lsn)
        return lsn < t->lsn ? -1 : 1;
    if (seq != t->seq)
        return seq < t->seq ? -1 : 1;
    if (rec != t->rec)
        return rec < t->rec ? -1 : 1;
    return 0;
}

static unsigned kafka_hash(const char *a, const char *b)
{
    unsigned h = 2166136261u;

    for (; *a; a++)
        h = (h ^ (unsigned char)*a) * 16777619u;
    h = (h ^ 0xffu) * 16777619u;
    for (; *b; b++)
        h = (h ^ (unsigned char)*b) * 16777619u;
    return h % KAFKA_TOPIC_BUCKETS;
}

/* The partition a record goes to: murmur2 of its key (Java-compatible), 0 for a null key. */
static int32_t kafka_partition_of(const char *key, size_t key_len, int32_t partitions)
{
    if (!key)
        return 0;
    return rd_kafka_msg_partitioner_murmur2_random(NULL, key, key_len, partitions, NULL, NULL);
}

/* ---- configuration ---------------------------------------------------------------------- */

static int kafka_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value, char *err, size_t errlen)
{
    char errstr[256];

    if (rd_kafka_conf_set(conf, name, value, errstr, sizeof errstr) != RD_KAFKA_CONF_OK) {
        snprintf(err, errlen, "kafka: librdkafka refuses %s: %s", name, errstr);
        return -1;
    }
    return 0;
}

static void kafka_dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque);

/* librdkafka's log lines go to the sink's log (syslog levels: 0..2 error; 3, a broker connection
 * failing, which librdkafka retries on its own, and 4 warning; 5..6 info). */
static void kafka_rdk_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    const kafka_session_t *s = rd_kafka_opaque(rk);

    if (!s)
        return;
    kafka_log(s, level <= 2 ? WP_SINK_LOG_ERROR : level <= 4 ? WP_SINK_LOG_WARN : level <= 6 ? WP_SINK_LOG_INFO
                                                                                              : WP_SINK_LOG_DEBUG,
              "librdkafka %s: %s", fac, buf);
}

/* Builds the producer's configuration from the sink's keys.  Returns NULL with err set. */
static rd_kafka_conf_t *kafka_producer_conf(kafka_session_t *s, const char *brokers, char *err, size_t errlen)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char num[32];

    snprintf(num, sizeof num, "%zu", s->ring_cap * 3 + 16);
    if (kafka_conf_set(conf, "bootstrap.servers", brokers, err, errlen) ||
        kafka_conf_set(conf, "enable.idempotence", "true", err, errlen) ||
        kafka_conf_set(conf, "acks", "all", err, errlen) ||
        kafka_conf_set(conf, "enable.gapless.guarantee", "true", err, errlen) ||
        kafka_conf_set(conf, "message.timeout.ms", "0", err, errlen) ||
        kafka_conf_set(conf, "partitioner", "murmur2_random", err, errlen) ||
        kafka_conf_set(conf, "queue.buffering.max.messages", num, err, errlen) ||
        kafka_conf_set(conf, "linger.ms", "5", err, errlen) ||
        kafka_conf_set(conf, "log_level", "4", err, errlen) ||
        /* log lines wait in the main queue and reach the host from rd_kafka_poll, in the
           core's thread (the host's log is not promised to be thread-safe) */
        kafka_conf_set(conf, "log.queue", "true", err, errlen))
        goto fail;
    for (const char *const *k = kafka_keys; *k; k++) {
        const char *v;
        if (strncmp(*k, "kafka.", 6) != 0 || !(v = s->host->config_get(s->host, *k)))
            continue;
        if (kafka_conf_set(conf, *k + 6, v, err, errlen))
            goto fail;
    }
    rd_kafka_conf_set_dr_msg_cb(conf, kafka_dr_cb);
    rd_kafka_conf_set_log_cb(conf, kafka_rdk_log);
    rd_kafka_conf_set_opaque(conf, s);
    return conf;
fail:
    rd_kafka_conf_destroy(conf);
    return NULL;
}

static int kafka_parse_bool(const char *v, int dflt, int *out)
{
    if (!v) {
        *out = dflt;
        return 0;
    }
    if (!strcmp(v, "true") || !strcmp(v, "on") || !strcmp(v, "yes") || !strcmp(v, "1"))
        *out = 1;
    else if (!strcmp(v, "false") || !strcmp(v, "off") || !strcmp(v, "no") || !strcmp(v, "0"))
        *out = 0;
    else
        return -1;
    return 0;
}

/* ---- delivery reports and the durable prefix --------------------------------------------- */

static void kafka_dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    kafka_session_t *s = opaque;
    uint64_t slot = (uint64_t)(uintptr_t)m->_private;
    kafka_slot_t *e = &s->ring[slot % s->ring_cap];

    (void)rk;
    if (s->closing)
        return;
    if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR && rd_kafka_message_status(m) == RD_KAFKA_MSG_STATUS_PERSISTED) {
        e->remaining--;
        return;
    }
    if (s->failed == WP_SINK_OK) {
        rd_kafka_resp_err_t err = m->err;
        /* a record the broker can never take: retrying the session would fail alike */
        int fatal = err == RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE || err == RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED ||
                    err == RD_KAFKA_RESP_ERR_TOPIC_EXCEPTION || err == RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE ||
                    err == RD_KAFKA_RESP_ERR_INVALID_RECORD;
        s->failed = fatal ? WP_SINK_FATAL : WP_SINK_RETRY;
        snprintf(s->fail_reason, sizeof s->fail_reason, "kafka: delivery to %s [%" PRId32 "] failed: %s%s",
                 rd_kafka_topic_name(m->rkt), m->partition, rd_kafka_err2str(err),
                 fatal ? " (the broker refuses this record; fix the topic or message.max.bytes)" : "");
        kafka_log(s, WP_SINK_LOG_WARN, "%s", s->fail_reason);
    }
}

/* Moves the ring's head over fully persisted events; *durable = the last one's ticket. */
static void kafka_advance(kafka_session_t *s)
{
    while (s->ring_head < s->ring_tail && s->ring[s->ring_head % s->ring_cap].remaining == 0) {
        s->durable = s->ring[s->ring_head % s->ring_cap].ticket;
        s->ring_head++;
    }
}

/* Serves delivery reports for up to timeout_ms; returns the session's state as a code. */
static int kafka_serve(kafka_session_t *s, int timeout_ms, char *err, size_t errlen)
{
    char reason[256];
    rd_kafka_resp_err_t ferr;

    rd_kafka_poll(s->rk, timeout_ms);
    kafka_advance(s);
    if (s->failed != WP_SINK_OK) {
        snprintf(err, errlen, "%s", s->fail_reason);
        return s->failed;
    }
    ferr = rd_kafka_fatal_error(s->rk, reason, sizeof reason);
    if (ferr) {
        /* e.g. an idempotence sequence error: this producer is done; a new session (new producer,
           tails read again) goes on from the durable position */
        snprintf(err, errlen, "kafka: producer failed (%s): %s; a new session restarts it", rd_kafka_err2name(ferr),
                 reason);
        return WP_SINK_RETRY;
    }
    return WP_SINK_OK;
}

/* ---- partition tails ----------------------------------------------------------------------- */

static int kafka_tail_consumer(kafka_session_t *s, char *err, size_t errlen)
{
    rd_kafka_conf_t *conf;
    char errstr[256];
    const char *brokers = s->host->config_get(s->host, "brokers");

    if (s->tail_rk)
        return 0;
    conf = rd_kafka_conf_new();
    if (kafka_conf_set(conf, "bootstrap.servers", brokers, err, errlen) ||
        kafka_conf_set(conf, "enable.partition.eof", "true", err, errlen) ||
        /* a tail is a few records already there: no waiting for more, no prefetching ahead */
        kafka_conf_set(conf, "fetch.wait.max.ms", "10", err, errlen) ||
        /* an offset gone (retention) is an error, not a silent jump to the end */
        kafka_conf_set(conf, "auto.offset.reset", "error", err, errlen) ||
        kafka_conf_set(conf, "queued.max.messages.kbytes", "1024", err, errlen) ||
        kafka_conf_set(conf, "log_level", "4", err, errlen)) {
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    for (const char *const *k = kafka_keys; *k; k++) {
        const char *v = s->host->config_get(s->host, *k);
        if (v && (!strncmp(*k, "kafka.s", 7) || !strcmp(*k, "kafka.client.id")) &&
            strcmp(*k, "kafka.socket.timeout.ms") != 0 && kafka_conf_set(conf, *k + 6, v, err, errlen)) {
            rd_kafka_conf_destroy(conf);
            return -1;
        }
    }
    s->tail_rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof errstr);
    if (!s->tail_rk) {
        snprintf(err, errlen, "kafka: cannot create the consumer that reads partition tails: %s", errstr);
        return -1;
    }
    return 0;
}

static const char *kafka_header(rd_kafka_headers_t *h, const char *name, char *buf, size_t buflen)
{
    const void *v;
    size_t len;

    if (!h || rd_kafka_header_get_last(h, name, &v, &len) != RD_KAFKA_RESP_ERR_NO_ERROR || !v || len >= buflen)
        return NULL;
    memcpy(buf, v, len);
    buf[len] = '\0';
    return buf;
}

/* Parses "X/Y" into an LSN.  Returns 0 on success. */
static int kafka_parse_lsn(const char *text, uint64_t *lsn)
{
    unsigned hi, lo;
    char tail;

    if (sscanf(text, "%X/%X%c", &hi, &lo, &tail) != 2)
        return -1;
    *lsn = ((uint64_t)hi << 32) | lo;
    return 0;
}

/* Reads one partition's tail for a source: the last record in [low, high) carrying this
 * source's headers and no replay mark, searching back window by window.  t->known stays 0
 * when there is none.  Returns 0, or -1 with err set (broker unreachable: RETRY). */
static int kafka_read_tail(kafka_session_t *s, const char *source, const char *topic, int32_t part, kafka_tail_t *t,
                           char *err, size_t errlen)
{
    int64_t low = 0, high = 0;
    rd_kafka_resp_err_t rerr;
    rd_kafka_topic_t *rkt = NULL;
    int rc = -1;

    memset(t, 0, sizeof *t);
    if (kafka_tail_consumer(s, err, errlen))
        return -1;
    rerr = rd_kafka_query_watermark_offsets(s->tail_rk, topic, part, &low, &high, KAFKA_META_TIMEOUT_MS);
    if (rerr) {
        snprintf(err, errlen, "kafka: cannot read the offsets of %s [%" PRId32 "]: %s", topic, part,
                 rd_kafka_err2str(rerr));
        return -1;
    }
    if (high <= low)
        return 0;
    rkt = rd_kafka_topic_new(s->tail_rk, topic, NULL);
    for (int64_t end = high; end > low && !t->known;) {
        int64_t start = end - KAFKA_TAIL_WINDOW > low ? end - KAFKA_TAIL_WINDOW : low;
        int64_t next = start;
        int64_t deadline = 0;
        struct timespec now;

        if (rd_kafka_consume_start(rkt, part, start) == -1) {
            snprintf(err, errlen, "kafka: cannot read %s [%" PRId32 "]: %s", topic, part,
                     rd_kafka_err2str(rd_kafka_last_error()));
            goto out;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        deadline = (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000 + KAFKA_META_TIMEOUT_MS * 3;
        while (next < end) {
            rd_kafka_message_t *m = rd_kafka_consume(rkt, part, 500);
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (!m) {
                if ((int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000 > deadline) {
                    snprintf(err, errlen, "kafka: timed out reading the tail of %s [%" PRId32 "]", topic, part);
                    rd_kafka_consume_stop(rkt, part);
                    goto out;
                }
                continue;
            }
            if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF && m->offset >= end) {
                rd_kafka_message_destroy(m);
                break;
            }
            if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) { /* the end seen before the window's: not yet */
                rd_kafka_message_destroy(m);
                continue;
            }
            if (m->err) {
                snprintf(err, errlen, "kafka: reading the tail of %s [%" PRId32 "]: %s", topic, part,
                         rd_kafka_message_errstr(m));
                rd_kafka_message_destroy(m);
                rd_kafka_consume_stop(rkt, part);
                goto out;
            }
            if (m->offset >= start && m->offset < end) {
                rd_kafka_headers_t *h = NULL;
                char src[256], lsn[64], seq[32], rec[16], rp[8];
                uint64_t l;
                rd_kafka_message_headers(m, &h);
                if (kafka_header(h, "walpipe.source", src, sizeof src) && !strcmp(src, source) &&
                    !kafka_header(h, "walpipe.replay", rp, sizeof rp) &&
                    kafka_header(h, "walpipe.lsn", lsn, sizeof lsn) && !kafka_parse_lsn(lsn, &l) &&
                    kafka_header(h, "walpipe.seq", seq, sizeof seq) && kafka_header(h, "walpipe.rec", rec, sizeof rec)) {
                    t->known = 1; /* later offsets overwrite: the last one wins */
                    t->lsn = l;
                    t->seq = (int32_t)strtol(seq, NULL, 10);
                    t->rec = (int32_t)strtol(rec, NULL, 10);
                }
            }
            next = m->offset + 1;
            rd_kafka_message_destroy(m);
        }
        rd_kafka_consume_stop(rkt, part);
        if (next < end) {
            /* fail closed: a tail not read to its end must not pass for "nothing of this source" */
            snprintf(err, errlen, "kafka: read %s [%" PRId32 "] only to offset %" PRId64 " of %" PRId64, topic, part,
                     next, end);
            goto out;
        }
        end = start;
    }
    rc = 0;
out:
    if (rkt)
        rd_kafka_topic_destroy(rkt);
    return rc;
}

/* The session's entry for (source, topic), created on first use: the topic's partition count
 * from the cluster (a producer's metadata request creates a missing topic when the broker
 * allows it) and each partition's tail.  Returns NULL with err set. */
static kafka_topic_t *kafka_topic_get(kafka_session_t *s, const char *source, const char *name, char *err,
                                      size_t errlen)
{
    unsigned b = kafka_hash(source, name);
    kafka_topic_t *t;
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_resp_err_t rerr;

    for (t = s->buckets[b]; t; t = t->next)
        if (!strcmp(t->name, name) && !strcmp(t->source, source))
            return t;
    t = calloc(1, sizeof *t);
    if (!t || !(t->source = strdup(source)) || !(t->name = strdup(name))) {
        snprintf(err, errlen, "kafka: out of memory");
        goto fail;
    }
    t->rkt = rd_kafka_topic_new(s->rk, name, NULL);
    if (!t->rkt) {
        snprintf(err, errlen, "kafka: topic %s: %s", name, rd_kafka_err2str(rd_kafka_last_error()));
        goto fail;
    }
    for (int attempt = 0; attempt < 20; attempt++) {
        rerr = rd_kafka_metadata(s->rk, 0, t->rkt, &md, KAFKA_META_TIMEOUT_MS);
        if (rerr) {
            snprintf(err, errlen, "kafka: no metadata for topic %s: %s", name, rd_kafka_err2str(rerr));
            goto fail;
        }
        if (md->topic_cnt == 1 && md->topics[0].err == RD_KAFKA_RESP_ERR_NO_ERROR && md->topics[0].partition_cnt > 0)
            break;
        rerr = md->topic_cnt == 1 ? md->topics[0].err : RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC;
        rd_kafka_metadata_destroy(md);
        md = NULL;
        if (rerr != RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE && rerr != RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART &&
            rerr != RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC) {
            snprintf(err, errlen, "kafka: topic %s: %s", name, rd_kafka_err2str(rerr));
            goto fail;
        }
        rd_kafka_poll(s->rk, 250); /* being created: ask again */
    }
    if (!md) {
        snprintf(err, errlen, "kafka: topic %s does not exist and was not created (auto.create.topics.enable?)", name);
        goto fail;
    }
    t->partitions = md->topics[0].partition_cnt;
    rd_kafka_metadata_destroy(md);
    t->tails = calloc((size_t)t->partitions, sizeof *t->tails);
    if (!t->tails) {
        snprintf(err, errlen, "kafka: out of memory");
        goto fail;
    }
    for (int32_t p = 0; p < t->partitions; p++) {
        if (kafka_read_tail(s, source, name, p, &t->tails[p], err, errlen))
            goto fail;
        if (t->tails[p].known)
            kafka_log(s, WP_SINK_LOG_DEBUG, "%s [%" PRId32 "] holds %s up to %X/%X seq %" PRId32 " record %" PRId32,
                      name, p, source, (unsigned)(t->tails[p].lsn >> 32), (unsigned)t->tails[p].lsn,
                      t->tails[p].seq, t->tails[p].rec);
    }
    t->next = s->buckets[b];
    s->buckets[b] = t;
    return t;
fail:
    if (t) {
        if (t->rkt)
            rd_kafka_topic_destroy(t->rkt);
        free(t->tails);
        free(t->source);
        free(t->name);
        free(t);
    }
    return NULL;
}

/* ---- the ABI --------------------------------------------------------------------------------- */

static void kafka_close(void *state);

static int kafka_open(const wp_sink_host_t *host, void **state, char *err, size_t errlen)
{
    kafka_session_t *s = calloc(1, sizeof *s);
    const char *brokers = host->config_get(host, "brokers");
    const char *v;
    rd_kafka_conf_t *conf = NULL;
    char errstr[256];
    int rc = WP_SINK_FATAL;

    *state = NULL;
    if (!s) {
        snprintf(err, errlen, "kafka: out of memory");
        return WP_SINK_RETRY;
    }
    s->host = host;
    if (!brokers || !*brokers) {
        snprintf(err, errlen, "kafka: brokers is not set (e.g. brokers = host1:9092,host2:9092)");
        goto out;
    }
    if ((v = host->config_get(host, "topic_prefix")) && *v && !(s->topic_prefix = strdup(v)))
        goto oom;
    if ((v = host->config_get(host, "database")) && *v && !(s->database = strdup(v)))
        goto oom;
    s->dbz.database = s->database;
    if (kafka_parse_bool(host->config_get(host, "schemas_enable"), 1, &s->dbz.schemas_enable)) {
        snprintf(err, errlen, "kafka: schemas_enable must be true or false");
        goto out;
    }
    if (kafka_parse_bool(host->config_get(host, "tombstones_on_delete"), 1, &s->tombstones)) {
        snprintf(err, errlen, "kafka: tombstones_on_delete must be true or false");
        goto out;
    }
    v = host->config_get(host, "decimal_handling_mode");
    if (!v || !strcmp(v, "precise"))
        s->dbz.decimal_mode = WP_DBZ_DECIMAL_PRECISE;
    else if (!strcmp(v, "string"))
        s->dbz.decimal_mode = WP_DBZ_DECIMAL_STRING;
    else if (!strcmp(v, "double"))
        s->dbz.decimal_mode = WP_DBZ_DECIMAL_DOUBLE;
    else {
        snprintf(err, errlen, "kafka: decimal_handling_mode must be precise, string or double, not '%s'", v);
        goto out;
    }
    s->ring_cap = 10000;
    if ((v = host->config_get(host, "queue_max_events"))) {
        char *end;
        long n = strtol(v, &end, 10);
        if (*end || n < 1 || n > 1000000) {
            snprintf(err, errlen, "kafka: queue_max_events must be 1..1000000, not '%s'", v);
            goto out;
        }
        s->ring_cap = (size_t)n;
    }
    s->ring = calloc(s->ring_cap, sizeof *s->ring);
    s->dbz.tables = wp_dbz_tables_new(); /* column lists learnt from rows: unchanged TOAST placeholders */
    if (!s->ring || !s->dbz.tables)
        goto oom;
    conf = kafka_producer_conf(s, brokers, err, errlen);
    if (!conf)
        goto out;
    s->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    if (!s->rk) {
        snprintf(err, errlen, "kafka: cannot create the producer: %s", errstr);
        goto out;
    }
    conf = NULL; /* the producer owns it */
    rd_kafka_set_log_queue(s->rk, NULL);
    *state = s;
    s = NULL;
    rc = WP_SINK_OK;
    goto out;
oom:
    snprintf(err, errlen, "kafka: out of memory");
    rc = WP_SINK_RETRY;
out:
    if (conf)
        rd_kafka_conf_destroy(conf);
    if (s)
        kafka_close(s);
    return rc;
}

/* Waits (serving reports) until the ring has a free slot.  Returns WP_SINK_OK or the failure. */
static int kafka_wait_slot(kafka_session_t *s, char *err, size_t errlen)
{
    int waited = 0;

    while (s->ring_tail - s->ring_head >= s->ring_cap) {
        int rc = kafka_serve(s, 100, err, errlen);
        if (rc != WP_SINK_OK)
            return rc;
        if ((waited += 100) >= KAFKA_BLOCK_MS) {
            snprintf(err, errlen, "kafka: %zu events not acknowledged for %d s: brokers unreachable?", s->ring_cap,
                     KAFKA_BLOCK_MS / 1000);
            return WP_SINK_RETRY;
        }
    }
    return WP_SINK_OK;
}

/* Decimal text of v into b (at least 12 bytes); returns its length.  (snprintf, 3 per record, was
   a tenth of the plugin's own time.) */
static size_t kafka_dec_text(char *b, int32_t v)
{
    char tmp[12];
    size_t n = 0, o = 0;
    uint32_t u = v < 0 ? 0u - (uint32_t)v : (uint32_t)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        b[o++] = '-';
    while (n)
        b[o++] = tmp[--n];
    b[o] = '\0';
    return o;
}

/* An LSN as PostgreSQL prints it, "%X/%X" (upper-case hex, no leading zeros), into b (at least
   18 bytes); returns its length. */
static size_t kafka_lsn_text(char *b, uint64_t lsn)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    for (int half = 0; half < 2; half++) {
        uint32_t v = half ? (uint32_t)lsn : (uint32_t)(lsn >> 32);
        int shift = 28;
        while (shift > 0 && !(v >> shift))
            shift -= 4;
        for (; shift >= 0; shift -= 4)
            b[o++] = hex[(v >> shift) & 15];
        if (!half)
            b[o++] = '/';
    }
    b[o] = '\0';
    return o;
}

/* Produces one record into its computed partition with walpipe's headers; on a full queue waits.
 * The value's buffer goes to librdkafka (RD_KAFKA_MSG_F_FREE, no copy): on success r->value is
 * NULL after the call; the key is copied. */
static int kafka_produce(kafka_session_t *s, const wp_sink_event_t *ev, kafka_topic_t *t, int32_t part,
                         wp_dbz_record_t *r, int rec, uint64_t slot, char *err, size_t errlen)
{
    char lsn[32], seq[16], recs[16];
    rd_kafka_headers_t *h = rd_kafka_headers_new(6);
    rd_kafka_resp_err_t rerr;
    int waited = 0;

    size_t nlsn = kafka_lsn_text(lsn, ev->lsn);
    size_t nseq = kafka_dec_text(seq, ev->seq);
    size_t nrec = kafka_dec_text(recs, rec);
    rd_kafka_header_add(h, "walpipe.source", 14, ev->source, -1);
    rd_kafka_header_add(h, "walpipe.lsn", 11, lsn, (ssize_t)nlsn);
    rd_kafka_header_add(h, "walpipe.seq", 11, seq, (ssize_t)nseq);
    rd_kafka_header_add(h, "walpipe.rec", 11, recs, (ssize_t)nrec);
    if (ev->replay)
        rd_kafka_header_add(h, "walpipe.replay", -1, "1", 1);
    if (r->header_name)
        rd_kafka_header_add(h, r->header_name, -1, r->header_value, (ssize_t)r->header_value_len);
    for (;;) {
        rerr = rd_kafka_producev(s->rk, RD_KAFKA_V_RKT(t->rkt), RD_KAFKA_V_PARTITION(part),
                                 RD_KAFKA_V_MSGFLAGS(r->value ? RD_KAFKA_MSG_F_FREE : RD_KAFKA_MSG_F_COPY),
                                 RD_KAFKA_V_KEY(r->key, r->key_len),
                                 RD_KAFKA_V_VALUE(r->value, r->value_len), RD_KAFKA_V_HEADERS(h),
                                 RD_KAFKA_V_OPAQUE((void *)(uintptr_t)slot), RD_KAFKA_V_END);
        if (rerr != RD_KAFKA_RESP_ERR__QUEUE_FULL)
            break;
        int rc = kafka_serve(s, 100, err, errlen);
        if (rc != WP_SINK_OK) {
            rd_kafka_headers_destroy(h);
            return rc;
        }
        if ((waited += 100) >= KAFKA_BLOCK_MS) {
            rd_kafka_headers_destroy(h);
            snprintf(err, errlen, "kafka: producer queue full for %d s: brokers unreachable?", KAFKA_BLOCK_MS / 1000);
            return WP_SINK_RETRY;
        }
    }
    if (rerr) {
        rd_kafka_headers_destroy(h);
        snprintf(err, errlen, "kafka: cannot produce to %s: %s", t->name, rd_kafka_err2str(rerr));
        return rerr == RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE ? WP_SINK_FATAL : WP_SINK_RETRY;
    }
    r->value = NULL; /* librdkafka's now (F_FREE), like h */
    r->value_len = 0;
    return WP_SINK_OK;
}

static int kafka_deliver_one(kafka_session_t *s, const wp_sink_event_t *ev, char *err, size_t errlen)
{
    wp_dbz_record_t recs[3];
    int n, rc;
    uint64_t slot;
    kafka_slot_t *e;

    memset(recs, 0, sizeof recs);
    rc = kafka_wait_slot(s, err, errlen);
    if (rc != WP_SINK_OK)
        return rc;
    s->dbz.topic_prefix = s->topic_prefix ? s->topic_prefix : ev->source;
    n = wp_dbz_encode(&s->dbz, ev, s->tombstones, recs, err, errlen);
    if (n < 0)
        return WP_SINK_FATAL; /* an event the encoder cannot express: the reason names it */
    slot = s->ring_tail++;
    e = &s->ring[slot % s->ring_cap];
    e->ticket = ev->ticket;
    e->remaining = n;
    for (int i = 0; i < n; i++) {
        kafka_topic_t *t = kafka_topic_get(s, ev->source, recs[i].topic, err, errlen);
        int32_t part;
        if (!t) {
            rc = WP_SINK_RETRY;
            break;
        }
        part = kafka_partition_of(recs[i].key, recs[i].key_len, t->partitions);
        if (!ev->replay && t->tails[part].known &&
            kafka_cmp_identity(ev->lsn, ev->seq, i + 1, &t->tails[part]) <= 0) {
            e->remaining--; /* already in the partition: durable as it is */
            if (s->skipped++ == 0)
                kafka_log(s, WP_SINK_LOG_INFO, "%s [%" PRId32 "] already holds %X/%X seq %" PRId32
                          ": redelivered records found in their partitions are not sent again",
                          t->name, part, (unsigned)(ev->lsn >> 32), (unsigned)ev->lsn, ev->seq);
            continue;
        }
        rc = kafka_produce(s, ev, t, part, &recs[i], i + 1, slot, err, errlen);
        if (rc != WP_SINK_OK)
            break;
    }
    for (int i = 0; i < n; i++)
        wp_dbz_record_free(&recs[i]);
    return rc;
}

static int kafka_deliver(void *state, const wp_sink_event_t *events, size_t n, char *err, size_t errlen)
{
    kafka_session_t *s = state;

    for (size_t i = 0; i < n; i++) {
        int rc = kafka_deliver_one(s, &events[i], err, errlen);
        if (rc != WP_SINK_OK)
            return rc;
    }
    return kafka_serve(s, 0, err, errlen);
}

static int kafka_poll(void *state, int timeout_ms, uint64_t *durable, char *err, size_t errlen)
{
    kafka_session_t *s = state;
    int rc = kafka_serve(s, timeout_ms, err, errlen);

    *durable = s->durable;
    return rc;
}

static int kafka_flush(void *state, int timeout_ms, uint64_t *durable, char *err, size_t errlen)
{
    kafka_session_t *s = state;
    struct timespec t0, now;
    int rc = WP_SINK_OK;

    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        long left;
        rc = kafka_serve(s, 0, err, errlen);
        if (rc != WP_SINK_OK || s->ring_head == s->ring_tail)
            break;
        clock_gettime(CLOCK_MONOTONIC, &now);
        left = timeout_ms - ((now.tv_sec - t0.tv_sec) * 1000 + (now.tv_nsec - t0.tv_nsec) / 1000000);
        if (left <= 0)
            break;
        rd_kafka_flush(s->rk, left < 100 ? (int)left : 100);
    }
    *durable = s->durable;
    return rc;
}

static void kafka_close(void *state)
{
    kafka_session_t *s = state;

    if (!s)
        return;
    if (s->rk) {
        /* outstanding records get their chance to land before the next session reads tails */
        if (rd_kafka_flush(s->rk, KAFKA_CLOSE_FLUSH_MS) != RD_KAFKA_RESP_ERR_NO_ERROR)
            kafka_log(s, WP_SINK_LOG_WARN, "closing with %d records unacknowledged; the next session sends "
                                           "them again unless a partition's tail shows them",
                      rd_kafka_outq_len(s->rk));
        s->closing = 1;
        rd_kafka_purge(s->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        rd_kafka_poll(s->rk, 0);
    }
    if (s->skipped)
        kafka_log(s, WP_SINK_LOG_INFO, "%" PRIu64 " records were already in their partitions and not sent again",
                  s->skipped);
    for (int b = 0; b < KAFKA_TOPIC_BUCKETS; b++) {
        for (kafka_topic_t *t = s->buckets[b], *next; t; t = next) {
            next = t->next;
            rd_kafka_topic_destroy(t->rkt);
            free(t->tails);
            free(t->source);
            free(t->name);
            free(t);
        }
    }
    if (s->rk)
        rd_kafka_destroy(s->rk);
    if (s->tail_rk)
        rd_kafka_destroy(s->tail_rk);
    wp_dbz_tables_free(s->dbz.tables);
    free(s->ring);
    free(s->topic_prefix);
    free(s->database);
    free(s);
}

static const wp_sink_plugin_t kafka_plugin = {
    .abi_version = WP_SINK_ABI_VERSION,
    .name = "kafka",
    .keys = kafka_keys,
    .open = kafka_open,
    .deliver = kafka_deliver,
    .poll = kafka_poll,
    .flush = kafka_flush,
    .close = kafka_close,
};

WP_SINK_EXPORT const wp_sink_plugin_t *wp_sink_plugin_entry(void);

WP_SINK_EXPORT const wp_sink_plugin_t *wp_sink_plugin_entry(void)
{
    return &kafka_plugin;
}

/*
 * kafka_driver: drives a sink plugin (.so) the way walpipe's sink core does, without
 * PostgreSQL, for tests of the Kafka plugin's delivery (tests/integration/test_kafka.py).
 *
 *   kafka_driver PLUGIN.so STATEFILE EVENTS [-o key=value]... [--delay-ms N] [--dump]
 *
 * It generates EVENTS synthetic events of source "drv" (a deterministic mix of inserts,
 * updates and deletes over 50 keys of public.t, inserts into the key-less public.nokey, and
 * truncates), four per transaction, with tickets = index + 1.  Like the core, it keeps a
 * durable position in STATEFILE (written by rename, only as far as the plugin reports
 * durable, and not after every report, so a SIGKILL leaves events to deliver again) and
 * starts after it.  It exits 0 when every event is durable, printing "done <skipped?>".
 * --delay-ms paces it (a pause after each batch of 64) so a test can kill it mid-stream.
 * --dump prints the events as JSON lines instead (the test's truth of what was sent).
 */
#include <dlfcn.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <walpipe/sink.h>

#define DRV_KEYS 50
#define DRV_BATCH 64
#define DRV_MAX_OPTS 32

typedef struct drv_event {
    uint64_t lsn;
    int32_t seq;
    const char *op;
    const char *table;
    int keyed;
    char payload[160];
} drv_event_t;

static const char *drv_keys[DRV_MAX_OPTS][2];
static int drv_nkeys;

static const char *drv_config_get(const wp_sink_host_t *host, const char *key)
{
    (void)host;
    for (int i = 0; i < drv_nkeys; i++)
        if (!strcmp(drv_keys[i][0], key))
            return drv_keys[i][1];
    return NULL;
}

static void drv_log(const wp_sink_host_t *host, int level, const char *message)
{
    (void)host;
    fprintf(stderr, "driver plugin log %d: %s\n", level, message);
}

/* Event i, deterministically. */
static void drv_make(uint64_t i, drv_event_t *e)
{
    uint64_t k = i % DRV_KEYS, round = i / DRV_KEYS;

    e->lsn = 0x16B0000ull + (i / 4) * 0x100;
    e->seq = (int32_t)(i % 4) + 1;
    e->keyed = 1;
    e->table = "t";
    if (i % 13 == 5) {
        e->op = "insert";
        e->table = "nokey";
        e->keyed = 0;
        snprintf(e->payload, sizeof e->payload, "{\"after\":{\"v\":%" PRIu64 "}}", i);
    } else if (i % 997 == 500) {
        e->op = "truncate";
        snprintf(e->payload, sizeof e->payload, "{}");
    } else if (round % 4 == 0) {
        e->op = "insert";
        snprintf(e->payload, sizeof e->payload, "{\"after\":{\"id\":%" PRIu64 ",\"v\":%" PRIu64 "}}", k, i);
    } else if (round % 4 == 3) {
        e->op = "delete";
        snprintf(e->payload, sizeof e->payload, "{\"key\":{\"id\":%" PRIu64 "}}", k);
    } else {
        e->op = "update";
        snprintf(e->payload, sizeof e->payload, "{\"after\":{\"id\":%" PRIu64 ",\"v\":%" PRIu64 "},\"key\":{\"id\":%" PRIu64 "}}",
                 k, i, k);
    }
}

static uint64_t drv_read_state(const char *path)
{
    FILE *f = fopen(path, "r");
    uint64_t v = 0;

    if (f) {
        if (fscanf(f, "%" SCNu64, &v) != 1)
            v = 0;
        fclose(f);
    }
    return v;
}

static int drv_write_state(const char *path, uint64_t v)
{
    char tmp[4096];
    FILE *f;

    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    if (!(f = fopen(tmp, "w")))
        return -1;
    fprintf(f, "%" PRIu64 "\n", v);
    if (fclose(f) != 0)
        return -1;
    return rename(tmp, path);
}

static int64_t drv_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int main(int argc, char **argv)
{
    static const char cols[] = "[{\"name\":\"id\",\"type\":\"integer\",\"typeoid\":23},{\"name\":\"v\",\"type\":\"bigint\",\"typeoid\":20}]";
    static const char kcols[] = "[{\"name\":\"id\",\"type\":\"integer\",\"typeoid\":23}]";
    static const char nkcols[] = "[{\"name\":\"v\",\"type\":\"bigint\",\"typeoid\":20}]";
    wp_sink_host_t host = {WP_SINK_ABI_VERSION, "drv", drv_config_get, drv_log, NULL};
    const wp_sink_plugin_t *p;
    void *dl, *state = NULL;
    wp_sink_entry_fn entry;
    char err[512] = "";
    uint64_t total, pos, durable = 0, next;
    int dump = 0, rc, delay_ms = 0;
    int64_t last_write = 0;

    if (argc < 4) {
        fprintf(stderr, "usage: kafka_driver PLUGIN.so STATEFILE EVENTS [-o key=value]... [--dump]\n");
        return 2;
    }
    total = strtoull(argv[3], NULL, 10);
    for (int i = 4; i < argc; i++) {
        if (!strcmp(argv[i], "--dump")) {
            dump = 1;
        } else if (!strcmp(argv[i], "--delay-ms") && i + 1 < argc) {
            delay_ms = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "-o") && i + 1 < argc && drv_nkeys < DRV_MAX_OPTS) {
            char *eq = strchr(argv[++i], '=');
            if (!eq)
                return 2;
            *eq = '\0';
            drv_keys[drv_nkeys][0] = argv[i];
            drv_keys[drv_nkeys++][1] = eq + 1;
        } else {
            return 2;
        }
    }
    if (dump) {
        for (uint64_t i = 0; i < total; i++) {
            drv_event_t e;
            drv_make(i, &e);
            printf("{\"lsn\":%" PRIu64 ",\"seq\":%d,\"op\":\"%s\",\"table\":\"%s\",\"payload\":%s}\n", e.lsn, e.seq,
                   e.op, e.table, e.payload);
        }
        return 0;
    }
    dl = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!dl || !(entry = (wp_sink_entry_fn)dlsym(dl, WP_SINK_ENTRY_SYMBOL))) {
        fprintf(stderr, "driver: %s\n", dlerror());
        return 1;
    }
    p = entry();
    pos = drv_read_state(argv[2]); /* events 0..pos-1 are durable */
    fprintf(stderr, "driver: starting after %" PRIu64 " durable events\n", pos);
    rc = p->open(&host, &state, err, sizeof err);
    if (rc != WP_SINK_OK)
        goto fail;
    next = pos;
    durable = pos; /* a session that starts with everything durable has nothing to do */
    while (durable < total) {
        wp_sink_event_t evs[DRV_BATCH];
        drv_event_t raw[DRV_BATCH];
        size_t n = 0;
        uint64_t d = 0;

        for (; n < DRV_BATCH && next < total; n++, next++) {
            drv_make(next, &raw[n]);
            memset(&evs[n], 0, sizeof evs[n]);
            evs[n].ticket = next + 1;
            evs[n].source = "drv";
            evs[n].lsn = raw[n].lsn;
            evs[n].seq = raw[n].seq;
            evs[n].op = raw[n].op;
            evs[n].schema = "public";
            evs[n].table = raw[n].table;
            evs[n].xid = 1000 + (int64_t)(next / 4);
            evs[n].commit_us = 1700000000000000ll + (int64_t)next;
            evs[n].payload = raw[n].payload;
            evs[n].payload_len = strlen(raw[n].payload);
            evs[n].columns = raw[n].keyed ? cols : nkcols;
            evs[n].key_columns = raw[n].keyed ? kcols : NULL;
        }
        if (n && (rc = p->deliver(state, evs, n, err, sizeof err)) != WP_SINK_OK)
            goto fail;
        if (n && delay_ms) {
            struct timespec ts = {delay_ms / 1000, (long)(delay_ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
        if ((rc = p->poll(state, next < total ? 0 : 100, &d, err, sizeof err)) != WP_SINK_OK)
            goto fail;
        if (d > durable)
            durable = d;
        if (durable > pos && (drv_now_ms() - last_write >= 200 || durable == total)) {
            if (drv_write_state(argv[2], durable) != 0) {
                fprintf(stderr, "driver: cannot write %s\n", argv[2]);
                return 1;
            }
            pos = durable;
            last_write = drv_now_ms();
        }
    }
    p->close(state);
    printf("done\n");
    /* no dlclose: the library stays mapped, so leak reports can name its functions */
    return 0;
fail:
    fprintf(stderr, "driver: plugin says %s: %s\n", rc == WP_SINK_RETRY ? "RETRY" : "FATAL", err);
    if (state)
        p->close(state);
    /* no dlclose: the library stays mapped, so leak reports can name its functions */
    return rc == WP_SINK_RETRY ? 3 : 4;
}
